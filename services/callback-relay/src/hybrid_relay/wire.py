"""Envelopes and AMQP publish frames built straight to bytes on the relay's hot paths.

``hybrid_common.messages.make`` + ``Envelope.to_bytes`` validate through pydantic twice per message, an
``aio_pika.Message`` costs dozens of attribute writes, and pamqp encodes each property through a generic type switch;
at thousands of batches a second on a 2-core VPS each was a visible share of the CPU. These builders write the same
JSON and the same frames (tests/integration/test_relay_door.py parses each envelope with
``hybrid_common.messages.parse`` and compares the frames with pamqp's).
"""

from __future__ import annotations

import functools
import random
import struct
from datetime import UTC, datetime
from typing import Any

import aio_pika
import orjson
import pamqp.frame
from pamqp.body import ContentBody
from pamqp.commands import Basic
from pamqp.header import ContentHeader

SOURCE = "callback-relay"
PERSISTENT = 2  # delivery_mode: not aio-pika's default (reliability.md)

_ids = random.Random()  # seeded from the OS once; uuid4() reads the OS's entropy pool (a system call) per id


_VERSION_4 = (0x4000 << 64) | (0x8000 << 48)  # RFC 4122: version 4, variant 10
_VERSION_MASK = ~((0xF000 << 64) | (0xC000 << 48))


