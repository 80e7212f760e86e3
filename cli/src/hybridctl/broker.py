"""Talking to the services over the queue: publish a command, ask a query (with a spinner), clear failures."""

from __future__ import annotations

import asyncio
from typing import Any, TypeVar

from hybrid_common.messages.base import Payload
from hybrid_common.settings import CommonSettings
from hybridctl.output import console, fail

R = TypeVar("R", bound=Payload)


def settings() -> CommonSettings:
    try:
        return CommonSettings()
    except ValueError as exc:  # pydantic's ValidationError is a ValueError: names the bad variable
        raise fail(f"bad configuration: {exc}") from None


def _where(url: str) -> str:
    return url.split("@")[-1]  # never print the broker's credentials


def _owner(payload: Payload) -> str:
    from hybrid_common.topology import owner_queue

    try:
        return owner_queue(payload.TYPE).split(".")[0]
    except LookupError:
        return "its owner"


# hybrid_common.bus (aio-pika, redis) is imported where used: most invocations never touch the broker and the
# CLI should start quickly.


def publish(payload: Payload) -> str:
    """Publish one command (mandatory, confirmed); the envelope id. Exits 1 when no owner queue binds it."""
    from hybrid_common.bus import Publisher, Unroutable, connect
    from hybrid_common.topology import Topology

    s = settings()

    async def go() -> str:
        conn = await connect(s.amqp_url, name="hybridctl", timeout=10)
        try:
            env = await Publisher(conn, Topology(s.namespace), "hybridctl", deadline=10).publish(payload)
            return str(env.id)
        finally:
            await conn.close()

    try:
        return asyncio.run(go())
    except Unroutable:
        raise fail(f"no queue takes {payload.TYPE!r}: the {_owner(payload)} service has never started", 1) from None
    except (OSError, TimeoutError) as exc:
        raise fail(f"cannot reach the broker at {_where(s.amqp_url)}: {exc}", 1) from None


class OwnerDown(Exception):
    """The owner's queue exists but nothing consumes it: asking would only wait for the timeout."""


async def _owner_listening(conn: Any, queue: str, owner: str) -> None:
    """Fail fast when the owner's queue has no consumer (a passive declare; a missing queue is left to the timeout,
    since someone else may answer, and the queue is never created here)."""
    import aiormq

    channel = await conn.channel()
    try:
        declared = await channel.declare_queue(queue, passive=True)
    except aiormq.exceptions.ChannelNotFoundEntity:
        return
    consumers = declared.declaration_result.consumer_count
    waiting = declared.declaration_result.message_count
    await channel.close()
    if consumers == 0:
        raise OwnerDown(f"the {owner} is not running: nothing consumes {queue} ({waiting} message(s) waiting)")


def ask(query: Payload, reply_type: type[R], *, timeout: float, what: str) -> R:
    """Request/reply with a spinner; a timeout names the owner that did not answer."""
    from hybrid_common.bus import Publisher, Requester, connect
    from hybrid_common.topology import Topology, owner_queue

    s = settings()
    owner = _owner(query)

    async def go() -> R:
        conn = await connect(s.amqp_url, name="hybridctl", timeout=10)
        try:
            topology = Topology(s.namespace)
            await _owner_listening(conn, topology.name(owner_queue(query.TYPE)), owner)
            publisher = Publisher(conn, topology, "hybridctl", deadline=10)
            requester = Requester(conn, publisher)
            await requester.start()
            return await requester.ask(query, reply_type, timeout=timeout)
        finally:
            await conn.close()

    try:
        with console.status(f"{what} (asking the {owner})…"):
            return asyncio.run(go())
    except OwnerDown as exc:
        raise fail(str(exc), 1) from None
    except TimeoutError:
        raise fail(f"the {owner} did not answer {query.TYPE} within {timeout:g}s (is it running?)", 1) from None
    except RuntimeError as exc:  # the owner's ErrorReply, or an unroutable query
        text = str(exc)
        if "NO_ROUTE" in text or "unroutable" in text.lower():
            text = f"no queue takes {query.TYPE!r}: the {owner} service has never started"
        raise fail(text, 1) from None
    except OSError as exc:
        raise fail(f"cannot reach the broker at {_where(s.amqp_url)}: {exc}", 1) from None
