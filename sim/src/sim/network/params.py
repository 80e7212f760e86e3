"""The chain's parameters and the dapi's settings, live and changeable (``POST /_sim/params``).

Epoch parameters carry the chain's names (gonka-protocol.md §5: "read them live, never hard-code");
they default from the time profile's :class:`hybrid_common.EpochShape`. The PoC generation is chosen
by the chain flag ``poc_v2_enabled`` (§7), the URL prefix the dapi puts before every node path by the
chain's ``mlnode_version`` (§1).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from hybrid_common import EpochShape

DEFAULT_EPOCH_MODEL = "Qwen/Qwen2.5-7B-Instruct"
DEFAULT_POC_MODEL = "Qwen/Qwen3-235B-A22B-Instruct-2507-FP8"
# gonka-protocol.md §1: the PoW model the v1 dapi sends in pow/init bodies (mainnet shape).
V1_POW_PARAMS: dict[str, Any] = {
    "dim": 1792,
    "n_layers": 64,
    "n_heads": 64,
    "n_kv_heads": 64,
    "vocab_size": 8196,
    "ffn_dim_multiplier": 10.0,
    "multiple_of": 8192,
    "norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "use_scaled_rope": False,
    "seq_len": 256,
}


@dataclass
class EpochParams:
    """``EpochParams`` of the inference module, in blocks (the chain multiplies by epoch_multiplier)."""

    epoch_length: int
    poc_stage_duration: int
    poc_exchange_duration: int
    poc_validation_delay: int
    poc_validation_duration: int
    set_new_validators_delay: int
    inference_validation_cutoff: int
    confirmation_poc_safety_window: int = 0
    epoch_shift: int = 0
    epoch_multiplier: int = 1
    default_unit_of_compute_price: int = 100
    inference_pruning_epoch_threshold: int = 4
    inference_pruning_max: int = 1000
    poc_pruning_max: int = 1000

    @classmethod
    def from_shape(cls, shape: EpochShape, *, epoch_shift: int) -> EpochParams:
        return cls(
            epoch_length=shape.epoch_length,
            poc_stage_duration=shape.poc_stage_duration,
            poc_exchange_duration=shape.poc_exchange_duration,
            poc_validation_delay=shape.poc_validation_delay,
            poc_validation_duration=shape.poc_validation_duration,
            set_new_validators_delay=shape.set_new_validators_delay,
            inference_validation_cutoff=shape.inference_validation_cutoff,
            confirmation_poc_safety_window=shape.confirmation_poc_safety_window,
            epoch_shift=epoch_shift,
        )

    # Offsets from the PoC start, as the chain computes them (0.8 wind-down factors included).
    def wind_down_offset(self) -> int:
        return int(self.poc_stage_duration * 0.8) * self.epoch_multiplier

    def generation_end_offset(self) -> int:
        return self.poc_stage_duration * self.epoch_multiplier

    def exchange_deadline_offset(self) -> int:
        return self.generation_end_offset() + self.poc_exchange_duration * self.epoch_multiplier

    def validation_start_offset(self) -> int:
        return self.generation_end_offset() + self.poc_validation_delay * self.epoch_multiplier

    def validation_wind_down_offset(self) -> int:
        return self.validation_start_offset() + int(self.poc_validation_duration * 0.8) * self.epoch_multiplier

    def validation_end_offset(self) -> int:
        return self.validation_start_offset() + self.poc_validation_duration * self.epoch_multiplier

    def set_new_validators_offset(self) -> int:
        return self.validation_end_offset() + self.set_new_validators_delay * self.epoch_multiplier

    def claim_money_offset(self) -> int:
        return self.set_new_validators_offset() + 1


_POSITIVE = {"epoch_length", "poc_stage_duration", "poc_validation_duration", "epoch_multiplier"}
_EPOCH_FIELDS = {f.name for f in dataclasses.fields(EpochParams)}


@dataclass
class NetworkParams:
    """Everything ``/_sim/params`` can read and change while the simulator runs."""

    epoch: EpochParams
    block_seconds: float
    poc_v2_enabled: bool = False
    mlnode_version: str = "v3.0.8"
    epoch_model: str = DEFAULT_EPOCH_MODEL
    poc_model: str = DEFAULT_POC_MODEL
    governance_models: list[str] = field(default_factory=lambda: [DEFAULT_EPOCH_MODEL, DEFAULT_POC_MODEL])
    poc_seq_len: int = 1024
    r_target: float = 1.398
    fraud_threshold: float = 1e-7
    v1_batch_size: int = 100
    v2_batch_size: int = 32
    v2_callback_model_path: bool = True  # v0.2.12+: /v2/poc-batches/<model id escaped twice>
    callback_base: str = ""
    participant_public_key: str = "02" + "5a" * 32
    node_sync_seconds: float = 60.0  # real seconds between the dapi's node-list syncs to the chain
    status_poll_seconds: float = 60.0  # real seconds between the dapi's node status polls
    state_timeout_seconds: float = 5.0  # real seconds, state polls
    command_timeout_seconds: float = 900.0  # real seconds, node commands (15 min)
    inference_interval_seconds: float = 30.0  # real seconds between simulated inferences; 0 = off
    validation_rate: float = 0.5  # share of inferences re-checked with enforced_tokens
    validation_similarity_threshold: float = 0.99
    confirmation_poc_enabled: bool = False
    expected_confirmations_per_epoch: int = 1
    alpha_threshold: float = 0.5
    slash_fraction: float = 0.1

    def as_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["epoch_params"] = out.pop("epoch")
        return out

    def update(self, changes: dict[str, Any]) -> list[str]:
        """Apply a partial update (flat or under ``epoch_params``); return the names changed.

        Raises ``ValueError`` for unknown names or bad values, changing nothing.
        """
        flat: dict[str, Any] = {}
        for key, value in changes.items():
            if key == "epoch_params" and isinstance(value, dict):
                flat.update(value)
            else:
                flat[key] = value
        own = {f.name: f for f in dataclasses.fields(self)} | {"epoch_params": None}
        unknown = sorted(k for k in flat if k not in _EPOCH_FIELDS and k not in own)
        if unknown:
            raise ValueError(f"unknown parameter(s): {', '.join(unknown)}")
        epoch_changes: dict[str, int] = {}
        other: dict[str, Any] = {}
        for key, value in flat.items():
            if key in _EPOCH_FIELDS:
                if isinstance(value, bool) or not isinstance(value, int):
                    raise ValueError(f"{key} must be an integer")
                if value < (1 if key in _POSITIVE else 0):
                    raise ValueError(f"{key} must be {'> 0' if key in _POSITIVE else '>= 0'}")
                epoch_changes[key] = value
            else:
                other[key] = _coerce(key, value, getattr(self, key))
        if "block_seconds" in other and not other["block_seconds"] > 0:
            raise ValueError("block_seconds must be > 0")
        for key, value in epoch_changes.items():
            setattr(self.epoch, key, value)
        for key, value in other.items():
            setattr(self, key, value)
        return sorted(epoch_changes) + sorted(other)


def _coerce(key: str, value: Any, current: Any) -> Any:
    if isinstance(current, bool):
        if not isinstance(value, bool):
            raise ValueError(f"{key} must be a boolean")
        return value
    if isinstance(current, int):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{key} must be an integer")
        return value
    if isinstance(current, float):
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError(f"{key} must be a number")
        if value < 0:
            raise ValueError(f"{key} must be >= 0")
        return float(value)
    if isinstance(current, str):
        if not isinstance(value, str):
            raise ValueError(f"{key} must be a string")
        return value
    if isinstance(current, list):
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ValueError(f"{key} must be a list of strings")
        return list(value)
    raise ValueError(f"{key} cannot be changed")
