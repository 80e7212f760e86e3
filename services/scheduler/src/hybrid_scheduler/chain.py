"""Reading the chain: the dapi's public ``/v1/epochs/latest`` and ``/v1/epochs/{epoch}/participants``, chain REST
``epoch_info`` / ``params`` / ``mlnode_version``, and Tendermint ``/chain-rpc/status`` (gonka-protocol.md §5), parsed
defensively.

The two renderings differ (the dapi's Go JSON drops zero fields and prints int64 as numbers; the gRPC gateway prints
every field, int64 as strings), ``phase`` may be a name or an enum number, and a confirmation-PoC event loses its
zero fields. Anything that cannot be a real chain's answer raises :class:`InvalidChainData`; the observer keeps its
last good view instead.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from typing import Any, Final

import httpx
import orjson

from hybrid_scheduler.window import EpochParams, InvalidChainData, PocWindow, as_int

PUBLIC_EPOCH: Final = "/v1/epochs/latest"
REST_BASE: Final = "/chain-api/productscience/inference/inference"
RPC_STATUS: Final = "/chain-rpc/status"
PARTICIPANTS_BYTES: Final = 16 << 20  # a mainnet epoch lists hundreds of participants, with validators and a block

PHASES: Final = ("PoCGenerate", "PoCGenerateWindDown", "PoCValidate", "PoCValidateWindDown", "Inference")
# Confirmation-PoC phases (gonka-protocol.md §8); the dapi prints the enum as a number, some clients as a name.
CPOC_PHASES: Final = {
    "CONFIRMATION_POC_INACTIVE": 0,
    "CONFIRMATION_POC_GRACE_PERIOD": 1,
    "CONFIRMATION_POC_GENERATION": 2,
    "CONFIRMATION_POC_VALIDATION": 3,
    "CONFIRMATION_POC_COMPLETED": 4,
}


class ChainUnavailable(RuntimeError):
    """An endpoint did not answer (connection error, timeout, HTTP error status)."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


def _phase(raw: Any) -> str:
    if isinstance(raw, bool):
        raise InvalidChainData("phase is a boolean")
    if isinstance(raw, int) and 0 <= raw < len(PHASES):
        return PHASES[raw]
    if isinstance(raw, str):
        for name in PHASES:
            if raw.strip().lower() == name.lower():
                return name
        if raw.strip().isdigit():
            return _phase(int(raw.strip()))
    raise InvalidChainData(f"unknown phase {raw!r}")


@dataclass(frozen=True)
class ConfirmationEvent:
    """``active_confirmation_poc_event`` (gonka-protocol.md §8)."""

    epoch_index: int
    event_sequence: int
    trigger_height: int
    generation_start_height: int
    phase: int
    validation_end_height: int | None = None

    @property
    def key(self) -> str:
        return f"{self.epoch_index}:{self.event_sequence}"

    @classmethod
    def parse(cls, raw: Any) -> ConfirmationEvent:
        if not isinstance(raw, dict):
            raise InvalidChainData("active_confirmation_poc_event is not an object")

        def num(name: str) -> int:
            # Go omitempty: a zero field (the first event's sequence 0, an epoch 0) simply vanishes.
            return as_int(raw[name], name) if raw.get(name) not in (None, "") else 0

        phase_raw = raw.get("phase", 0)
        phase = CPOC_PHASES.get(phase_raw, None) if isinstance(phase_raw, str) else None
        if phase is None:
            phase = as_int(phase_raw, "phase") if phase_raw not in (None, "") else 0
        trigger = num("trigger_height")
        if trigger <= 0:
            raise InvalidChainData("confirmation event without trigger_height")
        end = raw.get("validation_end_height")
        return cls(
            epoch_index=num("epoch_index"),
            event_sequence=num("event_sequence"),
            trigger_height=trigger,
            generation_start_height=num("generation_start_height") or trigger,
            phase=phase,
            validation_end_height=as_int(end, "validation_end_height") if end not in (None, "") else None,
        )


