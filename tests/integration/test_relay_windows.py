"""Issue #11: a batch whose exchange window has closed is dead-lettered with reason ``window_closed`` — never
forwarded — and only once the window has really closed on the (simulated) chain (gonka-protocol.md §2, §5)."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import aio_pika
import aiohttp
import orjson
import pytest
from redis.asyncio import Redis

from hybrid_common import TEST
from hybrid_common.bus import Publisher, connect
from hybrid_common.messages.commands import ForwardCallback, ForwardCallbackGroup
from hybrid_common.redis_keys import RedisKeys
from hybrid_common.topology import Topology
from hybrid_relay.ledger import read_stats
from hybrid_relay.service import RelayService
from hybrid_relay.settings import RelaySettings
from sim.network import DEFAULT_EPOCH_MODEL, start_dapi
from tests.integration.test_relay_faults import dead_letters, epoch_adapter
from tests.support.net import free_port

pytestmark = [pytest.mark.broker, pytest.mark.redis]

FIRST_POC = 4


async def _events(amqp_url: str, namespace: str, seen: list[dict[str, Any]], ready: asyncio.Event) -> None:
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        channel = await connection.channel()
        topology = Topology(namespace)
        await topology.declare_exchanges(channel)
        queue = await channel.declare_queue(exclusive=True, auto_delete=True)
        await queue.bind(topology.events, routing_key="callback.*")
        ready.set()
        async with queue.iterator(no_ack=True) as it:
            async for message in it:
                seen.append(orjson.loads(message.body))


@pytest.fixture
async def dapi() -> AsyncIterator[Any]:
    running = await start_dapi(profile=TEST, first_poc_start=FIRST_POC, inference_interval_seconds=0)
    try:
        yield running
    finally:
        await running.close()


async def test_closed_window_is_dead_lettered_never_forwarded(
    dapi: Any, amqp_url: str, redis_url: str, namespace: str
) -> None:
    async with aiohttp.ClientSession() as s:
        node = {
            "id": "relay-window-node",
            "host": "127.0.0.1",
            "inference_port": 42000,
            "poc_port": 42001,
            "max_concurrent": 10,
            "models": {DEFAULT_EPOCH_MODEL: {"args": []}},
        }
        async with s.post(f"{dapi.admin_url}/admin/v1/nodes", json=node) as r:
            assert r.status == 200, await r.text()
        async with s.get(f"{dapi.admin_url}/admin/v1/nodes") as r:
            node_num = (await r.json())[0]["node"]["node_num"]
        while dapi.height <= FIRST_POC + 1:
            await asyncio.sleep(0.05)

        stop, ready = asyncio.Event(), asyncio.Event()
        events: list[dict[str, Any]] = []
        listener = asyncio.create_task(_events(amqp_url, namespace, events, ready))
        await asyncio.wait_for(ready.wait(), 20)
        adapter = asyncio.create_task(epoch_adapter(amqp_url, namespace, dapi, stop))
        port = free_port()
        service = RelayService(
            RelaySettings(
                amqp_url=amqp_url,
                redis_url=redis_url,
                namespace=namespace,
                public_host="127.0.0.1",
                public_port=port,
                metrics_port=0,
                dapi_callback_url=dapi.callback_url,
                backoff_first=0.05,
                backoff_cap=0.2,
                max_attempts=10_000,
            )
        )
        await service.start()
        try:
            deadline = time.monotonic() + 20
            while FIRST_POC not in service.windows.windows:  # the relay heard of this PoC's window
                assert time.monotonic() < deadline, "epoch.observed never reached the relay"
                await asyncio.sleep(0.05)
            exchange_end = service.windows.windows[FIRST_POC].heights.exchange_end

            def batch(first: int) -> bytes:
                return orjson.dumps(
                    {
                        "public_key": "pk",
                        "block_hash": "h",
                        "block_height": FIRST_POC,
                        "nonces": [first, first + 1],
                        "dist": [0.1, 0.2],
                        "node_id": node_num,
                    }
                )

            # A: accepted while the window is open but the dapi is down; the window closes during the outage.
            async with s.post(f"{dapi.public_url}/_sim/callback/stop") as r:
                assert r.status == 200
            async with s.post(f"http://127.0.0.1:{port}/v1/poc-batches/generated", data=batch(1000)) as r:
                assert r.status == 200
            accepted_at = dapi.height
            assert accepted_at <= exchange_end
            deadline = time.monotonic() + 30
            while not any(e["type"] == "callback.dead" for e in events):
                assert time.monotonic() < deadline, "batch A was never dead-lettered"
                await asyncio.sleep(0.05)
            dead_at = dapi.height
            assert dead_at > exchange_end, f"dead-lettered at height {dead_at}, window open until {exchange_end}"
            async with s.post(f"{dapi.public_url}/_sim/callback/start") as r:
                assert r.status == 200

            # B: a v1 batch for the closed window (the dapi would still answer 200): accepted, dead-lettered at once.
            async with s.post(f"http://127.0.0.1:{port}/v1/poc-batches/generated", data=batch(2000)) as r:
                assert r.status == 200
            deadline = time.monotonic() + 20
            while sum(e["type"] == "callback.dead" for e in events) < 2:
                assert time.monotonic() < deadline, "batch B was never dead-lettered"
                await asyncio.sleep(0.05)

            dead = await dead_letters(amqp_url, namespace)
            assert sorted(dead) == [(1, "window_closed"), (2, "window_closed")]
            for e in events:
                if e["type"] == "callback.dead":
                    assert e["payload"]["reason"] == "window_closed"
            assert not any(e["type"] == "callback.forwarded" for e in events)
            await asyncio.sleep(1.0)  # anything still on its way to the dapi would land now
            async with s.get(f"{dapi.public_url}/_sim/batches") as r:
                assert await r.json() == [], "a dead-lettered batch reached the dapi"
            redis = Redis.from_url(redis_url)
            stats = await read_stats(redis, RedisKeys(namespace))
            await redis.aclose()
            print(
                "relay:stats:",
                stats["totals"],
                "accepted at",
                accepted_at,
                "dead at",
                dead_at,
                "window end",
                exchange_end,
            )
            assert stats["totals"]["dead:window_closed"] == 2 and stats["totals"]["accepted"] == 2
        finally:
            stop.set()
            await service.stop()
            await adapter
            listener.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await listener


async def test_a_single_batch_message_is_forwarded_too(
    dapi: Any, amqp_url: str, redis_url: str, namespace: str
) -> None:
    """The door sends groups (``callback.forward_group``); a lone ``callback.forward`` — a dead letter an operator puts
    back into ``relay.callbacks``, or one from an older door — is forwarded the same way, and its copy in a group
    later is recognised as already settled."""
    body = orjson.dumps(
        {"public_key": "pk", "block_hash": "h", "block_height": 9, "nonces": [77_000], "dist": [0.1], "node_id": 1}
    )
    single = ForwardCallback(
        batch_id=str(uuid.uuid4()),
        digest="d" * 64,
        path="/v1/poc-batches/generated",
        body=body.decode(),
        generation="v1",
        kind="generated",
        node_id=1,
        block_height=9,
        received_at=datetime.now(UTC),
    )
    service = RelayService(
        RelaySettings(
            amqp_url=amqp_url,
            redis_url=redis_url,
            namespace=namespace,
            role="forwarder",
            metrics_port=0,
            dapi_callback_url=dapi.callback_url,
        )
    )
    await service.start()
    connection = await connect(amqp_url, name="test-operator")
    try:
        publisher = Publisher(connection, Topology(namespace), "test-operator")
        await publisher.publish(single)
        await publisher.publish(ForwardCallbackGroup(batches=[single]))  # the same batch again, in a group
        async with aiohttp.ClientSession() as s:
            deadline = time.monotonic() + 20
            while True:
                async with s.get(f"{dapi.public_url}/_sim/batches") as r:
                    arrived = [b for b in await r.json() if b["nonce_sample"] == [77_000]]
                if arrived or time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.1)
        assert len(arrived) == 1
        redis = Redis.from_url(redis_url)
        deadline = time.monotonic() + 10
        while (await redis.get(RedisKeys(namespace).relay_batch(single.batch_id))) != b"forwarded":
            assert time.monotonic() < deadline, "the outcome was never recorded"
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.5)  # the group's copy is taken and recognised meanwhile
        totals = (await read_stats(redis, RedisKeys(namespace)))["totals"]
        await redis.aclose()
        assert totals == {"accepted": 1, "accepted_items": 1, "forwarded": 1, "forwarded_items": 1}
        async with aiohttp.ClientSession() as s, s.get(f"{dapi.public_url}/_sim/batches") as r:
            assert len([b for b in await r.json() if b["nonce_sample"] == [77_000]]) == 1
    finally:
        await connection.close()
        await service.stop()
