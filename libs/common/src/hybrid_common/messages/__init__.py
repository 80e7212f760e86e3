"""The message contracts: envelope, one model per event/command/query, and the type registry."""

from hybrid_common.messages import commands, domain, events
from hybrid_common.messages.base import Command, Event, MessageKind, Payload, Query, Reply
from hybrid_common.messages.envelope import Envelope
from hybrid_common.messages.registry import REGISTRY, InvalidMessage, UnknownMessageType, make, parse, payload_class

__all__ = [
    "REGISTRY",
    "Command",
    "Envelope",
    "Event",
    "InvalidMessage",
    "MessageKind",
    "Payload",
    "Query",
    "Reply",
    "UnknownMessageType",
    "commands",
    "domain",
    "events",
    "make",
    "parse",
    "payload_class",
]