@dataclass(frozen=True)
class ChainView:
    """One consistent reading of the chain."""

    observed_at: float  # wall time (unix seconds) of the answer
    source: str  # public | chain-rest | rpc
    block_height: int
    epoch_index: int  # the latest epoch (its PoC has started, or it is epoch 0)
    poc_start: int  # the latest epoch's PoC start (0 in epoch 0, which runs no PoC)
    next_poc_start: int
    phase: str
    params: EpochParams
    confirmation_active: bool = False
    confirmation: ConfirmationEvent | None = None
    poc_v2_enabled: bool | None = None
    mlnode_version: str | None = None
    reported: dict[str, int] = field(default_factory=dict)  # stage heights as the chain printed them

    def window(self) -> PocWindow | None:
        """The latest epoch's PoC window (none in epoch 0)."""
        if self.epoch_index <= 0 or self.poc_start <= 0:
            return None
        return PocWindow.compute(self.epoch_index, self.poc_start, self.params)

    def next_window(self) -> PocWindow:
        return PocWindow.compute(self.epoch_index + 1, self.next_poc_start, self.params)

    def with_flags(self, poc_v2_enabled: bool | None, mlnode_version: str | None) -> ChainView:
        return replace(
            self,
            poc_v2_enabled=self.poc_v2_enabled if poc_v2_enabled is None else poc_v2_enabled,
            mlnode_version=self.mlnode_version if mlnode_version is None else mlnode_version,
        )

    def as_dict(self) -> dict[str, Any]:
        return {
            "observed_at": self.observed_at,
            "source": self.source,
            "block_height": self.block_height,
            "epoch_index": self.epoch_index,
            "poc_start": self.poc_start,
            "next_poc_start": self.next_poc_start,
            "phase": self.phase,
            "params": self.params.__dict__,
            "confirmation_active": self.confirmation_active,
            "confirmation": None if self.confirmation is None else self.confirmation.__dict__,
            "poc_v2_enabled": self.poc_v2_enabled,
            "mlnode_version": self.mlnode_version,
        }


def _obj(raw: Any, name: str) -> dict[str, Any]:
    if not isinstance(raw, dict):
        raise InvalidChainData(f"{name} is not an object")
    return raw


def parse_epoch(raw: Any, *, source: str, observed_at: float) -> ChainView:
    """``/v1/epochs/latest`` (numbers, omitempty) or chain REST ``epoch_info`` (strings, params nested)."""
    body = _obj(raw, "the answer")
    height = as_int(body.get("block_height"), "block_height")
    latest = _obj(body.get("latest_epoch"), "latest_epoch")
    index = as_int(latest.get("index", 0), "latest_epoch.index")
    poc_start = as_int(latest.get("poc_start_block_height", 0), "latest_epoch.poc_start_block_height")
    params_raw = body.get("epoch_params")
    nested = body.get("params")
    if params_raw is None and isinstance(nested, dict):
        params_raw = nested.get("epoch_params")
    params = EpochParams.parse(params_raw)
    stages: dict[str, Any] = body["epoch_stages"] if isinstance(body.get("epoch_stages"), dict) else {}
    next_stages: dict[str, Any] = body["next_epoch_stages"] if isinstance(body.get("next_epoch_stages"), dict) else {}
    reported: dict[str, int] = {}
    for prefix, src in (("", stages), ("next epoch ", next_stages)):
        for key in ("poc_start", "poc_validation_end", "set_new_validators", "next_poc_start"):
            if src.get(key) not in (None, ""):
                reported[prefix + key] = as_int(src[key], f"{prefix}epoch_stages.{key}")
    if reported.get("next_poc_start", 0) > 0:
        next_poc = reported["next_poc_start"]
    elif index > 0 and poc_start > 0:
        next_poc = poc_start + params.epoch_length * params.epoch_multiplier
    elif next_stages.get("poc_start") not in (None, "", 0, "0"):
        next_poc = as_int(next_stages["poc_start"], "next_epoch_stages.poc_start")
    else:
        raise InvalidChainData("cannot tell when the next PoC starts")
    phase_raw = body.get("phase")
    phase = _phase(phase_raw) if phase_raw not in (None, "") else _derive_phase(height, index, poc_start, params)

    if height <= 0:
        raise InvalidChainData(f"block_height {height} is not positive")
    if index < 0 or poc_start < 0:
        raise InvalidChainData("negative epoch index or PoC start")
    if index > 0 and poc_start > height + 1:
        raise InvalidChainData(f"the latest epoch's PoC starts at {poc_start}, after the current height {height}")
    if next_poc <= 0 or next_poc < height - 1:
        raise InvalidChainData(f"next PoC start {next_poc} is behind the current height {height}")
    if index > 0 and next_poc <= poc_start:
        raise InvalidChainData("the next PoC starts before the latest one")

    active_raw = body.get("is_confirmation_poc_active", False)
    active = active_raw is True or (isinstance(active_raw, str) and active_raw.lower() == "true")
    event_raw = body.get("active_confirmation_poc_event")
    event = ConfirmationEvent.parse(event_raw) if active and isinstance(event_raw, dict) and event_raw else None
    v2: bool | None = None
    if isinstance(nested, dict) and isinstance(nested.get("poc_params"), dict):
        flag = nested["poc_params"].get("poc_v2_enabled")
        v2 = bool(flag) if isinstance(flag, bool) else None
    return ChainView(
        observed_at=observed_at,
        source=source,
        block_height=height,
        epoch_index=index,
        poc_start=poc_start if index > 0 else 0,
        next_poc_start=next_poc,
        phase=phase,
        params=params,
        confirmation_active=active,
        confirmation=event,
        poc_v2_enabled=v2,
        reported=reported,
    )


