"""The dapi's ML-node registry behind ``/admin/v1/nodes`` (gonka-protocol.md §3).

Rules kept from the real broker: ``node_num`` comes from a counter that only grows — an upsert keeps
it, delete + add gets a new one; a new node's admin epoch is the dapi's current epoch, and an upsert
keeps it; enable/disable stamp the current epoch. Every change is logged with the height the dapi
saw, because the chain learns of it only on the next node-sync tick.
"""

from __future__ import annotations

import asyncio
import datetime as dt
from dataclasses import dataclass, field
from typing import Any

UNKNOWN, INFERENCE, POC, TRAINING, STOPPED, FAILED = "UNKNOWN", "INFERENCE", "POC", "TRAINING", "STOPPED", "FAILED"
IDLE, GENERATING, VALIDATING = "IDLE", "GENERATING", "VALIDATING"


def go_time(t: dt.datetime) -> str:
    """RFC 3339 with nanoseconds, as Go's time.Time marshals."""
    return t.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%f") + "000Z"


class BindError(ValueError):
    """The body could not be bound to the Go struct (echo answers 400 'invalid request body: ...')."""


_INT_FIELDS = ("inference_port", "poc_port", "max_concurrent")
_STR_FIELDS = ("id", "host", "inference_segment", "poc_segment")


@dataclass
class NodeConfig:
    """``InferenceNodeConfig``: Go zero values for missing fields, unknown fields ignored."""

    id: str = ""
    host: str = ""
    inference_segment: str = ""
    inference_port: int = 0
    poc_segment: str = ""
    poc_port: int = 0
    models: dict[str, dict[str, Any]] = field(default_factory=dict)
    max_concurrent: int = 0
    hardware: list[dict[str, Any]] | None = None

    @classmethod
    def bind(cls, raw: Any) -> NodeConfig:
        if not isinstance(raw, dict):
            kind = "array" if isinstance(raw, list) else type(raw).__name__
            raise BindError(
                f"code=400, message=Unmarshal type error: expected=apiconfig.InferenceNodeConfig, got={kind}, field=, offset=1"
            )
        cfg = cls()
        for name in _STR_FIELDS:
            value = raw.get(name)
            if value is None:
                continue
            if not isinstance(value, str):
                raise BindError(_type_error("string", value, name))
            setattr(cfg, name, value)
        for name in _INT_FIELDS:
            value = raw.get(name)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int):
                raise BindError(_type_error("int", value, name))
            setattr(cfg, name, value)
        models = raw.get("models")
        if models is not None:
            if not isinstance(models, dict):
                raise BindError(_type_error("map[string]apiconfig.ModelConfig", models, "models"))
            for name, mc in models.items():
                if mc is None:
                    cfg.models[name] = {"args": None}
                    continue
                if not isinstance(mc, dict):
                    raise BindError(_type_error("apiconfig.ModelConfig", mc, f"models.{name}"))
                args = mc.get("args")
                if args is not None and (not isinstance(args, list) or not all(isinstance(a, str) for a in args)):
                    raise BindError(_type_error("[]string", args, f"models.{name}.args"))
                cfg.models[name] = {"args": list(args) if args is not None else None}
        hardware = raw.get("hardware")
        if hardware is not None:
            if not isinstance(hardware, list):
                raise BindError(_type_error("[]apiconfig.Hardware", hardware, "hardware"))
            cfg.hardware = []
            for item in hardware:
                if not isinstance(item, dict):
                    raise BindError(_type_error("apiconfig.Hardware", item, "hardware"))
                count = item.get("count", 0)
                if isinstance(count, bool) or not isinstance(count, int) or count < 0:
                    raise BindError(_type_error("uint32", count, "hardware.count"))
                cfg.hardware.append({"type": str(item.get("type", "")), "count": count})
        return cfg

    def as_config_json(self) -> dict[str, Any]:
        """The echo of ``POST /admin/v1/nodes``: InferenceNodeConfig's fields, in its order."""
        return {
            "host": self.host,
            "inference_segment": self.inference_segment,
            "inference_port": self.inference_port,
            "poc_segment": self.poc_segment,
            "poc_port": self.poc_port,
            "models": {k: dict(v) for k, v in self.models.items()},
            "id": self.id,
            "max_concurrent": self.max_concurrent,
            "hardware": [dict(h) for h in self.hardware] if self.hardware is not None else None,
        }

    @property
    def model(self) -> str:
        """The model the dapi loads on this node (the first one configured)."""
        return next(iter(self.models), "")

    def model_args(self) -> list[str]:
        args = self.models.get(self.model, {}).get("args")
        return list(args or [])


def _type_error(expected: str, value: Any, name: str) -> str:
    got = {bool: "bool", int: "number", float: "number", str: "string", list: "array", dict: "object"}.get(
        type(value), "value"
    )
    return f"code=400, message=Unmarshal type error: expected={expected}, got={got}, field={name}"


