"""The relay's events (``callback.accepted|forwarded|duplicate|dead``), published with confirms.

``emit`` does not hold up its caller (the door answers first; the forwarder moves to its next batch); the pending
publishes are bounded and drained on shutdown. Events are facts for others (alerts, status): the authoritative
accounting is ``relay:stats`` (see ledger.py), which does not depend on them.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from hybrid_common.bus import Publisher
from hybrid_relay.metrics import EVENTS_DROPPED
from hybrid_relay.wire import envelope

log = logging.getLogger("hybrid.relay.events")


class Announcer:
    def __init__(self, publisher: Publisher, *, max_pending: int = 50_000, deadline: float = 30.0) -> None:
        self.publisher = publisher
        self.max_pending = max_pending
        self.deadline = deadline
        self._pending: set[asyncio.Task[None]] = set()

    async def publish(self, type_: str, payload: dict[str, Any], *, correlation_id: str | None = None) -> None:
        _, message = envelope(type_, payload, correlation_id=correlation_id)
        await self.publisher.publish_raw(
            self.publisher.topology.events, type_, message, mandatory=False, deadline=self.deadline
        )

    def emit(self, type_: str, payload: dict[str, Any], *, correlation_id: str | None = None) -> None:
        if len(self._pending) >= self.max_pending:
            EVENTS_DROPPED.inc()
            return
        task = asyncio.create_task(self._guarded(type_, payload, correlation_id))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def _guarded(self, type_: str, payload: dict[str, Any], correlation_id: str | None) -> None:
        try:
            await self.publish(type_, payload, correlation_id=correlation_id)
        except Exception as exc:
            EVENTS_DROPPED.inc()
            log.warning("event %s not published: %r", type_, exc)

    async def drain(self, timeout: float = 10.0) -> None:
        if self._pending:
            await asyncio.wait(set(self._pending), timeout=timeout)
