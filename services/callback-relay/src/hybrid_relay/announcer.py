"""The relay's events (``callback.accepted|forwarded|duplicate|dead``), published with confirms.

Events are facts for others (alerts, status): the authoritative accounting is ``relay:stats`` (see ledger.py), which
does not depend on them. A round of outcomes is published in one write with overlapping confirms (publishing.py).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from hybrid_relay.publishing import Outgoing, PipelinedPublisher
from hybrid_relay.wire import envelope_body, new_id, properties

Event = tuple[str, dict[str, Any], str | None]  # (type, payload, correlation id)


class Announcer:
    def __init__(self, publisher: PipelinedPublisher, *, deadline: float = 30.0) -> None:
        self.publisher = publisher
        self.exchange = publisher.topology.events
        self.deadline = deadline

    async def publish(self, type_: str, payload: dict[str, Any], *, correlation_id: str | None = None) -> None:
        await self.publish_many([(type_, payload, correlation_id)])

    async def publish_many(self, events: list[Event]) -> None:
        now = datetime.now(UTC)
        outgoing: list[Outgoing] = []
        for type_, payload, correlation_id in events:
            env_id = new_id()
            body = envelope_body(type_, payload, env_id, now, correlation_id=correlation_id)
            outgoing.append((type_, body, properties(type_, env_id, now, correlation_id=correlation_id)))
        if outgoing:
            await self.publisher.publish_many(self.exchange, outgoing, mandatory=False, deadline=self.deadline)
