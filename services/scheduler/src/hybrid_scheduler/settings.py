"""The scheduler's settings: the common ones plus its own (``SCHEDULER_*``).

Two kinds of durations: *wall* settings (poll interval, HTTP timeout, lease TTL) are seconds on this machine's clock;
*real-world* settings (release margin, policy priors and margins, rehearsal hold) describe the real network and are
divided by the time profile's acceleration in ``MODE=sim`` (``HYBRID_TIME_PROFILE``), as every simulator does.
"""

from __future__ import annotations

import os
import socket
import uuid
from typing import Literal

from pydantic import AliasChoices, Field
from pydantic_settings import SettingsConfigDict

from hybrid_common import TimeProfile, current_profile, port
from hybrid_common.messages.domain import ConfirmationPolicy
from hybrid_common.settings import CommonSettings
from hybrid_scheduler.policy import PolicyConfig
from hybrid_scheduler.window import DEFAULT_RELEASE_MARGIN_SECONDS

# The simulated dapi's participant (sim.network.public_api.SIM_PARTICIPANT_ADDRESS, checked equal by a test): the
# default of GONKA_PARTICIPANT_ADDRESS in MODE=sim, so the simulated world needs no configuration.
SIM_PARTICIPANT_ADDRESS = "gonka16egtfj93fd349hqu9xj9l9cmd52sjpezhtqwre"


def _env(*names: str) -> AliasChoices:
    return AliasChoices(*names)


def _holder() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


