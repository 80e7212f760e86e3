"""Measured boot history: how long a GPU took from the scheduler's command to a registered node.

The lead time of every rental comes from here, not from a constant (the seeds' fixed 30 minutes wasted GPU time on
fast boots and missed the window on slow ones). Samples are kept per kind (``standby``: start of a pre-pulled stopped
instance → registered; ``fresh``: provision → registered), profile and GPU type, fed by the provisioner's events.

A boot that never finished — the loser of a hedge dropped at the winner's registration, a slow host replaced early, a
rental that failed — is kept as a *censored* sample ("longer than this"). Leaving those out would keep only the
fastest boots (the hedge winners) and shrink every later lead: the distribution is the Kaplan–Meier estimate over
finished and censored boots. Until enough boots finished, a configured prior stands in.
"""

from __future__ import annotations

import bisect
import math
import statistics
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Final, Literal

import orjson

BootKind = Literal["standby", "fresh"]
KINDS: Final[tuple[BootKind, ...]] = ("standby", "fresh")

_TAIL_FROM: Final = 0.9
_Z: Final = {_TAIL_FROM: statistics.NormalDist().inv_cdf(_TAIL_FROM)}


@dataclass(frozen=True)
class BootSample:
    kind: BootKind
    profile: str
    gpu_name: str
    seconds: float
    at: float
    censored: bool = False  # the boot lasted *at least* ``seconds`` (dropped or failed before it finished)

    def to_json(self) -> bytes:
        return orjson.dumps(asdict(self))

    @classmethod
    def from_json(cls, raw: bytes | str) -> BootSample:
        d = orjson.loads(raw)
        return cls(
            kind=d["kind"],
            profile=d["profile"],
            gpu_name=d["gpu_name"],
            seconds=float(d["seconds"]),
            at=float(d["at"]),
            censored=bool(d.get("censored", False)),
        )


class BootStats:
    """A boot-time distribution (Kaplan–Meier over finished and censored boots), or a prior while few finished.

    ``prior`` is a conservative (high-quantile) boot time: with too little data every quantile is the prior.
    """

    def __init__(self, samples: Iterable[float | tuple[float, bool]], prior: float, *, min_samples: int = 5) -> None:
        pts = sorted((s, False) if isinstance(s, int | float) else (float(s[0]), bool(s[1])) for s in samples)
        pts = [p for p in pts if p[0] >= 0]
        self.prior = prior
        self.times: list[float] = []  # distinct finished-boot times
        self.surv: list[float] = []  # survival just after each of them
        self.cuts: list[float] = sorted({t for t, _ in pts})  # every time at which a conditional estimate changes
        survival, at_risk, i = 1.0, len(pts), 0
        while i < len(pts):
            t, finished, censored = pts[i][0], 0, 0
            while i < len(pts) and pts[i][0] == t:
                censored += pts[i][1]
                finished += not pts[i][1]
                i += 1
            if finished:
                survival *= 1.0 - finished / at_risk
                self.times.append(t)
                self.surv.append(survival)
            at_risk -= finished + censored
        self._neg = [-s for s in self.surv]
        self.finished = sum(1 for _, c in pts if not c)
        self.censored = len(pts) - self.finished
        self.measured = self.finished >= min_samples
        self._fit: statistics.NormalDist | bool | None = None

    def __len__(self) -> int:
        return self.finished + self.censored

    def _survival(self, t: float) -> float:
        k = bisect.bisect_right(self.times, t) - 1
        return 1.0 if k < 0 else self.surv[k]

    def _first_below(self, level: float, after: float) -> float | None:
        k = max(bisect.bisect_left(self._neg, -(level + 1e-12)), bisect.bisect_right(self.times, after))
        return self.times[k] if k < len(self.times) else None

    def _km(self, q: float) -> float | None:
        return self._first_below(1.0 - q, -1.0)

    def _lognormal(self) -> statistics.NormalDist | None:
        """ln(boot) ~ N(mu, sigma) through the median and the 90th percentile (the tail model, see quantile)."""
        if self._fit is None:
            median, upper = self._km(0.5), self._km(_TAIL_FROM)
            if median is None or upper is None or median <= 0 or upper < median:
                self._fit = False
            else:
                sigma = max(math.log(upper / median) / _Z[_TAIL_FROM], 1e-3)
                self._fit = statistics.NormalDist(math.log(median), sigma)
        return self._fit if isinstance(self._fit, statistics.NormalDist) else None

    def _level(self, level: float, after: float) -> float | None:
        """The time at which the fraction ``level`` of all boots has finished, if later than ``after``.

        Above the 90th percentile the data thins out and, worse, hedging censors exactly the long boots (they are
        dropped once another candidate wins), so there the larger of the empirical value and a lognormal through
        the median and the 90th percentile is used.
        """
        empirical = self._first_below(1.0 - level, after)
        if level <= _TAIL_FROM and empirical is not None:
            return empirical
        fit = self._lognormal()
        fitted = math.exp(fit.inv_cdf(min(max(level, 1e-9), 1 - 1e-9))) if fit is not None else None
        values = [v for v in (empirical, fitted) if v is not None and v > after]
        return max(values) if values else None

    def quantile(self, q: float) -> float:
        """The ``q`` quantile of a boot's duration."""
        if not self.measured:
            return self.prior
        found = self._level(q, -1.0)
        return found if found is not None else self.cuts[-1]

    def remaining(self, elapsed: float, q: float) -> float | None:
        """The ``q`` quantile of the time still to go for a boot already ``elapsed`` long, or ``None`` when the data
        cannot say (the boot outlasted everything the history can describe: something is wrong with it)."""
        if not self.measured:
            return self.prior - elapsed if elapsed < self.prior else None
        alive = self._survival(elapsed)
        fit = self._lognormal()
        if fit is not None and alive < 1.0 - _TAIL_FROM:
            # in the tail the model, not the few samples, says how much of the distribution is left
            alive = min(alive, 1.0 - fit.cdf(math.log(max(elapsed, 1e-9))))
        if alive <= 0:
            return None
        found = self._level(1.0 - alive * (1.0 - q), elapsed)
        return None if found is None else found - elapsed

    def next_change(self, elapsed: float) -> float | None:
        """The elapsed time at which :meth:`remaining` next changes its verdict (a wake-up time for simulations)."""
        if not self.measured:
            return self.prior if elapsed < self.prior else None
        i = bisect.bisect_right(self.cuts, elapsed)
        nxt = self.cuts[i] if i < len(self.cuts) else None
        median = self._km(0.5)
        if self._survival(elapsed) < 1.0 - _TAIL_FROM and median is not None and self._lognormal() is not None:
            # in the tail the model's verdict drifts with every second: look again a little later
            step = elapsed + max(0.02 * median, 1e-3)
            nxt = step if nxt is None else min(nxt, step)
        return nxt


