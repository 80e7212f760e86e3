"""Settings shared by every service (pydantic-settings; environment and ``.env``).

The seeds' variable names are accepted as they are (``HYPERBOLIC_API_KEY``, ``VASTAI_API_KEY``, ``VASTAI_MAX_PRICE``,
...). Secrets are ``SecretStr``: they print as ``**********``. ``MODE=sim`` (the default) points every external URL at
the simulated world, whatever keys are set: only ``MODE=live`` touches a real endpoint.

An environment variable set to the empty string counts as unset (``env_ignore_empty``): compose's ``${VAR:-}`` and a
``VAR=`` line in ``.env`` leave the default in place instead of an empty endpoint.

``MODE=live`` runs on the real clock: the time profile (``HYBRID_TIME_PROFILE``, which every service's timings are
divided by) is ``real`` unless set, and a ``demo``/``test`` profile or an ``HYBRID_ACCELERATION`` other than 1 is
refused at start — accelerated timings against real endpoints poll Vast.ai many times a second and give up a paid boot
after seconds. The decision is made before any field default is computed, so the services' scaled defaults see it.
"""

from __future__ import annotations

import os
from typing import Any, Literal

from pydantic import AliasChoices, Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from hybrid_common._ports import port
from hybrid_common._time import PROFILES, current_profile

Mode = Literal["sim", "live"]

# The simulators' default keys (python -m sim vast --api-key, python -m sim upstream --api-key).
SIM_SECRETS = {"vastai_api_key": "test", "hyperbolic_api_key": "sim-upstream-key"}

REAL_ENDPOINTS = {
    "vast_url": "https://console.vast.ai",
    "upstream_url": "https://api.hyperbolic.xyz/v1",
}


def _local(name: str, path: str = "") -> str:
    return f"http://127.0.0.1:{port(name)}{path}"


def _raw(data: dict[str, Any], field: str) -> Any:
    """A field's raw input before validation, under its name or any of its aliases (as pydantic-settings hands it)."""
    info = CommonSettings.model_fields[field]
    names = [field]
    if isinstance(info.validation_alias, AliasChoices):
        names += [c for c in info.validation_alias.choices if isinstance(c, str)]
    for name in names:
        if name in data:
            return data[name]
    return None


