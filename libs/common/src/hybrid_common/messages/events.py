"""Events: facts published to the ``events`` exchange, routing key = ``TYPE``."""

from __future__ import annotations

from datetime import datetime
from typing import ClassVar

from pydantic import Field

from hybrid_common.messages.base import Event
from hybrid_common.messages.domain import (
    ConfirmationPolicy,
    Connectivity,
    FailureCause,
    PocGeneration,
    PocWindowHeights,
    PortMap,
    Purpose,
    SlotId,
)

# --- chain clock (owner: scheduler) -------------------------------------------------------------------------


class EpochObserved(Event):
    """The scheduler's current view of the chain, published on every change of height band or phase."""

    TYPE: ClassVar[str] = "epoch.observed"

    epoch_index: int
    block_height: int
    phase: str
    window: PocWindowHeights
    next_window: PocWindowHeights | None = None
    block_seconds: float = Field(gt=0, description="measured (robust moving estimate)")
    poc_v2_enabled: bool
    mlnode_version: str
    source: str = Field(description="which endpoint gave this view: public|chain-rest")
    stale_seconds: float = Field(ge=0, description="age of the last good view when it was published")


class EpochPhaseChanged(Event):
    TYPE: ClassVar[str] = "epoch.phase_changed"

    epoch_index: int
    block_height: int
    previous_phase: str | None
    phase: str


class ChainUnreachable(Event):
    """The chain endpoints are slow, down or answering garbage; the scheduler keeps its last good view."""

    TYPE: ClassVar[str] = "chain.unreachable"

    endpoint: str
    error: str
    last_good_age_seconds: float | None


class PocWindowPlanned(Event):
    """A rental plan for one PoC window (owner: scheduler)."""

    TYPE: ClassVar[str] = "poc.window_planned"

    epoch_index: int
    generation: PocGeneration
    profile: str
    slot_ids: list[SlotId]
    poc_start_height: int
    rent_at: datetime
    rent_at_height: int
    release_after_height: int
    lead_seconds: float
    reason: str = ""


class ConfirmationPocDetected(Event):
    """``active_confirmation_poc_event`` appeared (gonka-protocol.md §8)."""

    TYPE: ClassVar[str] = "confirmation_poc.detected"

    epoch_index: int
    event_sequence: int
    trigger_height: int
    generation_start_height: int
    phase: int
    policy: ConfirmationPolicy
    action: str = Field(description="what the policy did: nothing | rented | started standby")


class ConfirmationPocEnded(Event):
    TYPE: ClassVar[str] = "confirmation_poc.ended"

    epoch_index: int
    event_sequence: int


class SchedulerLeaderElected(Event):
    TYPE: ClassVar[str] = "scheduler.leader_elected"

    holder: str
    fencing_token: int


class SchedulerPaused(Event):
    TYPE: ClassVar[str] = "scheduler.paused"

    by: str = "operator"


class SchedulerResumed(Event):
    TYPE: ClassVar[str] = "scheduler.resumed"

    by: str = "operator"


# --- GPU instances and slots (owner: provisioner) ---------------------------------------------------------------


class JobAccepted(Event):
    TYPE: ClassVar[str] = "job.accepted"

    job_id: str
    slot_id: SlotId
    profile: str
    purpose: Purpose
    deadline: datetime | None


class InstanceCreated(Event):
    TYPE: ClassVar[str] = "instance.created"

    job_id: str
    slot_id: SlotId
    instance_id: int
    offer_id: int
    machine_id: int
    gpu_name: str
    num_gpus: int
    dph_total: float
    label: str
    hedge: bool = False
    stopped: bool = Field(default=False, description="created with target_state=stopped (pre-pulled)")


class InstanceRunning(Event):
    TYPE: ClassVar[str] = "instance.running"

    job_id: str
    slot_id: SlotId
    instance_id: int
    seconds_since_create: float


class InstanceReachable(Event):
    """How the node front reaches the slot's GPU (never ``ssh_host`` for HTTP: vastai-api.md)."""

    TYPE: ClassVar[str] = "instance.reachable"

    job_id: str
    slot_id: SlotId
    instance_id: int
    connectivity: Connectivity
    public_ip: str | None = Field(description="public_ipaddr, stripped")
    ports: list[PortMap]
    ssh_host: str | None = None
    ssh_port: int | None = None
    api_container_port: int = 8080
    inference_container_port: int = 5000
    gateway_poc_port: int | None = None
    gateway_inference_port: int | None = None


