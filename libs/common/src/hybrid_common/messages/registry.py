"""``type`` → payload model, and strict parsing of raw message bodies.

A body that is not JSON, names an unknown type, or carries an invalid payload raises :class:`InvalidMessage`;
the consumer helper dead-letters it instead of crashing (issue #2).
"""

from __future__ import annotations

import inspect
from types import ModuleType
from typing import Any

import orjson
from pydantic import ValidationError

from hybrid_common.messages import commands, events
from hybrid_common.messages.base import Payload
from hybrid_common.messages.envelope import Envelope


class InvalidMessage(ValueError):
    """A message that can never be handled: its reason says why (and goes to the dead-letter queue)."""


class UnknownMessageType(InvalidMessage):
    pass


def _collect(*modules: ModuleType) -> dict[str, type[Payload]]:
    found: dict[str, type[Payload]] = {}
    for module in modules:
        for _, obj in inspect.getmembers(module, inspect.isclass):
            if issubclass(obj, Payload) and obj.__module__ == module.__name__ and "TYPE" in obj.__dict__:
                if obj.TYPE in found and found[obj.TYPE] is not obj:
                    raise RuntimeError(f"message type {obj.TYPE!r} defined twice")
                found[obj.TYPE] = obj
    return dict(sorted(found.items()))


REGISTRY: dict[str, type[Payload]] = _collect(events, commands)


def payload_class(type_: str) -> type[Payload]:
    try:
        return REGISTRY[type_]
    except KeyError:
        raise UnknownMessageType(f"unknown message type {type_!r}") from None


def make(payload: Payload, *, source: str, **envelope_fields: Any) -> Envelope[Payload]:
    """Wrap a payload in a new envelope."""
    return Envelope[Payload](
        type=payload.TYPE, version=payload.VERSION, source=source, payload=payload, **envelope_fields
    )


def parse(body: bytes | str | dict[str, Any]) -> Envelope[Payload]:
    """Parse and validate a raw envelope; the payload is an instance of the registered model."""
    try:
        raw = body if isinstance(body, dict) else orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise InvalidMessage(f"body is not JSON: {exc}") from None
    if not isinstance(raw, dict):
        raise InvalidMessage("envelope must be a JSON object")
    type_ = raw.get("type")
    if not isinstance(type_, str):
        raise InvalidMessage("envelope has no string 'type'")
    model = payload_class(type_)
    try:
        payload = model.model_validate(raw.get("payload"))
        return Envelope[Payload].model_validate({**raw, "payload": payload})
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ()))
        raise InvalidMessage(f"invalid {type_!r} message: {where}: {first.get('msg')}") from None
