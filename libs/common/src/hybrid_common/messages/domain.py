"""Value types shared by several messages (names from the domain, see docs/architecture.md)."""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

SlotId = Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")]
"""A GPU slot's stable id; also the dapi node id it is registered under (gonka-protocol.md §3: reuse one id per slot)."""

PocGeneration = Literal["v1", "v2"]
"""PoC protocol generation: v1 = MLNode 3.0.11 pow/* routes, v2 = 3.0.12+ inference/pow/* (gonka-protocol.md §7)."""

Connectivity = Literal["direct", "tunnel"]
"""How the node front reaches a GPU: its public IP + mapped port, or an SSH local forward."""


class Purpose(StrEnum):
    POC = "poc"
    CONFIRMATION_POC = "confirmation_poc"
    REHEARSAL = "rehearsal"
    MANUAL = "manual"
    COMFYUI = "comfyui"


class FailureCause(StrEnum):
    OFFER_GONE = "offer_gone"
    CREATE_FAILED = "create_failed"
    PULL_FAILED = "pull_failed"
    OCI_ERROR = "oci_error"
    STUCK_LOADING = "stuck_loading"
    HOST_OFFLINE = "host_offline"
    NOT_REACHABLE = "not_reachable"
    SERVICE_NOT_READY = "service_not_ready"
    START_FAILED = "start_failed"
    REGISTRATION_FAILED = "registration_failed"
    DEADLINE_MISSED = "deadline_missed"
    BUDGET = "budget"
    NO_OFFERS = "no_offers"
    INSUFFICIENT_CREDIT = "insufficient_credit"
    API_ERROR = "api_error"


class ConfirmationPolicy(StrEnum):
    IGNORE = "ignore"
    BURST = "burst"
    STANDBY = "standby"


class OfferFilter(BaseModel):
    """Overrides of a profile's offer policy carried by a command (all optional)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    gpu_names: list[str] | None = None
    min_gpus: int | None = Field(default=None, ge=1)
    min_vram_gb: float | None = Field(default=None, gt=0)
    max_dph: float | None = Field(default=None, gt=0)
    min_reliability: float | None = Field(default=None, ge=0, le=1)
    exclude_machine_ids: list[int] = Field(default_factory=list)
    min_inet_down_mbps: float | None = Field(
        default=None, gt=0, description="download bandwidth floor: the model download dominates an MLNode's boot"
    )


class PortMap(BaseModel):
    """A container port and the public host port Vast mapped it to (vastai-api.md: ``HostPort`` is a string there)."""

    model_config = ConfigDict(frozen=True)

    container_port: int = Field(ge=1, le=65535)
    host_port: int = Field(ge=1, le=65535)


class OfferSummary(BaseModel):
    model_config = ConfigDict(frozen=True)

    offer_id: int
    machine_id: int
    gpu_name: str
    num_gpus: int
    gpu_ram_mb: float
    dph_total: float
    reliability: float
    inet_down_mbps: float
    direct_port_count: int
    geolocation: str | None = None
    estimated_cost_usd: float | None = None


class PocWindowHeights(BaseModel):
    """The heights of one PoC window, computed from live epoch parameters (gonka-protocol.md §5)."""

    model_config = ConfigDict(frozen=True)

    poc_start: int
    generation_end: int
    exchange_end: int
    validation_start: int
    validation_end: int
    set_new_validators: int
    next_poc_start: int
