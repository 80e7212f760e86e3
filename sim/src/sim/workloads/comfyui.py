"""The vastai/comfy image's services inside a simulated instance.

comfyui.md: ComfyUI itself listens on 127.0.0.1:18188 without auth; 8188 is a Caddy proxy that wants
``Authorization: Bearer <WEB_PASSWORD or OPEN_BUTTON_TOKEN>``, Basic ``vastai:<WEB_PASSWORD>`` or ``?token=``
(401 otherwise), unless ``ENABLE_AUTH=false`` / ``AUTH_EXCLUDE=8188``. Nothing starts unless
``PORTAL_CONFIG`` names ComfyUI. When ``sim.comfyui.start_comfyui`` is importable it runs; until then a
stand-in answers ``/system_stats``.
"""

from __future__ import annotations

import base64
import importlib
import secrets
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from hybrid_common import TimeProfile
from sim.workloads.http_service import HttpService, json_body
from sim.workloads.images import COMFY_INTERNAL_PORT
from sim.workloads.service import Service


def portal_names_comfyui(env: dict[str, str]) -> bool:
    """comfyui.md: e.g. ``localhost:1111:11111:/:Instance Portal|localhost:8188:18188:/:ComfyUI``."""
    for entry in env.get("PORTAL_CONFIG", "").split("|"):
        fields = entry.split(":")
        if len(fields) >= 5 and ("comfyui" in fields[4].lower() or fields[2].strip() == str(COMFY_INTERNAL_PORT)):
            return True
    return False


def web_password(env: dict[str, str]) -> str | None:
    """The password the proxy enforces, or ``None`` when auth is off for 8188."""
    if env.get("ENABLE_AUTH", "").lower() in {"false", "0", "no"}:
        return None
    if "8188" in env.get("AUTH_EXCLUDE", "").replace(" ", "").split(","):
        return None
    # The image makes up a token when none is given: callers that did not set one are locked out.
    return env.get("WEB_PASSWORD") or env.get("OPEN_BUTTON_TOKEN") or secrets.token_hex(16)


class _Pair:
    def __init__(self, *services: Service) -> None:
        self._services = services

    async def close(self) -> None:
        for s in self._services:
            await s.close()


async def start_comfyui_service(
    *, port: int, internal_port: int, password: str | None, profile: TimeProfile, seed: int
) -> tuple[Service, str]:
    """Start the proxy (container 8188) and ComfyUI (container 18188) on the given host ports."""
    start = _simulator()
    if start is not None:
        comfy = await start(
            port=port,
            internal_port=internal_port,
            web_password=password,
            host="127.0.0.1",
            profile=profile,
            seed=seed,
        )
        return comfy, "sim.comfyui"
    inner = await HttpService.serve(_standin_app(None), internal_port)
    try:
        outer = await HttpService.serve(_standin_app(password), port)
    except BaseException:
        await inner.close()
        raise
    return _Pair(outer, inner), "stand-in"


def _simulator() -> Any:
    try:
        module = importlib.import_module("sim.comfyui")
    except ImportError:
        return None
    return getattr(module, "start_comfyui", None)


def _authorised(request: web.Request, password: str) -> bool:
    header = request.headers.get("Authorization", "")
    if header == f"Bearer {password}":
        return True
    if header.startswith("Basic "):
        try:
            user, _, given = base64.b64decode(header[6:]).decode().partition(":")
        except (ValueError, UnicodeDecodeError):
            return False
        return user == "vastai" and given == password
    return request.query.get("token") == password


def _standin_app(password: str | None) -> web.Application:
    @web.middleware
    async def auth(
        request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        if password is not None and not _authorised(request, password):
            return web.Response(status=401, text="Unauthorized")
        return await handler(request)

    async def system_stats(_: web.Request) -> web.Response:
        return json_body(
            {
                "system": {
                    "os": "posix",
                    "comfyui_version": "0.3.60",
                    "python_version": "3.12.3",
                    "pytorch_version": "2.7.1+cu128",
                    "argv": ["main.py", "--listen", "127.0.0.1", "--port", str(COMFY_INTERNAL_PORT)],
                },
                "devices": [{"name": "cuda:0", "type": "cuda", "index": 0}],
            }
        )

    app = web.Application(middlewares=[auth])
    app.router.add_get("/system_stats", system_stats)
    app.router.add_get("/api/system_stats", system_stats)
    return app
