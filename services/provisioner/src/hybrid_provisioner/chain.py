"""The chain view the scheduler keeps in Redis (``chain:view``, EpochObserved JSON): turns a deadline height into a
wall time and gives the dapi's ``mlnode_version`` (the URL prefix the front probe uses)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import orjson
from redis.asyncio import Redis

from hybrid_common.messages.events import EpochObserved
from hybrid_common.redis_keys import RedisKeys


@dataclass(frozen=True)
class ChainView:
    block_height: int
    block_seconds: float
    mlnode_version: str | None
    poc_v2_enabled: bool | None
    observed_at: float
    epoch_index: int | None = None

    def height_to_time(self, height: int, now: float | None = None) -> float:
        at = now if now is not None else time.time()
        elapsed_blocks = max(0.0, at - self.observed_at) / self.block_seconds
        return at + (height - self.block_height - elapsed_blocks) * self.block_seconds


def _timestamp(value: Any) -> float | None:
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        try:
            return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
        except ValueError:
            return None
    return None


def parse_view(raw: bytes | str | dict[str, Any], now: float | None = None) -> ChainView | None:
    """Accepts the bare EpochObserved JSON or a wrapper ``{"view": {...}, "observed_at"/"at": ...}``."""
    data = raw if isinstance(raw, dict) else orjson.loads(raw)
    if not isinstance(data, dict):
        return None
    inner = data.get("view") or data.get("payload") or data
    try:
        view = EpochObserved.model_validate(inner)
    except ValueError:
        return None
    observed = _timestamp(data.get("observed_at")) or _timestamp(data.get("at")) or _timestamp(data.get("occurred_at"))
    at = observed or (now if now is not None else time.time()) - view.stale_seconds
    return ChainView(
        view.block_height, view.block_seconds, view.mlnode_version, view.poc_v2_enabled, at, view.epoch_index
    )


class ChainViews:
    """The latest view: from ``epoch.observed`` deliveries to this replica, else the scheduler's Redis copy."""

    def __init__(self, redis: Redis, keys: RedisKeys) -> None:
        self.redis = redis
        self.keys = keys
        self.latest: ChainView | None = None

    def observed(self, event: EpochObserved, at: float) -> None:
        self.latest = ChainView(
            event.block_height, event.block_seconds, event.mlnode_version, event.poc_v2_enabled, at, event.epoch_index
        )

    async def current(self) -> ChainView | None:
        try:
            raw = await self.redis.get(self.keys.chain_view())
        except Exception:
            raw = None
        stored = parse_view(raw) if raw else None
        if stored is None:
            return self.latest
        if self.latest is None or stored.observed_at >= self.latest.observed_at:
            return stored
        return self.latest
