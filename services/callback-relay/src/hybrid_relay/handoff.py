"""The door's hand-off to the broker: a group commit of accepted batches.

Every batch the door accepts must be published with a confirm before its 200 (issue #11). One message and one confirm
per batch costs the broker a quorum-queue write and the relay a publish, a delivery and an ack each — on a 2-core VPS
that alone caps the relay near its target. So batches accepted in the same moment travel together: each waits in
``pending`` until the next flush, a flush publishes everything pending (up to ``max_batches`` / ``max_bytes``) as one
``callback.forward_group`` and answers every batch with that message's confirm. At most ``max_in_flight`` groups
await their confirm at once; while they do, new batches gather into the next group, so the group size follows the
load (one batch when idle, dozens at thousands a second) and a batch waits at most about one confirm round trip more
than it would alone.

The common path does not await (accept latency, issue #11): the flush writes the group's frames from its own turn of
the loop (:meth:`PipelinedPublisher.write_now`) and the confirm answers the batches from aiormq's frame reader — on a
busy loop each task or future hand-over in between would cost a loop turn of several milliseconds. Anything unusual (no
open channel, a nack, the channel closing, no confirm within ``confirm_timeout``) hands the group to the awaiting
path, :meth:`PipelinedPublisher.publish_many`, which publishes again through reconnects: a message written twice
carries the same batch ids, which the forwarder recognises.

A batch whose group cannot be confirmed before its deadline (counted from its arrival) fails with
:class:`PublishFailed`; the door answers 503 and the sender keeps the batch.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable
from datetime import UTC, datetime
from functools import partial
from typing import Any

import aiormq
from pamqp.commands import Basic

from hybrid_common.bus import PublishFailed, Unroutable
from hybrid_relay.metrics import HANDOFF_BATCHES, HANDOFF_SECONDS
from hybrid_relay.publishing import PipelinedPublisher
from hybrid_relay.wire import envelope_body, new_id, properties

log = logging.getLogger("hybrid.relay.handoff")

GROUP_TYPE = "callback.forward_group"

# Called once per batch: None once a confirmed group carries it, else why not (PublishFailed, Unroutable, ...).
Reply = Callable[[BaseException | None], None]


class _Pending:
    __slots__ = ("give_up", "payload", "reply", "size")

    def __init__(self, payload: dict[str, Any], size: int, give_up: float, reply: Reply) -> None:
        self.payload = payload  # a ForwardCallback payload
        self.size = size
        self.give_up = give_up  # monotonic deadline of this batch's hand-off
        self.reply = reply


class _Group:
    """One group written by the flush itself, until its confirm (or its timer) settles it."""

    __slots__ = ("batches", "settled", "started", "timer")

    def __init__(self, batches: list[_Pending], started: float) -> None:
        self.batches = batches
        self.started = started
        self.settled = False
        self.timer: asyncio.TimerHandle | None = None


class GroupHandoff:
    def __init__(
        self,
        publisher: PipelinedPublisher,
        *,
        max_batches: int = 256,
        max_bytes: int = 1024 * 1024,
        max_in_flight: int = 4,
        deadline: float = 5.0,
    ) -> None:
        self.publisher = publisher
        self.exchange = publisher.topology.commands
        self.max_batches = max_batches
        self.max_bytes = max_bytes
        self.max_in_flight = max_in_flight
        self.deadline = deadline
        self._pending: deque[_Pending] = deque()
        self._in_flight = 0
        self._flush_scheduled = False
        self._tasks: set[asyncio.Task[None]] = set()
        self.groups = 0  # published (confirmed) groups, for the status
        self.batches = 0

    def submit(self, payload: dict[str, Any], size: int, reply: Reply) -> None:
        """Queue one batch; ``reply`` is called once a confirmed group carries it, or with why not."""
        self._pending.append(_Pending(payload, size, time.monotonic() + self.deadline, reply))
        self._schedule(asyncio.get_running_loop())

    def _schedule(self, loop: asyncio.AbstractEventLoop) -> None:
        # call_soon: every request parsed in this turn of the loop joins the same group.
        if not self._flush_scheduled and self._in_flight < self.max_in_flight:
            self._flush_scheduled = True
            loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        now = time.monotonic()
        while self._pending and self._in_flight < self.max_in_flight:
            group: list[_Pending] = []
            size = 0
            while self._pending and len(group) < self.max_batches:
                item = self._pending[0]
                if item.give_up <= now:
                    self._pending.popleft()
                    _reply(item, PublishFailed("no group confirmed before the batch's deadline"))
                    continue
                if group and size + item.size > self.max_bytes:
                    break
                group.append(self._pending.popleft())
                size += item.size
            if not group:
                continue
            self._in_flight += 1
            if not self._write_now(group):
                self._spawn(self._publish(group))

    def _message(self, group: list[_Pending]) -> tuple[bytes, Basic.Properties]:
        env_id = new_id()
        now = datetime.now(UTC)
        heights = {p.payload["block_height"] for p in group}
        correlation = f"poc:{next(iter(heights))}" if len(heights) == 1 else None
        body = envelope_body(
            GROUP_TYPE, {"batches": [p.payload for p in group]}, env_id, now, correlation_id=correlation
        )
        return body, properties(GROUP_TYPE, env_id, now, correlation_id=correlation)

    # --- the path without awaits ----------------------------------------------------------------------------------

    def _write_now(self, batches: list[_Pending]) -> bool:
        body, props = self._message(batches)
        group = _Group(batches, time.monotonic())
        try:
            confirms = self.publisher.write_now(
                self.exchange, [(GROUP_TYPE, body, props)], mandatory=True, on_settled=partial(self._settled, group)
            )
        except Exception as exc:  # nothing was written: the awaiting path tries, and reports what fails
            log.warning("group of %d batches not written at once: %r", len(batches), exc)
            return False
        if confirms is None:
            return False
        loop = asyncio.get_running_loop()
        left = min(self.publisher.confirm_timeout, min(p.give_up for p in batches) - group.started)
        group.timer = loop.call_later(max(0.0, left), confirms[0].cancel)
        return True

    def _settled(self, group: _Group, confirm: asyncio.Future[object]) -> None:
        if group.settled:
            return
        group.settled = True
        if group.timer is not None:
            group.timer.cancel()
        error = None if confirm.cancelled() else confirm.exception()
        retry = confirm.cancelled() or (error is not None and not isinstance(error, aiormq.exceptions.PublishError))
        if retry and min(p.give_up for p in group.batches) > time.monotonic():
            # The channel closed or the broker nacked: the awaiting path publishes again (it counts the group).
            log.info("group of %d batches not confirmed at once (%r); publishing again", len(group.batches), error)
            self._spawn(self._publish(group.batches))
            return
        self._in_flight -= 1
        if retry:  # no confirm before the deadline
            self._fail(group.batches, PublishFailed("no confirm before the batches' deadline"))
        elif error is not None:  # returned: no queue binds callback.forward_group
            self._fail(group.batches, Unroutable("callback.forward_group routes to no queue"))
        else:
            self._done(group.batches, group.started)
        if self._pending:
            self._schedule(asyncio.get_running_loop())

    # --- the awaiting path (publishes again through reconnects) ---------------------------------------------------

    async def _publish(self, group: list[_Pending]) -> None:
        try:
            body, props = self._message(group)
            started = time.monotonic()
            left = min(p.give_up for p in group) - started
            await self.publisher.publish(
                self.exchange, GROUP_TYPE, body, props, mandatory=True, deadline=max(0.0, left)
            )
        except asyncio.CancelledError:
            self._fail(group, PublishFailed("relay stopping"))
            raise
        except Exception as exc:
            log.error("group of %d batches not confirmed: %s", len(group), exc)
            self._fail(group, exc)
        else:
            self._done(group, started)
        finally:
            self._in_flight -= 1
            if self._pending:
                self._schedule(asyncio.get_running_loop())

    # --- outcomes -------------------------------------------------------------------------------------------------

    def _done(self, group: list[_Pending], started: float) -> None:
        HANDOFF_SECONDS.observe(time.monotonic() - started)
        HANDOFF_BATCHES.observe(len(group))
        self.groups += 1
        self.batches += len(group)
        for p in group:
            _reply(p, None)

    @staticmethod
    def _fail(group: list[_Pending], error: BaseException) -> None:
        for p in group:
            _reply(p, error)

    def _spawn(self, work: Any) -> None:
        task = asyncio.create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def drain(self, timeout: float = 10.0) -> None:
        """Let the groups in flight finish (shutdown: their batches are answered)."""
        deadline = time.monotonic() + timeout
        while (self._pending or self._in_flight) and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        for task in list(self._tasks):
            task.cancel()
        with contextlib.suppress(Exception):
            await asyncio.gather(*self._tasks, return_exceptions=True)


def _reply(batch: _Pending, error: BaseException | None) -> None:
    try:
        batch.reply(error)
    except Exception:  # one connection's answer must not keep the others from theirs
        log.exception("answering a batch failed")
