"""Job records, slot records and gateway ports in Redis (keys from ``hybrid_common.redis_keys``; writer: us).

- ``jobs``: hash job_id → :class:`Job` JSON. Written only by the holder of the job's lease (``lease:job:<id>``):
  a compare-and-write script refuses a replica that lost its lease, so a paused replica cannot overwrite the
  state its successor drives.
- ``slot:<slot_id>``: hash — ``job`` (the one live job allowed to rent for the slot), ``instance``, ``state``,
  ``release`` / ``start`` (requests from commands, read by the job's driver), ``seq:<epoch>`` (label counter).
- ``gateway:ports``: hash slot_id → "poc_port,inference_port" from ``GATEWAY_PORT_FIRST..LAST``. A slot keeps its
  pair for as long as a job holds the slot or the dapi still has the slot's node (a replaced GPU is upserted under
  the same id, host and ports: gonka-protocol.md §3, an upsert keeps ``node_num``; and the dapi refuses two nodes on
  one host+port, so a *disabled* node keeps its pair too). When the slot's last job ends with the node deleted or
  never registered, the pair goes back to the pool in the same script that drops the claim; the proxy's node front
  closes its listeners when the entry disappears. Every epoch makes new slot ids: without this a fixed range runs
  out within a few epochs. Allocation and freeing are Lua scripts, so replicas never hand one pair out twice.
- ``offer:claim:<offer_id>``: the job about to create on that offer (TTL): two jobs never send a create for one
  offer at once — the second would only get a 410 (vastai-api.md) — so the others take the next offer.
- ``idempotency:<key>``: a provision or release already applied.
"""

from __future__ import annotations

import contextlib
import hashlib
import time
from typing import Any

import orjson
from redis.asyncio import Redis

from hybrid_common.redis_keys import RedisKeys
from hybrid_provisioner.jobs.model import Job, ReleaseRequest

IDEMPOTENCY_TTL = 7 * 24 * 3600
TERMINAL_KEEP = 24 * 3600

_FENCED_SAVE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('HSET', KEYS[2], ARGV[2], ARGV[3])
  return 1
end
return 0
"""

_CLAIM_SLOT = """
local cur = redis.call('HGET', KEYS[1], 'job')
if (not cur) or cur == ARGV[1] or cur == ARGV[2] then
  redis.call('HSET', KEYS[1], 'job', ARGV[1])
  return 1
end
return 0
"""

# A slot's pair is free once no job claims the slot and the dapi has no node on it (node field: "registered" after an
# upsert, "disabled" after an admin disable, "" after a delete or before any registration).
_PAIR_IDLE = """
local function pair_idle(slot_key)
  if redis.call('HGET', slot_key, 'job') then return false end
  local node = redis.call('HGET', slot_key, 'node')
  return node ~= 'registered' and node ~= 'disabled'
end
"""

# KEYS: slot:<id>, gateway:ports; ARGV: job_id, state, slot_id. Drops the job's claim, then frees the slot's gateway
# pair if nobody else holds the slot (a job of the next epoch may already wait for it: then the pair stays with it).
_RELEASE_SLOT = (
    _PAIR_IDLE
    + """
local released = 0
if redis.call('HGET', KEYS[1], 'job') == ARGV[1] then
  redis.call('HDEL', KEYS[1], 'job', 'instance')
  redis.call('HSET', KEYS[1], 'state', ARGV[2])
  released = 1
end
if pair_idle(KEYS[1]) then redis.call('HDEL', KEYS[2], ARGV[3]) end
return released
"""
)

# KEYS: slot:<id>, gateway:ports; ARGV: slot_id, the pair the caller saw (or ''). Frees an idle slot's pair.
_FREE_PAIR = (
    _PAIR_IDLE
    + """
local cur = redis.call('HGET', KEYS[2], ARGV[1])
if not cur then return 0 end
if ARGV[2] ~= '' and cur ~= ARGV[2] then return 0 end
if not pair_idle(KEYS[1]) then return 0 end
redis.call('HDEL', KEYS[2], ARGV[1])
return 1
"""
)

_ALLOCATE_PAIR = """
local cur = redis.call('HGET', KEYS[1], ARGV[1])
if cur then return cur end
local used = {}
for _, v in ipairs(redis.call('HVALS', KEYS[1])) do
  for p in string.gmatch(v, '%d+') do used[tonumber(p)] = true end
