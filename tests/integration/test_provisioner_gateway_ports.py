"""Gateway port pairs (Redis ``gateway:ports``) return to the pool when a slot's last job ends, and the node front
stops listening on a freed pair.

Every epoch the scheduler makes new slot ids and pre-pulls several candidates per slot, each a job with a pair of
the fixed ``GATEWAY_PORT_FIRST..LAST`` range; pairs that were never freed ran ``make run`` out of pairs within about
five epochs. A pair stays with its slot while a job holds the slot or the dapi still has the slot's node (a disabled
node keeps its host+ports, unique per host: gonka-protocol.md §3); a replacement GPU in the slot keeps it.

Real Redis and RabbitMQ; the last test drives the real provisioner process against the Vast and dapi simulators.
"""

from __future__ import annotations

import asyncio
import random
import socket
from collections.abc import AsyncIterator, Awaitable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from redis.asyncio import Redis

from hybrid_common.bus import Publisher, connect
from hybrid_common.messages.commands import Provision, Release
from hybrid_common.messages.domain import PocWindowHeights, PortMap
from hybrid_common.messages.events import EpochObserved, InstanceReachable, JobCompleted, JobFailed, NodeRegistered
from hybrid_common.redis_keys import RedisKeys
from hybrid_common.topology import Topology
from hybrid_provisioner.jobs.store import JobStore
from hybrid_proxy.front import FrontSettings, NodeFront
from tests.integration.test_provisioner_kit import ProvisionerWorld, free_range, wait_for

PAIRS = 3  # a small range: a leak shows within two epochs


class _Store(JobStore):
    """A JobStore that remembers the slots it touched, so teardown deletes their keys without scanning a shared
    Redis."""

    def __init__(self, redis: Redis, keys: RedisKeys, touched: set[str]) -> None:
        super().__init__(redis, keys)
        self.touched = touched

    async def claim_slot(self, slot_id: str, job_id: str, stale_job: str | None = None) -> bool:
        self.touched.add(slot_id)
        return await super().claim_slot(slot_id, job_id, stale_job)

    async def set_slot(self, slot_id: str, **fields: Any) -> None:
        self.touched.add(slot_id)
        await super().set_slot(slot_id, **fields)


@pytest.fixture
async def stores(redis_url: str, namespace: str) -> AsyncIterator[tuple[JobStore, JobStore]]:
    """Two allocators with their own connections, as two provisioner replicas have."""
    a, b = Redis.from_url(redis_url), Redis.from_url(redis_url)
    keys = RedisKeys(namespace)
    touched: set[str] = set()
    yield _Store(a, keys, touched), _Store(b, keys, touched)
    await a.delete(keys.gateway_ports(), keys.front_routes(), keys.tunnels(), *[keys.slot(s) for s in touched])
    await a.aclose()
    await b.aclose()


async def _take(store: JobStore, slot: str, job: str, first: int, last: int) -> tuple[int, int] | None:
    """What a job's driver does on acceptance: claim the slot, then its pair."""
    assert await store.claim_slot(slot, job)
    return await store.gateway_ports(slot, first, last)


async def test_pairs_come_back_over_many_epochs_from_two_allocators(stores: tuple[JobStore, JobStore]) -> None:
    a, b = stores
    first, last = 20000, 20000 + 2 * PAIRS - 1
    every_pair = {(p, p + 1) for p in range(first, last, 2)}
    rng = random.Random(6)
    handed_out = 0
    for epoch in range(40):
        # This epoch's candidates: new slot ids, as many as there are pairs, taken by both replicas at once.
        slots = [f"poc-e{epoch}-{n}" for n in range(PAIRS)]
        stores_for = [rng.choice((a, b)) for _ in slots]
        pairs = await asyncio.gather(
            *(_take(s, slot, f"{slot}.job", first, last) for s, slot in zip(stores_for, slots, strict=True))
        )
        assert None not in pairs, f"epoch {epoch}: no free pair for {slots} (pairs leak)"
        assert len(set(pairs)) == len(pairs), f"epoch {epoch}: one pair handed out twice: {pairs}"
        assert set(pairs) == every_pair  # exactly the range, nothing outside it
        handed_out += len(pairs)
        # The range is full: one more slot gets nothing rather than a shared pair.
        assert await _take(a, f"poc-e{epoch}-extra", f"poc-e{epoch}-extra.job", first, last) is None
        await a.free_slot(f"poc-e{epoch}-extra", f"poc-e{epoch}-extra.job", "failed")
        # A replacement GPU in a slot keeps the slot's pair (the dapi node is upserted with the same ports).
        assert await b.gateway_ports(slots[0], first, last) == pairs[0]
        # Each job ends (released or failed, nodes deleted or never registered), from either replica, at once.
        ends = [rng.choice((a, b)).free_slot(slot, f"{slot}.job", rng.choice(("released", "failed"))) for slot in slots]
        await asyncio.gather(*ends)
        assert await a.redis.hgetall(a.keys.gateway_ports()) == {}, f"epoch {epoch}: pairs not returned"
    assert handed_out == 40 * PAIRS  # far more slots than pairs: only reuse makes this possible