def _derive_phase(height: int, index: int, poc_start: int, params: EpochParams) -> str:
    if index <= 0 or height < poc_start:
        return "Inference"
    w = params.window(poc_start)
    if height < poc_start + int(params.poc_stage_duration * 0.8) * params.epoch_multiplier:
        return "PoCGenerate"
    if height < w.validation_start:
        return "PoCGenerateWindDown"
    if height < w.validation_end:
        return "PoCValidate"
    return "Inference"


@dataclass(frozen=True)
class EpochParticipants:
    """An epoch's ``ActiveParticipants`` as the dapi's ``/v1/epochs/{epoch}/participants`` shows them."""

    epoch_index: int
    poc_start: int | None
    created_at_height: int | None  # the block that stored the record (the epoch's set_new_validators)
    weights: dict[str, int]  # participant address -> weight
    node_weights: dict[str, dict[str, int]]  # participant address -> ML node id -> PoC weight


def parse_participants(raw: Any, epoch_index: int) -> EpochParticipants:
    """``active_participants`` of the answer: the dapi's Go JSON of gogoproto types, so every zero field is absent
    (a participant's ``weight``, a node's ``poc_weight``, an empty list) and int64 are numbers (strings accepted)."""
    active = _obj(_obj(raw, "the answer").get("active_participants"), "active_participants")

    def optional(obj: dict[str, Any], name: str) -> int | None:
        return as_int(obj[name], name) if obj.get(name) not in (None, "") else None

    answered = optional(active, "epoch_id")
    if answered not in (None, epoch_index):
        raise InvalidChainData(f"asked for epoch {epoch_index}'s participants, got epoch {answered}'s")
    items = active.get("participants") or []
    if not isinstance(items, list):
        raise InvalidChainData("active_participants.participants is not a list")
    weights: dict[str, int] = {}
    node_weights: dict[str, dict[str, int]] = {}
    for item in items:
        p = _obj(item, "a participant")
        address = p.get("index")
        if not isinstance(address, str) or not address:
            raise InvalidChainData("a participant without an index (address)")
        weight = optional(p, "weight") or 0
        if weight < 0:
            raise InvalidChainData(f"participant {address} has a negative weight {weight}")
        weights[address] = weight
        nodes: dict[str, int] = {}
        groups = p.get("ml_nodes") or []
        for group in groups if isinstance(groups, list) else []:
            inner = group.get("ml_nodes") if isinstance(group, dict) else None
            for node in inner if isinstance(inner, list) else []:
                if isinstance(node, dict) and isinstance(node.get("node_id"), str):
                    nodes[node["node_id"]] = optional(node, "poc_weight") or 0
        node_weights[address] = nodes
    return EpochParticipants(
        epoch_index=epoch_index,
        poc_start=optional(active, "poc_start_block_height"),
        created_at_height=optional(active, "created_at_block_height"),
        weights=weights,
        node_weights=node_weights,
    )


