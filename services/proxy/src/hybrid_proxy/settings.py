"""The proxy service's settings: the common ones plus the inference-only node's (env prefix ``PROXY_``).

Real-world intervals that have no fixed value on the network (how often the proxy re-checks its registration, how
long an upstream health answer stays fresh) default to real seconds divided by the time profile's acceleration, so
the same code keeps pace with a shrunk epoch in tests and the demo (hybrid_common._time).
"""

from __future__ import annotations

from typing import Annotated, Any

import orjson
from pydantic import AliasChoices, Field, field_validator
from pydantic_settings import NoDecode

from hybrid_common import current_profile, port
from hybrid_common.settings import CommonSettings

# gonka-protocol.md §3 example body and the seeds' registration of the proxy node.
DEFAULT_NODE_ID = "hyperbolic-proxy-1"
DEFAULT_HARDWARE_TYPE = "Hyperbolic-API"
DEFAULT_MODELS = ("Qwen/Qwen2.5-7B-Instruct",)


def _env(*names: str) -> AliasChoices:
    return AliasChoices(*names)


def _split_list(value: Any) -> Any:
    """A list from an env string: JSON (``["a","b"]``) or comma-separated (``a,b``); empty = ``[]``."""
    if isinstance(value, str):
        text = value.strip()
        if not text:
            return []
        if text.startswith("["):
            return orjson.loads(text)
        return [part.strip() for part in text.split(",") if part.strip()]
    return value


def _split_map(value: Any) -> Any:
    """A mapping from an env string: JSON (``{"a":"b"}``) or ``a=b,c=d``; empty = ``{}``."""
    if isinstance(value, str):
        text = value.strip()
        if not text:
            return {}
        if text.startswith("{"):
            return orjson.loads(text)
        pairs = (part.split("=", 1) for part in text.split(",") if part.strip())
        return {k.strip(): v.strip() for k, v in pairs}
    return value


