"""The provisioner's settings: the common ones plus its own (``PROVISIONER_*``), timings scaled by the time profile.

Every timing default is a real-world duration divided by the time profile's acceleration (``HYBRID_TIME_PROFILE``),
so the same service paces itself for the real network (``real``) and for the accelerated simulated world
(``test``/``demo``). Each can be set explicitly in seconds.
"""

from __future__ import annotations

import os
import socket
import uuid
from pathlib import Path

from pydantic import AliasChoices, Field, model_validator

from hybrid_common import current_profile, port
from hybrid_common.settings import CommonSettings


def _scaled(real_seconds: float, floor: float = 0.0) -> float:
    return max(floor, current_profile().scale(real_seconds))


def _default_replica() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


def _env(*names: str) -> AliasChoices:
    return AliasChoices(*names)


class ProvisionerSettings(CommonSettings):
    """What ``python -m hybrid_provisioner`` reads from the environment (and ``.env``)."""

    replica_id: str = Field(default_factory=_default_replica, validation_alias=_env("PROVISIONER_REPLICA_ID"))
    metrics_port: int = Field(
        default=port("provisioner.metrics"),
        ge=0,
        le=65535,
        validation_alias=_env("PROVISIONER_METRICS_PORT"),
        description="0 = off (tests, several replicas on one host)",
    )
    metrics_addr: str = Field(default="127.0.0.1", validation_alias=_env("PROVISIONER_METRICS_ADDR", "METRICS_ADDR"))
    profiles_file: str | None = Field(
        default=None,
        validation_alias=_env("PROVISIONER_PROFILES_FILE"),
        description="JSON file overriding or adding workload profiles",
    )

    # Jobs and leases.
    lease_ttl: float = Field(
        default_factory=lambda: _scaled(15.0, floor=1.5),
        gt=0,
        validation_alias=_env("PROVISIONER_LEASE_TTL"),
        description="a dead replica's jobs are taken over after this",
    )
    scan_interval: float = Field(
        default_factory=lambda: _scaled(2.0, floor=0.1), gt=0, validation_alias=_env("PROVISIONER_SCAN_INTERVAL")
    )
    max_jobs: int = Field(default=64, ge=1, validation_alias=_env("PROVISIONER_MAX_JOBS"))
    take_per_scan: int = Field(
        default=2,
        ge=1,
        validation_alias=_env("PROVISIONER_TAKE_PER_SCAN"),
        description="new jobs a replica takes per scan, so several replicas share the work",
    )
    tick: float = Field(
        default_factory=lambda: _scaled(1.0, floor=0.05),
        gt=0,
        validation_alias=_env("PROVISIONER_TICK"),
        description="how often a job driver looks at its instances",
    )
    max_creates: int = Field(
        default=4, ge=1, validation_alias=_env("PROVISIONER_MAX_CREATES"), description="instances per job"
    )

    # Watching instances (vastai-api.md: poll ~every 10 s with a hard deadline; list 1 s, show 2 s rate limits).
    status_poll: float = Field(
        default_factory=lambda: _scaled(10.0, floor=0.05), gt=0, validation_alias=_env("PROVISIONER_STATUS_POLL")
    )
    hold_poll: float = Field(
        default_factory=lambda: _scaled(30.0, floor=0.1),
        gt=0,
        validation_alias=_env("PROVISIONER_HOLD_POLL"),
        description="status poll while a slot is registered and waiting for its release",
    )
    boot_timeout: float | None = Field(
        default=None,
        validation_alias=_env("PROVISIONER_BOOT_TIMEOUT"),
        description="create → running; default MLNODE_STARTUP_TIMEOUT scaled",
    )
    stall_timeout: float = Field(
        default_factory=lambda: _scaled(600.0),
        gt=0,
        validation_alias=_env("PROVISIONER_STALL_TIMEOUT"),
        description="no status change while loading for this long = stuck",
    )
    service_timeout: float = Field(
        default_factory=lambda: _scaled(1200.0),
        gt=0,
        validation_alias=_env("PROVISIONER_SERVICE_TIMEOUT"),
        description="running → service answering",
    )
    probe_interval: float = Field(
        default=0.25,
        gt=0,
        validation_alias=_env("PROVISIONER_PROBE_INTERVAL"),
        description="readiness probe cadence (sees a service within ~1 s of it answering)",
    )
    probe_timeout: float = Field(default=3.0, gt=0, validation_alias=_env("PROVISIONER_PROBE_TIMEOUT"))
    probe_via: str = Field(
        default="front",
        pattern="^(front|direct)$",
        validation_alias=_env("PROVISIONER_PROBE_VIA"),
        description="front: the final readiness probe goes through the node front; direct: to the GPU",
    )
    mlnode_version: str = Field(
        default="v3.0.8",
        validation_alias=_env("PROVISIONER_MLNODE_VERSION"),
        description="version prefix of the front probe when no chain view is known",
    )

    # Deadlines and hedging.
    hedge_lead: float = Field(
        default_factory=lambda: _scaled(600.0),
        ge=0,
        validation_alias=_env("PROVISIONER_HEDGE_LEAD"),
        description="not ready this long before the deadline → race a second offer",
    )
    deadline_grace: float = Field(
        default=0.0,
        ge=0,
        validation_alias=_env("PROVISIONER_DEADLINE_GRACE"),
        description="a job not ready this long after its deadline fails",
    )

    # Money.
    budget_day_usd: float | None = Field(default=None, gt=0, validation_alias=_env("BUDGET_DAY_USD"))
    budget_epoch_usd: float | None = Field(default=None, gt=0, validation_alias=_env("BUDGET_EPOCH_USD"))
    rental_hours_estimate: float = Field(
        default=1.0,
        gt=0,
        validation_alias=_env("PROVISIONER_RENTAL_HOURS"),
        description="billed hours a rental is assumed to last beyond its deadline (budget estimate)",
    )
    billing_acceleration: float | None = Field(
        default=None,
        validation_alias=_env("PROVISIONER_BILLING_ACCELERATION"),
        description="billed seconds per wall second; default 1 live, the profile's acceleration in sim",
    )
    reconcile_interval: float = Field(
        default_factory=lambda: _scaled(300.0, floor=0.5), gt=0, validation_alias=_env("PROVISIONER_RECONCILE_INTERVAL")
    )

    # Registration (gonka-protocol.md §3).
    node_max_concurrent: int = Field(default=500, gt=0, validation_alias=_env("PROVISIONER_NODE_MAX_CONCURRENT"))
    dapi_timeout: float = Field(default=10.0, gt=0, validation_alias=_env("PROVISIONER_DAPI_TIMEOUT"))

    # Vast client.
    vast_timeout: float = Field(default=120.0, gt=0, validation_alias=_env("PROVISIONER_VAST_TIMEOUT"))
    vast_retries: int = Field(default=6, ge=0, validation_alias=_env("PROVISIONER_VAST_RETRIES"))
    vast_backoff: float = Field(default=0.15, gt=0, validation_alias=_env("PROVISIONER_VAST_BACKOFF"))
    vast_backoff_cap: float = Field(
        default_factory=lambda: _scaled(8.0, floor=0.1), gt=0, validation_alias=_env("PROVISIONER_VAST_BACKOFF_CAP")
    )

    # Test-only fault hook (see hybrid_provisioner.faulthook).
    die_at: str = Field(default="", validation_alias=_env("PROVISIONER_TEST_DIE_AT"))
    die_once_dir: str | None = Field(default=None, validation_alias=_env("PROVISIONER_TEST_DIE_DIR"))

    @model_validator(mode="after")
    def _ports_in_order(self) -> ProvisionerSettings:
        if self.gateway_port_last <= self.gateway_port_first:
            raise ValueError("GATEWAY_PORT_LAST must be above GATEWAY_PORT_FIRST (ports come in pairs)")
        return self

    @property
    def effective_boot_timeout(self) -> float:
        if self.boot_timeout is not None:
            return self.boot_timeout
        return _scaled(self.mlnode_startup_timeout, floor=1.0)

    @property
    def effective_billing_acceleration(self) -> float:
        """Vast bills world time; in the simulated world that is wall time × the profile's acceleration."""
        if self.billing_acceleration is not None:
            return self.billing_acceleration
        return 1.0 if self.mode == "live" else current_profile().acceleration

    def vast_key(self) -> str:
        return self.secret("vastai_api_key")

    def ssh_public_key(self) -> str | None:
        """The ``.pub`` next to ``SSH_KEY_PATH``, attached to ssh-runtype instances (None when absent)."""
        path = Path(self.ssh_key_path).expanduser()
        pub = path.with_name(path.name + ".pub")
        try:
            return pub.read_text().strip() or None
        except OSError:
            return None
