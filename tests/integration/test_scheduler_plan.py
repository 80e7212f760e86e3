"""Issue #8 acceptance: the plan follows the chain's live parameters, and refuses an image that cannot speak its PoC.

Changing ``epoch_length``, ``poc_validation_duration`` and ``poc_v2_enabled`` in the simulator between epochs changes
the next window's plan (its PoC start, its release height, its profile) and what is actually rented and released.
"""

from __future__ import annotations

import asyncio

import pytest

from hybrid_common.bus import Requester
from hybrid_common.messages.commands import PauseScheduling, PlanQuery, PlanReply, Rehearse, ResumeScheduling
from hybrid_common.messages.events import AlertRaised, PocWindowPlanned, SchedulerPaused, SchedulerResumed
from tests.integration.test_scheduler_kit import SchedulerWorld

pytestmark = [pytest.mark.broker, pytest.mark.redis, pytest.mark.timeout(300)]


async def test_changing_epoch_parameters_between_epochs_changes_the_plan(
    amqp_url: str, redis_url: str, namespace: str
) -> None:
    async with SchedulerWorld(amqp_url, redis_url, namespace, first_poc_start=100) as w:
        w.start_scheduler()
        plan1 = await w.wait(lambda: _planned(w, 1), 40, "epoch 1 planned")
        assert plan1.poc_start_height == 100 and plan1.generation == "v1" and plan1.profile == "mlnode-v1"
        # TEST profile: validation ends at 100 + 20 + 4 + 20; the margin covers the 60 s sync + 30 s (1.5 s here,
        # 6 blocks of the measured ~0.25 s).
        assert plan1.release_after_height - 144 in (6, 7)
        first2 = await w.wait(lambda: _planned(w, 2), 60, "epoch 2 planned")
        assert first2.poc_start_height == 220  # 100 + epoch_length 120

        # Between epochs (epoch 1's PoC over, epoch 2 not rented yet): the chain changes.
        await w.wait(lambda: _campaign_state(w, 1, "released"), 60, "epoch 1 released")
        assert not w.provisioner.epoch_slots(2)
        await w.http.set_params(epoch_params={"epoch_length": 150, "poc_validation_duration": 30}, poc_v2_enabled=True)
        await w.wait(lambda: _planned(w, 2, generation="v2"), 20, "epoch 2 replanned")
        await w.dapi_jump(190)  # skip the quiet blocks up to shortly before epoch 2's pre-pull (every height processed)

        plan2 = await w.wait(lambda: _planned(w, 2, generation="v2"), 20, "epoch 2 replanned")
        assert plan2.poc_start_height == 250  # 100 + new epoch_length 150
        assert plan2.release_after_height - (250 + 20 + 4 + 30) in (6, 7)  # the new validation duration
        assert plan2.profile == "mlnode-v2"

        # … and the plan is what happens: a v2 rental, registered before 250, released after the new end.
        await w.wait(lambda: _campaign_state(w, 2, "released"), 90, "epoch 2 released")
        provisions = [c for c in w.provisioner.provisions() if c.slot_ids[0].startswith("poc-e2-")]
        assert provisions and {c.payload["profile"] for c in provisions} == {"mlnode-v2"}
        campaign = await w.campaign(2)
        assert campaign is not None
        winner = next(c for c in campaign["candidates"].values() if c["state"] == "ready")
        slot = w.provisioner.slots[winner["slot_id"]]
        assert slot.registered_height is not None and slot.registered_height < 250
        await w.wait(lambda: slot.released_height is not None, 20, "the release reaching the provisioner")
        assert slot.released_height is not None and slot.released_height > 250 + 20 + 4 + 30
        assert slot.released_height >= campaign["release_height"]

        # The plan is also answered over the queue (plan.query → plan.reply).
        requester = Requester(w.conn, w.publisher)
        await requester.start()
        reply = await requester.ask(PlanQuery(), PlanReply, timeout=10)
        assert reply.plan["plan"]["poc_v2_enabled"] is True
        assert any(c["key"] == "poc-e2" for c in reply.plan["campaigns"])


