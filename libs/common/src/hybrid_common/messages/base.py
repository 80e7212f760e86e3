"""Base classes for message payloads: each payload class names its own ``type`` and kind."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import BaseModel, ConfigDict

MessageKind = Literal["event", "command", "query", "reply"]


class Payload(BaseModel):
    """A message body. Subclasses set ``TYPE`` (the routing key and registry key) and ``KIND``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    TYPE: ClassVar[str]
    KIND: ClassVar[MessageKind]
    VERSION: ClassVar[int] = 1


class Event(Payload):
    """A fact that happened; any number of subscribers; published without ``mandatory``."""

    KIND: ClassVar[MessageKind] = "event"


class Command(Payload):
    """An imperative for exactly one owner queue; published ``mandatory`` (unroutable = error)."""

    KIND: ClassVar[MessageKind] = "command"


class Query(Payload):
    """A request answered over the queue (``reply_to`` + ``correlation_id`` + timeout)."""

    KIND: ClassVar[MessageKind] = "query"


class Reply(Payload):
    """The answer to a :class:`Query`."""

    KIND: ClassVar[MessageKind] = "reply"
