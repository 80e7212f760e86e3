"""Money: a cost ledger per instance, spend per UTC day and per epoch, and the budget caps.

vastai-api.md "Billing": storage bills from creation, the GPU from ``running``, until destroyed. The ledger uses the
same rule with billed time = wall time × the billing acceleration (1 live; the profile's acceleration in the
simulated world, whose invoices run on world time). Totals are final once the instance is destroyed; a live
instance's cost so far is computed from its view.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson
from redis.asyncio import Redis

from hybrid_common.redis_keys import RedisKeys
from hybrid_provisioner.jobs.model import Job, Track

DAY_TTL = 2 * 24 * 3600
EPOCH_TTL = 7 * 24 * 3600

# One Redis script finalises an instance once: the view flips to destroyed and the spend counters move together,
# so a replica that repeats a destroy after a takeover never counts it twice.
_FINALISE = """
local cur = redis.call('HGET', KEYS[1], ARGV[1])
if cur and string.find(cur, '"state":"destroyed"', 1, true) then return 0 end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('INCRBYFLOAT', KEYS[2], ARGV[3])
redis.call('EXPIRE', KEYS[2], ARGV[6])
if KEYS[3] ~= '' then
  redis.call('HINCRBYFLOAT', KEYS[3], 'usd', ARGV[3])
  redis.call('HINCRBYFLOAT', KEYS[3], 'gpu_seconds', ARGV[4])
  redis.call('HINCRBYFLOAT', KEYS[3], 'storage_seconds', ARGV[5])
  redis.call('HINCRBY', KEYS[3], 'instances', 1)
  redis.call('EXPIRE', KEYS[3], ARGV[7])
end
return 1
"""


def utc_day(ts: float | None = None) -> str:
    return datetime.fromtimestamp(ts if ts is not None else time.time(), UTC).strftime("%Y-%m-%d")


@dataclass(frozen=True)
class Cost:
    gpu_seconds: float  # billed
    storage_seconds: float  # billed
    usd: float


def track_cost(track: Track, acceleration: float, now: float | None = None) -> Cost:
    at = now if now is not None else time.time()
    end = track.destroyed_at or at
    storage = max(0.0, end - (track.created_at or end)) * acceleration
    gpu = max(0.0, end - track.running_at) * acceleration if track.running_at else 0.0
    storage_dph = min(track.storage_dph, track.dph_total)
    usd = storage / 3600.0 * storage_dph + gpu / 3600.0 * (track.dph_total - storage_dph)
    return Cost(gpu_seconds=gpu, storage_seconds=storage, usd=usd)


def instance_view(job: Job, track: Track, acceleration: float, state: str | None = None) -> dict[str, Any]:
    cost = track_cost(track, acceleration)
    return {
        "instance_id": track.instance_id,
        "slot_id": job.slot_id,
        "job_id": job.job_id,
        "epoch_index": job.epoch_index,
        "label": track.label,
        "state": state or track.state.value,
        "hedge": track.hedge,
        "machine_id": track.machine_id,
        "gpu_name": track.gpu_name,
        "num_gpus": track.num_gpus,
        "dph_total": track.dph_total,
        "storage_dph": track.storage_dph,
        "created_at": track.created_at,
        "running_at": track.running_at,
        "destroyed_at": track.destroyed_at,
        "route": {
            "connectivity": track.connectivity,
            "public_ip": track.public_ip,
            "ports": {str(k): v for k, v in track.ports.items()},
            "ssh_host": track.ssh_host,
            "ssh_port": track.ssh_port,
        },
        "gpu_seconds": round(cost.gpu_seconds, 3),
        "storage_seconds": round(cost.storage_seconds, 3),
        "cost_usd": round(cost.usd, 6),
        "acceleration": acceleration,
    }


class Ledger:
    def __init__(self, redis: Redis, keys: RedisKeys, acceleration: float) -> None:
        self.redis = redis
        self.keys = keys
        self.acceleration = acceleration

    async def record(self, job: Job, track: Track) -> None:
        if track.instance_id is not None:
            await self.redis.hset(
                self.keys.instances(),
                str(track.instance_id),
                orjson.dumps(instance_view(job, track, self.acceleration)),
            )

    async def finalise(self, job: Job, track: Track) -> Cost:
        """The destroyed instance's final cost, added to the day's and the epoch's spend exactly once."""
        cost = track_cost(track, self.acceleration)
        if track.instance_id is not None:
            view = instance_view(job, track, self.acceleration, state="destroyed")
            await self._book(track.instance_id, view, job.epoch_index, track.created_at, cost)
        return cost

    async def close_view(
        self, instance_id: int, view: dict[str, Any], usd: float, gpu: float, storage: float, now: float
    ) -> None:
        """Book an instance destroyed outside its job (the reconciler's orphans)."""
        closed = {**view, "state": "destroyed", "destroyed_at": now, "cost_usd": round(usd, 6)}
        closed.update(gpu_seconds=round(gpu, 3), storage_seconds=round(storage, 3))
        await self._book(instance_id, closed, view.get("epoch_index"), view.get("created_at"), Cost(gpu, storage, usd))

    async def _book(
        self, instance_id: int, view: dict[str, Any], epoch: int | None, created_at: float | None, cost: Cost
    ) -> None:
        await self.redis.eval(
            _FINALISE,
            3,
            self.keys.instances(),
            self.keys.spend_day(utc_day(created_at)),
            self.keys.spend_epoch(epoch) if epoch is not None else "",
            str(instance_id),
            orjson.dumps(view),
            repr(cost.usd),
            repr(cost.gpu_seconds),
            repr(cost.storage_seconds),
            DAY_TTL,
            EPOCH_TTL,
        )

    async def spent_today(self) -> float:
        raw = await self.redis.get(self.keys.spend_day(utc_day()))
        return float(raw) if raw else 0.0

    async def spent_epoch(self, epoch: int) -> float:
        raw = await self.redis.hget(self.keys.spend_epoch(epoch), "usd")
        return float(raw) if raw else 0.0