async def test_an_image_that_cannot_speak_the_chains_protocol_is_refused(
    amqp_url: str, redis_url: str, namespace: str
) -> None:
    async with SchedulerWorld(
        amqp_url, redis_url, namespace, first_poc_start=100, dapi_kwargs={"poc_v2_enabled": True}
    ) as w:
        w.start_scheduler(SCHEDULER_IMAGE_V2="ghcr.io/product-science/mlnode:3.0.11-post1")
        await w.wait(lambda: _campaign_state(w, 1, "refused"), 40, "epoch 1 refused")
        campaign = await w.campaign(1)
        assert campaign is not None and "speaks only v1" in campaign["plan"]["refused"]
        alerts = await w.wait(lambda: w.events.of(AlertRaised), 10, "an alert")
        assert alerts[0].severity == "critical" and "3.0.11" in alerts[0].detail
        assert w.provisioner.provisions() == []


def _planned(w: SchedulerWorld, epoch: int, generation: str | None = None) -> PocWindowPlanned | None:
    plans = [
        p for p in w.events.of(PocWindowPlanned, epoch_index=epoch) if generation is None or p.generation == generation
    ]
    return plans[-1] if plans else None


async def _campaign_state(w: SchedulerWorld, epoch: int, state: str) -> bool:
    campaign = await w.campaign(epoch)
    return campaign is not None and campaign["state"] == state


async def test_pause_holds_rentals_resume_rents_and_rehearse_runs_one_gpu_now(
    amqp_url: str, redis_url: str, namespace: str
) -> None:
    async with SchedulerWorld(amqp_url, redis_url, namespace, first_poc_start=400) as w:
        w.start_scheduler(SCHEDULER_REHEARSAL_HOLD="120")  # 2 s after registering (the next PoC is far)
        await w.wait(lambda: w.campaign(1), 30, "epoch 1 planned")

        # rehearse: one GPU now, outside the schedule, registered, then released after its hold
        await w.publisher.publish(Rehearse())
        rehearsal = await w.wait(lambda: _rehearsal(w), 20, "the rehearsal rented")
        slot_id = next(iter(rehearsal["candidates"]))
        await w.wait(
            lambda: w.provisioner.slots.get(slot_id) and w.provisioner.slots[slot_id].registered_height,
            20,
            "registered",
        )
        await w.wait(lambda: w.provisioner.slots[slot_id].released_height is not None, 30, "released after the hold")
        provision = next(c for c in w.provisioner.provisions() if c.slot_ids == [slot_id])
        assert provision.payload["purpose"] == "rehearsal" and provision.payload["start_stopped"] is False
        done = (await w.campaigns())[rehearsal["key"]]
        assert done["state"] == "released" and done["candidates"][slot_id]["boot_seconds"] > 0

        # pause: no rental leaves for the scheduled window while paused …
        await w.publisher.publish(PauseScheduling(reason="test"))
        await w.wait(lambda: w.events.of(SchedulerPaused), 10, "scheduler.paused")
        await w.dapi_jump(330)  # past epoch 1's pre-pull time (400 − 12 s of blocks)
        await asyncio.sleep(2)
        assert [c for c in w.provisioner.provisions() if c.slot_ids[0].startswith("poc-e1-")] == []
        # … and resume lets it rent
        await w.publisher.publish(ResumeScheduling(reason="test"))
        await w.wait(lambda: w.events.of(SchedulerResumed), 10, "scheduler.resumed")
        await w.wait(
            lambda: [c for c in w.provisioner.provisions() if c.slot_ids[0].startswith("poc-e1-")], 20, "epoch 1 rented"
        )


async def _rehearsal(w: SchedulerWorld) -> dict | None:  # type: ignore[type-arg]
    for key, campaign in (await w.campaigns()).items():
        if key.startswith("pocr-") and any(c["provisioned"] for c in campaign["candidates"].values()):
            return campaign
    return None