class SchedulerSettings(CommonSettings):
    model_config = SettingsConfigDict(
        env_file=".env",
        env_file_encoding="utf-8",
        extra="ignore",
        populate_by_name=True,
        env_nested_delimiter="__",
        env_ignore_empty=True,  # SCHEDULER_X= (or compose's ${SCHEDULER_X:-}) means unset: the default applies
    )

    holder: str = Field(default_factory=_holder, validation_alias=_env("SCHEDULER_HOLDER"))
    metrics_port: int = Field(
        default=port("scheduler.metrics"), ge=0, le=65535, validation_alias=_env("SCHEDULER_METRICS_PORT")
    )
    metrics_addr: str = Field(default="127.0.0.1", validation_alias=_env("SCHEDULER_METRICS_ADDR", "METRICS_ADDR"))

    # The chain clock (wall seconds).
    poll_seconds: float = Field(default=2.0, gt=0, validation_alias=_env("SCHEDULER_POLL_SECONDS"))
    http_timeout: float = Field(default=3.0, gt=0, validation_alias=_env("SCHEDULER_HTTP_TIMEOUT"))
    flags_every: float = Field(
        default=10.0, gt=0, validation_alias=_env("SCHEDULER_FLAGS_EVERY"), description="poc_v2_enabled refresh"
    )
    report_every: float = Field(
        default=30.0,
        gt=0,
        validation_alias=_env("SCHEDULER_REPORT_EVERY"),
        description="chain.unreachable per endpoint",
    )
    observe_every: float = Field(
        default=30.0, gt=0, validation_alias=_env("SCHEDULER_OBSERVE_EVERY"), description="epoch.observed heartbeat"
    )
    max_stale_blocks: float = Field(
        default=10.0,
        gt=0,
        validation_alias=_env("SCHEDULER_MAX_STALE_BLOCKS"),
        description="no new command once the last good chain view is older than this many blocks",
    )
    prior_block_seconds: float | None = Field(
        default=None, gt=0, validation_alias=_env("SCHEDULER_PRIOR_BLOCK_SECONDS"), description="until measured"
    )

    # Leadership (wall seconds).
    lease_ttl: float = Field(default=5.0, gt=0, validation_alias=_env("SCHEDULER_LEASE_TTL"))

    # What to rent.
    slots: int = Field(default=1, ge=1, le=64, validation_alias=_env("SCHEDULER_SLOTS"), description="GPUs per PoC")
    slot_prefix: str = Field(
        default="poc", pattern=r"^[A-Za-z0-9][A-Za-z0-9-]{0,15}$", validation_alias=_env("SCHEDULER_SLOT_PREFIX")
    )
    profile_v1: str = Field(default="mlnode-v1", validation_alias=_env("SCHEDULER_PROFILE_V1"))
    profile_v2: str = Field(default="mlnode-v2", validation_alias=_env("SCHEDULER_PROFILE_V2"))
    image_v1: str | None = Field(
        default=None, validation_alias=_env("SCHEDULER_IMAGE_V1", "DOCKER_IMAGE"), description="override, checked"
    )
    image_v2: str | None = Field(
        default=None, validation_alias=_env("SCHEDULER_IMAGE_V2"), description="override, checked"
    )
    policy: PolicyConfig = Field(default_factory=PolicyConfig, validation_alias=_env("SCHEDULER_POLICY"))

    # When to let go (real-world seconds).
    release_margin: float = Field(
        default=DEFAULT_RELEASE_MARGIN_SECONDS,
        ge=0,
        validation_alias=_env("SCHEDULER_RELEASE_MARGIN"),
        description="after the end of PoC validation: the dapi's 60 s node sync + slack (gonka-protocol.md §3)",
    )
    release_after: Literal["validation_end", "set_new_validators"] = Field(
        default="validation_end", validation_alias=_env("SCHEDULER_RELEASE_AFTER")
    )
    release_how: Literal["delete", "disable"] = Field(default="delete", validation_alias=_env("SCHEDULER_RELEASE_HOW"))

    # The weight the chain gave us per epoch (read from the dapi's public /v1/epochs/{epoch}/participants).
    participant_address: str | None = Field(
        default=None,
        pattern=r"^[a-z0-9]+1[02-9ac-hj-np-z]{6,}$",
        validation_alias=_env("GONKA_PARTICIPANT_ADDRESS", "SCHEDULER_PARTICIPANT_ADDRESS"),
        description="this participant's account address (gonka1...): `inferenced keys show $KEY_NAME -a`",
    )
    weight_retry_seconds: float = Field(
        default=5.0,
        gt=0,
        validation_alias=_env("SCHEDULER_WEIGHT_RETRY_SECONDS"),
        description="wall seconds between two reads of an epoch's participants while its weight is unknown",
    )

    # Confirmation PoC.
    confirmation_policy: ConfirmationPolicy = Field(
        default=ConfirmationPolicy.IGNORE, validation_alias=_env("SCHEDULER_CONFIRMATION_POLICY")
    )
    confirmation_slots: int = Field(default=1, ge=1, le=16, validation_alias=_env("SCHEDULER_CONFIRMATION_SLOTS"))

    # Rehearsal (real-world seconds).
    rehearsal_hold: float = Field(
        default=300.0, ge=0, validation_alias=_env("SCHEDULER_REHEARSAL_HOLD"), description="kept after registering"
    )
    rehearsal_max_wait: float = Field(
        default=3600.0,
        ge=0,
        validation_alias=_env("SCHEDULER_REHEARSAL_MAX_WAIT"),
        description="kept through the next PoC when its release comes within this after registering",
    )

    def our_address(self) -> str | None:
        """Whose weight to record: the configured address, else in MODE=sim the simulated participant's."""
        if self.participant_address is not None:
            return self.participant_address
        return SIM_PARTICIPANT_ADDRESS if self.mode == "sim" else None

    def profile(self) -> TimeProfile:
        return current_profile()

    def scale(self, real_seconds: float) -> float:
        """Wall seconds for a real-world duration: divided by the acceleration in sim mode, unchanged live."""
        return self.profile().scale(real_seconds) if self.mode == "sim" else real_seconds

    def wall_policy(self) -> PolicyConfig:
        factor = self.scale(1.0)
        return self.policy.scaled(factor) if factor != 1.0 else self.policy

    def block_seconds_prior(self) -> float:
        if self.prior_block_seconds is not None:
            return self.prior_block_seconds
        return self.profile().block_seconds if self.mode == "sim" else 6.0