def parse_rpc_status(raw: Any) -> int:
    """``result.sync_info.latest_block_height`` of Tendermint's ``/status``."""
    result = _obj(_obj(raw, "the answer").get("result"), "result")
    sync = _obj(result.get("sync_info"), "result.sync_info")
    height = as_int(sync.get("latest_block_height"), "latest_block_height")
    if height <= 0:
        raise InvalidChainData(f"latest_block_height {height} is not positive")
    return height


def parse_flags(params_raw: Any, version_raw: Any) -> tuple[bool | None, str | None]:
    """``poc_params.poc_v2_enabled`` from chain REST ``/params`` and the chain's ``mlnode_version``."""
    v2: bool | None = None
    if isinstance(params_raw, dict):
        params = params_raw.get("params", params_raw)
        poc = params.get("poc_params") if isinstance(params, dict) else None
        if isinstance(poc, dict):
            flag = poc.get("poc_v2_enabled", False)  # omitempty: absent means false
            if not isinstance(flag, bool):
                raise InvalidChainData(f"poc_v2_enabled = {flag!r} is not a boolean")
            v2 = flag
    version: str | None = None
    if isinstance(version_raw, dict):
        inner = version_raw.get("mlnode_version", version_raw)
        value = inner.get("current_version") if isinstance(inner, dict) else inner
        if isinstance(value, str) and value.strip():
            version = value.strip()
    return v2, version


class ChainClient:
    """One HTTP client for the dapi's public port (the scheduler alone talks to the chain)."""

    def __init__(self, base_url: str, *, timeout: float = 3.0, max_bytes: int = 1 << 20) -> None:
        self.base_url = base_url.rstrip("/")
        self.max_bytes = max_bytes
        self.http = httpx.AsyncClient(
            base_url=self.base_url,
            timeout=httpx.Timeout(timeout, connect=min(timeout, 2.0)),
            limits=httpx.Limits(max_connections=4, max_keepalive_connections=2),
        )

    async def close(self) -> None:
        await self.http.aclose()

    async def get_json(self, path: str, *, max_bytes: int | None = None) -> tuple[Any, float]:
        """The decoded JSON body and the wall time it arrived; :class:`ChainUnavailable` / :class:`InvalidChainData`."""
        try:
            resp = await self.http.get(path)
        except (httpx.HTTPError, OSError) as exc:
            raise ChainUnavailable(f"GET {path}: {type(exc).__name__}: {exc}".rstrip(": ")) from None
        at = time.time()
        if resp.status_code != 200:
            raise ChainUnavailable(f"GET {path}: HTTP {resp.status_code}", resp.status_code)
        if len(resp.content) > (max_bytes or self.max_bytes):
            raise InvalidChainData(f"GET {path}: {len(resp.content)} bytes is too large an answer")
        try:
            return orjson.loads(resp.content), at
        except orjson.JSONDecodeError:
            raise InvalidChainData(f"GET {path}: the body is not JSON") from None

    async def public_epoch(self) -> ChainView:
        raw, at = await self.get_json(PUBLIC_EPOCH)
        return parse_epoch(raw, source="public", observed_at=at)

    async def rest_epoch(self) -> ChainView:
        raw, at = await self.get_json(f"{REST_BASE}/epoch_info")
        return parse_epoch(raw, source="chain-rest", observed_at=at)

    async def rpc_height(self) -> tuple[int, float]:
        raw, at = await self.get_json(RPC_STATUS)
        return parse_rpc_status(raw), at

    async def participants(self, epoch_index: int) -> EpochParticipants | None:
        """The epoch's active participants; ``None`` while the chain has no record for it (the dapi's 404: before the
        epoch's ``set_new_validators``, or a PoC that gave nobody weight)."""
        try:
            raw, _ = await self.get_json(f"/v1/epochs/{epoch_index}/participants", max_bytes=PARTICIPANTS_BYTES)
        except ChainUnavailable as exc:
            if exc.status == 404:
                return None
            raise
        return parse_participants(raw, epoch_index)

    async def flags(self) -> tuple[bool | None, str | None]:
        params, _ = await self.get_json(f"{REST_BASE}/params")
        try:
            version, _ = await self.get_json(f"{REST_BASE}/mlnode_version")
        except ChainUnavailable:
            version = None
        return parse_flags(params, version)