class CommonSettings(BaseSettings):
    """What every service reads. Services subclass it and add their own fields."""

    # hide_input_in_errors: a validation error would otherwise print the raw input, keys included.
    model_config = SettingsConfigDict(
        env_file=".env",
        env_file_encoding="utf-8",
        extra="ignore",
        populate_by_name=True,
        env_ignore_empty=True,
        hide_input_in_errors=True,
    )

    mode: Mode = Field(default="sim", validation_alias=AliasChoices("MODE", "HYBRID_MODE"))
    # The clock every timing is scaled by (read by hybrid_common.current_profile from the process environment; these
    # fields let the settings see a value set in .env and refuse an accelerated clock in MODE=live).
    time_profile: Literal["real", "demo", "test"] | None = Field(
        default=None,
        validation_alias=AliasChoices("HYBRID_TIME_PROFILE"),
        description="real | demo | test (default: real in MODE=live, test otherwise)",
    )
    time_acceleration: float | None = Field(
        default=None,
        gt=0,
        validation_alias=AliasChoices("HYBRID_ACCELERATION"),
        description="re-accelerates the profile (simulated world only)",
    )
    amqp_url: str = Field(default="amqp://guest:guest@127.0.0.1:5672/", validation_alias=AliasChoices("AMQP_URL"))
    redis_url: str = Field(default="redis://127.0.0.1:6379/0", validation_alias=AliasChoices("REDIS_URL"))
    namespace: str = Field(
        default="",
        validation_alias=AliasChoices("HYBRID_NAMESPACE"),
        description="prefix for exchanges, queues and Redis keys",
    )
    label_prefix: str = Field(
        default="ghm",
        validation_alias=AliasChoices("HYBRID_LABEL_PREFIX"),
        description="Vast.ai instance labels: <prefix>-<slot>-<epoch>",
    )
    log_level: str = Field(default="INFO", validation_alias=AliasChoices("LOG_LEVEL"))
    log_json: bool = Field(default=True, validation_alias=AliasChoices("LOG_JSON"))

    # Secrets (seeds' names).
    vastai_api_key: SecretStr | None = Field(default=None, validation_alias=AliasChoices("VASTAI_API_KEY"))
    hyperbolic_api_key: SecretStr | None = Field(default=None, validation_alias=AliasChoices("HYPERBOLIC_API_KEY"))

    # External endpoints: in sim mode these default to the simulated world.
    vast_url: str | None = Field(default=None, validation_alias=AliasChoices("VAST_URL"))
    upstream_url: str | None = Field(default=None, validation_alias=AliasChoices("UPSTREAM_URL", "HYPERBOLIC_URL"))
    dapi_admin_url: str | None = Field(
        default=None, validation_alias=AliasChoices("GONKA_ADMIN_API_URL", "DAPI_ADMIN_URL")
    )
    dapi_public_url: str | None = Field(
        default=None, validation_alias=AliasChoices("GONKA_PUBLIC_API_URL", "DAPI_PUBLIC_URL")
    )
    dapi_callback_url: str | None = Field(
        default=None,
        validation_alias=AliasChoices("DAPI_CALLBACK_URL"),
        description="the dapi's internal PoC callback server (relay forwards here)",
    )
    # Where the simulated world listens: used in MODE=sim for an endpoint left unset (compose runs the simulators in
    # their own containers); never used in MODE=live.
    sim_vast_url: str = Field(default=_local("sim.vast"), validation_alias=AliasChoices("SIM_VAST_URL"))
    sim_upstream_url: str = Field(
        default=_local("sim.upstream", "/v1"), validation_alias=AliasChoices("SIM_UPSTREAM_URL")
    )
    sim_dapi_admin_url: str = Field(
        default=_local("sim.dapi.admin"), validation_alias=AliasChoices("SIM_DAPI_ADMIN_URL")
    )
    sim_dapi_public_url: str = Field(
        default=_local("sim.dapi.public"), validation_alias=AliasChoices("SIM_DAPI_PUBLIC_URL")
    )
    sim_dapi_callback_url: str = Field(
        default=_local("sim.dapi.callback"), validation_alias=AliasChoices("SIM_DAPI_CALLBACK_URL")
    )

    # The node front (design: "Why a node front"): the dapi reaches every GPU slot at this host and the slot's
    # gateway ports; the provisioner registers it, the proxy listens on it.
    node_front_host: str = Field(
        default="127.0.0.1",
        validation_alias=AliasChoices("NODE_FRONT_HOST"),
        description="the VPS address as the dapi sees it",
    )
    node_front_probe_host: str = Field(
        default="127.0.0.1",
        validation_alias=AliasChoices("NODE_FRONT_PROBE_HOST"),
        description="where the provisioner reaches the front (compose: proxy)",
    )
    gateway_port_first: int = Field(
        default=port("proxy.gateway_base"), ge=1, le=65535, validation_alias=AliasChoices("GATEWAY_PORT_FIRST")
    )
    gateway_port_last: int = Field(
        default=port("proxy.gateway_last"), ge=1, le=65535, validation_alias=AliasChoices("GATEWAY_PORT_LAST")
    )
    ssh_key_path: str = Field(
        default="~/.ssh/id_ed25519",
        validation_alias=AliasChoices("SSH_KEY_PATH"),
        description="private key for instance SSH (its .pub is attached to instances)",
    )
    relay_public_url: str | None = Field(
        default=None,
        validation_alias=AliasChoices("RELAY_PUBLIC_URL"),
        description="the relay as remote MLNodes reach it (DAPI_API__POC_CALLBACK_URL)",
    )

    # Seeds' rental knobs.
    vastai_max_price: float = Field(default=3.0, gt=0, validation_alias=AliasChoices("VASTAI_MAX_PRICE"))
    vastai_min_vram: float = Field(
        default=40.0, gt=0, validation_alias=AliasChoices("VASTAI_MIN_VRAM"), description="GB per GPU"
    )
    vastai_gpu_type: str | None = Field(default=None, validation_alias=AliasChoices("VASTAI_GPU_TYPE"))
    vastai_disk_size: int = Field(default=100, ge=8, validation_alias=AliasChoices("VASTAI_DISK_SIZE"))
    docker_image: str | None = Field(default=None, validation_alias=AliasChoices("DOCKER_IMAGE"))
    mlnode_port: int = Field(default=8080, ge=1, le=65535, validation_alias=AliasChoices("MLNODE_PORT"))
    mlnode_startup_timeout: float = Field(default=1800, gt=0, validation_alias=AliasChoices("MLNODE_STARTUP_TIMEOUT"))
    poc_execution_timeout: float = Field(default=3600, gt=0, validation_alias=AliasChoices("POC_EXECUTION_TIMEOUT"))

    @model_validator(mode="before")
    @classmethod
    def _live_runs_on_the_real_clock(cls, data: Any) -> Any:
        """MODE=live: the ``real`` profile unless set, any other refused (money is real).

        Runs before the fields: the services' timing defaults call ``current_profile()`` while their fields are
        validated, so a ``MODE=live`` read from ``.env`` (not in the process environment) must put ``real`` there
        first."""
        if not isinstance(data, dict) or _raw(data, "mode") != "live":
            return data
        name = _raw(data, "time_profile")
        if name is not None and name != "real":
            raise ValueError(
                f"MODE=live runs on the real clock: HYBRID_TIME_PROFILE={name!r} would scale every timeout and poll "
                f"down by {PROFILES[name].acceleration:g}x against real, paid endpoints"
                if name in PROFILES
                else f"HYBRID_TIME_PROFILE={name!r} is not one of {sorted(PROFILES)}"
            )
        acceleration = _raw(data, "time_acceleration")
        if acceleration is not None and float(acceleration) != 1.0:
            raise ValueError(f"MODE=live runs on the real clock: HYBRID_ACCELERATION={acceleration} is refused")
        clock = current_profile()
        if clock.name != "real" or clock.acceleration != 1.0:
            # MODE=live or the profile came from .env or arguments: make the process clock say what the settings say.
            os.environ["HYBRID_TIME_PROFILE"] = "real"
        return data

    @model_validator(mode="after")
    def _endpoints_follow_mode(self) -> CommonSettings:
        """In ``sim`` mode an endpoint pointing at a real service is refused; unset ones go to the simulators."""
        defaults = {
            "vast_url": self.sim_vast_url,
            "upstream_url": self.sim_upstream_url,
            "dapi_admin_url": self.sim_dapi_admin_url,
            "dapi_public_url": self.sim_dapi_public_url,
            "dapi_callback_url": self.sim_dapi_callback_url,
        }
        for name, default in defaults.items():
            value, source = getattr(self, name), name
            if value is None:
                if self.mode == "live" and name in REAL_ENDPOINTS:
                    value = REAL_ENDPOINTS[name]
                elif self.mode == "live":
                    raise ValueError(f"MODE=live needs {name.upper()} to be set")
                else:
                    value, source = default, f"sim_{name}"
            if self.mode == "sim" and any(value.startswith(real) for real in REAL_ENDPOINTS.values()):
                raise ValueError(f"MODE=sim refuses a real endpoint for {source}: {value!r} (set MODE=live to use it)")
            object.__setattr__(self, name, value.rstrip("/"))
        return self

    def secret(self, name: str) -> str:
        """The key to send. In ``sim`` mode always the simulator's key: a real key never leaves for a simulator."""
        if self.mode == "sim":
            return SIM_SECRETS[name]
        value = getattr(self, name)
        if value is None:
            raise ValueError(f"{name.upper()} is required in MODE=live")
        assert isinstance(value, SecretStr)
        return value.get_secret_value()

    def secret_values(self) -> list[str]:
        """Every configured secret, for the log redactor."""
        return [v.get_secret_value() for v in (self.vastai_api_key, self.hyperbolic_api_key) if v is not None]
