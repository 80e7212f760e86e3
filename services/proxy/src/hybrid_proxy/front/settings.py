"""The node front's own knobs, on top of :class:`hybrid_common.settings.CommonSettings`.

The proxy's ``__main__`` hands the front its settings object; anything the front needs beyond the common fields is
read here from ``FRONT_*`` environment variables, so the proxy's settings class does not have to know about them.
"""

from __future__ import annotations

from urllib.parse import urlsplit

from pydantic import AliasChoices, Field

from hybrid_common.settings import CommonSettings


class FrontSettings(CommonSettings):
    front_bind_host: str | None = Field(
        default=None,
        validation_alias=AliasChoices("FRONT_BIND_HOST"),
        description="address the gateway listeners bind (default: NODE_FRONT_HOST; 0.0.0.0 behind NAT or in compose)",
    )
    front_connect_timeout: float = Field(
        default=5.0, gt=0, validation_alias=AliasChoices("FRONT_CONNECT_TIMEOUT"), description="GPU connect, seconds"
    )
    front_probe_interval: float = Field(
        default=2.0, gt=0, validation_alias=AliasChoices("FRONT_PROBE_INTERVAL"), description="route health probes"
    )
    front_probe_timeout: float = Field(default=3.0, gt=0, validation_alias=AliasChoices("FRONT_PROBE_TIMEOUT"))
    front_direct_fallback_after: float = Field(
        default=60.0,
        ge=0,
        validation_alias=AliasChoices("FRONT_DIRECT_FALLBACK_AFTER"),
        description="seconds of failed direct probes before trying the GPU through SSH",
    )
    front_ssh_keepalive: float = Field(
        default=5.0,
        gt=0,
        validation_alias=AliasChoices("FRONT_SSH_KEEPALIVE"),
        description="SSH keepalive interval; 3 unanswered = tunnel dead",
    )
    front_ssh_connect_timeout: float = Field(
        default=15.0, gt=0, validation_alias=AliasChoices("FRONT_SSH_CONNECT_TIMEOUT")
    )
    front_tunnel_retry_max: float = Field(
        default=10.0, gt=0, validation_alias=AliasChoices("FRONT_TUNNEL_RETRY_MAX"), description="reopen backoff cap"
    )
    front_callback_tunnel: bool = Field(
        default=True,
        validation_alias=AliasChoices("FRONT_CALLBACK_TUNNEL"),
        description="carry tunnel-mode GPUs' PoC callbacks to the relay over an SSH remote forward",
    )
    front_relay_local_url: str | None = Field(
        default=None,
        validation_alias=AliasChoices("FRONT_RELAY_LOCAL_URL"),
        description="the relay as this machine reaches it over plain HTTP (default: RELAY_PUBLIC_URL)",
    )
    front_scan_interval: float = Field(
        default=2.0, gt=0, validation_alias=AliasChoices("FRONT_SCAN_INTERVAL"), description="gateway-ports re-scan"
    )
    front_metrics_port: int = Field(
        default=0, ge=0, le=65535, validation_alias=AliasChoices("FRONT_METRICS_PORT"), description="standalone only"
    )

    @classmethod
    def from_common(cls, settings: CommonSettings) -> FrontSettings:
        """The given settings' values plus the ``FRONT_*`` fields from the environment."""
        if isinstance(settings, FrontSettings):
            return settings
        return cls(**{name: getattr(settings, name) for name in CommonSettings.model_fields})

    @property
    def bind_host(self) -> str:
        return self.front_bind_host or self.node_front_host

    def relay_origin(self) -> str | None:
        """``scheme://host[:port]`` of RELAY_PUBLIC_URL: what the dapi hands the MLNodes as their callback base."""
        if not self.relay_public_url:
            return None
        parts = urlsplit(self.relay_public_url)
        return f"{parts.scheme}://{parts.netloc}" if parts.scheme and parts.netloc else None

    def relay_local_address(self) -> tuple[str, int] | None:
        """Where a callback remote forward connects on this side (plain HTTP), or ``None`` when unusable."""
        url = self.front_relay_local_url or self.relay_public_url
        if not url:
            return None
        parts = urlsplit(url)
        if parts.scheme != "http" or not parts.hostname:
            return None  # a TCP forward cannot carry https to a local port: set FRONT_RELAY_LOCAL_URL
        return parts.hostname, parts.port or 80
