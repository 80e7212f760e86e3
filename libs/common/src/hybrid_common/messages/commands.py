"""Commands (to exactly one owner queue, published ``mandatory``) and queries (request/reply)."""

from __future__ import annotations

from datetime import datetime
from typing import Any, ClassVar

from pydantic import Field, model_validator

from hybrid_common.messages.base import Command, Query, Reply
from hybrid_common.messages.domain import (
    ConfirmationPolicy,
    OfferFilter,
    OfferSummary,
    Purpose,
    SlotId,
)

# --- provisioner --------------------------------------------------------------------------------------------------


class Provision(Command):
    """Rent GPUs for slots. Becomes one durable job per slot; the message is acked once the jobs are recorded.

    ``idempotency_key`` makes a re-sent or duplicated command a no-op (a restarted scheduler never double-rents).
    """

    TYPE: ClassVar[str] = "provision"

    idempotency_key: str = Field(min_length=1, max_length=200)
    profile: str
    slot_ids: list[SlotId] = Field(min_length=1)
    purpose: Purpose = Purpose.POC
    epoch_index: int | None = None
    deadline: datetime | None = Field(default=None, description="registered before this (the PoC start)")
    deadline_height: int | None = None
    register_node: bool = Field(default=True, description="upsert the slot into the dapi once ready")
    hedge: bool = True
    start_stopped: bool = Field(default=False, description="pre-pull with target_state=stopped, start on command")
    offer_filter: OfferFilter | None = None
    image: str | None = Field(default=None, description="override the profile's image (DOCKER_IMAGE)")
    disk_gb: float | None = Field(
        default=None, ge=8, description="override the profile's disk in GB (Vast's minimum is 8; offers must have it)"
    )
    env: dict[str, str] = Field(default_factory=dict)


class Release(Command):
    """Take slots out of the dapi (disable or delete), then destroy their instances."""

    TYPE: ClassVar[str] = "release"

    idempotency_key: str = Field(min_length=1, max_length=200)
    slot_ids: list[SlotId] = Field(min_length=1)
    epoch_index: int | None = None
    how: str = Field(default="delete", pattern="^(delete|disable)$")
    reason: str = "scheduled"


class StartStandby(Command):
    """Start a slot's pre-pulled (stopped) instance now."""

    TYPE: ClassVar[str] = "start"

    slot_ids: list[SlotId] = Field(min_length=1)
    reason: str = "scheduled"


class Destroy(Command):
    """Destroy one instance, or every instance carrying our label prefix (emergency)."""

    TYPE: ClassVar[str] = "destroy"

    instance_id: int | None = None
    all_labelled: bool = False
    reason: str = "operator"

    @model_validator(mode="after")
    def _one_target(self) -> Destroy:
        if (self.instance_id is None) == (not self.all_labelled):
            raise ValueError("give exactly one of instance_id or all_labelled=true")
        return self


class Reconcile(Command):
    """Run the orphan reconciler now."""

    TYPE: ClassVar[str] = "reconcile"

    reason: str = "operator"


class TunnelOpen(Command):
    TYPE: ClassVar[str] = "tunnel.open"

    slot_id: SlotId | None = None
    instance_id: int
    remote_port: int = Field(ge=1, le=65535)


class TunnelClose(Command):
    TYPE: ClassVar[str] = "tunnel.close"

    instance_id: int | None = None
    all: bool = False


# --- callback-relay ------------------------------------------------------------------------------------------------


class ForwardCallback(Command):
    """A PoC batch the relay accepted (published with a confirm before its 200): forward it to the dapi.

    ``body`` is the batch exactly as received, so the dapi sees the sender's bytes; ``digest`` identifies its content
    for deduplication (the MLNode senders re-send the same batch).
    """

    TYPE: ClassVar[str] = "callback.forward"

    batch_id: str
    digest: str
    path: str = Field(description="the dapi path, forwarded unchanged, e.g. /v2/poc-batches/generated")
    body: str
    generation: str = Field(pattern="^v[12]$")
    kind: str = Field(pattern="^(generated|validated)$")
    node_id: int
    block_height: int
    received_at: datetime
    source_ip: str | None = None
    items: int | None = Field(default=None, description="nonces (v1) or artifacts (v2), counted at the door")


class ForwardCallbackGroup(Command):
    """Several accepted PoC batches in one message: the relay door's group commit.

    One publisher confirm covers every batch in the group, and each batch's 200 goes out only after it; the forwarder
    handles them one by one (each keeps its own ``batch_id``, dedupe and outcome) and acks the group when all are settled.
    """

    TYPE: ClassVar[str] = "callback.forward_group"

    batches: list[ForwardCallback] = Field(min_length=1)


# --- scheduler ----------------------------------------------------------------------------------------------------


class PauseScheduling(Command):
    TYPE: ClassVar[str] = "scheduler.pause"

    reason: str = "operator"


class ResumeScheduling(Command):
    TYPE: ClassVar[str] = "scheduler.resume"

    reason: str = "operator"


class Rehearse(Command):
    """One GPU through a full PoC cycle now, outside the schedule."""

    TYPE: ClassVar[str] = "scheduler.rehearse"

    profile: str | None = None
    slot_id: SlotId = "rehearsal-1"


class SetConfirmationPolicy(Command):
    TYPE: ClassVar[str] = "scheduler.confirmation_policy"

    policy: ConfirmationPolicy


# --- queries (request/reply) ----------------------------------------------------------------------------------------


class OffersQuery(Query):
    TYPE: ClassVar[str] = "offers.query"

    profile: str
    limit: int = Field(default=10, ge=1, le=100)
    estimated_minutes: float = Field(default=60, gt=0)
    offer_filter: OfferFilter | None = None


class OffersReply(Reply):
    TYPE: ClassVar[str] = "offers.reply"

    profile: str
    offers: list[OfferSummary]


class LogsQuery(Query):
    TYPE: ClassVar[str] = "logs.query"

    instance_id: int
    tail: int = Field(default=200, ge=1, le=10000)


class LogsReply(Reply):
    TYPE: ClassVar[str] = "logs.reply"

    instance_id: int
    text: str


class TunnelListQuery(Query):
    TYPE: ClassVar[str] = "tunnel.list"


class TunnelListReply(Reply):
    TYPE: ClassVar[str] = "tunnel.list_reply"

    tunnels: list[dict[str, Any]]


class PlanQuery(Query):
    TYPE: ClassVar[str] = "plan.query"


class PlanReply(Reply):
    TYPE: ClassVar[str] = "plan.reply"

    plan: dict[str, Any]


class ErrorReply(Reply):
    """What a query's owner answers when it cannot: the asker raises with ``message``."""

    TYPE: ClassVar[str] = "error.reply"

    error: str
    message: str
