"""Per-endpoint, per-identity rate limits (vastai-api.md "Rate limits and retries").

A minimum interval between calls (create 4.5 s, destroy 3 s, show one 2 s, list 1 s, start/stop/label 1 s)
and ~10 searches a minute; every interval is a real-world delay, so it is scaled by the time profile.
A refused call does not move the window. Continuation pages of a listing are exempt (the CLI fetches them
back to back). The answer is 429 with a plain-text body and no ``Retry-After``.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Final

from aiohttp import web

from sim.vast.replies import text_reply

# endpoint → minimum real-world seconds between calls by one identity
MIN_INTERVALS: Final[dict[str, float]] = {
    "create": 4.5,
    "destroy": 3.0,
    "show": 2.0,
    "list": 1.0,
    "manage": 1.0,
}
SEARCH_WINDOW: Final = 60.0
SEARCH_PER_WINDOW: Final = 10


@dataclass
class RateLimiter:
    scale: float  # wall seconds per real-world second (1 / acceleration)
    enabled: bool = True
    overrides: dict[str, float] = field(default_factory=dict)
    _last: dict[tuple[str, str], float] = field(default_factory=dict)
    _searches: dict[str, deque[float]] = field(default_factory=dict)
    refused: int = 0

    def interval(self, endpoint: str) -> float:
        """The real-world interval for ``endpoint`` (0 = unlimited)."""
        return self.overrides.get(endpoint, MIN_INTERVALS.get(endpoint, 0.0))

    def check(self, identity: str, endpoint: str, now: float) -> web.Response | None:
        """``None`` to let the call through (and count it), else the 429 to send."""
        if not self.enabled:
            return None
        if endpoint == "search":
            window = self._searches.setdefault(identity, deque())
            span = self.overrides.get("search_window", SEARCH_WINDOW) * self.scale
            while window and now - window[0] >= span:
                window.popleft()
            if len(window) >= int(self.overrides.get("search", SEARCH_PER_WINDOW)):
                return self._refuse(f"API requests too frequent endpoint threshold={SEARCH_PER_WINDOW}/min")
            window.append(now)
            return None
        real = self.interval(endpoint)
        if real <= 0:
            return None
        key = (identity, endpoint)
        last = self._last.get(key)
        if last is not None and now - last < real * self.scale:
            return self._refuse(f"API requests too frequent endpoint threshold={real:g}")
        self._last[key] = now
        return None

    def _refuse(self, text: str) -> web.Response:
        self.refused += 1
        return text_reply(text, 429)
