"""Publishing and consuming envelopes with the guarantees of reliability.md.

Publisher: persistent messages, publisher confirms, ``message_id`` = envelope id, ``mandatory`` for commands and
queries (an unroutable one raises :class:`Unroutable`), a per-attempt confirm timeout, and retries through a broker
reconnect until a deadline. A retried publish can duplicate a message: consumers deduplicate by envelope id.

Consumer: manual ack only after the handler succeeded and its effect is recorded; a message that can never be handled
(not JSON, unknown type, invalid payload) is rejected to its ``.dead`` queue at once; a handler that raises is retried
and, after ``max_attempts`` (counted in Redis so the bound holds on RabbitMQ 3.x and 4.x alike — 4.3 no longer counts
``nack(requeue=True)`` toward the quorum delivery limit), dead-lettered while the other messages keep flowing.
Idempotency: an envelope id whose handler already succeeded is acked without running the handler again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import aio_pika
import aiormq
from aio_pika.abc import (
    AbstractIncomingMessage,
    AbstractQueue,
    AbstractRobustChannel,
    AbstractRobustConnection,
    ConsumerTag,
)
from redis.asyncio import Redis

from hybrid_common.messages import Envelope, InvalidMessage, Payload, make, parse
from hybrid_common.messages.commands import ErrorReply
from hybrid_common.redis_keys import RedisKeys
from hybrid_common.topology import QueueSpec, Topology

log = logging.getLogger("hybrid.bus")


class Delivery:
    """What a handler gets: the parsed envelope and the AMQP properties it may need (``reply_to`` for queries)."""

    __slots__ = ("envelope", "redelivered", "reply_to")

    def __init__(self, envelope: Envelope[Payload], reply_to: str | None, redelivered: bool) -> None:
        self.envelope = envelope
        self.reply_to = reply_to
        self.redelivered = redelivered

    @property
    def payload(self) -> Payload:
        return self.envelope.payload


Handler = Callable[[Delivery], Awaitable[None]]
R = TypeVar("R", bound=Payload)

_TRANSIENT: tuple[type[BaseException], ...] = (
    aiormq.exceptions.AMQPError,
    aio_pika.exceptions.AMQPException,
    ConnectionError,
    OSError,
    TimeoutError,
    RuntimeError,
)


_CLAIMED = b"claimed"
_DONE = b"done"


class Unroutable(RuntimeError):
    """A command or query that no queue binds (published ``mandatory``): a deployment error, never retried."""


class PublishFailed(RuntimeError):
    """No confirm within the publish deadline (broker down for longer than the caller allowed)."""


async def connect(url: str, *, name: str = "hybrid", timeout: float = 30.0) -> AbstractRobustConnection:
    """A robust connection: reconnects and restores channels, QoS, topology and consumers (reliability.md).

    ``timeout`` bounds each connection attempt from inside: a broker that accepts TCP but never finishes the AMQP
    handshake (seen with a stalled RabbitMQ) must not hang the caller, and aio-pika's connect ignores an outer
    cancellation while it is still connecting.
    """
    return await aio_pika.connect_robust(
        url, client_properties={"connection_name": name}, reconnect_interval=0.5, fail_fast=True, timeout=timeout
    )


def _message(env: Envelope[Payload], *, reply_to: str | None = None) -> aio_pika.Message:
    return aio_pika.Message(
        env.to_bytes(),
        message_id=str(env.id),
        type=env.type,
        content_type="application/json",
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,  # not aio-pika's default (reliability.md)
        correlation_id=env.correlation_id,
        reply_to=reply_to,
        app_id=env.source,
        timestamp=env.occurred_at,
    )


class Publisher:
    """One confirming channel per process; safe to share between tasks."""

    def __init__(
        self,
        connection: AbstractRobustConnection,
        topology: Topology,
        source: str,
        *,
        confirm_timeout: float = 5.0,
        deadline: float = 120.0,
    ) -> None:
        self.connection = connection
        self.topology = topology
        self.source = source
        self.confirm_timeout = confirm_timeout
        self.deadline = deadline
        self._channel: AbstractRobustChannel | None = None
        self._lock = asyncio.Lock()

    async def _get_channel(self) -> AbstractRobustChannel:
        async with self._lock:
            if self._channel is None or self._channel.is_closed:
                ch = await self.connection.channel(publisher_confirms=True, on_return_raises=True)
                assert isinstance(ch, aio_pika.RobustChannel)
                await self.topology.declare_exchanges(ch)
                self._channel = ch
            return self._channel

    def envelope(self, payload: Payload, **fields: Any) -> Envelope[Payload]:
        return make(payload, source=self.source, **fields)

    async def publish(
        self,
        payload: Payload | Envelope[Payload],
        *,
        reply_to: str | None = None,
        deadline: float | None = None,
        **fields: Any,
    ) -> Envelope[Payload]:
        """Publish and wait for the broker's confirm; returns the envelope sent (its id is the message id)."""
        env = payload if isinstance(payload, Envelope) else self.envelope(payload, **fields)
        kind = type(env.payload).KIND
        to_commands = kind in {"command", "query"}
        exchange_name = self.topology.commands if to_commands else self.topology.events
        await self.publish_raw(
            exchange_name, env.type, _message(env, reply_to=reply_to), mandatory=to_commands, deadline=deadline
        )
        return env

    async def publish_raw(
        self,
        exchange_name: str,
        routing_key: str,
        message: aio_pika.Message,
        *,
        mandatory: bool,
        deadline: float | None = None,
    ) -> None:
        give_up = time.monotonic() + (self.deadline if deadline is None else deadline)
        delay = 0.05
        while True:
            try:
                channel = await asyncio.wait_for(self._get_channel(), self.confirm_timeout)
                exchange = await channel.get_exchange(exchange_name, ensure=False)
                await exchange.publish(
                    message, routing_key=routing_key, mandatory=mandatory, timeout=self.confirm_timeout
                )
                return
            except aiormq.exceptions.PublishError as exc:
                raise Unroutable(f"{routing_key!r} routes to no queue on {exchange_name!r}") from exc
            except _TRANSIENT as exc:
                if time.monotonic() >= give_up:
                    raise PublishFailed(f"{routing_key!r} not confirmed before the deadline: {exc!r}") from exc
                log.info("publish of %s failed (%r); retrying", routing_key, exc)
                async with self._lock:
                    if self._channel is not None and self._channel.is_closed:
                        self._channel = None
                await asyncio.sleep(delay * (0.5 + random.random()))
                delay = min(delay * 2, 1.0)


