"""Publishing with confirms, many messages in flight on one channel and written together.

``hybrid_common.bus.Publisher`` goes through ``aio_pika.Exchange.publish``: per message it takes the channel's lock
until the frame has been written and drained, wraps the channel lookup in a task with a timeout, and writes the
socket once. At thousands of messages a second on a 2-core VPS those per-message costs were the relay's largest share
of CPU. Here :meth:`PipelinedPublisher.publish_many` registers every message's confirm with aiormq's own bookkeeping
and writes all their frames in one piece; the confirms then overlap — reliability.md: "Confirm latency can reach
hundreds of ms: handle confirms concurrently or in batches when throughput matters".

The door publishes without awaiting (:meth:`PipelinedPublisher.write_now`, accept latency) and every confirm is
counted the moment aiormq settles it, rather than through a callback each a loop turn later (one per outcome event).

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
from collections.abc import Callable, Sequence
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


class _Confirm(asyncio.Future[object]):
    """A confirm future that reports its outcome at the moment aiormq settles it — ack → result, nack or mandatory
    return → exception, its channel closed → cancelled — instead of through callbacks scheduled a loop turn later."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        channel: aiormq.Channel,
        on_settled: Callable[[_Confirm], None] | None,
        outstanding: set[_Confirm],
    ) -> None:
        super().__init__(loop=loop)
        self.channel = channel
        self._on_settled = on_settled
        self._outstanding = outstanding
        outstanding.add(self)

    def _report(self) -> None:
        self._outstanding.discard(self)
        on_settled, self._on_settled = self._on_settled, None
        if on_settled is not None:
            try:
                on_settled(self)
            except Exception:  # runs inside aiormq's frame reader: never let it fail there
                log.exception("confirm callback failed")

    def set_result(self, result: object) -> None:
        super().set_result(result)
        self._report()

    def set_exception(self, exception: type | BaseException) -> None:
        super().set_exception(exception)
        self._report()

    def cancel(self, msg: object = None) -> bool:
        cancelled = super().cancel(msg)
        if cancelled:
            self._report()
        return cancelled

    def discard(self) -> None:
        """Cancel without reporting (its frames were never written)."""
        self._on_settled = None
        self.cancel()


def unbounded_frames(channel: aiormq.abc.AbstractChannel) -> None:
    """Let ``channel`` take every frame its connection's reader hands it without waiting.

    aiormq gives each channel a queue of 10 frames between the connection's frame reader (one task for all channels)
    and the channel's own reader task. A burst of confirms for the outcome events, or of deliveries, fills it, and the
    connection's reader then waits a loop turn per 10 frames for the channel to catch up — with every other channel's
    frames behind it: a door's confirm sat behind the forwarder's event confirms for several loop turns (issue #11,
    accept p99). aio-pika opens channels with that default and offers no way to choose, so the queue is unbounded here.
    What it holds is what the broker already sent and the reader would buffer anyway; the broker's own flow control
    (prefetch for deliveries, our confirms in flight for acks) bounds it.
    """
    frames = getattr(channel, "frames", None)
    if isinstance(frames, asyncio.Queue) and getattr(frames, "_maxsize", 0) != 0:
        frames._maxsize = 0  # type: ignore[attr-defined]  # asyncio.Queue: 0 = unbounded (put never waits)


class _Countdown:
    """Resolves ``finished`` once ``left`` confirms have settled."""

    __slots__ = ("finished", "left")

    def __init__(self, left: int, loop: asyncio.AbstractEventLoop) -> None:
        self.left = left
        self.finished: asyncio.Future[None] = loop.create_future()

    def __call__(self, _: _Confirm) -> None:
        self.left -= 1
        if self.left <= 0 and not self.finished.done():
            self.finished.set_result(None)


def _forget(channel: aiormq.Channel, message_id: str, tag: int, _: asyncio.Future[object]) -> None:
    if channel.message_id_delivery_tag.get(message_id) == tag:
        channel.message_id_delivery_tag.pop(message_id, None)


def _register(
    channel: aiormq.Channel,
    exchange: str,
    messages: Sequence[Outgoing],
    mandatory: bool,
    confirms: list[_Confirm],
    new_confirm: Callable[[], _Confirm],
) -> bytes:
    """The frames of ``messages``, each given its delivery tag and confirm future (appended to ``confirms``).

    This is ``aiormq.Channel.basic_publish``'s bookkeeping (aiormq 7.2, pinned by uv.lock) done for many messages
    at once: a delivery tag and a confirm future each and, for ``mandatory`` messages, the message id → tag map that
    routes a return to its future (no other message can be returned). The caller holds the channel (its lock, or no
    await until the frames are queued) and calls :func:`_unregister` if the frames are not queued after all.
    """
    number, max_content = channel.number, channel.max_content_size
    confirmations = channel.confirmations
    payload: list[bytes] = []
    for routing_key, body, props in messages:
        payload.append(publish_frames(number, exchange, routing_key, mandatory, props, body, max_content))
        channel.delivery_tag += 1
        tag = channel.delivery_tag
        confirm = new_confirm()
        confirmations[tag] = confirm
        if mandatory:
            message_id = props.message_id or ""
            channel.message_id_delivery_tag[message_id] = tag
            confirm.add_done_callback(partial(_forget, channel, message_id, tag))
        confirms.append(confirm)
    return b"".join(payload)


