"""The block clock: the height is a pure function of (anchor time, block time, pause offsets).

Nothing here advances state; :class:`sim.network.scheduler.BlockScheduler` reads ``height()`` and
processes every height up to it in order, so a loaded machine delays blocks but never skips one.
Pausing freezes the height; jumping moves it forward (never back) without touching the block time.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable


class BlockClock:
    def __init__(self, block_seconds: float, start_height: int, now: Callable[[], float] = time.monotonic) -> None:
        if block_seconds <= 0:
            raise ValueError("block_seconds must be > 0")
        self._now = now
        self._block_seconds = block_seconds
        self._anchor_time = now()
        self._anchor_height = start_height
        self._paused_at: float | None = None

    @property
    def block_seconds(self) -> float:
        return self._block_seconds

    @property
    def paused(self) -> bool:
        return self._paused_at is not None

    def _elapsed(self) -> float:
        t = self._paused_at if self._paused_at is not None else self._now()
        return t - self._anchor_time

    def height(self) -> int:
        return self._anchor_height + math.floor(self._elapsed() / self._block_seconds)

    def time_of(self, height: int) -> float:
        """Monotonic time at which ``height`` begins (in the past for heights already reached)."""
        return self._anchor_time + (height - self._anchor_height) * self._block_seconds

    def seconds_until(self, height: int) -> float:
        if self.paused:
            return math.inf
        return self.time_of(height) - self._now()

    def pause(self) -> None:
        if self._paused_at is None:
            self._paused_at = self._now()

    def resume(self) -> None:
        if self._paused_at is not None:
            self._anchor_time += self._now() - self._paused_at
            self._paused_at = None

    def jump_to(self, height: int) -> int:
        """Move forward to ``height`` (keeping the progress inside the current block); return the new height."""
        current = self.height()
        if height > current:
            self._anchor_height += height - current
        return self.height()

    def set_block_seconds(self, block_seconds: float) -> None:
        if block_seconds <= 0:
            raise ValueError("block_seconds must be > 0")
        h = self.height()
        fraction = self._elapsed() / self._block_seconds - (h - self._anchor_height)
        reference = self._paused_at if self._paused_at is not None else self._now()
        self._anchor_height = h
        self._anchor_time = reference - fraction * block_seconds
        self._block_seconds = block_seconds
