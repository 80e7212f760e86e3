"""The relay's settings: ``RELAY_*`` variables on top of the common ones (``AMQP_URL``, ``DAPI_CALLBACK_URL``, ...).

Delays default from the time profile (``HYBRID_TIME_PROFILE``) so a shrunk test epoch gets proportionally short
backoffs; every one can be set explicitly.
"""

from __future__ import annotations

import ipaddress
from functools import cached_property
from typing import Literal

from pydantic import Field, SecretStr
from pydantic_settings import SettingsConfigDict

from hybrid_common import TimeProfile, current_profile, port
from hybrid_common.settings import CommonSettings

Role = Literal["all", "door", "forwarder"]
Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class RelaySettings(CommonSettings):
    model_config = SettingsConfigDict(
        env_prefix="RELAY_",
        env_file=".env",
        env_file_encoding="utf-8",
        extra="ignore",
        populate_by_name=True,
        env_ignore_empty=True,  # RELAY_X= (or compose's ${RELAY_X:-}) means unset: the default applies
    )

    role: Role = Field(default="all", description="door (public HTTP), forwarder, or both in one process")
    instance: str = Field(default="", description="this replica's name in status keys (default: host-pid)")
    public_host: str = Field(default="0.0.0.0", description="the door listens here (MLNodes reach it from outside)")
    public_port: int = Field(default=port("relay.public"), ge=1, le=65535)
    metrics_port: int = Field(default=port("relay.metrics"), ge=0, le=65535)

    # Protection of the public door (all optional). MLNodes cannot add headers to their callbacks, so the secret is a
    # path segment they carry in DAPI_API__POC_CALLBACK_URL (http://relay:9300/<secret>); the token suits other clients.
    secret_path: SecretStr | None = Field(default=None, description="required first path segment")
    token: SecretStr | None = Field(default=None, description="required X-Relay-Token / Authorization: Bearer")
    allow_sources: str = Field(default="", description="comma-separated CIDRs allowed to post (empty: anyone)")
    allow_owned_instances: bool = Field(
        default=False, description="also allow the public IPs of the instances the provisioner owns (Redis view)"
    )
    max_body_bytes: int = Field(default=8 * 1024 * 1024, gt=0)
    door_publish_deadline: float = Field(
        default=5.0, gt=0, description="longest the door waits for a confirm before answering 503 (sender retries)"
    )
    door_group_max_batches: int = Field(
        default=256, ge=1, description="most batches one confirmed hand-off message carries (handoff.py)"
    )
    door_group_max_bytes: int = Field(default=1024 * 1024, gt=0, description="most body bytes per hand-off message")
    door_groups_in_flight: int = Field(
        default=4, ge=1, description="hand-off messages awaiting their confirm at once; more batches wait and group"
    )
    door_keepalive: float = Field(default=30.0, gt=0, description="idle keep-alive connections close after (s)")
    refuse_at_door: bool = Field(default=True, description="answer the dapi's refusal at the door when it is known")
    accepted_events: bool = Field(
        default=True,
        description="publish callback.accepted per batch, with its outcome (relay:stats counts accepted batches "
        "regardless)",
    )

    gc_freeze: bool = Field(
        default=True, description="freeze start-up objects and collect the young generation less often (latency)"
    )

    # Forwarding.
    forward_timeout: float | None = Field(default=None, gt=0, description="per POST to the dapi (s)")
    backoff_first: float | None = Field(default=None, gt=0)
    backoff_cap: float | None = Field(default=None, gt=0)
    max_attempts: int = Field(default=40, ge=1)
    prefetch: int = Field(default=64, ge=1, description="deliveries held at once (a delivery is one batch or a group)")
    record_interval: float = Field(
        default=0.01, ge=0, description="outcomes gather this long (s) before one round records and announces them"
    )
    dedupe: bool = Field(default=True, description="drop batches whose content was already forwarded")
    seen_ttl: float | None = Field(default=None, gt=0, description="dedupe memory (s); default two epochs")
    window_margin_blocks: float = Field(
        default=1.0, ge=0, description="a window counts as closed only this many blocks after its last height"
    )

    @cached_property
    def profile(self) -> TimeProfile:
        return current_profile()

    @property
    def forward_timeout_s(self) -> float:
        # The dapi answers in milliseconds; the v2 sender's own budget is 10 s (gonka-protocol.md §7). A POST that
        # times out is posted again, and if the dapi had only been slow it now holds the batch twice: so a floor of
        # 5 s even in shrunk test epochs, where a loaded machine can stall a healthy simulator for a second.
        return self.forward_timeout or max(5.0, self.profile.scale(10.0))

    @property
    def backoff_first_s(self) -> float:
        return self.backoff_first or max(0.02, self.profile.scale(0.5))

    @property
    def backoff_cap_s(self) -> float:
        return self.backoff_cap or max(0.25, self.profile.scale(30.0))

    @property
    def seen_ttl_s(self) -> int:
        two_epochs = 2 * self.profile.epoch.epoch_length * self.profile.block_seconds
        return int(self.seen_ttl or max(two_epochs, 3600.0))

    @cached_property
    def allowed_networks(self) -> tuple[Network, ...]:
        return tuple(ipaddress.ip_network(c.strip(), strict=False) for c in self.allow_sources.split(",") if c.strip())

    def secrets(self) -> list[str]:
        return [s.get_secret_value() for s in (self.secret_path, self.token) if s is not None] + self.secret_values()