class Consumer:
    """Consume a queue with ack-after-success, idempotency by envelope id, and bounded retries."""

    def __init__(
        self,
        connection: AbstractRobustConnection,
        topology: Topology,
        redis: Redis,
        spec: QueueSpec,
        handler: Handler,
        *,
        name: str | None = None,
        prefetch: int = 32,
        max_attempts: int = 5,
        retry_delay: float = 0.2,
        done_ttl: int = 7 * 24 * 3600,
        claim_ttl: float = 30.0,
    ) -> None:
        self.connection = connection
        self.topology = topology
        self.redis = redis
        self.spec = spec
        self.handler = handler
        self.name = name or spec.name
        self.prefetch = prefetch
        self.max_attempts = max_attempts
        self.retry_delay = retry_delay
        self.done_ttl = done_ttl
        self.claim_ttl = claim_ttl  # bounds a handler's run: handlers are short, long work lives in job records
        self.keys = RedisKeys(topology.namespace)
        self.queue: AbstractQueue | None = None
        self._tag: ConsumerTag | None = None
        self.dead_lettered = 0

    async def start(self) -> None:
        channel = await self.connection.channel()
        await channel.set_qos(prefetch_count=self.prefetch)
        self.queue = await self.topology.declare_queue(channel, self.spec)
        self._tag = await self.queue.consume(self._on_message)

    async def stop(self) -> None:
        if self.queue is not None and self._tag is not None:
            with contextlib.suppress(Exception):
                await self.queue.cancel(self._tag)

    async def _on_message(self, message: AbstractIncomingMessage) -> None:
        try:
            env = parse(message.body)
        except InvalidMessage as exc:
            self.dead_lettered += 1
            log.error("%s: dead-lettering message %s: %s", self.name, message.message_id, exc)
            await message.reject(requeue=False)
            return
        key = self.keys.idem(self.name, str(env.id))
        if not await self._claim(key):
            await message.ack()  # a duplicate of a message whose effect is already recorded
            return
        try:
            # Shielded: when a connection loss cancels this callback, the handler and the record of its effect still
            # complete together, so the redelivered copy finds the id done instead of running the handler again.
            await asyncio.shield(self._handle_and_record(env, message, key))
        except Exception as exc:
            await self.redis.delete(key)
            await self._failed(message, env, exc)
            return
        await message.ack()

    async def _handle_and_record(self, env: Envelope[Payload], message: AbstractIncomingMessage, key: str) -> None:
        await self.handler(Delivery(env, message.reply_to, bool(message.redelivered)))
        await self.redis.set(key, _DONE, ex=self.done_ttl)

    async def _claim(self, key: str) -> bool:
        """True when this delivery should run the handler; False when the id's effect is already recorded.

        Two copies of one id can be in flight at once (a publish retried after a lost confirm): the claim makes the
        second wait for the first's outcome instead of running the handler concurrently.
        """
        while True:
            if await self.redis.set(key, _CLAIMED, nx=True, px=int(self.claim_ttl * 1000)):
                return True
            state = await self.redis.get(key)
            if state == _DONE:
                return False
            if state is None:
                continue  # the other attempt failed (or its claim lapsed): try to claim again
            await asyncio.sleep(0.05)

    async def _failed(self, message: AbstractIncomingMessage, env: Envelope[Payload], exc: Exception) -> None:
        attempts_key = self.keys.attempts(self.name, str(env.id))
        attempts = int(await self.redis.incr(attempts_key))
        await self.redis.expire(attempts_key, self.done_ttl)
        if attempts >= self.max_attempts:
            self.dead_lettered += 1
            log.error("%s: %s %s failed %d times, dead-lettering: %r", self.name, env.type, env.id, attempts, exc)
            await message.reject(requeue=False)
        else:
            log.warning(
                "%s: %s %s failed (attempt %d/%d): %r", self.name, env.type, env.id, attempts, self.max_attempts, exc
            )
            await asyncio.sleep(self.retry_delay)
            await message.nack(requeue=True)


