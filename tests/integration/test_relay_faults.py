"""Issue #11 acceptance: every PoC batch the relay answered 200 reaches the dapi simulator (or is dead-lettered for a
window that really closed), through a dapi outage, a broker restart and a SIGKILL of the relay mid-forwarding;
duplicates at the dapi are counted and bounded by what was in flight at the kill; none without a kill — and the same
check fails when deduplication is switched off.

The world: a private RabbitMQ (restartable), the shared Redis under a test namespace, the dapi simulator in this
process with a long PoC exchange window and registered nodes (so it judges every batch and detects duplicates itself),
an "epoch adapter" standing in for the scheduler (publishes ``epoch.observed`` from the simulator's
``/v1/epochs/latest``), the relay as a real process, and concurrent senders that retry until they get a 200 and
re-send some batches after it, as MLNode senders do when a 200 is lost (gonka-protocol.md §2, §7).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any

import aio_pika
import aiohttp
import orjson
import pytest
from redis.asyncio import Redis

from hybrid_common import TEST, EpochShape
from hybrid_common.bus import Publisher, connect
from hybrid_common.messages.domain import PocWindowHeights
from hybrid_common.messages.events import EpochObserved
from hybrid_common.redis_keys import RedisKeys
from hybrid_common.topology import Topology
from hybrid_relay.ledger import read_stats
from sim.network import DEFAULT_EPOCH_MODEL, RunningDapi, start_dapi
from tests.support.infra import PrivateRabbit
from tests.support.net import free_port
from tests.support.procs import ManagedProcess

pytestmark = [pytest.mark.broker, pytest.mark.redis]

# A PoC whose exchange window outlasts the run (3000 blocks of 0.25 s): here only the faults decide the outcome.
LONG_POC = EpochShape(
    epoch_length=4000,
    poc_stage_duration=3000,
    poc_exchange_duration=10,
    poc_validation_delay=5,
    poc_validation_duration=20,
    set_new_validators_delay=16,
    inference_validation_cutoff=8,
)
FIRST_POC = 4
NODES = 8


@pytest.fixture(scope="module")
def rabbit() -> Iterator[PrivateRabbit]:
    r = PrivateRabbit().start()
    try:
        yield r
    finally:
        r.cleanup()


# --- the world ------------------------------------------------------------------------------------------------------


@dataclass
class World:
    dapi: RunningDapi
    node_nums: list[int]
    poc_start: int
    session: aiohttp.ClientSession

    async def batches(self) -> list[dict[str, Any]]:
        async with self.session.get(f"{self.dapi.public_url}/_sim/batches") as r:
            data = await r.json()
            assert isinstance(data, list)
            return data

    async def callback_server(self, up: bool) -> None:
        async with self.session.post(f"{self.dapi.public_url}/_sim/callback/{'start' if up else 'stop'}") as r:
            assert r.status == 200, await r.text()


@contextlib.asynccontextmanager
async def world() -> AsyncIterator[World]:
    dapi = await start_dapi(profile=TEST, epoch=LONG_POC, first_poc_start=FIRST_POC, inference_interval_seconds=0)
    session = aiohttp.ClientSession()
    try:
        nums = []
        for i in range(NODES):
            body = {
                "id": f"relay-node-{i}",
                "host": "127.0.0.1",
                "inference_port": 41000 + 2 * i,
                "poc_port": 41001 + 2 * i,
                "max_concurrent": 500,
                "models": {DEFAULT_EPOCH_MODEL: {"args": []}},
                "hardware": [{"type": "H100", "count": 1}],
            }
            async with session.post(f"{dapi.admin_url}/admin/v1/nodes", json=body) as r:
                assert r.status == 200, await r.text()
        async with session.get(f"{dapi.admin_url}/admin/v1/nodes") as r:
            nums = sorted(int(n["node"]["node_num"]) for n in await r.json())
        deadline = time.monotonic() + 30
        while dapi.height <= FIRST_POC + 1:  # the exchange window opens a block after the PoC start
            assert time.monotonic() < deadline, "the simulated chain does not advance"
            await asyncio.sleep(0.05)
        yield World(dapi, nums, FIRST_POC, session)
    finally:
        await session.close()
        await dapi.close()


async def epoch_adapter(amqp_url: str, namespace: str, dapi: RunningDapi, stop: asyncio.Event) -> None:
    """The scheduler's part: ``epoch.observed`` from the dapi's public API (the relay never calls the chain)."""
    connection = await connect(amqp_url, name="test-epoch-adapter")
    publisher = Publisher(connection, Topology(namespace), "test-scheduler", deadline=2.0)
    try:
        async with aiohttp.ClientSession() as s:
            while not stop.is_set():
                async with s.get(f"{dapi.public_url}/v1/epochs/latest") as r:
                    data = await r.json()
                st, nx = data["epoch_stages"], data["next_epoch_stages"]
                with contextlib.suppress(Exception):  # a broker restart: the next tick publishes again
                    await publisher.publish(
                        EpochObserved(
                            epoch_index=data["latest_epoch"]["index"],
                            block_height=data["block_height"],
                            phase=data["phase"],
                            window=_window(st),
                            next_window=_window(nx),
                            block_seconds=TEST.block_seconds,
                            poc_v2_enabled=False,
                            mlnode_version="v3.0.8",
                            source="public",
                            stale_seconds=0.0,
                        )
                    )
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), 0.5)
    finally:
        await connection.close()


def _window(stages: dict[str, Any]) -> PocWindowHeights:
    return PocWindowHeights(
        poc_start=stages["poc_start"],
        generation_end=stages["poc_generation_end"],
        exchange_end=stages["poc_exchange_window"]["end"],
        validation_start=stages["poc_validation_start"],
        validation_end=stages["poc_validation_end"],
        set_new_validators=stages["set_new_validators"],
        next_poc_start=stages["next_poc_start"],
    )


def relay_process(amqp_url: str, redis_url: str, namespace: str, dapi: RunningDapi, port: int, **env: str):
    return ManagedProcess(
        ["-m", "hybrid_relay"],
        env={
            "AMQP_URL": amqp_url,
            "REDIS_URL": redis_url,
            "HYBRID_NAMESPACE": namespace,
            "HYBRID_TIME_PROFILE": "test",
            "DAPI_CALLBACK_URL": dapi.callback_url,
            "RELAY_PUBLIC_HOST": "127.0.0.1",
            "RELAY_PUBLIC_PORT": str(port),
            "RELAY_METRICS_PORT": "0",
            "LOG_JSON": "false",
            **env,
        },
        wait_for_port=port,
        timeout=60,
        name="relay",
    )


# --- the senders --------------------------------------------------------------------------------------------------


@dataclass
class Fleet:
    """Concurrent MLNode-like senders: retry until 200; every ``resend_every``-th batch is sent again after its 200."""

    url: str
    total: int
    senders: int
    node_nums: list[int]
    poc_start: int
    resend_every: int = 10
    pause: float = 0.0  # between a sender's batches: an MLNode produces batches over time, not in one burst
    accepted: Counter[int] = field(default_factory=Counter)  # seq → 200s received
    refusals: Counter[str] = field(default_factory=Counter)

    def body(self, seq: int) -> bytes:
        return orjson.dumps(
            {
                "public_key": f"pk-{seq % len(self.node_nums)}",
                "block_hash": "relay-test-hash",
                "block_height": self.poc_start,
                "nonces": [seq * 1000 + i for i in range(4)],
                "dist": [0.1, 0.2, 0.3, 0.4],
                "node_id": self.node_nums[seq % len(self.node_nums)],
            }
        )

    @property
    def accepted_unique(self) -> int:
        return len(self.accepted)

    async def run(self) -> None:
        timeout = aiohttp.ClientTimeout(total=10)
        async with aiohttp.ClientSession(timeout=timeout) as s:
            await asyncio.gather(*(self._sender(s, i) for i in range(self.senders)))

    async def _sender(self, s: aiohttp.ClientSession, index: int) -> None:
        for seq in range(index, self.total, self.senders):
            await self._deliver(s, seq)
            if seq % self.resend_every == 0:
                await self._deliver(s, seq)  # the 200 "got lost": the same batch again
            if self.pause:
                await asyncio.sleep(self.pause)

    async def _deliver(self, s: aiohttp.ClientSession, seq: int) -> None:
        body = self.body(seq)
        while True:
            try:
                async with s.post(
                    f"{self.url}/v1/poc-batches/generated", data=body, headers={"Content-Type": "application/json"}
                ) as r:
                    await r.read()
                    if r.status == 200:
                        self.accepted[seq] += 1
                        return
                    self.refusals[str(r.status)] += 1
            except (aiohttp.ClientError, TimeoutError) as exc:
                self.refusals[type(exc).__name__] += 1
            await asyncio.sleep(0.05)


# --- the verdict --------------------------------------------------------------------------------------------------


def arrivals_by_seq(batches: list[dict[str, Any]]) -> Counter[int]:
    return Counter(b["nonce_sample"][0] // 1000 for b in batches if b.get("generation") == "v1" and b["nonce_sample"])


async def dead_letters(amqp_url: str, namespace: str) -> list[tuple[int, str]]:
    """(seq, reason) of every batch in ``relay.callbacks.dead`` (left in place)."""
    out: list[tuple[int, str]] = []
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        channel = await connection.channel()
        queue = await channel.get_queue(f"{namespace}.relay.callbacks.dead", ensure=False)
        while (message := await queue.get(no_ack=False, fail=False)) is not None:
            body = orjson.loads(orjson.loads(message.body)["payload"]["body"])
            reason = str((message.headers or {}).get("x-relay-dead-reason", "rejected by the broker"))
            out.append((body["nonces"][0] // 1000, reason))
        await channel.close()  # unacked: back to the queue
    return out


def verdict(
    fleet: Fleet, arrivals: Counter[int], dead: list[tuple[int, str]], window_closed: bool, max_duplicates: int
) -> dict[str, int]:
    """The acceptance rule; raises AssertionError naming what broke it."""
    dead_seqs = {seq: reason for seq, reason in dead}
    lost = [s for s in fleet.accepted if s not in arrivals and s not in dead_seqs]
    wrongly_dead = [s for s, reason in dead_seqs.items() if reason != "window_closed" or not window_closed]
    duplicates = sum(n - 1 for n in arrivals.values() if n > 1)
    counts = {
        "accepted_batches": fleet.accepted_unique,
        "accepted_answers": sum(fleet.accepted.values()),
        "reached_dapi": sum(1 for s in fleet.accepted if s in arrivals),
        "dead": len(dead_seqs),
        "lost": len(lost),
        "dapi_duplicates": duplicates,
        "max_duplicates_allowed": max_duplicates,
    }
    print("outcome:", counts)
    assert not lost, f"{len(lost)} batches answered 200 never reached the dapi, e.g. {lost[:5]}"
    assert not wrongly_dead, f"dead-lettered while the window was open: {wrongly_dead[:5]}"
    assert duplicates <= max_duplicates, f"{duplicates} duplicates reached the dapi (allowed {max_duplicates})"
    return counts


async def wait_delivered(w: World, fleet: Fleet, timeout: float) -> Counter[int]:
    deadline = time.monotonic() + timeout
    while True:
        arrivals = arrivals_by_seq(await w.batches())
        if all(s in arrivals for s in fleet.accepted) or time.monotonic() > deadline:
            return arrivals
        await asyncio.sleep(0.5)


async def in_flight_batches(amqp_url: str, queue: str) -> int:
    """Batches that were delivered to the (killed) relay and not acked: after a SIGKILL the broker puts them back,
    marked redelivered. Read before the relay restarts, and left in place. A delivery is one batch or the door's group
    of them: every batch of an unacked group counts, settled or not — an upper bound of what a restart can re-post."""
    count = 0
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        channel = await connection.channel()
        q = await channel.get_queue(queue, ensure=False)
        while (message := await q.get(no_ack=False, fail=False)) is not None:
            if message.redelivered:
                payload = orjson.loads(message.body)["payload"]
                count += len(payload["batches"]) if "batches" in payload else 1
        await channel.close()  # unacked: back to the queue
    return count


async def stats_totals(redis_url: str, namespace: str) -> dict[str, int]:
    redis = Redis.from_url(redis_url)
    try:
        return (await read_stats(redis, RedisKeys(namespace)))["totals"]
    finally:
        await redis.aclose()


# --- the runs -----------------------------------------------------------------------------------------------------


@pytest.mark.slow
async def test_ten_thousand_batches_through_outage_broker_restart_and_kill(
    rabbit: PrivateRabbit, redis_url: str, namespace: str
) -> None:
    port = free_port()
    async with world() as w:
        stop = asyncio.Event()
        adapter = asyncio.create_task(epoch_adapter(rabbit.url, namespace, w.dapi, stop))
        relay = relay_process(rabbit.url, redis_url, namespace, w.dapi, port).start()
        # About 500 batches/s (the rate the relay managed before issue #11's speed work): the faults below land while
        # batches are still being sent, queued and forwarded, not after a burst has already gone through.
        fleet = Fleet(f"http://127.0.0.1:{port}", 10_000, 32, w.node_nums, w.poc_start, pause=0.06)
        faults: dict[str, Any] = {}
        try:
            sending = asyncio.create_task(fleet.run())

            async def at(n: int) -> None:
                while fleet.accepted_unique < n:
                    assert not sending.done(), "senders finished early"
                    await asyncio.sleep(0.02)

            # (a) the dapi is down for a stretch: batches keep being accepted and wait in the queue.
            await at(1500)
            await w.callback_server(False)
            await asyncio.sleep(3)
            await w.callback_server(True)
            # (b) the broker restarts: the door answers 503 while it cannot confirm, the senders retry.
            await at(4000)
            # The senders slow down while the broker restarts: under load `rabbitmqctl stop` takes seconds to begin,
            # and at full pace the fleet could finish before the broker went down (the fault must land mid-run).
            fleet.pause = 0.5
            await asyncio.to_thread(rabbit.restart)
            faults["broker_restarted_at"] = fleet.accepted_unique
            fleet.pause = 0.06
            # (c) the relay is SIGKILLed mid-forwarding and started again.
            await at(min(6500, faults["broker_restarted_at"] + 1000))
            relay.kill()
            faults["killed_at"] = fleet.accepted_unique
            # The broker requeues the dead connection's unacked deliveries once it notices the socket closed: count
            # until two reads agree, so a slow broker does not make the bound smaller than what was really in flight.
            counts = [await in_flight_batches(rabbit.url, f"{namespace}.relay.callbacks")]
            while len(counts) < 6 and (len(counts) < 2 or counts[-1] != counts[-2]):
                await asyncio.sleep(0.3)
                counts.append(await in_flight_batches(rabbit.url, f"{namespace}.relay.callbacks"))
            faults["in_flight_at_kill"] = max(counts)
            relay = relay_process(rabbit.url, redis_url, namespace, w.dapi, port).start()
            await asyncio.wait_for(sending, 240)
            arrivals = await wait_delivered(w, fleet, 120)
            dead = await dead_letters(rabbit.url, namespace)
            totals = await stats_totals(redis_url, namespace)
            assert faults["broker_restarted_at"] < fleet.total and faults["killed_at"] < fleet.total  # mid-run
            print("faults:", faults, "refusals seen by the senders:", dict(fleet.refusals))
            print("relay:stats totals:", totals)
            window_closed = w.dapi.height > w.poc_start + LONG_POC.poc_stage_duration + LONG_POC.poc_exchange_duration
            verdict(fleet, arrivals, dead, window_closed, max_duplicates=faults["in_flight_at_kill"])
            # The relay's own accounting: every re-send of a forwarded batch was kept out as a duplicate.
            assert totals.get("duplicate", 0) >= fleet.total // fleet.resend_every - faults["in_flight_at_kill"]
            assert fleet.total == fleet.accepted_unique
        finally:
            stop.set()
            relay.kill()
            print("relay log tail:", relay.output()[-1500:])
            await adapter


async def _run_without_kills(rabbit: PrivateRabbit, redis_url: str, namespace: str, dedupe: bool) -> None:
    port = free_port()
    async with world() as w:
        stop = asyncio.Event()
        adapter = asyncio.create_task(epoch_adapter(rabbit.url, namespace, w.dapi, stop))
        relay = relay_process(
            rabbit.url, redis_url, namespace, w.dapi, port, RELAY_DEDUPE="true" if dedupe else "false"
        ).start()
        # Paced (≈ 800 batches/s at most): the senders share this process with the dapi simulator, which must keep
        # answering in time — a POST the relay times out on is posted again, and that would be a duplicate.
        fleet = Fleet(f"http://127.0.0.1:{port}", 1500, 16, w.node_nums, w.poc_start, resend_every=5, pause=0.02)
        try:
            sending = asyncio.create_task(fleet.run())
            while fleet.accepted_unique < 500:
                await asyncio.sleep(0.02)
            await w.callback_server(False)  # an outage, but no kill: still no duplicate may reach the dapi
            await asyncio.sleep(2)
            await w.callback_server(True)
            await asyncio.wait_for(sending, 120)
            arrivals = await wait_delivered(w, fleet, 60)
            verdict(fleet, arrivals, await dead_letters(rabbit.url, namespace), False, max_duplicates=0)
        finally:
            stop.set()
            relay.stop()
            await adapter


async def test_no_kill_no_duplicate(rabbit: PrivateRabbit, redis_url: str, namespace: str) -> None:
    await _run_without_kills(rabbit, redis_url, namespace, dedupe=True)


async def test_the_check_fails_with_dedupe_switched_off(rabbit: PrivateRabbit, redis_url: str) -> None:
    # The same run and the same verdict with RELAY_DEDUPE=false: the senders' re-sends reach the dapi.
    with pytest.raises(AssertionError, match="duplicates reached the dapi"):
        await _run_without_kills(rabbit, redis_url, f"t{uuid.uuid4().hex[:10]}", dedupe=False)


async def test_per_node_order_survives_an_outage(rabbit: PrivateRabbit, redis_url: str, namespace: str) -> None:
    """Each node's batches reach the dapi in the order the relay accepted them, retries included."""
    port = free_port()
    per_node = 60
    async with world() as w:
        relay = relay_process(rabbit.url, redis_url, namespace, w.dapi, port).start()
        fleet = Fleet(f"http://127.0.0.1:{port}", per_node * NODES, NODES, w.node_nums, w.poc_start, resend_every=10**9)
        try:
            # One sequential sender per node (sender i sends seq i, i+NODES, ...: all of node i), 200 before the next.
            sending = asyncio.create_task(fleet.run())
            while fleet.accepted_unique < per_node * NODES // 3:
                await asyncio.sleep(0.02)
            await w.callback_server(False)
            await asyncio.sleep(2)
            await w.callback_server(True)
            await asyncio.wait_for(sending, 120)
            await wait_delivered(w, fleet, 60)
            first_arrival: dict[int, list[int]] = {}
            seen: set[int] = set()
            for b in await w.batches():
                seq = b["nonce_sample"][0] // 1000
                if seq not in seen:
                    seen.add(seq)
                    first_arrival.setdefault(b["node_num"], []).append(seq)
            assert len(seen) == per_node * NODES
            for node_num, order in first_arrival.items():
                assert order == sorted(order), f"node {node_num}: batches reached the dapi out of order"
        finally:
            relay.stop()