async def test_a_pair_stays_while_the_slot_is_held_or_its_node_remains(stores: tuple[JobStore, JobStore]) -> None:
    store, other = stores
    first, last = 20000, 20005
    # The next epoch's job already waits for the slot when this one ends: the pair stays for it.
    keep = await _take(store, "keep", "keep.e1", first, last)
    await store.redis.hset(store.keys.slot("keep"), "job", "keep.e2")  # e2 took the claim over as e1 ended
    await store.free_slot("keep", "keep.e1", "released")
    assert (await store.gateway_table()).get("keep") == keep
    assert await other.gateway_ports("keep", first, last) == keep
    await store.free_slot("keep", "keep.e2", "released")
    assert "keep" not in await store.gateway_table()

    # A disabled node stays in the dapi on its host+ports (unique per host): the pair stays with the slot, and a new
    # job for that slot gets it back.
    disabled = await _take(store, "off", "off.e1", first, last)
    await store.set_slot("off", node="disabled")
    await store.free_slot("off", "off.e1", "released")
    assert (await store.gateway_table()).get("off") == disabled
    assert await _take(other, "off", "off.e2", first, last) == disabled

    # A job that failed after registering leaves its node registered: the pair waits for the release that deletes
    # the node (the provisioner's release command frees it then).
    failed = await _take(store, "reg", "reg.e1", first, last)
    await store.set_slot("reg", node="registered")
    await store.free_slot("reg", "reg.e1", "failed")
    assert (await store.gateway_table()).get("reg") == failed
    assert not await store.free_gateway_ports("reg")
    await store.set_slot("reg", node="")
    assert await store.free_gateway_ports("reg")
    assert "reg" not in await store.gateway_table()


async def test_the_sweep_frees_only_idle_pairs_no_dapi_node_uses(stores: tuple[JobStore, JobStore]) -> None:
    """Pairs an older version never freed (or a crash between two writes left): the sweep returns them, never one a
    job holds, one whose node the slot record says is registered or disabled, or one a dapi node still uses."""
    store, _ = stores
    table = store.keys.gateway_ports()
    leaked = {f"old-{n}": (20000 + 2 * n, 20001 + 2 * n) for n in range(5)}
    await store.redis.hset(table, mapping={slot: f"{p},{q}" for slot, (p, q) in leaked.items()})
    await store.claim_slot("old-0", "old-0.job")
    await store.set_slot("old-1", node="disabled")
    await store.set_slot("old-2", node="registered")
    freed = await store.sweep_gateway_ports(in_use={20006})  # old-3's PoC port is still a dapi node's
    assert sorted(freed) == ["old-4"]
    assert set(await store.gateway_table()) == {"old-0", "old-1", "old-2", "old-3"}


# ---------------------------------------------------------------------------------------------------- the front


def _listening(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


async def _state(port: int) -> tuple[int, Any] | None:
    """``GET /api/v1/state`` on a gateway port (None while nothing listens)."""
    try:
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=3)) as s,
            s.get(f"http://127.0.0.1:{port}/v3.0.8/api/v1/state") as r,
        ):
            return r.status, await r.json(content_type=None)
    except (aiohttp.ClientError, OSError, TimeoutError):
        return None