class BootHistory:
    """The last ``capacity`` samples (``scheduler:boots`` in Redis holds the same, newest first)."""

    def __init__(self, capacity: int = 200, *, min_samples: int = 5) -> None:
        self.samples: deque[BootSample] = deque(maxlen=capacity)
        self.min_samples = min_samples

    def add(self, sample: BootSample) -> None:
        self.samples.append(sample)

    def record(
        self,
        kind: BootKind,
        profile: str,
        gpu_name: str,
        seconds: float,
        at: float | None = None,
        *,
        censored: bool = False,
    ) -> BootSample:
        sample = BootSample(kind, profile, gpu_name, seconds, time.time() if at is None else at, censored)
        self.add(sample)
        return sample

    def stats(self, kind: BootKind, profile: str, prior: float, gpu_name: str | None = None) -> BootStats:
        """Per GPU type when that type alone has enough finished boots, else pooled over the profile's GPUs."""
        mine = [s for s in self.samples if s.kind == kind and s.profile == profile]
        if gpu_name:
            per_gpu = [(s.seconds, s.censored) for s in mine if s.gpu_name == gpu_name]
            if sum(1 for _, c in per_gpu if not c) >= self.min_samples:
                return BootStats(per_gpu, prior, min_samples=self.min_samples)
        return BootStats(((s.seconds, s.censored) for s in mine), prior, min_samples=self.min_samples)

    def summary(self) -> list[dict[str, object]]:
        """Per (kind, profile, GPU): finished and censored boots, median and p90 seconds — for the status."""
        groups: dict[tuple[str, str, str], list[tuple[float, bool]]] = {}
        for s in self.samples:
            groups.setdefault((s.kind, s.profile, s.gpu_name), []).append((s.seconds, s.censored))
        out: list[dict[str, object]] = []
        for (kind, profile, gpu), values in sorted(groups.items()):
            stats = BootStats(values, 0.0, min_samples=1)
            out.append(
                {
                    "kind": kind,
                    "profile": profile,
                    "gpu_name": gpu,
                    "finished": stats.finished,
                    "censored": stats.censored,
                    "p50_seconds": round(stats.quantile(0.5), 3) if stats.measured else None,
                    "p90_seconds": round(stats.quantile(0.9), 3) if stats.measured else None,
                }
            )
        return out