class ProxySettings(CommonSettings):
    """Everything ``python -m hybrid_proxy`` reads (the common settings included)."""

    # --- the node as the dapi sees it (gonka-protocol.md §3) ---------------------------------------------------
    node_id: str = Field(default=DEFAULT_NODE_ID, min_length=1, validation_alias=_env("PROXY_NODE_ID"))
    listen_host: str = Field(
        default="0.0.0.0",
        validation_alias=_env("PROXY_LISTEN_HOST"),
        description="address the node listens on",
    )
    node_port: int = Field(
        default=port("proxy.node"),
        ge=0,
        le=65535,
        validation_alias=_env("PROXY_NODE_PORT", "PROXY_PORT"),
        description="serves the MLNode control routes and the inference routes (0 = any free port, tests)",
    )
    inference_port: int | None = Field(
        default=None,
        ge=0,
        le=65535,
        validation_alias=_env("PROXY_INFERENCE_PORT"),
        description="a second listener for the inference routes when the dapi needs poc_port != inference_port",
    )
    public_host: str | None = Field(
        default=None,
        validation_alias=_env("PROXY_PUBLIC_HOST"),
        description="host registered in the dapi (default: NODE_FRONT_HOST)",
    )
    public_poc_port: int | None = Field(
        default=None, ge=1, le=65535, validation_alias=_env("PROXY_PUBLIC_POC_PORT"), description="default: node_port"
    )
    public_inference_port: int | None = Field(
        default=None,
        ge=1,
        le=65535,
        validation_alias=_env("PROXY_PUBLIC_INFERENCE_PORT"),
        description="default: inference_port, else node_port",
    )
    models: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: list(DEFAULT_MODELS),
        validation_alias=_env("PROXY_MODELS"),
        description="model ids as the dapi names them (registered, answered on /v1/models)",
    )
    model_map: Annotated[dict[str, str], NoDecode] = Field(
        default_factory=dict,
        validation_alias=_env("PROXY_MODEL_MAP"),
        description="dapi model id -> the upstream's name for it (only the model string is rewritten)",
    )
    max_concurrent: int = Field(default=500, gt=0, validation_alias=_env("PROXY_MAX_CONCURRENT"))
    hardware_type: str = Field(default=DEFAULT_HARDWARE_TYPE, validation_alias=_env("PROXY_HARDWARE_TYPE"))
    hardware_count: int = Field(default=1, ge=1, validation_alias=_env("PROXY_HARDWARE_COUNT"))
    self_register: bool = Field(
        default=True, validation_alias=_env("PROXY_REGISTER"), description="upsert the node into the dapi"
    )
    registration_check_seconds: float | None = Field(
        default=None,
        gt=0,
        validation_alias=_env("PROXY_REGISTRATION_CHECK_SECONDS"),
        description="how often the dapi's node list is re-read (default: 30 real seconds, profile-scaled)",
    )
    restore_state: bool = Field(
        default=True,
        validation_alias=_env("PROXY_RESTORE_STATE"),
        description="come back INFERENCE with the last loaded model after a restart",
    )

    # --- inbound protection ------------------------------------------------------------------------------------
    allowed_sources: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        validation_alias=_env("PROXY_ALLOWED_SOURCES"),
        description="addresses/CIDRs allowed to call the node (the dapi's); empty = everyone (warned at start)",
    )
    max_request_bytes: int = Field(default=8 * 1024 * 1024, ge=1024, validation_alias=_env("PROXY_MAX_REQUEST_BYTES"))

    # --- the upstream (inference-proxy.md) ----------------------------------------------------------------------
    upstream_connect_timeout: float = Field(default=10.0, gt=0, validation_alias=_env("PROXY_UPSTREAM_CONNECT_TIMEOUT"))
    upstream_first_byte_timeout: float = Field(
        default=900.0,
        gt=0,
        validation_alias=_env("PROXY_UPSTREAM_FIRST_BYTE_TIMEOUT"),
        description="request sent -> response headers; a non-streamed long generation needs minutes (dapi: 15 min)",
    )
    upstream_read_timeout: float = Field(
        default=300.0,
        gt=0,
        validation_alias=_env("PROXY_UPSTREAM_READ_TIMEOUT"),
        description="longest silence between two body reads",
    )
    upstream_retries: int = Field(default=2, ge=0, le=10, validation_alias=_env("PROXY_UPSTREAM_RETRIES"))
    upstream_retry_backoff: float = Field(default=0.25, ge=0, validation_alias=_env("PROXY_UPSTREAM_RETRY_BACKOFF"))
    upstream_retry_after_cap: float = Field(
        default=2.0,
        ge=0,
        validation_alias=_env("PROXY_UPSTREAM_RETRY_AFTER_CAP"),
        description="longest Retry-After obeyed",
    )
    upstream_pool_size: int = Field(default=1024, ge=1, validation_alias=_env("PROXY_UPSTREAM_POOL_SIZE"))
    upstream_keepalive_seconds: float = Field(
        default=10.0,
        gt=0,
        validation_alias=_env("PROXY_UPSTREAM_KEEPALIVE"),
        description="idle keep-alive of pooled upstream connections (below the upstream's own)",
    )
    health_cache_seconds: float | None = Field(
        default=None,
        gt=0,
        validation_alias=_env("PROXY_HEALTH_CACHE_SECONDS"),
        description="how long an upstream health answer is reused (default: 10 real seconds, profile-scaled)",
    )
    health_timeout: float = Field(default=4.0, gt=0, validation_alias=_env("PROXY_HEALTH_TIMEOUT"))
    tokenize_url: str | None = Field(
        default=None,
        validation_alias=_env("PROXY_TOKENIZE_URL"),
        description="a real /tokenize endpoint to ask (else the proxy estimates the count)",
    )
    validation_timeout: float = Field(default=600.0, gt=0, validation_alias=_env("PROXY_VALIDATION_TIMEOUT"))
    log_bodies: bool = Field(
        default=False,
        validation_alias=_env("PROXY_LOG_BODIES"),
        description="log request bodies at DEBUG (prompts stay out of the logs unless this is on)",
    )

    # --- observability -----------------------------------------------------------------------------------------
    metrics_port: int = Field(
        default=port("proxy.metrics"), ge=0, le=65535, validation_alias=_env("PROXY_METRICS_PORT")
    )
    metrics_addr: str = Field(default="127.0.0.1", validation_alias=_env("PROXY_METRICS_ADDR", "METRICS_ADDR"))

    @field_validator("models", "allowed_sources", mode="before")
    @classmethod
    def _lists(cls, value: Any) -> Any:
        return _split_list(value)

    @field_validator("model_map", mode="before")
    @classmethod
    def _maps(cls, value: Any) -> Any:
        return _split_map(value)

    # --- derived values ----------------------------------------------------------------------------------------

    @property
    def registered_host(self) -> str:
        return self.public_host or self.node_front_host

    def registered_ports(self, bound_node_port: int, bound_inference_port: int | None) -> tuple[int, int]:
        """(poc_port, inference_port) registered in the dapi, given the ports actually bound."""
        poc = self.public_poc_port or bound_node_port
        inference = self.public_inference_port or bound_inference_port or bound_node_port
        return poc, inference

    def registration_interval(self) -> float:
        return self.registration_check_seconds or current_profile().scale(30.0)

    def health_ttl(self) -> float:
        return self.health_cache_seconds or current_profile().scale(10.0)

    def upstream_key(self) -> str:
        return self.secret("hyperbolic_api_key")
