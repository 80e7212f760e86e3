"""Issue #2 acceptance: the messaging contract against the real broker, through cuts of the connection."""

from __future__ import annotations

import asyncio
import time
from typing import ClassVar
from urllib.parse import urlparse

import aio_pika
import pytest
from redis.asyncio import Redis

from hybrid_common.bus import Consumer, Delivery, Publisher, Unroutable, connect
from hybrid_common.messages import Event, commands
from hybrid_common.topology import QueueSpec, Topology
from tests.support.tcpproxy import TcpProxy

pytestmark = [pytest.mark.broker, pytest.mark.redis]


class ProbeTicked(Event):
    """Test-only event (not in the registry: registered by the test below)."""

    TYPE: ClassVar[str] = "probe.ticked"
    n: int


@pytest.fixture(autouse=True)
def _register_probe():
    from hybrid_common.messages import registry

    registry.REGISTRY[ProbeTicked.TYPE] = ProbeTicked
    yield
    registry.REGISTRY.pop(ProbeTicked.TYPE, None)


def _via(url: str, proxy: TcpProxy) -> str:
    u = urlparse(url)
    return url.replace(f"{u.hostname}:{u.port}", f"127.0.0.1:{proxy.port}")


async def _queue_depth(amqp_url: str, name: str) -> int:
    conn = await aio_pika.connect(amqp_url)
    async with conn:
        ch = await conn.channel()
        q = await ch.declare_queue(name, passive=True)
        return int(q.declaration_result.message_count or 0)


async def test_confirmed_messages_survive_two_cuts(amqp_url: str, redis_url: str, namespace: str) -> None:
    total = 5000
    u = urlparse(amqp_url)
    proxy = await TcpProxy(u.hostname or "127.0.0.1", u.port or 5672).start()
    redis = Redis.from_url(redis_url)
    topology = Topology(namespace)
    spec = QueueSpec("probe.work", "events", ("probe.*",), delivery_limit=5)

    pub_conn = await connect(_via(amqp_url, proxy), name="probe-pub")
    con_conn = await connect(_via(amqp_url, proxy), name="probe-con")
    reconnects = 0

    def on_reconnect(*_: object) -> None:
        nonlocal reconnects
        reconnects += 1

    pub_conn.reconnect_callbacks.add(on_reconnect)
    con_conn.reconnect_callbacks.add(on_reconnect)

    consumed: set[str] = set()
    effects_key = f"{namespace}:effects"

    async def handler(d: Delivery) -> None:
        await redis.incr(effects_key)  # the handler's side effect: counted once per handled delivery
        consumed.add(str(d.envelope.id))

    consumer = Consumer(con_conn, topology, redis, spec, handler, prefetch=64)
    await consumer.start()
    publisher = Publisher(pub_conn, topology, "probe", confirm_timeout=3.0, deadline=60.0)

    confirmed: set[str] = set()
    started_at = time.monotonic()

    async def publish_one(i: int) -> None:
        env = await publisher.publish(ProbeTicked(n=i))
        confirmed.add(str(env.id))

    started = 0
    in_flight_at_cut: list[int] = []

    async def cutter() -> None:
        for threshold in (total // 3, 2 * total // 3):
            while len(confirmed) < threshold:
                await asyncio.sleep(0.005)
            in_flight_at_cut.append(started - len(confirmed))
            proxy.cut()
            await asyncio.sleep(0.5)
            proxy.restore()

    sem = asyncio.Semaphore(100)

    async def bounded(i: int) -> None:
        nonlocal started
        async with sem:
            started += 1
            await publish_one(i)

    cut_task = asyncio.create_task(cutter())
    await asyncio.gather(*(bounded(i) for i in range(total)))
    await cut_task

    # A malformed message on the same queue: dead-lettered, consumption goes on.
    raw = await aio_pika.connect(amqp_url)
    async with raw:
        ch = await raw.channel()
        ex = await ch.get_exchange(topology.events)
        await ex.publish(aio_pika.Message(b"{not json", message_id="bad-1"), routing_key="probe.garbage")
        await ex.publish(
            aio_pika.Message(b'{"type":"probe.ticked","source":"x","payload":{"n":"NaN?"}}', message_id="bad-2"),
            routing_key="probe.garbage",
        )
    extra = await publisher.publish(ProbeTicked(n=total))
    confirmed.add(str(extra.id))

    deadline = time.monotonic() + 90
    while not confirmed <= consumed and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    effects = int(await redis.get(effects_key) or 0)
    dead = await _queue_depth(amqp_url, f"{topology.name(spec.name)}.dead")
    print(
        f"published+confirmed={len(confirmed)} consumed_unique={len(consumed)} effects={effects} "
        f"reconnects={reconnects} cuts={proxy.cuts} in_flight_at_cuts={in_flight_at_cut} dead={dead} seconds={time.monotonic() - started_at:.1f}"
    )

    missing = confirmed - consumed
    assert not missing, f"{len(missing)} confirmed messages were never consumed"
    assert len(confirmed) == total + 1
    assert proxy.cuts == 2 and reconnects >= 2, "each cut must force a reconnect"
    assert len(in_flight_at_cut) == 2 and min(in_flight_at_cut) > 0, (
        "unconfirmed publishes must be in flight at each cut"
    )
    assert effects == len(consumed), "a redelivered id ran its handler twice"
    assert dead == 2, "both malformed messages must be in the .dead queue"

    await consumer.stop()
    await pub_conn.close()
    await con_conn.close()
    await proxy.close()
    await redis.aclose()


async def test_failing_handler_dead_letters_one_message_while_others_flow(
    amqp_url: str, redis_url: str, namespace: str
) -> None:
    redis = Redis.from_url(redis_url)
    topology = Topology(namespace)
    spec = QueueSpec("probe.flaky", "events", ("probe.*",), delivery_limit=4)
    conn = await connect(amqp_url)
    handled: list[int] = []
    attempts_on_poison = 0

    async def handler(d: Delivery) -> None:
        nonlocal attempts_on_poison
        assert isinstance(d.payload, ProbeTicked)
        if d.payload.n == 13:
            attempts_on_poison += 1
            raise RuntimeError("cannot handle 13")
        handled.append(d.payload.n)

    consumer = Consumer(conn, topology, redis, spec, handler, max_attempts=3, retry_delay=0.01)
    await consumer.start()
    publisher = Publisher(conn, topology, "probe")
    for i in range(30):
        await publisher.publish(ProbeTicked(n=i))

    deadline = time.monotonic() + 30
    dead_q = f"{topology.name(spec.name)}.dead"
    while time.monotonic() < deadline:
        if len(handled) == 29 and await _queue_depth(amqp_url, dead_q) == 1:
            break
        await asyncio.sleep(0.1)
    assert sorted(handled) == [i for i in range(30) if i != 13]
    assert attempts_on_poison == 3
    assert await _queue_depth(amqp_url, dead_q) == 1
    await consumer.stop()
    await conn.close()
    await redis.aclose()


async def test_unroutable_command_is_an_error(amqp_url: str, namespace: str) -> None:
    conn = await connect(amqp_url)
    publisher = Publisher(conn, Topology(namespace), "probe")
    with pytest.raises(Unroutable):
        await publisher.publish(commands.Reconcile())  # no owner queue declared in this namespace
    await conn.close()


async def test_unrouted_event_is_fine(amqp_url: str, namespace: str) -> None:
    conn = await connect(amqp_url)
    publisher = Publisher(conn, Topology(namespace), "probe")
    env = await publisher.publish(ProbeTicked(n=1))  # nobody listens yet: not an error for events
    assert env.type == "probe.ticked"
    await conn.close()