def validate(cfg: NodeConfig, others: dict[str, ManagedNode], exclude_id: str = "") -> list[str]:
    """The broker's checks, with its wording, joined with '; ' after 'validation failed: '."""
    errors: list[str] = []
    if not cfg.id.strip():
        errors.append("node id is required and cannot be empty")
    if not cfg.host.strip():
        errors.append("host is required and cannot be empty")
    if not 0 < cfg.inference_port <= 65535:
        errors.append(f"inference_port must be between 1 and 65535, got {cfg.inference_port}")
    if not 0 < cfg.poc_port <= 65535:
        errors.append(f"poc_port must be between 1 and 65535, got {cfg.poc_port}")
    if cfg.max_concurrent <= 0:
        errors.append(f"max_concurrent must be greater than 0, got {cfg.max_concurrent}")
    if not cfg.models:
        errors.append("at least one model must be specified")
    for node_id, node in others.items():
        if exclude_id and node_id == exclude_id:
            continue
        if node.config.host == cfg.host and node.config.inference_port == cfg.inference_port:
            errors.append(
                f"duplicate inference host+port combination: {cfg.host}:{cfg.inference_port} (already used by node '{node_id}')"
            )
            break
    for node_id, node in others.items():
        if exclude_id and node_id == exclude_id:
            continue
        if node.config.host == cfg.host and node.config.poc_port == cfg.poc_port:
            errors.append(
                f"duplicate PoC host+port combination: {cfg.host}:{cfg.poc_port} (already used by node '{node_id}')"
            )
            break
    return errors


@dataclass
class NodeStatus:
    intended_status: str = UNKNOWN
    current_status: str = UNKNOWN
    poc_intended_status: str = IDLE
    poc_current_status: str = IDLE
    failure_reason: str = ""
    status_timestamp: dt.datetime = field(default_factory=lambda: dt.datetime.now(dt.UTC))
    admin_enabled: bool = True
    admin_epoch: int = 0
    epoch_ml_nodes: dict[str, Any] = field(default_factory=dict)


@dataclass
class ManagedNode:
    config: NodeConfig
    node_num: int
    registered_height: int
    status: NodeStatus
    upserted_heights: list[int] = field(default_factory=list)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    applied_key: tuple[Any, ...] | None = None
    retry_after: float = 0.0
    busy: bool = False
    removed: bool = False
    ml_node_version: str = ""

    def as_response(self) -> dict[str, Any]:
        """One item of ``GET /admin/v1/nodes``: ``{node: Node, state: NodeState}``."""
        cfg = self.config
        s = self.status
        return {
            "node": {
                "host": cfg.host,
                "inference_segment": cfg.inference_segment,
                "inference_port": cfg.inference_port,
                "poc_segment": cfg.poc_segment,
                "poc_port": cfg.poc_port,
                "models": {k: {"args": v.get("args")} for k, v in cfg.models.items()},
                "id": cfg.id,
                "max_concurrent": cfg.max_concurrent,
                "node_num": self.node_num,
                "hardware": [dict(h) for h in cfg.hardware] if cfg.hardware is not None else None,
            },
            "state": {
                "intended_status": s.intended_status,
                "current_status": s.current_status,
                "poc_intended_status": s.poc_intended_status,
                "poc_current_status": s.poc_current_status,
                "lock_count": 1 if self.busy else 0,
                "failure_reason": s.failure_reason,
                "status_timestamp": go_time(s.status_timestamp),
                "admin_state": {"enabled": s.admin_enabled, "epoch": s.admin_epoch},
                "ml_node_version": self.ml_node_version,
                "poc_validation_inference": False,
                "epoch_models": {},
                "epoch_ml_nodes": s.epoch_ml_nodes,
                "preserved_models": {},
            },
        }


@dataclass(frozen=True)
class AdminChange:
    """One registry change as the chain will see it: applied at the first node sync after ``height``."""

    height: int
    op: str  # "add" | "update" | "remove"
    node_id: str
    node_num: int


class NodeRegistry:
    def __init__(self) -> None:
        self.nodes: dict[str, ManagedNode] = {}
        self._max_num = 0
        self.changes: list[AdminChange] = []

    def by_num(self, node_num: int) -> ManagedNode | None:
        for node in self.nodes.values():
            if node.node_num == node_num:
                return node
        return None

    def add(self, cfg: NodeConfig, *, height: int, epoch: int) -> ManagedNode:
        replaced = self.nodes.get(cfg.id)
        if replaced is not None:  # the batch route re-registers an existing id: it becomes a new node
            replaced.removed = True
        self._max_num += 1
        node = ManagedNode(
            config=cfg,
            node_num=self._max_num,
            registered_height=height,
            status=NodeStatus(admin_epoch=epoch),
        )
        self.nodes[cfg.id] = node
        self.changes.append(AdminChange(height, "add", cfg.id, node.node_num))
        return node

    def update(self, cfg: NodeConfig, *, height: int) -> ManagedNode:
        node = self.nodes[cfg.id]
        node.config = cfg
        node.upserted_heights.append(height)
        self.changes.append(AdminChange(height, "update", cfg.id, node.node_num))
        return node

    def remove(self, node_id: str, *, height: int) -> ManagedNode | None:
        node = self.nodes.pop(node_id, None)
        if node is not None:
            node.removed = True
            self.changes.append(AdminChange(height, "remove", node_id, node.node_num))
        return node
