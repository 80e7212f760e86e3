"""Accounting and deduplication in Redis: every accepted batch ends in exactly one outcome.

Keys (hybrid_common.redis_keys): ``relay:seen:{digest}`` remembers which batch carried a content (``c|<batch>`` while
it is being forwarded, ``f|<batch>`` once the dapi took it); ``relay:batch:{batch_id}`` records the batch's outcome
(``forwarded``, ``duplicate``, ``dead:<reason>``) so a redelivered message is never counted twice; ``relay:stats`` holds
the counters per PoC (its start height) and node. Each step is one Lua script: atomic, one round trip for
all the batches handled together.

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

# Many batches per call (one round trip for everything the forwarder took in one go); per batch, in order:
# KEYS: batch_i, seen_i. ARGV: ttl_s, dedupe(1|0), batch_id_i... Returns state_i, other_i pairs.
_CLAIM = """
local out = {}
for i = 1, #KEYS / 2 do
  local bkey, skey, id = KEYS[2 * i - 1], KEYS[2 * i], ARGV[i + 2]
  local state, other = 'go', ''
  local done = redis.call('GET', bkey)
  if done then
    state, other = 'done', done
  elseif ARGV[2] == '1' then
    local seen = redis.call('GET', skey)
    if seen and string.sub(seen, 3) ~= id then
      state, other = 'dup', string.sub(seen, 3)
    else
      redis.call('SET', skey, 'c|' .. id, 'EX', ARGV[1])
    end
  end
  out[2 * i - 1], out[2 * i] = state, other
end
return out
"""

# KEYS: stats, then batch_i, seen_i. ARGV: ttl_s, dedupe(1|0), then per batch: batch_id, outcome, stats prefix,
# items, reached(1|0). Returns per batch '' when newly recorded, else the outcome recorded before (a redelivery).
_FINISH = """
local out = {}
local stats, ttl = KEYS[1], ARGV[1]
for i = 1, (#KEYS - 1) / 2 do
  local bkey, skey = KEYS[2 * i], KEYS[2 * i + 1]
  local a = 2 + 5 * (i - 1)
  local id, outcome, p, items, reached = ARGV[a + 1], ARGV[a + 2], ARGV[a + 3], ARGV[a + 4], ARGV[a + 5]
  if not redis.call('SET', bkey, outcome, 'NX', 'EX', ttl) then
    out[i] = redis.call('GET', bkey) or outcome
  else
    if ARGV[2] == '1' then
      if reached == '1' then
        redis.call('SET', skey, 'f|' .. id, 'EX', ttl)
      elseif redis.call('GET', skey) == 'c|' .. id then
        redis.call('DEL', skey)
      end
    end
    redis.call('HINCRBY', stats, p .. ':accepted', 1)
    redis.call('HINCRBY', stats, p .. ':accepted_items', items)
    redis.call('HINCRBY', stats, p .. ':' .. outcome, 1)
    if outcome == 'forwarded' then
      redis.call('HINCRBY', stats, p .. ':forwarded_items', items)
    end
    out[i] = ''
  end
end
return out
"""


@dataclass(frozen=True, slots=True)
class Claim:
    state: Literal["go", "done", "dup"]
    other: str  # "done": the recorded outcome; "dup": the batch that carried this content first


@dataclass(frozen=True, slots=True)
class Settlement:
    """One batch's outcome, as the forwarder hands it to :meth:`RelayLedger.finish_many`."""

    batch_id: str
    digest: str
    outcome: Outcome
    block_height: int
    node_id: int
    items: int


class RelayLedger:
    def __init__(self, redis: Redis, keys: RedisKeys, *, ttl_s: int, dedupe: bool = True) -> None:
        self.redis = redis
        self.keys = keys
        self.ttl_s = ttl_s
        self.dedupe = dedupe
        self._claim = redis.register_script(_CLAIM)
        self._finish = redis.register_script(_FINISH)

    async def claim_many(self, batches: list[tuple[str, str]]) -> list[Claim]:
        """Claim the content of each (batch_id, digest), in order (a later copy of one content sees the earlier)."""
        keys: list[str] = []
        for batch_id, digest in batches:
            keys += (self.keys.relay_batch(batch_id), self.keys.relay_seen(digest))
        args: list[Any] = [self.ttl_s, "1" if self.dedupe else "0", *(b for b, _ in batches)]
        flat = await self._claim(keys=keys, args=args)
        return [Claim(_s(flat[i]), _s(flat[i + 1])) for i in range(0, len(flat), 2)]  # type: ignore[arg-type]

    async def claim(self, batch_id: str, digest: str) -> Claim:
        return (await self.claim_many([(batch_id, digest)]))[0]

    async def finish_many(self, settled: list[Settlement]) -> list[Outcome | None]:
        """Record each outcome; per batch None when newly recorded, else the outcome recorded before."""
        keys = [self.keys.relay_stats()]
        args: list[Any] = [self.ttl_s, "1" if self.dedupe else "0"]
        for s in settled:
            keys += (self.keys.relay_batch(s.batch_id), self.keys.relay_seen(s.digest))
            reached = s.outcome == "forwarded" or s.outcome == "dead:rejected"  # the dapi has seen this content
            args += (s.batch_id, s.outcome, f"{s.block_height}:{s.node_id}", s.items, "1" if reached else "0")
        previous = await self._finish(keys=keys, args=args)
        return [_s(p) or None for p in previous]

    async def finish(
        self, batch_id: str, digest: str, outcome: Outcome, *, block_height: int, node_id: int, items: int
    ) -> Outcome | None:
        """Record ``outcome``; None when newly recorded, else the outcome recorded before (a redelivery)."""
        settled = Settlement(batch_id, digest, outcome, block_height, node_id, items)
        return (await self.finish_many([settled]))[0]


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
