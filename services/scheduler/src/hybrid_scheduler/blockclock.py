"""The measured chain clock: block time as a robust moving estimate, and height ↔ wall time.

gonka-protocol.md §5: "Block time ≈ 5–6 s: measure it." Each new height is recorded with the wall time it was
first seen. The block time is the Theil–Sen estimate over the recent samples (the median of the pairwise
seconds-per-block slopes), which ignores the outliers a poll loop produces: a late poll, a burst of blocks after a
stall, one slow answer. The intercept is the median of the recent samples' intercepts for the same reason.
"""

from __future__ import annotations

import math
import statistics
from collections import deque


class BlockClock:
    def __init__(self, prior_block_seconds: float, *, window: int = 48, min_samples: int = 3) -> None:
        if prior_block_seconds <= 0:
            raise ValueError("prior_block_seconds must be > 0")
        self.prior = prior_block_seconds
        self.min_samples = min_samples
        self._samples: deque[tuple[float, int]] = deque(maxlen=window)
        self._cached: tuple[float, float] | None = None

    def observe(self, height: int, at: float) -> None:
        """Record ``height`` as seen at wall time ``at`` (only the first sight of each new height counts)."""
        if self._samples:
            last_t, last_h = self._samples[-1]
            if height <= last_h:
                return
            if at < last_t:
                at = last_t
        self._samples.append((at, height))
        self._cached = None

    def reset(self) -> None:
        self._samples.clear()
        self._cached = None

    @property
    def samples(self) -> int:
        return len(self._samples)

    def _fit(self) -> tuple[float, float]:
        if self._cached is not None:
            return self._cached
        pts = list(self._samples)
        slopes = [
            (tj - ti) / (hj - hi) for i, (ti, hi) in enumerate(pts) for tj, hj in pts[i + 1 :] if hj > hi and tj > ti
        ]
        seconds = statistics.median(slopes) if len(pts) >= self.min_samples and slopes else self.prior
        seconds = max(seconds, 1e-3)
        intercept = statistics.median(t - seconds * h for t, h in pts[-16:]) if pts else 0.0
        self._cached = (seconds, intercept)
        return self._cached

    @property
    def block_seconds(self) -> float:
        return self._fit()[0]

    @property
    def measured(self) -> bool:
        return len(self._samples) >= self.min_samples

    def time_of(self, height: float) -> float:
        """Estimated wall time of ``height`` (in the past or the future)."""
        if not self._samples:
            raise LookupError("no height observed yet")
        seconds, intercept = self._fit()
        return intercept + seconds * height

    def height_at(self, at: float) -> float:
        if not self._samples:
            raise LookupError("no height observed yet")
        seconds, intercept = self._fit()
        return (at - intercept) / seconds

    def blocks_for(self, seconds: float) -> int:
        """Whole blocks covering ``seconds`` of wall time (at least one). A twentieth of a block of tolerance keeps
        the answer from flickering when ``seconds`` is a whole number of blocks and the estimate wobbles around it."""
        return max(1, math.ceil(seconds / self.block_seconds - 0.05))
