"""Publishing with confirms, many messages in flight on one channel and written together.

``hybrid_common.bus.Publisher`` goes through ``aio_pika.Exchange.publish``: per message it takes the channel's lock
until the frame has been written and drained, wraps the channel lookup in a task with a timeout, and writes the
socket once. At thousands of messages a second on a 2-core VPS those per-message costs were the relay's largest share
of CPU. Here :meth:`PipelinedPublisher.publish_many` registers every message's confirm with aiormq's own bookkeeping
and writes all their frames in one piece; the confirms then overlap — reliability.md: "Confirm latency can reach
hundreds of ms: handle confirms concurrently or in batches when throughput matters".

The guarantees are the shared Publisher's: persistent messages (the caller's properties), every message confirmed,
``mandatory`` commands raising :class:`Unroutable` when no queue binds them, retries through a broker reconnect until
a deadline (:class:`PublishFailed` after it). A retried publish can duplicate a message: the forwarder recognises a
batch it already holds by its id, and events carry their own ids.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Sequence
from functools import partial

import aio_pika
import aiormq
from aio_pika.abc import AbstractRobustChannel, AbstractRobustConnection
from aiormq.abc import ChannelFrame
from pamqp.commands import Basic

from hybrid_common.bus import PublishFailed, Unroutable
from hybrid_common.topology import Topology
from hybrid_relay.wire import publish_frames

log = logging.getLogger("hybrid.relay.publishing")

_TRANSIENT: tuple[type[BaseException], ...] = (
    aiormq.exceptions.AMQPError,  # includes a broker nack (DeliveryError): quorum queue under reject-publish
    aio_pika.exceptions.AMQPException,
    ConnectionError,
    OSError,
    TimeoutError,
    RuntimeError,
)

# (routing key, body, properties); properties must carry a message_id (a mandatory return is matched by it).
Outgoing = tuple[str, bytes, Basic.Properties]


def _forget(channel: aiormq.Channel, message_id: str, tag: int, _: asyncio.Future[object]) -> None:
    if channel.message_id_delivery_tag.get(message_id) == tag:
        channel.message_id_delivery_tag.pop(message_id, None)


class PipelinedPublisher:
    """One confirming channel per process, shared by every task; publishes overlap instead of queueing."""

    def __init__(
        self, connection: AbstractRobustConnection, topology: Topology, *, confirm_timeout: float = 5.0
    ) -> None:
        self.connection = connection
        self.topology = topology
        self.confirm_timeout = confirm_timeout
        self._channel: AbstractRobustChannel | None = None
        self._opening = asyncio.Lock()
        self._underlay_cache: aiormq.Channel | None = None

    async def start(self) -> None:
        await self._robust_channel()

    async def _robust_channel(self) -> AbstractRobustChannel:
        if self._channel is not None and not self._channel.is_closed:
            return self._channel
        async with self._opening:
            if self._channel is None or self._channel.is_closed:
                channel = await self.connection.channel(publisher_confirms=True, on_return_raises=True)
                assert isinstance(channel, aio_pika.RobustChannel)
                await self.topology.declare_exchanges(channel)
                self._channel = channel
            return self._channel

    async def _underlay(self) -> aiormq.Channel:
        # The aiormq channel under the robust one, kept while it is open (no await on the common path); after a
        # reconnect the robust channel has re-opened a new one, which is looked up again.
        cached = self._underlay_cache
        if cached is not None and not cached.is_closed:
            return cached
        channel = await (await self._robust_channel()).get_underlay_channel()
        assert isinstance(channel, aiormq.Channel)
        self._underlay_cache = channel
        return channel

    async def publish(
        self,
        exchange: str,
        routing_key: str,
        body: bytes,
        props: Basic.Properties,
        *,
        mandatory: bool,
        deadline: float,
    ) -> None:
        """Publish one message and wait for its confirm (see :meth:`publish_many`)."""
        await self.publish_many(exchange, [(routing_key, body, props)], mandatory=mandatory, deadline=deadline)

    async def publish_many(
        self, exchange: str, messages: Sequence[Outgoing], *, mandatory: bool, deadline: float
    ) -> None:
        """Publish ``messages`` in one write and wait until the broker confirmed every one; what is not confirmed
        is published again through reconnects for ``deadline`` seconds."""
        give_up = time.monotonic() + deadline
        delay = 0.05
        todo = list(messages)
        while todo:
            try:
                channel = self._underlay_cache
                if channel is None or channel.is_closed:
                    left = max(0.05, min(self.confirm_timeout, give_up - time.monotonic()))
                    channel = await asyncio.wait_for(self._underlay(), left)
                confirms = await self._write(channel, exchange, todo, mandatory)
                try:
                    await self._confirmed(channel, confirms)
                finally:
                    # Only what the broker did not confirm goes again (a lost confirm can still duplicate it).
                    errors: list[BaseException] = []
                    unconfirmed: list[Outgoing] = []
                    for message, confirm in zip(todo, confirms, strict=True):
                        if not confirm.done():
                            confirm.cancel()
                            unconfirmed.append(message)
                        elif confirm.cancelled() or confirm.exception() is not None:
                            unconfirmed.append(message)
                            if not confirm.cancelled():
                                errors.append(confirm.exception())  # type: ignore[arg-type]
                    todo = unconfirmed
                for error in errors:
                    if isinstance(error, aiormq.exceptions.PublishError):
                        raise error
                if todo:
                    raise errors[0] if errors else ConnectionError("channel closed before the confirms")
            except aiormq.exceptions.PublishError as exc:
                raise Unroutable(f"a message routes to no queue on {exchange!r}") from exc
            except _TRANSIENT as exc:
                if time.monotonic() >= give_up:
                    raise PublishFailed(f"{len(todo)} messages not confirmed before the deadline: {exc!r}") from exc
                log.info("publish of %d messages failed (%r); retrying", len(todo), exc)
                await asyncio.sleep(min(delay * (0.5 + random.random()), max(0.0, give_up - time.monotonic())))
                delay = min(delay * 2, 1.0)

    async def _confirmed(self, channel: aiormq.Channel, confirms: list[asyncio.Future[object]]) -> None:
        """Until every confirm is in, the channel closes, or the confirm timeout passes (TimeoutError)."""
        loop = asyncio.get_running_loop()
        settled: asyncio.Future[None] = loop.create_future()
        remaining = len(confirms)

        def one(_: asyncio.Future[object]) -> None:
            nonlocal remaining
            remaining -= 1
            if remaining == 0 and not settled.done():
                settled.set_result(None)

        def closed(_: asyncio.Future[object]) -> None:
            if not settled.done():
                settled.set_result(None)

        for confirm in confirms:
            confirm.add_done_callback(one)
        closing = channel.closing  # an observer: cancelling it detaches it
        closing.add_done_callback(closed)
        try:
            async with asyncio.timeout(self.confirm_timeout):
                await settled
        finally:
            closing.cancel()

    @staticmethod
    async def _write(
        channel: aiormq.Channel, exchange: str, messages: Sequence[Outgoing], mandatory: bool
    ) -> list[asyncio.Future[object]]:
        """Frames for every message, written at once; the confirm futures in message order.

        The bookkeeping is ``aiormq.Channel.basic_publish``'s (aiormq 7.2, pinned by uv.lock) done for many messages
        under one hold of the channel's lock: a delivery tag and a confirm future each, and the message id → tag map
        that routes a mandatory return to its future. (A closing channel does not fail these futures: the caller
        watches the channel itself.)
        """
        if channel.is_closed:
            raise aiormq.exceptions.ChannelInvalidStateError(f"{channel!r} closed")
        loop = asyncio.get_running_loop()
        number, max_content = channel.number, channel.max_content_size
        async with channel.lock:
            first = channel.delivery_tag
            confirms: list[asyncio.Future[object]] = []
            payload: list[bytes] = []
            try:
                for routing_key, body, props in messages:
                    payload.append(publish_frames(number, exchange, routing_key, mandatory, props, body, max_content))
                    channel.delivery_tag += 1
                    tag = channel.delivery_tag
                    confirm: asyncio.Future[object] = loop.create_future()
                    channel.confirmations[tag] = confirm
                    message_id = props.message_id or ""
                    channel.message_id_delivery_tag[message_id] = tag
                    confirm.add_done_callback(partial(_forget, channel, message_id, tag))
                    confirms.append(confirm)
                await channel.write_queue.put(ChannelFrame(payload=b"".join(payload), should_close=False))
            except BaseException:
                # Nothing was written: give the tags back so the broker's numbering and ours stay in step.
                for tag in range(first + 1, channel.delivery_tag + 1):
                    channel.confirmations.pop(tag, None)
                channel.delivery_tag = first
                for confirm in confirms:
                    confirm.cancel()
                raise
        return confirms

    async def close(self) -> None:
        if self._channel is not None and not self._channel.is_closed:
            await self._channel.close()
