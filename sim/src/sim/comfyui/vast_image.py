"""How the vastai/comfy image reads its environment (comfyui.md, "The images") — for the Vast.ai
simulator, which starts :func:`~sim.comfyui.start_comfyui` for instances of that image.

- ComfyUI starts only if ``PORTAL_CONFIG`` names it (e.g. ``localhost:8188:18188:/:ComfyUI``).
- The proxy on 8188 accepts ``WEB_PASSWORD`` / ``OPEN_BUTTON_TOKEN``; ``ENABLE_AUTH=false`` or an
  ``AUTH_EXCLUDE`` listing 8188 turns its auth off.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def portal_starts_comfyui(portal_config: str | None) -> bool:
    if not portal_config:
        return False
    for entry in portal_config.split("|"):
        fields = entry.split(":")
        # host:external_port:internal_port:path:name
        if len(fields) >= 5 and (fields[2] == "18188" or fields[4].strip().lower() == "comfyui"):
            return True
    return False


def launch_options_from_env(env: Mapping[str, str]) -> dict[str, Any] | None:
    """Keyword arguments for ``start_comfyui`` from an instance's env, or None if ComfyUI would not start."""
    if not portal_starts_comfyui(env.get("PORTAL_CONFIG")):
        return None
    excluded = {p.strip() for p in env.get("AUTH_EXCLUDE", "").split(",") if p.strip()}
    enable_auth = env.get("ENABLE_AUTH", "true").strip().lower() != "false" and "8188" not in excluded
    return {
        "web_password": env.get("WEB_PASSWORD") or None,
        "open_button_token": env.get("OPEN_BUTTON_TOKEN") or None,
        "enable_auth": enable_auth,
    }
