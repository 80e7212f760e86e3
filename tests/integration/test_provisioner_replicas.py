"""Issue #6 acceptance: three replicas, the one holding a job SIGKILLed at every lifecycle point in turn.

The test-only fault hook (``PROVISIONER_TEST_DIE_AT`` + ``PROVISIONER_TEST_DIE_DIR``) makes the first replica that
reaches each named point kill itself — deterministic, no sleeps. Dead replicas are replaced so three keep running.
Every job still completes, no slot ever gets a second instance, and after the reconciler's pass nothing is left.
"""

from __future__ import annotations

import asyncio
import contextlib
from datetime import UTC, datetime
from pathlib import Path

import pytest

from hybrid_common.messages.commands import Provision, Reconcile, Release
from hybrid_common.messages.events import InstanceCreated, JobCompleted, NodeRegistered
from hybrid_provisioner.faulthook import POINTS
from tests.integration.test_provisioner_kit import ProvisionerWorld


@pytest.mark.timeout(600)
@pytest.mark.slow
async def test_sigkill_at_every_lifecycle_point_still_completes_without_duplicates(
    amqp_url: str, redis_url: str, namespace: str, tmp_path: Path
) -> None:
    async with ProvisionerWorld(amqp_url, redis_url, namespace, tmp_path, boot_scale=0.2) as w:
        env = {"PROVISIONER_TEST_DIE_AT": ",".join(POINTS)}
        for _ in range(3):
            w.start_replica(**env)
        kills = 0

        async def keep_three() -> None:
            nonlocal kills
            while True:
                for proc in list(w.replicas):
                    if not proc.alive() and not getattr(proc, "counted", False):
                        proc.counted = True  # type: ignore[attr-defined]
                        kills += 1
                        w.start_replica(**env)
                await asyncio.sleep(0.1)

        keeper = asyncio.create_task(keep_three())
        try:
            slots = ["kill-a", "kill-b"]
            deadline = datetime.fromtimestamp(w.started + 600, UTC)
            await w.publish(
                Provision(
                    idempotency_key=f"{namespace}-p",
                    profile="mlnode-v1",
                    slot_ids=slots,
                    epoch_index=3,
                    deadline=deadline,
                )
            )
            registered = lambda: {e.slot_id for e in w.events.of(NodeRegistered)} >= set(slots)  # noqa: E731
            await w.wait(registered, 300, "both slots registered despite the kills")
            await w.publish(Release(idempotency_key=f"{namespace}-r", slot_ids=slots, epoch_index=3))
            done = lambda: {e.slot_id for e in w.events.of(JobCompleted)} >= set(slots)  # noqa: E731
            await w.wait(done, 240, "both jobs released despite the kills")
            fired = {p.name for p in w.die_dir.iterdir()}
            # Every point a job passes through killed one replica ("accepted" … "released").
            assert fired == set(POINTS), sorted(set(POINTS) - fired)
            await w.wait(lambda: kills >= len(POINTS) - 1, 20, "the dead replicas counted")
        finally:
            keeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await keeper
        await w.publish(Reconcile(reason="test"))
        await w.wait(lambda: w.vast.ledger()["instances_live"] == 0, 40, "no instance left after reconcile")
        for slot in slots:
            made = w.instances_of(slot)
            assert len(made) == 1, f"slot {slot} got {len(made)} instances: {[m['id'] for m in made]}"
        created = w.events.of(InstanceCreated)
        assert {c.slot_id for c in created} == set(slots)
        assert len({c.instance_id for c in created}) == 2
        jobs = await w.jobs()
        assert {j["state"] for j in jobs.values()} == {"released"}
        assert all(all(t["state"] == "destroyed" for t in j["tracks"]) for j in jobs.values())
