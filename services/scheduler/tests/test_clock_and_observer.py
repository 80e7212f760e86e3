"""The measured block clock, and the observer's handling of failing, garbage and jumping answers."""

from __future__ import annotations

import random
from typing import Any

import pytest

from hybrid_scheduler.blockclock import BlockClock
from hybrid_scheduler.chain import ChainUnavailable, ChainView, parse_epoch
from hybrid_scheduler.observer import ChainObserver
from hybrid_scheduler.window import InvalidChainData

PARAMS = {"epoch_length": 240, "poc_stage_duration": 20, "poc_validation_duration": 20}


def test_block_time_is_robust_to_late_polls_and_stalls() -> None:
    rng = random.Random(1)
    clock = BlockClock(6.0)
    t = 1000.0
    for h in range(100, 160):
        t += 5.0
        seen = t + rng.uniform(0, 0.4) + (20.0 if h == 130 else 0.0)  # one very late poll
        clock.observe(h, seen)
        clock.observe(h, seen + 1)  # a repeat of the same height does not count
    assert clock.block_seconds == pytest.approx(5.0, abs=0.1)
    assert clock.time_of(200) == pytest.approx(t + 41 * 5.0, abs=1.0)  # 159 was seen at ~t
    assert clock.blocks_for(12.0) == 3


def view(height: int, at: float, **over: Any) -> ChainView:
    body: dict[str, Any] = {
        "block_height": height,
        "latest_epoch": {"index": 1, "poc_start_block_height": 100},
        "epoch_params": PARAMS,
        "epoch_stages": {"next_poc_start": 340},
    }
    body.update(over)
    return parse_epoch(body, source="public", observed_at=at)


class ScriptedChain:
    """Answers from a script: a ChainView, an exception, in turn (the HTTP side is covered by the integration tests)."""

    def __init__(self) -> None:
        self.public: list[Any] = []
        self.rest: list[Any] = []
        self.rpc: list[Any] = []

    @staticmethod
    def _next(queue: list[Any]) -> Any:
        item = queue.pop(0) if queue else ChainUnavailable("down")
        if isinstance(item, Exception):
            raise item
        return item

    async def public_epoch(self) -> ChainView:
        return self._next(self.public)  # type: ignore[no-any-return]

    async def rest_epoch(self) -> ChainView:
        return self._next(self.rest)  # type: ignore[no-any-return]

    async def rpc_height(self) -> tuple[int, float]:
        return self._next(self.rpc)  # type: ignore[no-any-return]

    async def flags(self) -> tuple[bool | None, str | None]:
        return False, "v3.0.8"


async def test_observer_falls_back_keeps_the_last_good_view_and_holds_wild_jumps() -> None:
    chain = ScriptedChain()
    reports: list[tuple[str, str, float | None]] = []

    async def report(endpoint: str, error: str, age: float | None) -> None:
        reports.append((endpoint, error, age))

    obs = ChainObserver(chain, BlockClock(1.0), on_unreachable=report, report_every=0.0)  # type: ignore[arg-type]
    for i in range(5):
        chain.public.append(view(150 + i, 1000.0 + i))
        assert (await obs.poll()).block_height == 150 + i  # type: ignore[union-attr]
    # public down: chain REST answers
    chain.public.append(ChainUnavailable("HTTP 503"))
    chain.rest.append(view(155, 1005.0))
    assert (await obs.poll()).source == "public"  # type: ignore[union-attr]
    # both down: the RPC height alone moves the clock, the structure is the last good one
    chain.public.append(InvalidChainData("not JSON"))
    chain.rest.append(ChainUnavailable("timeout"))
    chain.rpc.append((156, 1006.0))
    got = await obs.poll()
    assert got is not None and got.source == "rpc" and got.block_height == 156
    # everything down: the last view stays, its age grows, every failure was reported
    got = await obs.poll()
    assert got is not None and got.block_height == 156
    assert {r[0] for r in reports} >= {"public", "chain-rest", "rpc"}
    assert obs.consecutive_failures == 1
    # a plausible answer with an absurd height is held, never becomes the view …
    chain.public.append(
        view(
            90_000,
            1007.0,
            latest_epoch={"index": 1, "poc_start_block_height": 100},
            epoch_stages={"next_poc_start": 90_100},
        )
    )
    chain.rest.append(view(157, 1007.0))
    assert (await obs.poll()).block_height == 157  # type: ignore[union-attr]
    # … and a height that runs backwards is refused
    chain.public.append(view(120, 1008.0))
    chain.rest.append(ChainUnavailable("down"))
    chain.rpc.append(ChainUnavailable("down"))
    assert (await obs.poll()).block_height == 157  # type: ignore[union-attr]
    # a real jump (the chain was paused, or we were) is accepted once two answers agree
    chain.public.extend(
        [
            view(500, 1009.0, epoch_stages={"next_poc_start": 580}),
            view(501, 1009.5, epoch_stages={"next_poc_start": 580}),
        ]
    )
    chain.rest.append(ChainUnavailable("down"))
    chain.rpc.append(ChainUnavailable("down"))
    assert (await obs.poll()).block_height == 157  # type: ignore[union-attr]
    assert (await obs.poll()).block_height == 501  # type: ignore[union-attr]
