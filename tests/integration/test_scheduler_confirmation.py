"""Issue #8 acceptance: a confirmation PoC under ``burst`` leads to a rental and a registration while its window is
open, and the status says plainly what the policies can and cannot do."""

from __future__ import annotations

import orjson
import pytest

from hybrid_common.messages.commands import SetConfirmationPolicy
from hybrid_common.messages.domain import ConfirmationPolicy
from hybrid_common.messages.events import ConfirmationPocDetected, ConfirmationPocEnded
from tests.integration.test_scheduler_kit import SchedulerWorld

pytestmark = [pytest.mark.broker, pytest.mark.redis, pytest.mark.timeout(240)]


async def test_burst_rents_and_registers_while_the_confirmation_window_is_open(
    amqp_url: str, redis_url: str, namespace: str
) -> None:
    # The scheduled PoC far away: only the confirmation PoC rents here.
    async with SchedulerWorld(amqp_url, redis_url, namespace, first_poc_start=400) as w:
        w.start_scheduler()  # the default policy is ignore: switched by the operator's command
        await w.wait(lambda: w.campaign(1), 30, "the scheduler planning")
        await w.publisher.publish(SetConfirmationPolicy(policy=ConfirmationPolicy.BURST))
        await w.wait(lambda: _policy_is(w, "burst"), 15, "the policy switched")

        status, _ = await w.http._json("POST", f"{w.dapi.public_url}/_sim/confirmation-poc")
        assert status == 200
        detected = (await w.wait(lambda: w.events.of(ConfirmationPocDetected), 15, "the event detected"))[0]
        assert detected.policy is ConfirmationPolicy.BURST and detected.action == "rented"

        key = f"pocc-e{detected.epoch_index}n{detected.event_sequence}"
        campaign = await w.wait(lambda: _registered(w, key), 30, "the burst GPU registered")
        winner = next(c for c in campaign["candidates"].values() if c["state"] == "ready")
        slot = w.provisioner.slots[winner["slot_id"]]
        assert slot.registered_height is not None
        # While the event's window is open: after its trigger, before its validation ended.
        report = await w.report()
        events = [e for epoch in report["epochs"] for e in epoch["confirmation_poc"]]
        assert events, report["epochs"]
        event = events[-1]
        assert detected.trigger_height <= slot.registered_height <= event["validation_end_height"]
        provision = next(c for c in w.provisioner.provisions() if c.slot_ids == [winner["slot_id"]])
        assert provision.payload["purpose"] == "confirmation_poc"

        # The event ends; the burst GPU is released after its validation, and the status tells the truth.
        await w.wait(lambda: w.events.of(ConfirmationPocEnded), 40, "the event ended")
        await w.wait(lambda: slot.released_height is not None, 30, "the burst GPU released")
        assert slot.released_height is not None and slot.released_height > event["validation_end_height"]
        raw = await w.redis.get(f"{namespace}:scheduler:confirmation")
        status_doc = orjson.loads(raw or b"{}")
        assert "only a GPU already serving can answer" in status_doc["statement"]
        assert status_doc["policies"]["burst"]["events"] == 1
        assert status_doc["policies"]["burst"]["rentals"] == 1
        assert "INACTIVE" in status_doc["policies"]["ignore"]["risk"]
        # the scheduler's own record of when it registered (its last view of the height when the event arrived)
        assert abs(status_doc["events"][-1]["registered_height"] - slot.registered_height) <= 4


async def _policy_is(w: SchedulerWorld, policy: str) -> bool:
    raw = await w.redis.get(f"{w.namespace}:scheduler:confirmation")
    return bool(raw) and orjson.loads(raw or b"{}")["policy"] == policy


async def _registered(w: SchedulerWorld, key: str) -> dict | None:  # type: ignore[type-arg]
    campaign = (await w.campaigns()).get(key)
    if campaign and any(c["state"] == "ready" for c in campaign["candidates"].values()):
        return campaign
    return None
