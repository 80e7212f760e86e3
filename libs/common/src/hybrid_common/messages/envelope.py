"""The message envelope every event, command and reply travels in (docs/architecture.md, "Messages").

``id`` is also the AMQP ``message_id``: consumers deduplicate on it. ``correlation_id`` ties a message to the
epoch or request it belongs to; ``causation_id`` to the message that caused it.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any, Generic, TypeVar

import orjson
from pydantic import BaseModel, ConfigDict, Field, SerializeAsAny

P = TypeVar("P", bound=BaseModel)


def _now() -> datetime:
    return datetime.now(UTC)


class Envelope(BaseModel, Generic[P]):
    model_config = ConfigDict(frozen=True)

    id: uuid.UUID = Field(default_factory=uuid.uuid4)
    type: str
    version: int = 1
    occurred_at: datetime = Field(default_factory=_now)
    correlation_id: str | None = None
    causation_id: str | None = None
    source: str
    payload: SerializeAsAny[P]

    def to_bytes(self) -> bytes:
        return orjson.dumps(self.model_dump(mode="json"))

    def caused(self) -> dict[str, Any]:
        """Keyword arguments that make a follow-up message carry this one's correlation and causation."""
        return {"correlation_id": self.correlation_id, "causation_id": str(self.id)}
