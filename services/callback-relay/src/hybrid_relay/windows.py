"""What the relay knows of PoC windows — learned from the scheduler's ``epoch.observed``, never from the chain.

The scheduler owns the chain (docs/architecture.md); the relay keeps the windows it was told about, keyed by PoC start
height (the ``block_height`` every batch of that PoC carries, gonka-protocol.md §7), and extrapolates the current
height from the last view and the measured block time. A window counts as closed only ``margin`` blocks after its last
height, so a batch is never dead-lettered while the dapi could still take it. Windows it never heard of (a
confirmation PoC's trigger height, an epoch before the relay started) are "unknown": such a batch is forwarded and
bounded by attempts instead.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import orjson
from pydantic import ValidationError
from redis.asyncio import Redis

from hybrid_common.messages.domain import PocWindowHeights
from hybrid_common.messages.events import EpochObserved
from hybrid_common.redis_keys import RedisKeys

log = logging.getLogger("hybrid.relay.windows")

KEEP_WINDOWS = 8
_VIEW_FIELD = "view"


@dataclass(frozen=True, slots=True)
class ChainView:
    epoch_index: int
    block_height: int
    observed_at: float  # wall clock (s) when ``block_height`` was the chain's height
    block_seconds: float
    poc_v2_enabled: bool

    def height_at(self, wall: float) -> float:
        return self.block_height + max(0.0, wall - self.observed_at) / self.block_seconds


@dataclass(frozen=True, slots=True)
class KnownWindow:
    epoch_index: int
    heights: PocWindowHeights

    def last_height(self, kind: str) -> int:
        # Generated batches count up to the exchange deadline, validations until validation ends (§2, §5, §7).
        return self.heights.exchange_end if kind == "generated" else self.heights.validation_end


class PocWindows:
    def __init__(self, margin_blocks: float = 1.0) -> None:
        self.margin = margin_blocks
        self.view: ChainView | None = None
        self.windows: dict[int, KnownWindow] = {}

    # --- learning -------------------------------------------------------------------------------------------

    def observe(self, event: EpochObserved, occurred_at: datetime) -> None:
        observed_at = occurred_at.timestamp() - event.stale_seconds
        if self.view is None or observed_at >= self.view.observed_at:
            self.view = ChainView(
                event.epoch_index, event.block_height, observed_at, event.block_seconds, event.poc_v2_enabled
            )
        self._learn(KnownWindow(event.epoch_index, event.window))
        if event.next_window is not None:
            self._learn(KnownWindow(event.epoch_index + 1, event.next_window))

    def _learn(self, window: KnownWindow) -> None:
        self.windows[window.heights.poc_start] = window
        for old in sorted(self.windows)[:-KEEP_WINDOWS]:
            del self.windows[old]

    # --- judging --------------------------------------------------------------------------------------------

    def height_now(self) -> float | None:
        return None if self.view is None else self.view.height_at(time.time())

    def window_for(self, block_height: int) -> KnownWindow | None:
        return self.windows.get(block_height)

    def epoch_of(self, block_height: int) -> int | None:
        w = self.windows.get(block_height)
        return None if w is None else w.epoch_index

    def closed(self, block_height: int, kind: str) -> bool:
        """True only when this batch's window is known and has certainly closed."""
        window = self.windows.get(block_height)
        now = self.height_now()
        if window is None or now is None:
            return False
        return now - self.margin > window.last_height(kind)

    def v1_refused(self) -> bool:
        """The dapi answers 503 on v1 routes while ``poc_v2_enabled`` is on (gonka-protocol.md §10)."""
        return self.view is not None and self.view.poc_v2_enabled

    # --- sharing between replicas (relay:windows) -------------------------------------------------------------

    async def save(self, redis: Redis, keys: RedisKeys) -> None:
        mapping: dict[str, bytes] = {
            str(start): orjson.dumps({"epoch_index": w.epoch_index, "window": w.heights.model_dump()})
            for start, w in self.windows.items()
        }
        if self.view is not None:
            mapping[_VIEW_FIELD] = orjson.dumps(self.view)  # orjson serialises dataclasses
        key = keys.relay_windows()
        async with redis.pipeline(transaction=True) as pipe:
            pipe.delete(key)
            pipe.hset(key, mapping=mapping)  # type: ignore[arg-type]
            await pipe.execute()

    async def load(self, redis: Redis, keys: RedisKeys) -> bool:
        """Merge what another replica (or this one before a restart) saved; falls back to the scheduler's
        ``chain:view``. True when anything was learned."""
        raw: dict[Any, Any] = await redis.hgetall(keys.relay_windows())
        learned = False
        for field, value in raw.items():
            try:
                data = orjson.loads(value)
                if field.decode() == _VIEW_FIELD:
                    view = ChainView(**data)
                    if self.view is None or view.observed_at > self.view.observed_at:
                        self.view = view
                else:
                    w = KnownWindow(int(data["epoch_index"]), PocWindowHeights.model_validate(data["window"]))
                    if w.heights.poc_start not in self.windows:
                        self._learn(w)
                learned = True
            except (ValueError, KeyError, TypeError, ValidationError) as exc:
                log.warning("ignoring unreadable relay:windows field %r: %s", field, exc)
        if not learned:
            learned = await self._load_chain_view(redis, keys)
        return learned

    async def _load_chain_view(self, redis: Redis, keys: RedisKeys) -> bool:
        value = await redis.get(keys.chain_view())
        if not value:
            return False
        try:
            data: Any = orjson.loads(value)
            # The scheduler's shape: the EpochObserved payload, possibly wrapped with its age or in an envelope.
            payload = data.get("payload") or data.get("view") or data
            event = EpochObserved.model_validate(payload)
            when = data.get("occurred_at") or data.get("observed_at") or data.get("at")
            occurred = datetime.fromisoformat(when) if isinstance(when, str) else None
        except (ValueError, TypeError, AttributeError, ValidationError) as exc:
            log.info("chain:view not usable by the relay: %s", exc)
            return False
        if occurred is not None:
            self.observe(event, occurred)
        else:  # no timestamp: trust the windows, not the height (it would be extrapolated from an unknown time)
            self._learn(KnownWindow(event.epoch_index, event.window))
        return True