end
local p = tonumber(ARGV[2])
local last = tonumber(ARGV[3])
while p + 1 <= last do
  if not used[p] and not used[p + 1] then
    local val = p .. ',' .. (p + 1)
    redis.call('HSET', KEYS[1], ARGV[1], val)
    return val
  end
  p = p + 2
end
return false
"""


# KEYS: offer:claim:<id>; ARGV: job_id, ttl ms. Take a free claim or renew our own; 0 when another job holds it.
_CLAIM_OFFER = """
local cur = redis.call('GET', KEYS[1])
if (not cur) or cur == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
end
return 0
"""

# KEYS: offer:claim:<id>; ARGV: job_id. Drop the claim only if it is still ours.
_DROP_OFFER_CLAIM = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _pair(raw: bytes | str) -> tuple[int, int]:
    poc, inference = (int(p) for p in _text(raw).split(","))
    return poc, inference


def job_id_for(idempotency_key: str, slot_id: str) -> str:
    """Deterministic: a redelivered or re-sent provision maps to the same job ids (idempotent by construction)."""
    digest = hashlib.sha256(f"{idempotency_key}\x00{slot_id}".encode()).hexdigest()[:12]
    return f"{slot_id}.{digest}"


def lease_role(job_id: str) -> str:
    return f"job:{job_id}"


class JobStore:
    def __init__(self, redis: Redis, keys: RedisKeys) -> None:
        self.redis = redis
        self.keys = keys

    # ---- jobs

    async def create(self, jobs: list[Job], idempotency_key: str) -> list[Job]:
        """Record jobs that do not exist yet (HSETNX) and the idempotency key, in one transaction."""
        async with self.redis.pipeline(transaction=True) as pipe:
            for job in jobs:
                pipe.hsetnx(self.keys.jobs(), job.job_id, job.model_dump_json())
            pipe.set(self.keys.idempotency(idempotency_key), b"provision", ex=IDEMPOTENCY_TTL)
            results = await pipe.execute()
        return [job for job, created in zip(jobs, results[: len(jobs)], strict=True) if created]

    async def seen(self, idempotency_key: str) -> bool:
        return bool(await self.redis.exists(self.keys.idempotency(idempotency_key)))

    async def mark_seen(self, idempotency_key: str, what: str) -> None:
        await self.redis.set(self.keys.idempotency(idempotency_key), what.encode(), ex=IDEMPOTENCY_TTL)

    async def load(self, job_id: str) -> Job | None:
        raw = await self.redis.hget(self.keys.jobs(), job_id)
        return Job.model_validate_json(raw) if raw else None

    async def all(self) -> list[Job]:
        raw = await self.redis.hgetall(self.keys.jobs())
        out = []
        for value in raw.values():
            try:
                out.append(Job.model_validate_json(value))
            except ValueError:
                continue
        return out

    async def save(self, job: Job, holder: str) -> bool:
        """Write ``job`` if ``holder`` still holds its lease (fenced); False when the lease is lost."""
        ok = await self.redis.eval(
            _FENCED_SAVE,
            2,
            self.keys.lease(lease_role(job.job_id)),
            self.keys.jobs(),
            holder,
            job.job_id,
            job.model_dump_json(),
        )
        return bool(ok)

    async def forget_old(self, now: float | None = None) -> int:
        """Drop terminal jobs older than a day ("until job ends + 1 day") and their fence counters."""
        at = now or time.time()
        gone = [j for j in await self.all() if j.terminal and j.ended_at and at - j.ended_at > TERMINAL_KEEP]
        if gone:
            await self.redis.hdel(self.keys.jobs(), *[j.job_id for j in gone])
            await self.redis.delete(*[self.keys.fence(lease_role(j.job_id)) for j in gone])
        return len(gone)

    # ---- slots

    async def claim_slot(self, slot_id: str, job_id: str, stale_job: str | None = None) -> bool:
        """Make ``job_id`` the one job renting for ``slot_id`` (taking over ``stale_job``'s claim if given)."""
        ok = await self.redis.eval(_CLAIM_SLOT, 1, self.keys.slot(slot_id), job_id, stale_job or job_id)
        return bool(ok)

    async def slot_owner(self, slot_id: str) -> str | None:
        raw = await self.redis.hget(self.keys.slot(slot_id), "job")
        return raw.decode() if isinstance(raw, bytes) else raw

    async def free_slot(self, slot_id: str, job_id: str, state: str) -> None:
        """The job ends: drop its claim on the slot and, if the slot is now idle, return its gateway pair."""
        await self.redis.eval(
            _RELEASE_SLOT, 2, self.keys.slot(slot_id), self.keys.gateway_ports(), job_id, state, slot_id
        )

    async def set_slot(self, slot_id: str, **fields: Any) -> None:
        mapping: dict[str | bytes, str | bytes] = {
            k: (v if isinstance(v, (str, bytes)) else orjson.dumps(v)) for k, v in fields.items()
        }
        await self.redis.hset(self.keys.slot(slot_id), mapping=mapping)  # type: ignore[arg-type]

    async def slot(self, slot_id: str) -> dict[str, str]:
        raw = await self.redis.hgetall(self.keys.slot(slot_id))
        return {_text(k): _text(v) for k, v in raw.items()}

    async def next_label_seq(self, slot_id: str, epoch: str) -> int:
        return int(await self.redis.hincrby(self.keys.slot(slot_id), f"seq:{epoch}", 1))

    async def request_release(self, slot_id: str, request: ReleaseRequest) -> None:
        await self.redis.hset(self.keys.slot(slot_id), "release", request.model_dump_json())

    async def release_request(self, slot_id: str) -> ReleaseRequest | None:
        raw = await self.redis.hget(self.keys.slot(slot_id), "release")
        return ReleaseRequest.model_validate_json(raw) if raw else None

    async def request_start(self, slot_id: str, at: float) -> None:
        await self.redis.hset(self.keys.slot(slot_id), "start", str(at))

    async def start_request(self, slot_id: str) -> float | None:
        raw = await self.redis.hget(self.keys.slot(slot_id), "start")
        return float(raw) if raw else None

    # ---- offer claims

    async def claim_offer(self, offer_id: int, job_id: str, ttl: float) -> bool:
        """``job_id`` may create on ``offer_id`` for the next ``ttl`` seconds (renewed if it already held it)."""
        ok = await self.redis.eval(_CLAIM_OFFER, 1, self.keys.offer_claim(offer_id), job_id, int(ttl * 1000))
        return bool(ok)

    async def drop_offer_claim(self, offer_id: int, job_id: str) -> None:
        await self.redis.eval(_DROP_OFFER_CLAIM, 1, self.keys.offer_claim(offer_id), job_id)

    # ---- gateway ports

    async def gateway_ports(self, slot_id: str, first: int, last: int) -> tuple[int, int] | None:
        """The slot's gateway port pair: the one it holds, else the lowest free pair of ``first..last`` (None: none)."""
        raw = await self.redis.eval(_ALLOCATE_PAIR, 1, self.keys.gateway_ports(), slot_id, first, last)
        if not raw:
            return None
        return _pair(raw)

    async def gateway_table(self) -> dict[str, tuple[int, int]]:
        table: dict[str, tuple[int, int]] = {}
        for slot, raw in (await self.redis.hgetall(self.keys.gateway_ports())).items():
            with contextlib.suppress(ValueError):
                table[_text(slot)] = _pair(raw)
        return table

    async def free_gateway_ports(self, slot_id: str, seen: tuple[int, int] | None = None) -> bool:
        """Return ``slot_id``'s pair to the pool if no job holds the slot and the dapi has no node on it (its node
        field says so); with ``seen``, only if the slot still holds that pair. True when freed."""
        expected = f"{seen[0]},{seen[1]}" if seen else ""
        ok = await self.redis.eval(_FREE_PAIR, 2, self.keys.slot(slot_id), self.keys.gateway_ports(), slot_id, expected)
        return bool(ok)

    async def sweep_gateway_ports(self, in_use: set[int]) -> list[str]:
        """Free the pairs of idle slots whose ports no dapi node uses (``in_use``): pairs left by a crash between two
        writes or by an older version that never freed them. Returns the slots freed."""
        freed = []
        for slot_id, pair in (await self.gateway_table()).items():
            if in_use.intersection(pair):
                continue
            if await self.free_gateway_ports(slot_id, pair):
                freed.append(slot_id)
        return freed

    # ---- instance views (CLI status)

    async def put_instance(self, instance_id: int, view: dict[str, Any]) -> None:
        await self.redis.hset(self.keys.instances(), str(instance_id), orjson.dumps(view))

    async def instance_views(self) -> dict[int, dict[str, Any]]:
        raw = await self.redis.hgetall(self.keys.instances())
        return {int(k): orjson.loads(v) for k, v in raw.items()}

    async def drop_instance_views(self, ids: list[int]) -> None:
        if ids:
            await self.redis.hdel(self.keys.instances(), *[str(i) for i in ids])