class InstanceReady(Event):
    """The workload answers through the node front (for MLNodes: ``GET /api/v1/state``)."""

    TYPE: ClassVar[str] = "instance.ready"

    job_id: str
    slot_id: SlotId
    instance_id: int
    profile: str
    gpu_name: str
    boot_seconds: float = Field(description="create → ready, the figure the scheduler's lead time is built from")
    pull_seconds: float | None = None
    readiness_lag_seconds: float | None = Field(default=None, description="service up → seen by the probe")


class InstanceFailed(Event):
    TYPE: ClassVar[str] = "instance.failed"

    job_id: str
    slot_id: SlotId
    instance_id: int | None
    machine_id: int | None = None
    cause: FailureCause
    message: str
    logs_tail: str = ""
    will_retry: bool


class InstanceDestroyed(Event):
    TYPE: ClassVar[str] = "instance.destroyed"

    slot_id: SlotId | None
    instance_id: int
    reason: str
    gpu_seconds: float = 0.0
    storage_seconds: float = 0.0
    cost_usd: float = 0.0


class NodeRegistered(Event):
    """A slot upserted into the dapi admin API with the node front's address (gonka-protocol.md §3)."""

    TYPE: ClassVar[str] = "node.registered"

    job_id: str | None
    slot_id: SlotId
    node_id: str
    host: str
    poc_port: int
    inference_port: int
    epoch_index: int | None = None
    before_deadline: bool = True


class NodeDeregistered(Event):
    TYPE: ClassVar[str] = "node.deregistered"

    slot_id: SlotId
    node_id: str
    how: str = Field(description="disable | delete")


class NodeFailed(Event):
    """The dapi reports one of our nodes FAILED."""

    TYPE: ClassVar[str] = "node.failed"

    node_id: str
    failure_reason: str
    observed_by: str


class JobCompleted(Event):
    TYPE: ClassVar[str] = "job.completed"

    job_id: str
    slot_id: SlotId
    outcome: str = Field(description="released | destroyed | cancelled")


class JobFailed(Event):
    TYPE: ClassVar[str] = "job.failed"

    job_id: str
    slot_id: SlotId
    cause: FailureCause
    message: str
    standby: bool = Field(
        default=False,
        description="a standby pre-pull (start_stopped) that was never started: a spare, not the slot's rental",
    )


class BudgetBlocked(Event):
    TYPE: ClassVar[str] = "budget.blocked"

    job_id: str | None
    scope: str = Field(description="day | epoch | credit")
    cap_usd: float
    spent_usd: float
    estimated_usd: float


class OrphanDestroyed(Event):
    TYPE: ClassVar[str] = "orphan.destroyed"

    instance_id: int
    label: str | None
    reason: str


class TunnelOpened(Event):
    TYPE: ClassVar[str] = "tunnel.opened"

    slot_id: SlotId | None
    instance_id: int
    local_port: int
    remote_port: int
    ssh_host: str
    ssh_port: int


class TunnelClosed(Event):
    TYPE: ClassVar[str] = "tunnel.closed"

    slot_id: SlotId | None
    instance_id: int
    local_port: int
    reason: str


class TunnelFailed(Event):
    TYPE: ClassVar[str] = "tunnel.failed"

    slot_id: SlotId | None
    instance_id: int
    error: str
    will_retry: bool


# --- PoC callbacks (owner: callback-relay) ----------------------------------------------------------------------


class CallbackAccepted(Event):
    TYPE: ClassVar[str] = "callback.accepted"

    batch_id: str
    path: str
    generation: PocGeneration
    kind: str = Field(description="generated | validated")
    node_id: int
    block_height: int
    items: int = Field(description="nonces (v1) or artifacts (v2) in the batch")


class CallbackForwarded(Event):
    TYPE: ClassVar[str] = "callback.forwarded"

    batch_id: str
    attempts: int
    status: int
    lag_ms: float


class CallbackDuplicate(Event):
    TYPE: ClassVar[str] = "callback.duplicate"

    batch_id: str
    path: str


class CallbackDead(Event):
    TYPE: ClassVar[str] = "callback.dead"

    batch_id: str
    path: str
    reason: str = Field(description="window_closed | attempts_exhausted | rejected")
    last_status: int | None = None
    attempts: int = 0


# --- the proxy's own node (owner: proxy) --------------------------------------------------------------------------


class ProxyNodeRegistered(Event):
    TYPE: ClassVar[str] = "proxy.node_registered"

    node_id: str
    host: str
    poc_port: int
    inference_port: int
    models: list[str]


class AlertRaised(Event):
    """Anything an operator must hear about (also delivered to the alert webhook)."""

    TYPE: ClassVar[str] = "alert.raised"

    severity: str = Field(description="info | warning | critical")
    title: str
    detail: str
    source_type: str | None = None
