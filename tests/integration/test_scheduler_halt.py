"""A chain halt while the scheduler watches (gonka-protocol.md §5: the PoC window opens at a *height*; the block time
is measured, and a halted chain produces no block at all): the window's poc_start comes as much later as the chain
stood still, so neither the scheduler's plan nor the provisioner's deadline may declare it missed before it came."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from hybrid_common.messages.domain import FailureCause
from hybrid_common.messages.events import AlertRaised, JobFailed
from tests.integration.test_scheduler_kit import RealProvisionerWorld, SchedulerWorld

pytestmark = [pytest.mark.broker, pytest.mark.redis, pytest.mark.timeout(300)]

FIRST_POC_START = 120
EPOCH = 2  # the first window the scheduler plans with a measured clock, well after it started watching
POC_START = FIRST_POC_START + 120  # SHORT_EPOCH
# Wall seconds the chain stands still: longer than the time from the halt to the deadlines estimated before it (the
# pre-pulls' Provision carries ~20 s; a stale view ~12 s), so they pass while poc_start has come no nearer. The
# shortest halt that reproduced both misses before the fix under the TEST profile (15 s did not).
HALT_SECONDS = 20.0


async def test_a_chain_halt_before_poc_start_neither_misses_the_window_nor_raises_a_critical_alert(
    amqp_url: str, redis_url: str, namespace: str, tmp_path: Path
) -> None:
    async with RealProvisionerWorld(amqp_url, redis_url, namespace, tmp_path, first_poc_start=FIRST_POC_START) as w:
        w.start_scheduler()
        # The scheduler has measured the block time, planned the window, sent its pre-pulls (each Provision carries
        # the deadline as a wall time, estimated before the halt) and started nothing yet.
        await w.wait(
            lambda: _prepulled_none_started(w, EPOCH), 120, f"epoch {EPOCH}'s standbys pre-pulled, none started"
        )
        halted_at = await w.http.height()
        assert halted_at < POC_START - 20, f"too late to halt before the first start (height {halted_at})"
        await _clock(w, "pause")
        await asyncio.sleep(HALT_SECONDS)
        await _clock(w, "resume")

        await w.wait(lambda: _registered(w, EPOCH), 90, f"epoch {EPOCH} registered")
        # Past poc_start: any deadline the halt could have put in the past has been judged by now.
        await w.http.wait_height(POC_START + 4, timeout=60)
        await asyncio.sleep(2)  # the provisioner's and the scheduler's next ticks after poc_start

        # A job.failed with deadline_missed is what the alert notifier posts as a critical "missed registration".
        missed = [e for e in w.events.of(JobFailed) if e.cause is FailureCause.DEADLINE_MISSED]
        assert missed == [], [(e.slot_id, e.message) for e in missed]
        critical = [e for e in w.events.of(AlertRaised) if e.severity == "critical"]
        assert critical == [], [(e.title, e.detail) for e in critical]

        campaign = await w.campaign(EPOCH)
        assert campaign is not None
        assert campaign["missed_slots"] == [], campaign["notes"]
        winners = [c for c in campaign["candidates"].values() if c["state"] == "ready"]
        assert len(winners) == 1, campaign["notes"]
        assert winners[0]["registered_before_deadline"] is True, campaign["notes"]
        # On the dapi's own record the node was registered before poc_start, so it joins that PoC (§3).
        report = await w.report()
        nodes = next(e for e in report["epochs"] if int(e["index"]) == EPOCH)["nodes"]
        assert nodes[winners[0]["slot_id"]]["registered_at_height"] < POC_START, nodes


async def test_a_chain_halt_with_the_dapi_unreachable_does_not_miss_the_window_before_poc_start(
    amqp_url: str, redis_url: str, namespace: str
) -> None:
    """The same halt, with the chain endpoints answering 503 throughout: the scheduler's last view goes stale at a
    height still short of poc_start, so the window cannot have opened — the deadline keeps moving out with the
    time that passes instead of being dated from the stale view, and nothing is dropped as missed."""
    async with SchedulerWorld(amqp_url, redis_url, namespace, first_poc_start=FIRST_POC_START, faults=True) as w:
        assert w.faults is not None
        w.start_scheduler()
        await w.wait(lambda: _prepulled_none_started(w, 1), 60, "epoch 1's standbys pre-pulled, none started")
        halted_at = await w.http.height()
        assert halted_at < FIRST_POC_START - 20, f"too late to halt before the first start (height {halted_at})"
        await _clock(w, "pause")
        w.faults.mode = "5xx"
        await asyncio.sleep(HALT_SECONDS)
        w.faults.mode = "ok"
        await _clock(w, "resume")

        await w.wait(lambda: _registered(w, 1), 60, "epoch 1 registered")
        campaign = await w.campaign(1)
        assert campaign is not None
        assert campaign["missed_slots"] == [], campaign["notes"]
        assert not [n for n in campaign["notes"] if "missed" in n], campaign["notes"]
        winner = next(c for c in campaign["candidates"].values() if c["state"] == "ready")
        assert winner["registered_before_deadline"] is True, campaign["notes"]
        registered = w.provisioner.slots[winner["slot_id"]].registered_height
        assert registered is not None and halted_at <= registered < FIRST_POC_START, (registered, campaign["notes"])


async def _clock(w: RealProvisionerWorld | SchedulerWorld, action: str) -> None:
    status, body = await w.http._json("POST", f"{w.dapi.public_url}/_sim/clock/{action}")
    assert status == 200, body


async def _prepulled_none_started(w: RealProvisionerWorld | SchedulerWorld, epoch: int) -> bool:
    campaign = await w.campaign(epoch)
    if campaign is None:
        return False
    candidates: list[dict[str, Any]] = list(campaign["candidates"].values())
    return any(c["provisioned"] for c in candidates) and all(c["started_at"] is None for c in candidates)


async def _registered(w: RealProvisionerWorld | SchedulerWorld, epoch: int) -> bool:
    campaign = await w.campaign(epoch)
    return campaign is not None and any(c["state"] == "ready" for c in campaign["candidates"].values())
