"""The durable job record: one per slot and provision, driven as a state machine from Redis (never from a held
message — reliability.md: a delivery held past 30 minutes closes the channel).

A job owns *tracks*: one per instance it rents for the slot. Normally one; a retry after a failure adds one after
the failed one is destroyed; a deadline hedge adds a second live one and the loser is destroyed (the only case
where a slot has two instances). Every track records its create *intent* (label, offer) before the create is
sent, so a replica that takes the job over finds the instance by its label instead of renting again.
"""

from __future__ import annotations

import time
from enum import StrEnum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from hybrid_common.messages.domain import Connectivity, FailureCause, OfferFilter, Purpose


class JobState(StrEnum):
    ACCEPTED = "accepted"  # recorded; waiting for its slot to be free
    PROVISIONING = "provisioning"  # tracks: offer → create → loading → running → reachable → service up
    STANDBY = "standby"  # pre-pulled, stopped; waits for a `start`
    READY = "ready"  # the winner answers through the node front
    REGISTERED = "registered"  # upserted into the dapi; holding until released
    SERVING = "serving"  # ready, not registered (comfyui, register_node=false); holding until released
    RELEASING = "releasing"  # node disabled/removed, instances being destroyed
    FAILING = "failing"  # destroying what is left before failing
    RELEASED = "released"  # terminal
    FAILED = "failed"  # terminal


TERMINAL = frozenset({JobState.RELEASED, JobState.FAILED})
HOLDING = frozenset({JobState.REGISTERED, JobState.SERVING, JobState.STANDBY})


class TrackState(StrEnum):
    CREATING = "creating"  # intent recorded, create being sent
    LOADING = "loading"  # instance exists, not running yet
    STOPPED = "stopped"  # pre-pulled with target_state=stopped (standby)
    RUNNING = "running"  # running, ports being read
    REACHABLE = "reachable"  # addresses known, service being probed
    SERVICE_UP = "service_up"  # the workload answered the probe
    FAILED = "failed"  # will be destroyed (doomed)
    DESTROYED = "destroyed"  # gone; money stops


LIVE_TRACK = frozenset(
    {
        TrackState.CREATING,
        TrackState.LOADING,
        TrackState.STOPPED,
        TrackState.RUNNING,
        TrackState.REACHABLE,
        TrackState.SERVICE_UP,
    }
)


class Failure(BaseModel):
    model_config = ConfigDict(extra="ignore")

    cause: FailureCause
    message: str


class Track(BaseModel):
    model_config = ConfigDict(extra="ignore")

    n: int = Field(description="create attempt number within the slot and epoch (label suffix)")
    label: str
    offer_id: int
    machine_id: int
    gpu_name: str
    num_gpus: int
    dph_total: float
    storage_dph: float = 0.0
    estimate_usd: float = Field(default=0.0, description="expected cost when rented (budget commitment)")
    hedge: bool = False
    state: TrackState = TrackState.CREATING
    instance_id: int | None = None
    intent_at: float = Field(default_factory=time.time)
    created_at: float | None = None
    boot_started_at: float | None = Field(default=None, description="create, or the start of a standby instance")
    running_at: float | None = None
    service_up_at: float | None = None
    readiness_lag: float | None = None
    destroyed_at: float | None = None
    last_status: str | None = None
    status_changed_at: float | None = None
    public_ip: str | None = None
    ports: dict[int, int] = Field(default_factory=dict)
    ssh_host: str | None = None
    ssh_port: int | None = None
    connectivity: Connectivity | None = None
    ssh_key_attached: bool = False
    model_up_requested_at: float | None = None
    failure: Failure | None = None
    booked: bool = Field(default=False, description="final cost added to the spend ledger")

    @property
    def live(self) -> bool:
        return self.state in LIVE_TRACK

    @property
    def holds_instance(self) -> bool:
        """An instance that exists (or may) and is not destroyed yet: it bills."""
        return self.state != TrackState.DESTROYED and (
            self.instance_id is not None or self.state == TrackState.CREATING
        )


class ReleaseRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    how: str = "delete"
    reason: str = "scheduled"
    requested_at: float
    epoch_index: int | None = None
    idempotency_key: str | None = None


class Job(BaseModel):
    model_config = ConfigDict(extra="ignore")

    job_id: str
    slot_id: str
    profile: str
    purpose: Purpose
    epoch_index: int | None = None
    deadline: float | None = Field(default=None, description="wall time (epoch seconds) of poc_start")
    deadline_height: int | None = None
    register_node: bool = True
    hedge_allowed: bool = True
    start_stopped: bool = False
    offer_filter: OfferFilter | None = None
    image: str | None = None
    disk_gb: float | None = None
    env: dict[str, str] = Field(default_factory=dict)
    correlation_id: str | None = None
    causation_id: str | None = None
    idempotency_key: str

    state: JobState = JobState.ACCEPTED
    accepted_at: float = Field(default_factory=time.time)
    ready_at: float | None = None
    registered_at: float | None = None
    ended_at: float | None = None
    tracks: list[Track] = Field(default_factory=list)
    winner: int | None = Field(default=None, description="n of the track serving the slot")
    excluded_machines: list[int] = Field(default_factory=list)
    excluded_offers: list[int] = Field(default_factory=list)
    hedged: bool = False
    gateway_poc_port: int | None = None
    gateway_inference_port: int | None = None
    registered: bool = False
    deregistered: bool = False
    front_published_for: int | None = Field(default=None, description="instance id the front was told about")
    release: ReleaseRequest | None = None
    start_requested_at: float | None = None
    failure: Failure | None = None
    replacements: int = 0
    attempt_base: int = Field(default=0, description="tracks before the last replacement (create budget)")
    outbox: list[dict[str, Any]] = Field(default_factory=list, description="envelopes to publish (same ids on retry)")

    @property
    def terminal(self) -> bool:
        return self.state in TERMINAL

    @property
    def prepull(self) -> bool:
        """A standby pre-pull not started yet: its instance is created (or kept) stopped."""
        return self.start_stopped and self.start_requested_at is None

    def live_tracks(self) -> list[Track]:
        return [t for t in self.tracks if t.live]

    def track(self, n: int | None) -> Track | None:
        return next((t for t in self.tracks if t.n == n), None) if n is not None else None

    @property
    def winning(self) -> Track | None:
        return self.track(self.winner)

    def creates(self) -> int:
        return len(self.tracks)
