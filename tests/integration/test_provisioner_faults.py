"""Issue #6 acceptance: injected Vast.ai faults each end in a ready slot on another machine or a clear
``instance.failed`` — and nothing is left running.

One provision, one slot per fault (the faults match the slot's label), all at once under a 429 storm:
offer gone, create failing but leaving an instance, pull failure, stuck loading, host offline (while serving: the
slot is re-rented and re-registered under the same id and ports), and an image that never pulls anywhere (the job
fails clearly after its create budget). Two replicas share the work.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest

from hybrid_common.messages.commands import Provision, Reconcile, Release
from hybrid_common.messages.domain import FailureCause
from hybrid_common.messages.events import (
    InstanceCreated,
    InstanceDestroyed,
    InstanceFailed,
    InstanceReady,
    JobCompleted,
    JobFailed,
    NodeRegistered,
)
from hybrid_provisioner.offers import find_offers
from hybrid_provisioner.profiles import load_profiles
from hybrid_provisioner.settings import ProvisionerSettings
from hybrid_provisioner.vast import VastClient
from tests.integration.test_provisioner_kit import ProvisionerWorld


@pytest.mark.timeout(600)
@pytest.mark.slow
async def test_faults_end_ready_elsewhere_or_clearly_failed_with_no_orphans(
    amqp_url: str, redis_url: str, namespace: str, tmp_path: Path
) -> None:
    async with ProvisionerWorld(amqp_url, redis_url, namespace, tmp_path, boot_scale=0.25) as w:
        p = w.label_prefix
        # The cheapest adequate offer vanishes between search and create.
        settings = ProvisionerSettings(_env_file=None, VAST_URL=w.vast.url)
        profile = load_profiles(settings)["mlnode-v1"]
        vast = VastClient(w.vast.url, "test")
        cheapest = (await find_offers(vast, profile, profile.policy))[0]
        await vast.close()
        w.vast.inject(kind="offer_gone", offer_id=cheapest.id)
        w.vast.inject(kind="create_leaves_instance", label=f"{p}-fleave-*")
        w.vast.inject(kind="pull_failure", label=f"{p}-fpull-*")
        w.vast.inject(kind="stuck_loading", label=f"{p}-fstuck-*")
        # A 429 storm on every route the provisioner uses (plain-text bodies, no Retry-After).
        for route, count in (("create", 4), ("list", 12), ("show", 6), ("destroy", 3), ("search", 3), ("logs", 2)):
            w.vast.inject(kind="http_error", route=route, status=429, body="text", count=count)
        for _ in range(2):
            w.start_replica(PROVISIONER_MAX_CREATES="3")
        ok_slots = ["fgone", "fleave", "fpull", "fstuck", "foff"]
        deadline = datetime.fromtimestamp(w.started + 300, UTC)
        await w.publish(
            Provision(
                idempotency_key=f"{namespace}-p",
                profile="mlnode-v1",
                slot_ids=ok_slots,
                epoch_index=7,
                deadline=deadline,
            )
        )
        await w.publish(
            Provision(
                idempotency_key=f"{namespace}-bad",
                profile="mlnode-v1",
                slot_ids=["fbad"],
                epoch_index=7,
                deadline=deadline,
                image="ghcr.io/product-science/mlnode:9.9.9-missing",
            )
        )
        registered = lambda: {e.slot_id for e in w.events.of(NodeRegistered)} >= set(ok_slots)  # noqa: E731
        await w.wait(registered, 240, "every recoverable slot registered")

        failed = w.events.of(InstanceFailed)
        causes = {(f.slot_id, f.cause) for f in failed}
        assert any(c == FailureCause.OFFER_GONE for _, c in causes), causes
        for slot, cause in (
            ("fleave", FailureCause.CREATE_FAILED),
            ("fpull", FailureCause.PULL_FAILED),
            ("fstuck", FailureCause.STUCK_LOADING),
        ):
            assert (slot, cause) in causes, (slot, causes)
            bad_machines = {f.machine_id for f in failed if f.slot_id == slot}
            ready = w.events.of(InstanceReady, slot_id=slot)[-1]
            served_by = next(r for r in w.vast.ledger()["instances"] if r["id"] == ready.instance_id)
            assert served_by["machine_id"] not in bad_machines, "retried on the machine that failed"
        pulled = next(f for f in failed if f.slot_id == "fpull" and f.cause == FailureCause.PULL_FAILED)
        assert "manifest" in pulled.message and pulled.instance_id is not None
        assert "manifest" in pulled.logs_tail, "the failure carries the instance's logs"
        assert w.vast.limiter.refused > 0 or w.vast.world.faults.all()[-1].fired > 0

        # The host of a serving slot goes offline: the slot is re-rented and re-registered, same id and ports.
        first_reg = w.events.of(NodeRegistered, slot_id="foff")[0]
        first_ready = w.events.of(InstanceReady, slot_id="foff")[0]
        w.vast.inject(kind="host_offline", instance_id=first_ready.instance_id)
        await w.wait(lambda: len(w.events.of(NodeRegistered, slot_id="foff")) >= 2, 120, "foff re-registered")
        again = w.events.of(NodeRegistered, slot_id="foff")[-1]
        assert (again.poc_port, again.inference_port) == (first_reg.poc_port, first_reg.inference_port)
        assert (("foff", FailureCause.HOST_OFFLINE)) in {(f.slot_id, f.cause) for f in w.events.of(InstanceFailed)}
        assert w.events.of(InstanceReady, slot_id="foff")[-1].instance_id != first_ready.instance_id

        # The image no registry has: a clear failure after the create budget, nothing left behind.
        await w.wait(lambda: w.events.of(JobFailed, slot_id="fbad"), 120, "fbad failed")
        job_failed = w.events.of(JobFailed, slot_id="fbad")[0]
        assert job_failed.cause == FailureCause.PULL_FAILED
        bad = w.events.of(InstanceFailed, slot_id="fbad")
        pulls = [b for b in bad if b.cause == FailureCause.PULL_FAILED]
        assert len(pulls) == 3 and not bad[-1].will_retry, bad
        assert {b.cause for b in bad} <= {FailureCause.PULL_FAILED, FailureCause.OFFER_GONE}
        assert all(r["destroyed"] for r in w.instances_of("fbad"))

        await w.publish(Release(idempotency_key=f"{namespace}-r", slot_ids=ok_slots, epoch_index=7))
        done = lambda: {e.slot_id for e in w.events.of(JobCompleted)} >= set(ok_slots)  # noqa: E731
        await w.wait(done, 120, "every slot released")
        await w.publish(Reconcile(reason="test"))
        await w.wait(lambda: w.vast.ledger()["instances_live"] == 0, 40, "0 orphans")
        for slot in ok_slots:
            live_at_once = w.instances_of(slot)
            assert all(r["destroyed"] for r in live_at_once)


async def test_deadline_hedge_races_a_second_offer_and_destroys_the_loser(
    amqp_url: str, redis_url: str, namespace: str, tmp_path: Path
) -> None:
    async with ProvisionerWorld(amqp_url, redis_url, namespace, tmp_path, boot_scale=0.2) as w:
        # The first instance never finishes pulling (and is not given up on: a long stall timeout); the safety
        # point 8 s before the deadline starts a second offer, which wins.
        w.vast.inject(kind="stuck_loading", label=f"{w.label_prefix}-hedge-*")
        w.start_replica(PROVISIONER_STALL_TIMEOUT="120", PROVISIONER_HEDGE_LEAD="8")
        deadline = datetime.fromtimestamp(w.started + 14, UTC)
        await w.publish(
            Provision(
                idempotency_key=f"{namespace}-h",
                profile="mlnode-v1",
                slot_ids=["hedge"],
                epoch_index=2,
                deadline=deadline,
            )
        )
        await w.wait(lambda: w.events.of(NodeRegistered, slot_id="hedge"), 80, "the hedged slot registered")
        assert w.events.of(NodeRegistered, slot_id="hedge")[0].before_deadline
        created = w.events.of(InstanceCreated, slot_id="hedge")
        assert [c.hedge for c in created] == [False, True]
        ready = w.events.of(InstanceReady, slot_id="hedge")[0]
        assert ready.instance_id == created[1].instance_id
        await w.wait(lambda: w.events.of(InstanceDestroyed, slot_id="hedge"), 40, "the loser destroyed")
        loser = w.events.of(InstanceDestroyed, slot_id="hedge")[0]
        assert loser.instance_id == created[0].instance_id and loser.reason == "hedge lost"
        live = [r["id"] for r in w.instances_of("hedge") if not r["destroyed"]]
        assert live == [created[1].instance_id], "after the race the slot has one instance"
        await w.publish(Release(idempotency_key=f"{namespace}-r", slot_ids=["hedge"], epoch_index=2))
        await w.wait(lambda: w.vast.ledger()["instances_live"] == 0, 60, "released")
