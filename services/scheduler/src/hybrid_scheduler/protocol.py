"""Which PoC protocol an MLNode image speaks, so the scheduler never plans a window it cannot win.

gonka-protocol.md §7: ``3.0.11-post1`` speaks PoC v1 only; ``3.0.12`` and later (``product-science/mlnode:3.0.12*``,
``ghcr.io/gonka-ai/mlnode:3.0.13+``) speak v2, where PoC runs inside vLLM on the served model. The chain's
``poc_v2_enabled`` flag chooses; the image is configuration.
"""

from __future__ import annotations

import re

from hybrid_common.messages.domain import PocGeneration

_VERSION = re.compile(r"mlnode:v?(\d+)\.(\d+)\.(\d+)")
_PROFILE_GEN = re.compile(r"-(v[12])$")


class IncompatibleImage(ValueError):
    """The configured image or profile cannot speak the chain's PoC protocol."""


def image_generations(image: str) -> frozenset[str] | None:
    """The PoC generations an MLNode image speaks, or ``None`` when its version cannot be read from the reference."""
    m = _VERSION.search(image)
    if m is None:
        return None
    version = tuple(int(x) for x in m.groups())
    if version < (3, 0, 12):
        return frozenset({"v1"})
    return frozenset({"v1", "v2"})


def check(generation: PocGeneration, profile: str, image: str | None) -> None:
    """Raise :class:`IncompatibleImage` with a clear reason when the profile or image cannot do ``generation``."""
    named = _PROFILE_GEN.search(profile)
    if named is not None and named.group(1) != generation:
        raise IncompatibleImage(
            f"the chain runs PoC {generation} (poc_v2_enabled={generation == 'v2'}) but profile {profile!r} is a "
            f"{named.group(1)} profile: set SCHEDULER_PROFILE_{generation.upper()} to a {generation} profile"
        )
    if image is None:
        return
    speaks = image_generations(image)
    if speaks is not None and generation not in speaks:
        raise IncompatibleImage(
            f"the chain runs PoC {generation} but image {image!r} speaks only {', '.join(sorted(speaks))} "
            f"(gonka-protocol.md §7: 3.0.11 is v1 only; v2 needs mlnode 3.0.12+): refusing to plan this window"
        )