@dataclass(frozen=True)
class BudgetVerdict:
    scope: str  # day | epoch
    cap_usd: float
    spent_usd: float
    estimated_usd: float


class Budget:
    """The caps ($/day, $/epoch) that block new rentals (a blocked rental is reported as ``budget.blocked``)."""

    def __init__(self, ledger: Ledger, day_cap: float | None, epoch_cap: float | None, hours_after: float) -> None:
        self.ledger = ledger
        self.day_cap = day_cap
        self.epoch_cap = epoch_cap
        self.hours_after = hours_after

    def estimate(self, dph_total: float, deadline: float | None, now: float | None = None) -> float:
        """A rental's expected cost: until its deadline (billed time) plus the hours it is held after it."""
        at = now if now is not None else time.time()
        until = max(0.0, (deadline - at) if deadline else 0.0) * self.ledger.acceleration / 3600.0
        return dph_total * (until + self.hours_after)

    async def check(
        self, dph_total: float, deadline: float | None, epoch: int | None, jobs: list[Job]
    ) -> BudgetVerdict | None:
        """A verdict when renting at ``dph_total`` would pass a cap, counting what is already spent (destroyed
        instances), and for every live rental of the ``jobs`` the larger of its cost so far and its estimate
        (money committed, not only money gone: two rentals checked one after the other cannot both slip under)."""
        if self.day_cap is None and self.epoch_cap is None:
            return None
        estimate = self.estimate(dph_total, deadline)
        now = time.time()
        today = utc_day(now)
        committed_day = 0.0
        committed_epoch = 0.0
        for job in jobs:
            if job.terminal:
                continue
            for t in job.tracks:
                if not t.holds_instance or t.booked:
                    continue
                cost = max(track_cost(t, self.ledger.acceleration, now).usd, t.estimate_usd)
                if utc_day(t.created_at or t.intent_at) == today:
                    committed_day += cost
                if epoch is not None and job.epoch_index == epoch:
                    committed_epoch += cost
        if self.day_cap is not None:
            spent = await self.ledger.spent_today() + committed_day
            if spent + estimate > self.day_cap:
                return BudgetVerdict("day", self.day_cap, round(spent, 6), round(estimate, 6))
        if self.epoch_cap is not None and epoch is not None:
            spent = await self.ledger.spent_epoch(epoch) + committed_epoch
            if spent + estimate > self.epoch_cap:
                return BudgetVerdict("epoch", self.epoch_cap, round(spent, 6), round(estimate, 6))
        return None