async def test_the_front_stops_listening_on_a_freed_pair_and_serves_its_next_slot(
    amqp_url: str, redis_url: str, namespace: str, tmp_path: Path, stores: tuple[JobStore, JobStore]
) -> None:
    store, _ = stores
    first, last = free_range(2)
    conn = await connect(amqp_url, name="test-gateway-ports")
    topology = Topology(namespace)
    settings = FrontSettings(
        _env_file=None,
        HYBRID_NAMESPACE=namespace,
        AMQP_URL=amqp_url,
        REDIS_URL=redis_url,
        NODE_FRONT_HOST="127.0.0.1",
        SSH_KEY_PATH=str(tmp_path / "id_ed25519"),
        FRONT_PROBE_INTERVAL=0.2,
        FRONT_SCAN_INTERVAL=0.2,
    )
    front = NodeFront(settings, store.redis, conn, topology)
    try:
        await front.start()
        pair = await _take(store, "poc-e1-a", "poc-e1-a.job", first, last)
        assert pair is not None
        answer = await wait_for(lambda: _state(pair[0]), 20, "the front listening on the slot's pair")
        assert answer[0] == 503 and answer[1]["slot_id"] == "poc-e1-a"

        # The slot's job ends (node deleted): the pair leaves the table and the front closes both listeners.
        await store.free_slot("poc-e1-a", "poc-e1-a.job", "released")
        await wait_for(lambda: not _listening(pair[0]) and not _listening(pair[1]), 20, "listeners closed")
        assert "poc-e1-a" not in front.status()["slots"]

        # The next epoch's slot gets the pair back and the front serves it there.
        assert await _take(store, "poc-e2-a", "poc-e2-a.job", first, last) == pair
        answer = await wait_for(lambda: _state(pair[0]), 20, "the next slot's listener")
        assert answer[1]["slot_id"] == "poc-e2-a"

        # A slot still routed to a GPU when its pair is handed on (its instance.destroyed not seen yet): the new
        # slot takes the ports over instead of failing to listen.
        publisher = Publisher(conn, topology, "test")
        await publisher.publish(
            InstanceReachable(
                job_id="poc-e2-a.job",
                slot_id="poc-e2-a",
                instance_id=4242,
                connectivity="direct",
                public_ip="127.0.0.1",
                ports=[PortMap(container_port=8080, host_port=9), PortMap(container_port=5000, host_port=9)],
                gateway_poc_port=pair[0],
                gateway_inference_port=pair[1],
            )
        )
        await wait_for(lambda: front.routes.get("poc-e2-a") and front.routes["poc-e2-a"].instance_id, 20, "routed")
        await store.free_slot("poc-e2-a", "poc-e2-a.job", "released")
        assert await _take(store, "poc-e3-a", "poc-e3-a.job", first, last) == pair

        async def served_by_e3() -> bool:
            answer = await _state(pair[0])
            return bool(answer and answer[1].get("slot_id") == "poc-e3-a")

        await wait_for(served_by_e3, 20, "the pair served for the new slot")
        assert front.status()["listen_errors"] == []
        assert "poc-e2-a" not in front.routes
    finally:
        await front.stop()
        await conn.close()


# ---------------------------------------------------------------------------------------------------- end to end


async def test_one_pair_serves_slot_after_slot_through_the_real_provisioner(
    amqp_url: str, redis_url: str, namespace: str, tmp_path: Path
) -> None:
    """One gateway pair in the range: a second epoch's slot can rent only because the first slot's release (admin
    delete) returned the pair; the front listens on it for each slot in turn."""
    async with ProvisionerWorld(amqp_url, redis_url, namespace, tmp_path, boot_scale=0.2, gateway_pairs=1) as w:
        w.start_replica()
        table = RedisKeys(namespace).gateway_ports()
        pairs = []
        for epoch, slot in ((1, "poc-e1-a"), (2, "poc-e2-a")):
            await w.publish(
                Provision(
                    idempotency_key=f"{namespace}-{epoch}", profile="mlnode-v1", slot_ids=[slot], epoch_index=epoch
                )
            )

            def settled(slot: str = slot) -> Any:
                return w.events.of(NodeRegistered, slot_id=slot) or w.events.of(JobFailed, slot_id=slot)

            await w.wait(settled, 90, f"{slot} registered")
            assert not w.events.of(JobFailed, slot_id=slot), w.events.of(JobFailed, slot_id=slot)
            reg = w.events.of(NodeRegistered, slot_id=slot)[0]
            pairs.append((reg.poc_port, reg.inference_port))
            assert _listening(reg.poc_port) and _listening(reg.inference_port)
            await w.publish(
                Release(idempotency_key=f"{namespace}-r{epoch}", slot_ids=[slot], epoch_index=epoch, how="delete")
            )

            def released(slot: str = slot) -> Any:
                return w.events.of(JobCompleted, slot_id=slot)

            def returned(slot: str = slot) -> Awaitable[bool]:
                return _absent(w.redis, table, slot)

            await w.wait(released, 60, f"{slot} released")
            await w.wait(returned, 20, f"{slot}'s pair returned")
        assert pairs[0] == pairs[1] == w.gateway
        await w.wait(lambda: not _listening(pairs[1][0]), 20, "the front closed the last slot's listeners")
        assert w.vast.ledger()["instances_live"] == 0


