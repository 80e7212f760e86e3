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

# Many batches per call (one round trip for everything the forwarder took in one go). The batch id is read from the end
# of its key and each reply is one string, a line per batch: at thousands of batches a second the Python client's
# encoding of every argument and parsing of every reply element were a fifth of the relay's CPU (issue #11).
# KEYS: batch_i, seen_i. ARGV: ttl_s, dedupe(1|0), length of the batch keys' prefix.
# Reply, per batch: 'go' | 'done' .. the recorded outcome | 'dup' .. the batch that carried the content first.
_CLAIM = """
local out = {}
local skip = tonumber(ARGV[3])
for i = 1, #KEYS / 2 do
  local bkey, skey = KEYS[2 * i - 1], KEYS[2 * i]
  local id = string.sub(bkey, skip + 1)
  local state = 'go'
  local done = redis.call('GET', bkey)
  if done then
    state = 'done' .. done
  elseif ARGV[2] == '1' then
    local seen = redis.call('GET', skey)
    if seen and string.sub(seen, 3) ~= id then
      state = 'dup' .. string.sub(seen, 3)
    else
      redis.call('SET', skey, 'c|' .. id, 'EX', ARGV[1])
    end
  end
  out[i] = state
end
return table.concat(out, '\\n')
"""

# KEYS: stats, then batch_i, seen_i. ARGV: ttl_s, dedupe(1|0), length of the batch keys' prefix, then per batch
# '<outcome> <stats prefix> <items> <reached 1|0>'. Reply, a line per batch: '' when newly recorded, else the outcome
# recorded before (a redelivery).
_FINISH = """
local out = {}
local stats, ttl, skip = KEYS[1], ARGV[1], tonumber(ARGV[3])
for i = 1, (#KEYS - 1) / 2 do
  local bkey, skey = KEYS[2 * i], KEYS[2 * i + 1]
  local id = string.sub(bkey, skip + 1)
  local outcome, p, items, reached = string.match(ARGV[3 + i], '^(%S+) (%S+) (%d+) ([01])$')
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
return table.concat(out, '\\n')
"""

_CLAIM_STATES: Final = ("done", "dup", "go")


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
        # Key prefixes, so a batch's keys are one concatenation each; the scripts read the batch id after the prefix.
        self._batch_prefix = keys.relay_batch("")
        self._seen_prefix = keys.relay_seen("")
        self._skip = str(len(self._batch_prefix.encode()))
        self._dedupe = "1" if dedupe else "0"

    async def claim_many(self, batches: list[tuple[str, str]]) -> list[Claim]:
        """Claim the content of each (batch_id, digest), in order (a later copy of one content sees the earlier)."""
        batch, seen = self._batch_prefix, self._seen_prefix
        keys: list[str] = []
        for batch_id, digest in batches:
            keys += (batch + batch_id, seen + digest)
        reply = await self._claim(keys=keys, args=[self.ttl_s, self._dedupe, self._skip])
        claims = []
        for line in _s(reply).split("\n"):
            state = next(s for s in _CLAIM_STATES if line.startswith(s))
            claims.append(Claim(state, line[len(state) :]))  # type: ignore[arg-type]
        return claims

    async def claim(self, batch_id: str, digest: str) -> Claim:
        return (await self.claim_many([(batch_id, digest)]))[0]

    async def finish_many(self, settled: list[Settlement]) -> list[Outcome | None]:
        """Record each outcome; per batch None when newly recorded, else the outcome recorded before."""
        batch, seen = self._batch_prefix, self._seen_prefix
        keys = [self.keys.relay_stats()]
        args: list[Any] = [self.ttl_s, self._dedupe, self._skip]
        for s in settled:
            keys += (batch + s.batch_id, seen + s.digest)
            reached = s.outcome == "forwarded" or s.outcome == "dead:rejected"  # the dapi has seen this content
            args.append(f"{s.outcome} {s.block_height}:{s.node_id} {s.items} {'1' if reached else '0'}")
        reply = await self._finish(keys=keys, args=args)
        return [line or None for line in _s(reply).split("\n")]

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
