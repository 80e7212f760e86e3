"""Issue #6 acceptance: money. A budget cap stops the rental that would exceed it (``budget.blocked``, no instance
in the Vast ledger), while the rental within it goes ahead; the cost ledger books what the Vast ledger bills."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import orjson

from hybrid_common.bus import Requester
from hybrid_common.messages.commands import (
    Destroy,
    LogsQuery,
    LogsReply,
    OffersQuery,
    OffersReply,
    Provision,
    Reconcile,
    Release,
)
from hybrid_common.messages.domain import FailureCause
from hybrid_common.messages.events import (
    BudgetBlocked,
    InstanceCreated,
    InstanceDestroyed,
    InstanceReady,
    JobCompleted,
    JobFailed,
    NodeRegistered,
    OrphanDestroyed,
)
from hybrid_provisioner.vast import VastClient, VastError
from tests.integration.test_provisioner_kit import ProvisionerWorld
from tests.support.procs import ManagedProcess


async def test_budget_cap_blocks_the_rental_that_would_exceed_it(
    amqp_url: str, redis_url: str, namespace: str, tmp_path: Path
) -> None:
    async with ProvisionerWorld(amqp_url, redis_url, namespace, tmp_path, boot_scale=0.2) as w:
        # One rental of the cheapest fitting GPU (~$0.38/h) is estimated at ~1 billed hour until the deadline plus
        # 1 hour held: ~$0.76. A $1.00 day cap lets one through and blocks the second.
        w.start_replica(BUDGET_DAY_USD="1.0")
        deadline = datetime.fromtimestamp(w.started + 60, UTC)  # 60 wall s = 1 billed hour at 60x
        await w.publish(
            Provision(idempotency_key=f"{namespace}-a", profile="mlnode-v1", slot_ids=["cash-a"], deadline=deadline)
        )
        await w.wait(lambda: w.events.of(InstanceCreated, slot_id="cash-a"), 60, "the first rental")
        await w.publish(
            Provision(idempotency_key=f"{namespace}-b", profile="mlnode-v1", slot_ids=["cash-b"], deadline=deadline)
        )
        await w.wait(lambda: w.events.of(JobFailed, slot_id="cash-b"), 60, "the second rental refused")
        blocked = w.events.of(BudgetBlocked)
        assert len(blocked) == 1 and blocked[0].scope == "day" and blocked[0].cap_usd == 1.0
        assert blocked[0].spent_usd + blocked[0].estimated_usd > 1.0
        assert blocked[0].spent_usd > 0.5, "the first rental's commitment counts"
        assert w.events.of(JobFailed, slot_id="cash-b")[0].cause == FailureCause.BUDGET
        assert w.instances_of("cash-b") == [], "a blocked rental creates nothing"
        assert len(w.instances_of("cash-a")) == 1

        # The cost ledger: the destroyed instance's final cost, booked once, close to what Vast billed.
        await w.wait(lambda: w.events.of(NodeRegistered, slot_id="cash-a"), 60, "cash-a registered")
        await w.publish(Release(idempotency_key=f"{namespace}-r", slot_ids=["cash-a"], how="disable"))
        await w.wait(lambda: w.events.of(JobCompleted, slot_id="cash-a"), 60, "released")
        destroyed = w.events.of(InstanceDestroyed, slot_id="cash-a")[0]
        billed = w.instances_of("cash-a")[0]
        assert billed["destroyed"]
        assert abs(destroyed.cost_usd - billed["cost"]) <= max(0.02, 0.1 * billed["cost"]), (destroyed, billed["cost"])
        assert abs(destroyed.gpu_seconds - billed["billed_gpu_seconds"]) <= 0.1 * billed["billed_gpu_seconds"] + 60
        day = datetime.now(UTC).strftime("%Y-%m-%d")
        spent = float(await w.redis.get(f"{namespace}:spend:day:{day}") or 0)
        assert abs(spent - destroyed.cost_usd) < 1e-6
        raw_view = await w.redis.hget(f"{namespace}:instances", str(destroyed.instance_id))
        assert raw_view is not None
        view = orjson.loads(raw_view)
        assert view["state"] == "destroyed" and view["slot_id"] == "cash-a"
        nodes = await w.admin_nodes()
        assert nodes["cash-a"]["state"]["admin_state"]["enabled"] is False, "how=disable keeps the node, disabled"


async def _rent_directly(vast: VastClient, label: str) -> int:
    """An instance the provisioner never asked for (a crashed deployment's leftover, or someone else's)."""
    offers = await vast.search_offers(
        {
            "rentable": {"eq": True},
            "rented": {"eq": False},
            "direct_port_count": {"gte": 1},
            "order": [["dph_total", "asc"]],
        }
    )
    for offer in offers:
        try:
            result = await vast.create_instance(
                int(offer["id"]), {"image": "vastai/base-image:cuda-12.4", "disk": 10, "label": label, "env": {}}
            )
        except VastError:
            continue
        return result.instance_id
    raise AssertionError("no offer to rent directly")


async def test_reconciler_destroys_unowned_labelled_instances_and_destroy_all_labelled(
    amqp_url: str, redis_url: str, namespace: str, tmp_path: Path
) -> None:
    async with ProvisionerWorld(amqp_url, redis_url, namespace, tmp_path, boot_scale=0.2, vast_rate_limits=False) as w:
        w.start_replica(PROVISIONER_RECONCILE_INTERVAL="1000")
        await w.publish(Provision(idempotency_key=f"{namespace}-o", profile="mlnode-v1", slot_ids=["owned"]))
        await w.wait(lambda: w.events.of(NodeRegistered, slot_id="owned"), 80, "a live job's instance")
        vast = VastClient(w.vast.url, "test")
        ghost = await _rent_directly(vast, f"{w.label_prefix}-ghost-9")
        foreign = await _rent_directly(vast, "someone-else-1")
        await w.publish(Reconcile(reason="test"))
        await w.wait(lambda: w.events.of(OrphanDestroyed), 40, "the orphan destroyed")
        assert [o.instance_id for o in w.events.of(OrphanDestroyed)] == [ghost]
        live = {r["id"] for r in w.live_instances()}
        assert ghost not in live and foreign in live
        owned = w.events.of(InstanceReady, slot_id="owned")[0].instance_id
        assert owned in live, "an instance a live job owns is never an orphan"

        # Queries answered from Vast over the reply queue: a priced offer preview, an instance's logs.
        requester = Requester(w.conn, w.publisher)
        await requester.start()
        preview = await requester.ask(
            OffersQuery(profile="mlnode-v1", limit=5, estimated_minutes=30), OffersReply, timeout=15
        )
        assert 0 < len(preview.offers) <= 5
        assert [o.dph_total for o in preview.offers] == sorted(o.dph_total for o in preview.offers)
        assert all(o.estimated_cost_usd == round(o.dph_total / 2, 4) for o in preview.offers)
        logs = await requester.ask(LogsQuery(instance_id=owned, tail=20), LogsReply, timeout=15)
        assert logs.instance_id == owned and "Uvicorn running" in logs.text

        # Emergency: every labelled instance goes, and the live job is released instead of renting again.
        await w.publish(Destroy(all_labelled=True, reason="test"))
        await w.wait(lambda: owned not in {r["id"] for r in w.live_instances()}, 40, "the owned instance destroyed")
        await w.wait(lambda: w.events.of(JobCompleted, slot_id="owned"), 40, "the job released")
        assert {r["id"] for r in w.live_instances()} == {foreign}

        # The same without broker or service: python -m hybrid_provisioner destroy --all-labelled.
        leftover = await _rent_directly(vast, f"{w.label_prefix}-left-1")
        await vast.close()
        for r in w.replicas:
            r.stop()
        cli = ManagedProcess(["-m", "hybrid_provisioner", "destroy", "--all-labelled"], env=w.env(), name="cli")
        cli.start()
        await w.wait(lambda: not cli.alive(), 60, "the emergency command done")
        assert str(leftover) in cli.output()
        assert {r["id"] for r in w.live_instances()} == {foreign}
