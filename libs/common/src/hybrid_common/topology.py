"""The RabbitMQ topology, declared idempotently from this one place (docs/architecture.md, "Messages").

- ``events``: topic exchange for facts; routing key = event type; any number of subscriber queues.
- ``commands``: topic exchange for imperatives; routing key = command type; exactly one owner queue binds each.
- ``dlx``: direct exchange; every work queue dead-letters to it with its own name as routing key, landing in
  ``<queue>.dead``.

Work queues are quorum queues with an explicit ``x-delivery-limit`` (reliability.md: RabbitMQ 3.10 has no default
limit) and at-least-once dead-lettering (``dead-letter-strategy=at-least-once`` needs ``overflow=reject-publish``).
A ``namespace`` prefixes every name so tests (and several systems on one broker) never see each other's messages.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Final

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractExchange, AbstractQueue

from hybrid_common.messages import REGISTRY

DEFAULT_DELIVERY_LIMIT: Final = 5


@dataclass(frozen=True)
class QueueSpec:
    """A durable work queue and the routing keys it binds on one exchange."""

    name: str
    exchange: str  # "events" | "commands"
    bindings: tuple[str, ...]
    delivery_limit: int = DEFAULT_DELIVERY_LIMIT


def _command_types(*prefixes: str) -> tuple[str, ...]:
    return tuple(
        t
        for t, m in REGISTRY.items()
        if m.KIND in {"command", "query"} and any(t == p or t.startswith(p + ".") for p in prefixes)
    )


# Owner queues: each command type is bound by exactly one queue (checked by the topology test).
OWNER_QUEUES: Final[tuple[QueueSpec, ...]] = (
    QueueSpec(
        "provisioner.commands",
        "commands",
        _command_types("provision", "release", "start", "destroy", "reconcile", "offers", "logs"),
    ),
    QueueSpec("scheduler.commands", "commands", _command_types("scheduler", "plan")),
    QueueSpec("proxy.commands", "commands", _command_types("tunnel")),
    QueueSpec("relay.callbacks", "commands", _command_types("callback"), delivery_limit=20),
)

# Event subscriptions of each service (a queue per subscriber; several replicas share it).
SUBSCRIPTIONS: Final[tuple[QueueSpec, ...]] = (
    QueueSpec("proxy.front", "events", ("instance.reachable", "instance.destroyed", "instance.failed")),
    QueueSpec(
        "scheduler.boots",
        "events",
        (
            "instance.ready",
            "instance.failed",
            "instance.created",
            "node.registered",
            "job.*",
            "budget.blocked",
            "instance.running",
            "instance.destroyed",
        ),
    ),
    QueueSpec("relay.epochs", "events", ("epoch.observed",)),
    QueueSpec("provisioner.epochs", "events", ("epoch.observed",)),
    QueueSpec(
        "alerts",
        "events",
        (
            "instance.failed",
            "budget.blocked",
            "orphan.destroyed",
            "node.failed",
            "callback.dead",
            "job.failed",
            "alert.raised",
            "confirmation_poc.detected",
        ),
    ),
)


@dataclass
class Topology:
    """Names (with the namespace applied) and idempotent declaration."""

    namespace: str = ""
    delivery_limit: int = DEFAULT_DELIVERY_LIMIT
    _exchanges: dict[str, AbstractExchange] = field(default_factory=dict, repr=False)

    def name(self, base: str) -> str:
        return f"{self.namespace}.{base}" if self.namespace else base

    @property
    def events(self) -> str:
        return self.name("events")

    @property
    def commands(self) -> str:
        return self.name("commands")

    @property
    def dlx(self) -> str:
        return self.name("dlx")

    def queue_args(self, queue: str, delivery_limit: int | None = None) -> dict[str, Any]:
        return {
            "x-queue-type": "quorum",
            "x-delivery-limit": delivery_limit or self.delivery_limit,
            "x-dead-letter-exchange": self.dlx,
            "x-dead-letter-routing-key": queue,
            "x-dead-letter-strategy": "at-least-once",
            "x-overflow": "reject-publish",
        }

    async def declare_exchanges(self, channel: AbstractChannel) -> None:
        for ex, kind in (
            (self.events, aio_pika.ExchangeType.TOPIC),
            (self.commands, aio_pika.ExchangeType.TOPIC),
            (self.dlx, aio_pika.ExchangeType.DIRECT),
        ):
            self._exchanges[ex] = await channel.declare_exchange(ex, kind, durable=True)

    async def declare_queue(self, channel: AbstractChannel, spec: QueueSpec) -> AbstractQueue:
        """Declare ``spec`` (namespaced), its bindings, and its ``.dead`` queue. Safe to call repeatedly."""
        await self.declare_exchanges(channel)
        qname = self.name(spec.name)
        dead = await channel.declare_queue(f"{qname}.dead", durable=True, arguments={"x-queue-type": "quorum"})
        await dead.bind(self.dlx, routing_key=qname)
        queue = await channel.declare_queue(qname, durable=True, arguments=self.queue_args(qname, spec.delivery_limit))
        exchange = self.events if spec.exchange == "events" else self.commands
        for key in spec.bindings:
            await queue.bind(exchange, routing_key=key)
        return queue

    async def declare_all(self, channel: AbstractChannel) -> None:
        """Every owner and subscription queue of the design (used by services at start and by the CLI's check)."""
        for spec in (*OWNER_QUEUES, *SUBSCRIPTIONS):
            await self.declare_queue(channel, spec)


def owner_queue(command_type: str) -> str:
    """The one owner queue (un-namespaced) that binds ``command_type``."""
    owners = [q.name for q in OWNER_QUEUES if command_type in q.bindings]
    if len(owners) != 1:
        raise LookupError(f"command {command_type!r} has {len(owners)} owner queues")
    return owners[0]
