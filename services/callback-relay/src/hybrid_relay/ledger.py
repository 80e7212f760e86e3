"""Accounting and deduplication in Redis: every accepted batch ends in exactly one outcome.

Keys (hybrid_common.redis_keys): ``relay:seen:{digest}`` remembers which batch carried a content (``c|<batch>`` while
it is being forwarded, ``f|<batch>`` once the dapi took it); ``relay:batch:{batch_id}`` records the batch's outcome
(``forwarded``, ``duplicate``, ``dead:<reason>``) so a redelivered message is never counted twice; ``relay:stats`` holds
the counters per PoC (its start height) and node. Each step is one Lua script: atomic, one round trip.

Why a claim before the POST: MLNode senders re-send a batch whenever they did not see our 200 in time (gonka-protocol.md
§2, §7); a second copy arriving while the first is still being forwarded must be kept out too. A copy of the *same*
batch (a broker redelivery, or this relay restarted mid-POST) takes its claim back and posts again: that is the only
way a duplicate reaches the dapi, bounded by the batches in flight when the relay died. A copy whose content is
claimed by a batch still in flight is counted ``duplicate`` at once: if that first batch then dies (window closed,
attempts exhausted), the content is in ``relay.callbacks.dead`` with it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final, Literal

from redis.asyncio import Redis

from hybrid_common.redis_keys import RedisKeys

Outcome = str  # "forwarded" | "duplicate" | "dead:<reason>"
DEAD_REASONS: Final = ("window_closed", "attempts_exhausted", "rejected")

# KEYS: batch, seen. ARGV: batch_id, ttl_s, dedupe(1|0).
_CLAIM = """
local done = redis.call('GET', KEYS[1])
if done then return {'done', done} end
if ARGV[3] ~= '1' then return {'go', ''} end
local seen = redis.call('GET', KEYS[2])
if seen then
  local owner = string.sub(seen, 3)
  if owner ~= ARGV[1] then return {'dup', owner} end
end
redis.call('SET', KEYS[2], 'c|' .. ARGV[1], 'EX', ARGV[2])
return {'go', ''}
"""

# KEYS: batch, seen, stats. ARGV: batch_id, outcome, ttl_s, stats prefix, items, dedupe(1|0), reached(1|0).
_FINISH = """
if not redis.call('SET', KEYS[1], ARGV[2], 'NX', 'EX', ARGV[3]) then
  return redis.call('GET', KEYS[1])
end
if ARGV[6] == '1' then
  if ARGV[7] == '1' then
    redis.call('SET', KEYS[2], 'f|' .. ARGV[1], 'EX', ARGV[3])
  elseif redis.call('GET', KEYS[2]) == 'c|' .. ARGV[1] then
    redis.call('DEL', KEYS[2])
  end
end
local p = ARGV[4]
redis.call('HINCRBY', KEYS[3], p .. ':accepted', 1)
redis.call('HINCRBY', KEYS[3], p .. ':accepted_items', ARGV[5])
redis.call('HINCRBY', KEYS[3], p .. ':' .. ARGV[2], 1)
if ARGV[2] == 'forwarded' then
  redis.call('HINCRBY', KEYS[3], p .. ':forwarded_items', ARGV[5])
end
return false
"""


@dataclass(frozen=True, slots=True)
class Claim:
    state: Literal["go", "done", "dup"]
    other: str  # "done": the recorded outcome; "dup": the batch that carried this content first


class RelayLedger:
    def __init__(self, redis: Redis, keys: RedisKeys, *, ttl_s: int, dedupe: bool = True) -> None:
        self.redis = redis
        self.keys = keys
        self.ttl_s = ttl_s
        self.dedupe = dedupe
        self._claim = redis.register_script(_CLAIM)
        self._finish = redis.register_script(_FINISH)

    async def claim(self, batch_id: str, digest: str) -> Claim:
        state, other = await self._claim(
            keys=[self.keys.relay_batch(batch_id), self.keys.relay_seen(digest)],
            args=[batch_id, self.ttl_s, "1" if self.dedupe else "0"],
        )
        return Claim(_s(state), _s(other))  # type: ignore[arg-type]

    async def finish(
        self, batch_id: str, digest: str, outcome: Outcome, *, block_height: int, node_id: int, items: int
    ) -> Outcome | None:
        """Record ``outcome``; None when newly recorded, else the outcome recorded before (a redelivery)."""
        reached = outcome == "forwarded" or outcome == "dead:rejected"  # the dapi has seen this content
        previous = await self._finish(
            keys=[self.keys.relay_batch(batch_id), self.keys.relay_seen(digest), self.keys.relay_stats()],
            args=[
                batch_id,
                outcome,
                self.ttl_s,
                f"{block_height}:{node_id}",
                items,
                "1" if self.dedupe else "0",
                "1" if reached else "0",
            ],
        )
        return None if previous is None else _s(previous)


def _s(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


async def read_stats(redis: Redis, keys: RedisKeys, epoch_of: dict[int, int] | None = None) -> dict[str, Any]:
    """``relay:stats`` as the status shows it: per PoC (start height, epoch when known) and node, plus totals."""
    raw: dict[Any, Any] = await redis.hgetall(keys.relay_stats())
    per_poc: dict[int, dict[str, Any]] = {}
    totals: dict[str, int] = {}
    for field, value in raw.items():
        height_s, node_s, counter = field.decode().split(":", 2)
        height, n = int(height_s), int(value)
        poc = per_poc.setdefault(
            height, {"poc_start": height, "epoch_index": (epoch_of or {}).get(height), "nodes": {}, "totals": {}}
        )
        poc["nodes"].setdefault(node_s, {})[counter] = n
        poc["totals"][counter] = poc["totals"].get(counter, 0) + n
        totals[counter] = totals.get(counter, 0) + n
    return {"pocs": [per_poc[h] for h in sorted(per_poc)], "totals": totals}
