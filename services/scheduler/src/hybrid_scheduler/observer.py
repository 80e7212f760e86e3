"""The chain observer: polls the chain, measures block time, keeps the last good view, reports what fails.

Order of sources (gonka-protocol.md §5): the dapi's public ``/v1/epochs/latest``, else chain REST ``epoch_info``, else
Tendermint ``/chain-rpc/status`` for the height alone (the rest of the view is then the last good one). A slow, down or
garbage endpoint never raises out of :meth:`ChainObserver.poll`: it is reported (``chain.unreachable``, at most once
per ``report_every`` seconds per endpoint) and the last good view is kept, with its age.

Garbage that parses is still refused: a height that runs backwards, or one far ahead of what the measured clock allows
since the last good view, is held back until a second answer confirms it (a chain that really jumped, e.g. after the
scheduler was paused, is accepted one poll later; a single wild answer never moves the plan).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace

from hybrid_scheduler.blockclock import BlockClock
from hybrid_scheduler.chain import ChainClient, ChainUnavailable, ChainView
from hybrid_scheduler.window import InvalidChainData

log = logging.getLogger("hybrid.scheduler.chain")

Reporter = Callable[[str, str, float | None], Awaitable[None]]


@dataclass(frozen=True)
class Failure:
    endpoint: str
    error: str
    at: float


class ChainObserver:
    def __init__(
        self,
        client: ChainClient,
        clock: BlockClock,
        *,
        on_unreachable: Reporter | None = None,
        report_every: float = 30.0,
        flags_every: float = 5.0,
        backwards_tolerance: int = 2,
    ) -> None:
        self.client = client
        self.clock = clock
        self.on_unreachable = on_unreachable
        self.report_every = report_every
        self.flags_every = flags_every
        self.backwards_tolerance = backwards_tolerance
        self.view: ChainView | None = None  # the last good view
        self.good_at: float | None = None  # when the last good structural view arrived
        self.failures: dict[str, Failure] = {}
        self.consecutive_failures = 0
        self._reported: dict[str, float] = {}
        self._held: ChainView | None = None  # a suspicious jump waiting for confirmation
        self._flags_at = 0.0
        self._flags: tuple[bool | None, str | None] = (None, None)

    def stale_seconds(self, now: float | None = None) -> float | None:
        if self.good_at is None:
            return None
        return max(0.0, (time.time() if now is None else now) - self.good_at)

    async def poll(self) -> ChainView | None:
        """One round; returns the current good view (maybe an older one) or ``None`` if there never was one."""
        fresh: ChainView | None = None
        for endpoint, fetch in (("public", self.client.public_epoch), ("chain-rest", self.client.rest_epoch)):
            try:
                candidate = await fetch()
                self._check(candidate)
            except (ChainUnavailable, InvalidChainData) as exc:
                await self._failed(endpoint, exc)
                continue
            except Exception as exc:  # a bug in parsing must not stop the clock either
                log.exception("unexpected error reading %s", endpoint)
                await self._failed(endpoint, exc)
                continue
            fresh = candidate
            break
        if fresh is None and self.view is not None:
            fresh = await self._height_only()
        if fresh is None:
            self.consecutive_failures += 1
            return self.view
        fresh = await self._with_flags(fresh)
        self.consecutive_failures = 0
        self.clock.observe(fresh.block_height, fresh.observed_at)
        if fresh.source != "rpc":
            self.good_at = fresh.observed_at
        self.view = fresh
        return fresh

    def _check(self, view: ChainView) -> None:
        """Refuse a height that runs backwards or jumps beyond what the clock allows (unless confirmed twice)."""
        last = self.view
        if last is None:
            return
        if view.block_height < last.block_height - self.backwards_tolerance:
            raise InvalidChainData(f"height went backwards: {view.block_height} after {last.block_height}")
        if view.epoch_index < last.epoch_index:
            raise InvalidChainData(f"epoch went backwards: {view.epoch_index} after {last.epoch_index}")
        if not self.clock.measured:
            return
        elapsed = max(0.0, view.observed_at - last.observed_at)
        expected = elapsed / self.clock.block_seconds
        allowed = last.block_height + max(10.0, 2.0 * expected + 5.0)
        if view.block_height <= allowed:
            self._held = None
            return
        held = self._held
        if held is not None and held.block_height <= view.block_height <= held.block_height + max(
            10.0, 2.0 * (max(0.0, view.observed_at - held.observed_at) / self.clock.block_seconds) + 5.0
        ):
            log.warning("chain jumped from %d to %d (confirmed twice): accepted", last.block_height, view.block_height)
            self._held = None
            self.clock.reset()  # the old samples describe a different stretch of chain
            return
        self._held = view
        raise InvalidChainData(
            f"height {view.block_height} is beyond the measured clock (≤ {allowed:.0f} expected): held for confirmation"
        )

    async def _height_only(self) -> ChainView | None:
        assert self.view is not None
        try:
            height, at = await self.client.rpc_height()
        except (ChainUnavailable, InvalidChainData) as exc:
            await self._failed("rpc", exc)
            return None
        last = self.view
        if height < last.block_height - self.backwards_tolerance:
            await self._failed("rpc", InvalidChainData(f"height went backwards: {height} after {last.block_height}"))
            return None
        if height >= last.next_poc_start:
            # A new epoch began: its structure (PoC start, parameters) is unknown until a full answer comes back.
            await self._failed("rpc", InvalidChainData("the epoch turned over; waiting for a full epoch answer"))
            return None
        if self.clock.measured:
            elapsed = max(0.0, at - last.observed_at)
            if height > last.block_height + max(10.0, 2.0 * elapsed / self.clock.block_seconds + 5.0):
                await self._failed("rpc", InvalidChainData(f"height {height} is beyond the measured clock"))
                return None
        return replace(last, block_height=max(height, last.block_height), observed_at=at, source="rpc")

    async def _with_flags(self, view: ChainView) -> ChainView:
        """Refresh ``poc_v2_enabled`` / ``mlnode_version`` every few seconds and at every new epoch."""
        epoch_changed = self.view is None or view.epoch_index != self.view.epoch_index
        if view.poc_v2_enabled is not None:
            self._flags = (view.poc_v2_enabled, self._flags[1])
        if epoch_changed or time.monotonic() - self._flags_at >= self.flags_every or self._flags[0] is None:
            try:
                v2, version = await self.client.flags()
                self._flags = (self._flags[0] if v2 is None else v2, self._flags[1] if version is None else version)
                self._flags_at = time.monotonic()
            except (ChainUnavailable, InvalidChainData) as exc:
                await self._failed("chain-rest params", exc)
        return view.with_flags(*self._flags)

    async def _failed(self, endpoint: str, exc: BaseException) -> None:
        now = time.time()
        error = str(exc) or type(exc).__name__
        self.failures[endpoint] = Failure(endpoint, error, now)
        log.warning("chain endpoint %s: %s", endpoint, error)
        last = self._reported.get(endpoint)
        if self.on_unreachable is not None and (last is None or now - last >= self.report_every):
            self._reported[endpoint] = now
            try:
                await self.on_unreachable(endpoint, error, self.stale_seconds(now))
            except Exception:
                log.exception("reporting chain.unreachable failed")
