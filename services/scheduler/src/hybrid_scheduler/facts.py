"""The provisioner's events, recorded on the campaigns they concern (queue ``scheduler.boots``).

Any replica may take a delivery: it only records facts (registered, failed, created, cost) on the campaign record,
in a Redis transaction, and the leader's next tick acts on them. A registration is also a boot sample: the time from
the scheduler's own start (or rent) command to the node being registered is what the next lead is built from.
"""

from __future__ import annotations

import logging
import time

import orjson
from redis.asyncio import Redis

from hybrid_common.bus import Delivery
from hybrid_common.messages.events import (
    BudgetBlocked,
    InstanceCreated,
    InstanceDestroyed,
    InstanceFailed,
    InstanceReady,
    InstanceRunning,
    JobAccepted,
    JobFailed,
    NodeRegistered,
)
from hybrid_common.redis_keys import RedisKeys
from hybrid_scheduler import telemetry
from hybrid_scheduler.book import Campaign, CandidateRecord, EpochBook, boot_sample, campaign_of
from hybrid_scheduler.boots import BootSample
from hybrid_scheduler.policy import CandidateState

log = logging.getLogger("hybrid.scheduler.facts")

_BOOTING = frozenset({CandidateState.PULLING, CandidateState.STOPPED, CandidateState.STARTING})
_PULLING = frozenset({CandidateState.PULLING, CandidateState.STOPPED})


class ProvisionerFacts:
    def __init__(self, redis: Redis, keys: RedisKeys, book: EpochBook) -> None:
        self.redis = redis
        self.keys = keys
        self.book = book

    async def _height(self) -> int | None:
        raw = await self.redis.get(self.keys.chain_view())
        if not raw:
            return None
        try:
            value = orjson.loads(raw)["view"]["block_height"]
        except (orjson.JSONDecodeError, KeyError, TypeError):
            return None
        return value if isinstance(value, int) else None

    async def handle(self, d: Delivery) -> None:
        p = d.payload
        slot_id = getattr(p, "slot_id", None)
        if isinstance(p, BudgetBlocked):
            await self._budget(p)
            return
        if not isinstance(slot_id, str):
            return
        key = campaign_of(slot_id)
        if key is None:
            return
        now = time.time()
        height = await self._height() if isinstance(p, NodeRegistered) else None
        samples: list[BootSample] = []

        def change(c: Campaign) -> None:
            r = c.candidates.get(slot_id)
            if r is None:
                return
            self._apply(c, r, p, now, height, samples)

        result = await self.book.update(key, change, boots=samples)
        for s in samples:
            if not s.censored:
                telemetry.BOOTS.labels(s.kind).observe(s.seconds)
        if result is None:
            log.debug("%s for %s: not one of ours", d.envelope.type, slot_id)

    @staticmethod
    def _apply(
        c: Campaign, r: CandidateRecord, p: object, now: float, height: int | None, samples: list[BootSample]
    ) -> None:
        if isinstance(p, JobAccepted):
            r.job_id = p.job_id
        elif isinstance(p, InstanceCreated):
            r.instance_id, r.gpu_name = p.instance_id, p.gpu_name
            if p.stopped and r.state is CandidateState.PULLING:
                r.state = CandidateState.STOPPED
        elif isinstance(p, InstanceRunning):
            r.instance_id = p.instance_id
        elif isinstance(p, InstanceReady):
            r.instance_id, r.gpu_name = p.instance_id, p.gpu_name
            r.provisioner_boot_seconds = p.boot_seconds
        elif isinstance(p, NodeRegistered):
            r.registered_height = height
            before = p.before_deadline and (c.deadline_at is None or now <= c.deadline_at)
            r.registered_before_deadline = before
            if r.state in _BOOTING:
                r.state, r.ready_at = CandidateState.READY, now
                sample = boot_sample(c, r, now, censored=False)
                if sample is not None:
                    samples.append(sample)
                c.note(f"{r.slot_id} registered at height {height} ({'before' if before else 'AFTER'} the deadline)")
            elif r.state is not CandidateState.READY:
                # a dropped or failed candidate registered anyway: the release already on its way takes it out
                c.note(f"{r.slot_id} registered while {r.state.value}: its release is pending")
        elif isinstance(p, InstanceFailed) and p.will_retry and r.state in _PULLING:
            # A pre-pull that failed is retried by the provisioner on another machine: still a standby in the making.
            r.state = CandidateState.PULLING
            c.note(f"{r.slot_id} pre-pull failed ({p.cause.value}); the provisioner retries it")
        elif isinstance(p, InstanceFailed | JobFailed):
            cause = p.cause.value
            if r.state in _BOOTING:
                if r.state is CandidateState.STARTING:
                    sample = boot_sample(c, r, now, censored=True)
                    if sample is not None:
                        samples.append(sample)
                r.state, r.ended_at, r.failure = CandidateState.FAILED, now, f"{cause}: {p.message[:300]}"
                c.note(f"{r.slot_id} failed: {cause}")
                retrying = isinstance(p, InstanceFailed) and p.will_retry
                if retrying and r.provisioned and not r.release_sent and "release" not in r.pending:
                    # our policy replaces it with the next candidate: stop the provisioner's own retry
                    r.pending.append("release")
            elif r.state is CandidateState.READY:
                c.note(f"{r.slot_id} (registered) reported {cause}: {p.message[:200]}")
        elif isinstance(p, InstanceDestroyed):
            r.gpu_seconds += p.gpu_seconds
            r.storage_seconds += p.storage_seconds
            r.cost_usd += p.cost_usd

    async def _budget(self, p: BudgetBlocked) -> None:
        """A budget cap stopped a rental: the candidate is failed (the policy moves on, and reports it)."""
        if p.job_id is None:
            return
        for key, campaign in (await self.book.all()).items():
            match = next((r for r in campaign.candidates.values() if r.job_id == p.job_id), None)
            if match is None:
                continue
            slot_id = match.slot_id

            def change(c: Campaign, slot_id: str = slot_id) -> None:
                r = c.candidates[slot_id]
                if r.state in _BOOTING:
                    r.state, r.ended_at = CandidateState.FAILED, time.time()
                r.failure = f"budget ({p.scope}): cap ${p.cap_usd:.2f}, spent ${p.spent_usd:.2f}"
                c.note(f"{slot_id}: blocked by the {p.scope} budget")

            await self.book.update(key, change)
            return
