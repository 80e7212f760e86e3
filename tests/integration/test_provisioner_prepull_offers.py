"""Standby pre-pulls competing for fewer fitting offers than there are jobs (the v2 world: a few multi-GPU machines).

Each offer gets at most one create (an offer claim in Redis sends the other jobs to the next offer instead of a 410,
vastai-api.md), the jobs left without a machine end ``job.failed`` ``no_offers`` marked ``standby``, and the alert
webhook gets those as warnings: a healthy epoch pages nobody.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from hybrid_common.alerts import AlertNotifier
from hybrid_common.messages.commands import Provision, Release
from hybrid_common.messages.domain import FailureCause
from hybrid_common.messages.events import InstanceCreated, InstanceFailed, JobFailed
from hybrid_common.redis_keys import RedisKeys
from hybrid_provisioner.offers import find_offers
from hybrid_provisioner.profiles import load_profiles
from hybrid_provisioner.settings import ProvisionerSettings
from hybrid_provisioner.vast import VastClient
from tests.integration.test_provisioner_kit import ProvisionerWorld
from tests.support.webhook import Webhook

pytestmark = pytest.mark.timeout(420)

PROFILE = "mlnode-v2"
JOBS = 7


@pytest.fixture
async def webhook() -> AsyncIterator[Webhook]:
    async with Webhook() as hook:
        yield hook


async def fitting_offers(w: ProvisionerWorld) -> set[int]:
    """The offers the provisioner's own search accepts for the profile, before anything is rented."""
    profile = load_profiles(ProvisionerSettings(_env_file=None, MODE="sim"))[PROFILE]
    client = VastClient(w.vast.url, "test")
    try:
        return {o.id for o in await find_offers(client, profile, profile.policy)}
    finally:
        await client.close()


async def test_surplus_prepulls_never_race_one_offer_and_only_warn(
    amqp_url: str, redis_url: str, namespace: str, tmp_path: Path, webhook: Webhook
) -> None:
    async with ProvisionerWorld(amqp_url, redis_url, namespace, tmp_path, boot_scale=0.2, gateway_pairs=JOBS) as w:
        fitting = await fitting_offers(w)
        assert 0 < len(fitting) < JOBS, f"the scenario needs fewer fitting offers than jobs: {len(fitting)}"

        # Every create the simulated Vast receives, refused or not (its ledger lists only the instances made).
        creates: list[int] = []
        create = w.vast.world.create

        def counted(offer_id: int, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
            creates.append(offer_id)
            return create(offer_id, body)

        w.vast.world.create = counted  # type: ignore[method-assign]

        notifier = AlertNotifier(w.conn, w.topology, w.redis, webhook.url, backoff=0.05)
        await notifier.start()
        try:
            # Two replicas driving about half the jobs each (the claims are shared through Redis, not memory), each
            # taking them all in its first scan, so every job searches while the others are still creating.
            replicas = [w.start_replica(PROVISIONER_TAKE_PER_SCAN="4", PROVISIONER_MAX_JOBS="4") for _ in range(2)]
            await w.wait(lambda: all(" up: profiles" in r.output() for r in replicas), 90, "both replicas up")
            slots = [f"sb-{i}" for i in range(JOBS)]
            await w.publish(
                Provision(
                    idempotency_key=f"{namespace}-prepull",
                    profile=PROFILE,
                    slot_ids=slots,
                    epoch_index=3,
                    start_stopped=True,
                )
            )
            surplus = JOBS - len(fitting)
            await w.wait(lambda: len(w.events.of(JobFailed)) >= surplus, 240, f"{surplus} surplus pre-pulls failed")
            await w.wait(
                lambda: len(w.events.of(InstanceCreated)) >= len(fitting), 240, "every fitting offer rented once"
            )
            await w.wait(lambda: len(webhook.of("job.failed")) >= surplus, 60, "the surplus failures alerted")

            counts = Counter(creates)
            assert all(n == 1 for n in counts.values()), f"two creates on one offer: {counts}"
            assert set(counts) == fitting, "each fitting offer got exactly one create, nothing else was tried"
            gone = [f for f in w.events.of(InstanceFailed) if f.cause == FailureCause.OFFER_GONE]
            assert not gone, f"a job raced another to an offer: {gone}"

            created = w.events.of(InstanceCreated)
            assert len(created) == len(fitting) and all(c.stopped for c in created)
            assert {c.offer_id for c in created} == fitting
            keys = RedisKeys(namespace)
            for c in created:
                # The claim outlives the create (its TTL): a search answered before the create cannot send a job there.
                assert await w.redis.get(keys.offer_claim(c.offer_id)) == c.job_id.encode()
            live = w.live_instances()
            assert len(live) == len(fitting) and {r["offer_id"] for r in live} == fitting

            failed = w.events.of(JobFailed)
            assert len(failed) == surplus
            assert {f.cause for f in failed} == {FailureCause.NO_OFFERS}
            assert all(f.standby for f in failed), "a pre-pull's failure says it was a standby"
            assert {f.slot_id for f in failed}.isdisjoint({c.slot_id for c in created})

            alerts = webhook.of("job.failed")
            assert len(alerts) == surplus
            assert {a["severity"] for a in alerts} == {"warning"}
            assert all(a["title"].startswith("standby pre-pull not rented for slot sb-") for a in alerts)
            assert not [b for b in webhook.bodies if b["severity"] == "critical"], webhook.bodies

            await w.publish(Release(idempotency_key=f"{namespace}-release", slot_ids=slots, epoch_index=3))
            await w.wait(lambda: w.vast.ledger()["instances_live"] == 0, 120, "every pre-pull destroyed")
        finally:
            await notifier.stop()