def _unregister(channel: aiormq.Channel, first: int, confirms: list[_Confirm]) -> None:
    # Nothing was written: give the tags back so the broker's numbering and ours stay in step.
    for tag in range(first + 1, channel.delivery_tag + 1):
        channel.confirmations.pop(tag, None)
    channel.delivery_tag = first
    for confirm in confirms:
        confirm.discard()


class PipelinedPublisher:
    """One confirming channel, shared by every task of its owner; publishes overlap instead of queueing."""

    def __init__(
        self, connection: AbstractRobustConnection, topology: Topology, *, confirm_timeout: float = 5.0
    ) -> None:
        self.connection = connection
        self.topology = topology
        self.confirm_timeout = confirm_timeout
        self._channel: AbstractRobustChannel | None = None
        self._opening = asyncio.Lock()
        self._underlay_cache: aiormq.Channel | None = None
        self._outstanding: set[_Confirm] = set()  # confirms not settled yet, on any channel
        self._watched: aiormq.Channel | None = None

    async def start(self) -> None:
        await self._underlay()

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
        unbounded_frames(channel)
        self._underlay_cache = channel
        return channel

    def _watch(self, channel: aiormq.Channel) -> None:
        """When ``channel`` closes, cancel its confirms still outstanding (aiormq leaves them pending)."""
        if self._watched is channel:
            return
        self._watched = channel

        def closed(_: asyncio.Future[object]) -> None:
            for confirm in [c for c in self._outstanding if c.channel is channel]:
                confirm.cancel()

        channel.closing.add_done_callback(closed)

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
        loop = asyncio.get_running_loop()
        while todo:
            try:
                channel = self._underlay_cache
                if channel is None or channel.is_closed:
                    left = max(0.05, min(self.confirm_timeout, give_up - time.monotonic()))
                    channel = await asyncio.wait_for(self._underlay(), left)
                countdown = _Countdown(len(todo), loop)
                confirms = await self._write(channel, exchange, todo, mandatory, countdown)
                try:
                    # Until every confirm is in (a closing channel cancels the rest), or the timeout.
                    async with asyncio.timeout(self.confirm_timeout):
                        await countdown.finished
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

    async def _write(
        self,
        channel: aiormq.Channel,
        exchange: str,
        messages: Sequence[Outgoing],
        mandatory: bool,
        on_settled: Callable[[_Confirm], None],
    ) -> list[_Confirm]:
        """Frames for every message, written at once; the confirm futures in message order."""
        if channel.is_closed:
            raise aiormq.exceptions.ChannelInvalidStateError(f"{channel!r} closed")
        self._watch(channel)
        loop = asyncio.get_running_loop()
        outstanding = self._outstanding
        async with channel.lock:
            confirms: list[_Confirm] = []
            first = channel.delivery_tag
            try:
                payload = _register(
                    channel, exchange, messages, mandatory, confirms,
                    lambda: _Confirm(loop, channel, on_settled, outstanding),
                )  # fmt: skip
                await channel.write_queue.put(ChannelFrame(payload=payload, should_close=False))
            except BaseException:
                _unregister(channel, first, confirms)
                raise
        return confirms

    def write_now(
        self,
        exchange: str,
        messages: Sequence[Outgoing],
        *,
        mandatory: bool,
        on_settled: Callable[[_Confirm], None],
    ) -> list[_Confirm] | None:
        """Publish ``messages`` without awaiting anything, or return None when that cannot be done right now (no
        open channel yet, another publish holding the channel, the connection's write buffer full): the caller then
        takes the awaiting path, :meth:`publish_many`.

        Why (issue #11, accept latency): on a busy loop every hand-over between tasks waits for a whole turn of the
        loop, several milliseconds at thousands of batches a second, and the awaiting path crosses several between a
        door's batch and its 200 (a task started, the confirm's callbacks, a task woken). Here the frames go to the
        connection's writer from the caller's own turn and ``on_settled(confirm)`` runs when aiormq settles the
        confirm: ack → result, nack or mandatory return → exception, channel closed → cancelled. One that never comes
        is the caller's to time out (cancel it). Nothing is retried here.
        """
        channel = self._underlay_cache
        if channel is None or channel.is_closed:
            return None
        lock = getattr(channel, "_Channel__lock", None)  # aiormq's channel lock, held by an awaiting publish
        if not isinstance(lock, asyncio.Lock) or lock.locked() or channel.write_queue.full():
            return None
        self._watch(channel)
        loop = asyncio.get_running_loop()
        outstanding = self._outstanding
        confirms: list[_Confirm] = []
        first = channel.delivery_tag
        try:
            payload = _register(
                channel, exchange, messages, mandatory, confirms,
                lambda: _Confirm(loop, channel, on_settled, outstanding),
            )  # fmt: skip
            channel.write_queue.put_nowait(ChannelFrame(payload=payload, should_close=False))
        except BaseException:
            _unregister(channel, first, confirms)
            raise
        return confirms

    async def close(self) -> None:
        if self._channel is not None and not self._channel.is_closed:
            await self._channel.close()