def new_id() -> str:
    """A random (version 4) UUID string for an envelope or a batch, without a system call or a UUID object."""
    h = "%032x" % (_ids.getrandbits(128) & _VERSION_MASK | _VERSION_4)
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def envelope_body(
    type_: str,
    payload: dict[str, Any],
    env_id: str,
    now: datetime,
    *,
    correlation_id: str | None = None,
    causation_id: str | None = None,
) -> bytes:
    """The envelope JSON (``hybrid_common.messages.Envelope``) for a payload dict that matches ``type_``'s model."""
    return orjson.dumps(
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


def properties(
    type_: str,
    env_id: str,
    now: datetime,
    *,
    correlation_id: str | None = None,
    headers: dict[str, Any] | None = None,
) -> Basic.Properties:
    """AMQP properties as ``hybrid_common.bus`` sets them: message_id = envelope id, persistent, JSON."""
    return Basic.Properties(
        content_type="application/json",
        delivery_mode=PERSISTENT,
        message_id=env_id,
        message_type=type_,
        correlation_id=correlation_id,
        app_id=SOURCE,
        timestamp=now,
        headers=headers,
    )


def envelope(
    type_: str,
    payload: dict[str, Any],
    *,
    env_id: str | None = None,
    correlation_id: str | None = None,
    causation_id: str | None = None,
) -> tuple[str, aio_pika.Message]:
    """(envelope id, persistent AMQP message): the same envelope as an ``aio_pika.Message`` (off the hot paths)."""
    env_id = env_id or new_id()
    now = datetime.now(UTC)
    body = envelope_body(type_, payload, env_id, now, correlation_id=correlation_id, causation_id=causation_id)
    message = aio_pika.Message(
        body,
        message_id=env_id,
        type=type_,
        content_type="application/json",
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        correlation_id=correlation_id,
        app_id=SOURCE,
        timestamp=now,
    )
    return env_id, message


# --- AMQP 0-9-1 frames for basic.publish ---------------------------------------------------------------------------

_FRAME_END = b"\xce"
_METHOD, _HEADER, _BODY = 1, 2, 3
_BASIC_PUBLISH = struct.pack(">HHH", 60, 40, 0)  # class basic, method publish, reserved-1
_HEAD = struct.Struct(">BHI")
_CONTENT = struct.Struct(">HHQH")  # class basic, weight 0, body size, property flags
_TIMESTAMP = struct.Struct(">Q")
# Property flag bits (AMQP 0-9-1 §4.2.6.1, basic class): the list follows this order, highest bit first.
_CONTENT_TYPE, _DELIVERY_MODE, _CORRELATION_ID, _MESSAGE_ID, _TIMESTAMP_BIT, _TYPE, _APP_ID = (
    1 << 15,
    1 << 12,
    1 << 10,
    1 << 7,
    1 << 6,
    1 << 5,
    1 << 3,
)


def _shortstr(value: str) -> bytes:
    raw = value.encode()
    if len(raw) > 255:
        raise ValueError(f"short string longer than 255 bytes: {value[:40]!r}...")
    return bytes((len(raw),)) + raw


@functools.lru_cache(maxsize=256)
def _constant_properties(
    content_type: str | None, delivery_mode: int | None, message_type: str | None, app_id: str | None
) -> tuple[int, bytes, bytes]:
    """(flags, encoded fields before the correlation id, encoded fields after the timestamp)."""
    flags, before, after = 0, b"", b""
    if content_type is not None:
        flags |= _CONTENT_TYPE
        before += _shortstr(content_type)
    if delivery_mode is not None:
        flags |= _DELIVERY_MODE
        before += bytes((delivery_mode,))
    if message_type is not None:
        flags |= _TYPE
        after += _shortstr(message_type)
    if app_id is not None:
        flags |= _APP_ID
        after += _shortstr(app_id)
    return flags, before, after


@functools.lru_cache(maxsize=256)
def _method(channel: int, exchange: str, routing_key: str, mandatory: bool) -> bytes:
    payload = _BASIC_PUBLISH + _shortstr(exchange) + _shortstr(routing_key) + (b"\x01" if mandatory else b"\x00")
    return _frame(_METHOD, channel, payload)


def _frame(kind: int, channel: int, payload: bytes) -> bytes:
    return _HEAD.pack(kind, channel, len(payload)) + payload + _FRAME_END


def publish_frames(
    channel: int,
    exchange: str,
    routing_key: str,
    mandatory: bool,
    props: Basic.Properties,
    body: bytes,
    max_content: int,
) -> bytes:
    """basic.publish + content header + body frames, as ``pamqp.frame.marshal`` writes them.

    The properties the relay sets are encoded here directly; a message with any other (headers, expiration, ...)
    goes through pamqp.
    """
    if (
        props.headers
        or props.content_encoding is not None
        or props.priority is not None
        or props.reply_to is not None
        or props.expiration is not None
        or props.user_id is not None
        or props.cluster_id
    ):
        return _pamqp_frames(channel, exchange, routing_key, mandatory, props, body, max_content)
    # The properties are written in flag order; those the relay sets to the same values again and again (content type
    # and delivery mode before, type and app id after the per-message ones) come from a cache, ready encoded.
    flags, before, after = _constant_properties(
        props.content_type, props.delivery_mode, props.message_type, props.app_id
    )
    fields = [before]
    if props.correlation_id is not None:
        flags |= _CORRELATION_ID
        fields.append(_shortstr(props.correlation_id))
    if props.message_id is not None:
        flags |= _MESSAGE_ID
        fields.append(_shortstr(props.message_id))
    if props.timestamp is not None:
        flags |= _TIMESTAMP_BIT
        stamp = props.timestamp
        if stamp.tzinfo is None:
            stamp = stamp.replace(tzinfo=UTC)  # as pamqp: a naive datetime is UTC
        fields.append(_TIMESTAMP.pack(int(stamp.timestamp())))  # whole seconds, as calendar.timegm gives them
    fields.append(after)
    header = _CONTENT.pack(60, 0, len(body), flags) + b"".join(fields)
    parts = [_method(channel, exchange, routing_key, mandatory), _HEAD.pack(_HEADER, channel, len(header)), header]
    if len(body) <= max_content:
        if body:
            parts += (_FRAME_END, _HEAD.pack(_BODY, channel, len(body)), body)
    else:
        for start in range(0, len(body), max_content):
            chunk = body[start : start + max_content]
            parts += (_FRAME_END, _HEAD.pack(_BODY, channel, len(chunk)), chunk)
    parts.append(_FRAME_END)
    return b"".join(parts)


def _pamqp_frames(
    channel: int,
    exchange: str,
    routing_key: str,
    mandatory: bool,
    props: Basic.Properties,
    body: bytes,
    max_content: int,
) -> bytes:
    frames: list[Any] = [
        Basic.Publish(exchange=exchange, routing_key=routing_key, mandatory=mandatory),
        ContentHeader(0, len(body), props),
    ]
    frames += [ContentBody(body[i : i + max_content]) for i in range(0, len(body), max_content)]
    return b"".join(pamqp.frame.marshal(f, channel) for f in frames)