class Requester:
    """Request/reply over the queue: ``reply_to`` = RabbitMQ's direct reply-to, ``correlation_id`` = request id."""

    REPLY_QUEUE = "amq.rabbitmq.reply-to"

    def __init__(self, connection: AbstractRobustConnection, publisher: Publisher) -> None:
        self.connection = connection
        self.publisher = publisher
        self._pending: dict[str, asyncio.Future[Envelope[Payload]]] = {}
        self._channel: aio_pika.abc.AbstractChannel | None = None

    async def start(self) -> None:
        # Direct reply-to needs the consumer and the publish on the same channel.
        self._channel = await self.connection.channel(publisher_confirms=False)
        queue = await self._channel.get_queue(self.REPLY_QUEUE, ensure=False)
        await queue.consume(self._on_reply, no_ack=True)

    async def _on_reply(self, message: AbstractIncomingMessage) -> None:
        fut = self._pending.pop(message.correlation_id or "", None)
        if fut is not None and not fut.done():
            try:
                fut.set_result(parse(message.body))
            except InvalidMessage as exc:
                fut.set_exception(exc)

    async def ask(self, query: Payload, reply_type: type[R], *, timeout: float = 10.0) -> R:
        assert self._channel is not None, "start() first"
        request_id = str(uuid.uuid4())
        env = self.publisher.envelope(query, correlation_id=request_id)
        fut: asyncio.Future[Envelope[Payload]] = asyncio.get_running_loop().create_future()
        self._pending[request_id] = fut
        try:
            exchange = await self._channel.get_exchange(self.publisher.topology.commands, ensure=False)
            msg = _message(env, reply_to=self.REPLY_QUEUE)
            await exchange.publish(msg, routing_key=env.type, mandatory=True)
            reply = await asyncio.wait_for(fut, timeout)
        except TimeoutError:
            raise TimeoutError(f"no reply to {env.type} within {timeout}s (is its owner running?)") from None
        finally:
            self._pending.pop(request_id, None)
        if isinstance(reply.payload, ErrorReply):
            raise RuntimeError(f"{env.type}: {reply.payload.message}")
        if not isinstance(reply.payload, reply_type):
            raise InvalidMessage(f"expected {reply_type.TYPE}, got {reply.type}")
        return reply.payload


async def reply(publisher: Publisher, request: Envelope[Payload], reply_to: str | None, payload: Payload) -> None:
    """Answer a query: to its ``reply_to`` through the default exchange, correlated by the request's id."""
    if not reply_to:
        return
    env = publisher.envelope(payload, correlation_id=request.correlation_id, causation_id=str(request.id))
    channel = await publisher._get_channel()
    msg = _message(env)
    await channel.default_exchange.publish(msg, routing_key=reply_to, mandatory=False)
