"""Envelopes built straight to bytes on the relay's hot paths.

``hybrid_common.messages.make`` + ``Envelope.to_bytes`` validate through pydantic twice per message; at thousands of
batches a second on a 2-core VPS that is a visible share of the CPU. These builders write the same JSON (the
contract test in tests/integration/test_relay_door.py parses each with ``hybrid_common.messages.parse``).
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

import aio_pika
import orjson

SOURCE = "callback-relay"


def envelope(
    type_: str,
    payload: dict[str, Any],
    *,
    env_id: str | None = None,
    correlation_id: str | None = None,
    causation_id: str | None = None,
) -> tuple[str, aio_pika.Message]:
    """(envelope id, persistent AMQP message) for a payload dict that matches ``type_``'s model."""
    env_id = env_id or str(uuid.uuid4())
    now = datetime.now(UTC)
    body = orjson.dumps(
        {
            "id": env_id,
            "type": type_,
            "version": 1,
            "occurred_at": now,
            "correlation_id": correlation_id,
            "causation_id": causation_id,
            "source": SOURCE,
            "payload": payload,
        }
    )
    message = aio_pika.Message(
        body,
        message_id=env_id,
        type=type_,
        content_type="application/json",
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,  # not aio-pika's default (reliability.md)
        correlation_id=correlation_id,
        app_id=SOURCE,
        timestamp=now,
    )
    return env_id, message
