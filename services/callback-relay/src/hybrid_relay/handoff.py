"""The door's hand-off to the broker: a group commit of accepted batches.

Every batch the door accepts must be published with a confirm before its 200 (issue #11). One message and one confirm
per batch costs the broker a quorum-queue write and the relay a publish, a delivery and an ack each — on a 2-core VPS
that alone caps the relay near its target. So batches accepted in the same moment travel together: each waits in
``pending`` until the next flush, a flush publishes everything pending (up to ``max_batches`` / ``max_bytes``) as one
``callback.forward_group`` and resolves every batch's future with that message's confirm. At most ``max_in_flight``
groups await their confirm at once; while they do, new batches gather into the next group, so the group size follows
the load (one batch when idle, dozens at thousands a second) and a batch waits at most about one confirm round trip
more than it would alone.

A batch whose group cannot be confirmed before its deadline (counted from its arrival) fails with
:class:`PublishFailed`; the door answers 503 and the sender keeps the batch.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from hybrid_common.bus import PublishFailed
from hybrid_relay.metrics import HANDOFF_BATCHES, HANDOFF_SECONDS
from hybrid_relay.publishing import PipelinedPublisher
from hybrid_relay.wire import envelope_body, new_id, properties

log = logging.getLogger("hybrid.relay.handoff")

GROUP_TYPE = "callback.forward_group"


@dataclass(slots=True)
class _Pending:
    payload: dict[str, Any]  # a ForwardCallback payload
    size: int
    give_up: float  # monotonic deadline of this batch's hand-off
    future: asyncio.Future[None]


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

    def submit(self, payload: dict[str, Any], size: int) -> asyncio.Future[None]:
        """Queue one batch; the future resolves once a confirmed group carries it (or fails with PublishFailed)."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        self._pending.append(_Pending(payload, size, time.monotonic() + self.deadline, future))
        self._schedule(loop)
        return future

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
                if item.future.done():  # cancelled by its request's owner
                    self._pending.popleft()
                    continue
                if item.give_up <= now:
                    self._pending.popleft()
                    item.future.set_exception(PublishFailed("no group confirmed before the batch's deadline"))
                    continue
                if group and size + item.size > self.max_bytes:
                    break
                group.append(self._pending.popleft())
                size += item.size
            if not group:
                continue
            self._in_flight += 1
            task = asyncio.create_task(self._publish(group))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _publish(self, group: list[_Pending]) -> None:
        try:
            env_id = new_id()
            now = datetime.now(UTC)
            heights = {p.payload["block_height"] for p in group}
            correlation = f"poc:{next(iter(heights))}" if len(heights) == 1 else None
            body = envelope_body(
                GROUP_TYPE, {"batches": [p.payload for p in group]}, env_id, now, correlation_id=correlation
            )
            props = properties(GROUP_TYPE, env_id, now, correlation_id=correlation)
            started = time.monotonic()
            left = min(p.give_up for p in group) - started
            await self.publisher.publish(
                self.exchange, GROUP_TYPE, body, props, mandatory=True, deadline=max(0.0, left)
            )
            HANDOFF_SECONDS.observe(time.monotonic() - started)
            HANDOFF_BATCHES.observe(len(group))
        except asyncio.CancelledError:
            for p in group:
                p.future.cancel()
            raise
        except Exception as exc:
            log.error("group of %d batches not confirmed: %s", len(group), exc)
            for p in group:
                if not p.future.done():
                    p.future.set_exception(exc)
        else:
            self.groups += 1
            self.batches += len(group)
            for p in group:
                if not p.future.done():
                    p.future.set_result(None)
        finally:
            self._in_flight -= 1
            if self._pending:
                self._schedule(asyncio.get_running_loop())

    async def drain(self, timeout: float = 10.0) -> None:
        """Let the groups in flight finish (shutdown: their batches are answered)."""
        deadline = time.monotonic() + timeout
        while (self._pending or self._tasks) and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        for task in list(self._tasks):
            task.cancel()
        with contextlib.suppress(Exception):
            await asyncio.gather(*self._tasks, return_exceptions=True)