async def _absent(redis: Redis, table: str, slot: str) -> bool:
    return not await redis.hexists(table, slot)


async def _view_epoch(redis: Redis, namespace: str, epoch: int) -> None:
    """The scheduler's chain view in Redis (what every provisioner replica reads), saying the chain is in ``epoch``."""
    window = PocWindowHeights(
        poc_start=100,
        generation_end=120,
        exchange_end=124,
        validation_start=128,
        validation_end=147,
        set_new_validators=163,
        next_poc_start=340,
    )
    view = EpochObserved(
        epoch_index=epoch,
        block_height=200,
        phase="Inference",
        window=window,
        block_seconds=1.0,
        poc_v2_enabled=False,
        mlnode_version="v3.0.8",
        source="public",
        stale_seconds=0,
    )
    await redis.set(RedisKeys(namespace).chain_view(), view.model_dump_json())


async def test_a_node_released_with_disable_gives_its_pair_back_two_epochs_later(
    amqp_url: str, redis_url: str, namespace: str, tmp_path: Path
) -> None:
    """SCHEDULER_RELEASE_HOW=disable keeps the node in the dapi (gonka-protocol.md §3: the Gonka team's route for a
    node leaving; it keeps its host+ports), so its pair stays taken; with new slot ids every epoch a fixed range would
    drain. A node we disabled two epochs ago, whose slot no job rents, is deleted by the sweep and its pair freed —
    not one disabled in the previous epoch, and never a node of someone else's."""
    async with ProvisionerWorld(amqp_url, redis_url, namespace, tmp_path, boot_scale=0.2, gateway_pairs=1) as w:
        w.start_replica()
        slot = "poc-e1-a"
        await w.publish(
            Provision(idempotency_key=f"{namespace}-1", profile="mlnode-v1", slot_ids=[slot], epoch_index=1)
        )
        await w.wait(
            lambda: w.events.of(NodeRegistered, slot_id=slot) or w.events.of(JobFailed, slot_id=slot), 90, "registered"
        )
        assert not w.events.of(JobFailed, slot_id=slot), w.events.of(JobFailed, slot_id=slot)
        await w.publish(Release(idempotency_key=f"{namespace}-r1", slot_ids=[slot], epoch_index=1, how="disable"))
        await w.wait(lambda: w.events.of(JobCompleted, slot_id=slot), 60, f"{slot} released")
        node = (await w.admin_nodes())[slot]
        assert node["state"]["admin_state"]["enabled"] is False, node["state"]
        disabled_in = int(node["state"]["admin_state"]["epoch"])
        table = RedisKeys(namespace).gateway_ports()
        assert await w.redis.hexists(table, slot), "a disabled node keeps its pair"
        # The operator's own node on the same host, disabled by hand in the same epoch: not ours to delete.
        theirs = {**node["node"], "id": "operator-gpu", "poc_port": 40001, "inference_port": 40002}
        theirs.pop("node_num", None)
        async with aiohttp.ClientSession() as http:
            async with http.post(f"{w.dapi.admin_url}/admin/v1/nodes", json=theirs) as r:
                assert r.status == 200, await r.text()
            async with http.post(f"{w.dapi.admin_url}/admin/v1/nodes/operator-gpu/disable") as r:
                assert r.status == 200, await r.text()

        # The next epoch: the node is kept (it serves until that epoch's PoC), and so is its pair.
        await _view_epoch(w.redis, namespace, disabled_in + 1)
        w.start_replica().wait_for_output(" up: profiles")  # a replica sweeps once at start
        await asyncio.sleep(3)
        assert slot in await w.admin_nodes() and await w.redis.hexists(table, slot)

        # Two epochs on: that PoC and its weights are behind; the sweep deletes the node and the pair is free.
        await _view_epoch(w.redis, namespace, disabled_in + 2)
        w.start_replica().wait_for_output(" up: profiles")
        await w.wait(lambda: _node_gone(w, slot), 30, f"{slot} deleted from the dapi")
        await w.wait(lambda: _absent(w.redis, table, slot), 20, f"{slot}'s pair returned")
        assert "operator-gpu" in await w.admin_nodes()
        assert w.vast.ledger()["instances_live"] == 0


async def _node_gone(w: ProvisionerWorld, slot: str) -> bool:
    return slot not in await w.admin_nodes()
