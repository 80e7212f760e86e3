"""Per-key request rate limiting, as Hyperbolic does it (inference-proxy.md: 60 req/min basic,
600 pro; over the limit → 429).

A sliding window per API key. The window is one real-world minute scaled by the time profile, like
every other real-world interval in the simulated world.
"""

from __future__ import annotations

import time
from collections import deque


class SlidingWindowLimiter:
    def __init__(self, limit: int | None, window_s: float) -> None:
        self.limit = limit
        self.window_s = window_s
        self._hits: dict[str, deque[float]] = {}

    def allow(self, key: str, now: float | None = None) -> bool:
        """Record one request for ``key`` if it fits in the window; refused requests are not recorded."""
        if self.limit is None:
            return True
        t = time.monotonic() if now is None else now
        hits = self._hits.get(key)
        if hits is None:
            hits = self._hits[key] = deque()
        horizon = t - self.window_s
        while hits and hits[0] <= horizon:
            hits.popleft()
        if len(hits) >= self.limit:
            return False
        hits.append(t)
        return True

    def reset(self) -> None:
        self._hits.clear()
