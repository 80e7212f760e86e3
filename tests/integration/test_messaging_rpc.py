"""Issue #2: request/reply over the queue for queries an owner answers from its external system."""

from __future__ import annotations

import pytest
from redis.asyncio import Redis

from hybrid_common.bus import Consumer, Delivery, Publisher, Requester, connect, reply
from hybrid_common.messages.commands import ErrorReply, LogsQuery, LogsReply
from hybrid_common.topology import QueueSpec, Topology


async def test_query_gets_its_reply_and_errors_and_timeouts_are_clear(
    amqp_url: str, redis_url: str, namespace: str
) -> None:
    topology = Topology(namespace)
    conn = await connect(amqp_url)
    redis = Redis.from_url(redis_url)
    publisher = Publisher(conn, topology, "owner")

    async def owner(d: Delivery) -> None:
        q = d.payload
        assert isinstance(q, LogsQuery)
        if q.instance_id == 404:
            await reply(publisher, d.envelope, d.reply_to, ErrorReply(error="not_found", message="no instance 404"))
        elif q.instance_id != 0:
            await reply(publisher, d.envelope, d.reply_to, LogsReply(instance_id=q.instance_id, text="x" * q.tail))

    consumer = Consumer(conn, topology, redis, QueueSpec("owner.q", "commands", ("logs.query",)), owner)
    await consumer.start()
    requester = Requester(conn, Publisher(conn, topology, "cli"))
    await requester.start()

    got = await requester.ask(LogsQuery(instance_id=7, tail=3), LogsReply, timeout=5)
    assert got.text == "xxx" and got.instance_id == 7
    with pytest.raises(RuntimeError, match="no instance 404"):
        await requester.ask(LogsQuery(instance_id=404), LogsReply, timeout=5)
    with pytest.raises(TimeoutError, match="no reply to logs.query"):
        await requester.ask(LogsQuery(instance_id=0), LogsReply, timeout=0.5)
    await consumer.stop()
    await conn.close()
    await redis.aclose()
