"""Issue #8 acceptance: garbage, timeouts and 5xx from the chain endpoints never crash the scheduler and never rent;
a plausible answer with an absurd height never releases early; once the faults stop, it rents on time."""

from __future__ import annotations

import asyncio

import orjson
import pytest

from hybrid_common.messages.events import ChainUnreachable
from tests.integration.test_scheduler_kit import SchedulerWorld

pytestmark = [pytest.mark.broker, pytest.mark.redis, pytest.mark.timeout(240)]


async def test_chain_faults_never_crash_never_rent_and_it_rents_on_time_after(
    amqp_url: str, redis_url: str, namespace: str
) -> None:
    async with SchedulerWorld(amqp_url, redis_url, namespace, first_poc_start=110, faults=True) as w:
        assert w.faults is not None
        w.faults.mode = "mixed"  # garbage, truncated JSON, 503, hanging past the timeout, absurd heights
        scheduler = w.start_scheduler()
        await w.wait(lambda: len(w.events.of(ChainUnreachable)) >= 3, 20, "chain.unreachable reported")
        await asyncio.sleep(4)
        assert scheduler.alive(), scheduler.output()
        assert {"garbage", "5xx", "hang", "jump", "truncated"} <= set(w.faults.served)
        assert w.provisioner.commands == []
        assert await w.campaigns() == {}
        endpoints = {e.endpoint for e in w.events.of(ChainUnreachable)}
        assert {"public", "chain-rest"} <= endpoints

        # The faults stop: it plans and rents on time.
        w.faults.mode = "ok"
        await w.wait(lambda: _registered(w, 1), 60, "epoch 1 registered")
        campaign = await w.campaign(1)
        assert campaign is not None
        winner = next(c for c in campaign["candidates"].values() if c["state"] == "ready")
        slot = w.provisioner.slots[winner["slot_id"]]
        assert slot.registered_height is not None and slot.registered_height < 110

        # During the PoC: absurd heights (and garbage) for a while must not release anything early.
        await w.http.wait_height(112, timeout=30)
        w.faults.mode = "jump"
        await asyncio.sleep(3)
        w.faults.mode = "mixed"
        await asyncio.sleep(2)
        assert w.provisioner.releases() == [] or all(
            r.slot_ids[0] != winner["slot_id"] for r in w.provisioner.releases()
        ), [(r.slot_ids, r.height) for r in w.provisioner.releases()]
        raw = await w.redis.get(f"{namespace}:chain:view")
        assert orjson.loads(raw or b"{}")["view"]["block_height"] < 1000  # the absurd height never became the view
        w.faults.mode = "ok"
        validation_end = campaign["window"]["validation_end"]
        await w.wait(lambda: slot.released_height is not None, 60, "the release after validation")
        assert slot.released_height is not None and slot.released_height > validation_end
        assert scheduler.alive()


async def _registered(w: SchedulerWorld, epoch: int) -> bool:
    campaign = await w.campaign(epoch)
    return campaign is not None and any(c["state"] == "ready" for c in campaign["candidates"].values())
