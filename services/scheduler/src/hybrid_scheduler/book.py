"""The scheduler's durable memory: one *campaign* record per PoC window (and per confirmation-PoC burst or rehearsal)
in the Redis hash ``scheduler:epochs``, and the boot history in ``scheduler:boots``.

A campaign holds its plan and every candidate rental with its state, the commands it still has to send (an outbox:
the record is written before the command is published, and a successor re-sends what is pending — the provisioner
deduplicates by idempotency key), the registration, the release and the cost. The leader writes decisions with its
fencing token: a record carrying a newer token refuses an older leader's write (reliability.md: fence side effects).
Event handlers of any replica record facts (registered, failed, cost) in the same records, with optimistic
transactions (WATCH), so no replica needs the delivery to reach the leader.

Slot ids name their campaign: ``<campaign>-<slot><candidate>``, e.g. ``poc-e12-1a`` (epoch 12, GPU 1, candidate
a); the campaign is everything before the last ``-``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, Literal, TypeVar

import orjson
from pydantic import BaseModel, ConfigDict, Field
from redis.asyncio import Redis
from redis.exceptions import WatchError

from hybrid_common.messages.domain import PocGeneration, PocWindowHeights, Purpose
from hybrid_common.redis_keys import RedisKeys
from hybrid_scheduler.boots import BootHistory, BootKind, BootSample
from hybrid_scheduler.policy import LIVE_STATES, Candidate, CandidateKind, CandidateState

T = TypeVar("T")
BOOTS_KEPT = 200

CampaignState = Literal["planned", "renting", "registered", "missed", "released", "refused", "cancelled"]


class FencedOut(RuntimeError):
    """A newer leader has written this record: the caller is no longer the leader."""


class CandidateRecord(BaseModel):
    model_config = ConfigDict(extra="ignore")

    slot_id: str
    slot: int
    name: str
    kind: CandidateKind
    state: CandidateState = CandidateState.PLANNED
    created_at: float | None = None
    started_at: float | None = None
    ready_at: float | None = None
    ended_at: float | None = None
    slow: bool = False
    job_id: str | None = None
    instance_id: int | None = None
    gpu_name: str | None = None
    registered_height: int | None = None
    registered_before_deadline: bool | None = None
    failure: str | None = None
    pending: list[str] = Field(default_factory=list, description="commands recorded, not yet published")
    provisioned: bool = False
    release_sent: bool = False
    boot_recorded: bool = False
    boot_seconds: float | None = None
    provisioner_boot_seconds: float | None = None
    gpu_seconds: float = 0.0
    storage_seconds: float = 0.0
    cost_usd: float = 0.0

    @property
    def live(self) -> bool:
        return self.state in LIVE_STATES

    def policy_view(self) -> Candidate:
        return Candidate(
            name=self.name,
            kind=self.kind,
            state=self.state,
            created_at=self.created_at,
            started_at=self.started_at,
            ready_at=self.ready_at,
            ended_at=self.ended_at,
            slow=self.slow,
        )


class Campaign(BaseModel):
    """One rental campaign: a PoC window's GPUs, a confirmation-PoC burst, or a rehearsal."""

    model_config = ConfigDict(extra="ignore")

    key: str
    purpose: Purpose
    epoch_index: int | None = None
    generation: PocGeneration | None = None
    profile: str | None = None
    slots: int = 1
    window: PocWindowHeights | None = None
    deadline_at: float | None = None
    release_height: int | None = None
    release_at: float | None = None  # wall time, for campaigns released by time (rehearsal)
    state: CampaignState = "planned"
    plan: dict[str, Any] = Field(default_factory=dict)
    candidates: dict[str, CandidateRecord] = Field(default_factory=dict)
    missed_slots: list[int] = Field(default_factory=list)
    released_at_height: int | None = None
    fence: int = 0
    notes: list[str] = Field(default_factory=list)
    created_at: float = Field(default_factory=time.time)
    updated_at: float = Field(default_factory=time.time)
    # What the chain gave this participant for the epoch (PoC campaigns, recorded by EpochWeights once the epoch's
    # participants are on chain): the participant's weight, the PoC weight of each of our slots, and the height
    # the record was stored at. ``None`` = not known yet.
    weight: float | None = None
    node_weights: dict[str, int] = Field(default_factory=dict)
    weight_height: int | None = None

    def slot_candidates(self, slot: int) -> list[CandidateRecord]:
        return sorted((c for c in self.candidates.values() if c.slot == slot), key=lambda c: (len(c.name), c.name))

    def winners(self) -> dict[int, CandidateRecord]:
        out: dict[int, CandidateRecord] = {}
        for c in self.candidates.values():
            if c.state is CandidateState.READY:
                out.setdefault(c.slot, c)
        return out

    def note(self, text: str) -> None:
        self.notes = [*self.notes[-19:], f"{time.strftime('%H:%M:%S')} {text}"]

    def summary(self) -> dict[str, Any]:
        """What the CLI status shows for this campaign."""
        winners = self.winners()
        return {
            "key": self.key,
            "purpose": self.purpose.value,
            "epoch_index": self.epoch_index,
            "state": self.state,
            "generation": self.generation,
            "profile": self.profile,
            "slots": self.slots,
            "poc_start": self.window.poc_start if self.window else None,
            "release_height": self.release_height,
            "registered": {str(s): c.slot_id for s, c in sorted(winners.items())},
            "registered_before_deadline": all(c.registered_before_deadline for c in winners.values())
            if winners
            else None,
            "missed_slots": self.missed_slots,
            "rentals": sum(1 for c in self.candidates.values() if c.provisioned),
            "gpu_boots": sum(1 for c in self.candidates.values() if c.started_at is not None),
            "released_at_height": self.released_at_height,
            "weight": self.weight,
            "node_weights": self.node_weights,
            "gpu_seconds": round(sum(c.gpu_seconds for c in self.candidates.values()), 3),
            "cost_usd": round(sum(c.cost_usd for c in self.candidates.values()), 6),
            "plan": self.plan,
        }


def campaign_of(slot_id: str) -> str | None:
    head, sep, _ = slot_id.rpartition("-")
    return head if sep and head else None


class EpochBook:
    def __init__(self, redis: Redis, keys: RedisKeys) -> None:
        self.redis = redis
        self.key = keys.scheduler("epochs")
        self.boots_key = keys.scheduler("boots")

    async def get(self, key: str) -> Campaign | None:
        raw = await self.redis.hget(self.key, key)
        return None if raw is None else Campaign.model_validate_json(raw)

    async def all(self) -> dict[str, Campaign]:
        raw = await self.redis.hgetall(self.key)
        out: dict[str, Campaign] = {}
        for k, v in raw.items():
            name = k.decode() if isinstance(k, bytes) else str(k)
            try:
                out[name] = Campaign.model_validate_json(v)
            except ValueError:
                continue
        return out

    async def create(self, campaign: Campaign) -> bool:
        """Record a new campaign unless one with the same key exists (two leaders planning at once: one wins)."""
        return bool(await self.redis.hsetnx(self.key, campaign.key, campaign.model_dump_json()))

    async def update(
        self,
        key: str,
        change: Callable[[Campaign], T],
        *,
        fence: int | None = None,
        boots: list[BootSample] | None = None,
    ) -> tuple[Campaign, T] | None:
        """Read-modify-write one campaign atomically (optimistic: retried when another writer got in between).

        ``change`` mutates the campaign and returns a result; whatever it appends to ``boots`` (emptied before each
        attempt) is added to the boot history in the same transaction. ``None`` when the campaign does not exist.
        """
        while True:
            async with self.redis.pipeline(transaction=True) as pipe:
                try:
                    await pipe.watch(self.key)
                    raw = await pipe.hget(self.key, key)
                    if raw is None:
                        await pipe.unwatch()  # type: ignore[no-untyped-call]
                        return None
                    campaign = Campaign.model_validate_json(raw)
                    if fence is not None:
                        if campaign.fence > fence:
                            raise FencedOut(f"{key} was written by a newer leader (token {campaign.fence} > {fence})")
                        campaign.fence = fence
                    if boots is not None:
                        boots.clear()
                    result = change(campaign)
                    campaign.updated_at = time.time()
                    samples = list(boots or [])
                    pipe.multi()  # type: ignore[no-untyped-call]
                    pipe.hset(self.key, key, campaign.model_dump_json())
                    if samples:
                        pipe.lpush(self.boots_key, *(s.to_json() for s in samples))
                        pipe.ltrim(self.boots_key, 0, BOOTS_KEPT - 1)
                    await pipe.execute()
                    return campaign, result
                except WatchError:
                    continue

    async def prune(self, keep: int = 64) -> None:
        """Forget the oldest finished campaigns beyond ``keep``."""
        everything = await self.all()
        done = sorted(
            (c for c in everything.values() if c.state in {"released", "missed", "refused", "cancelled"}),
            key=lambda c: c.updated_at,
        )
        extra = len(everything) - keep
        if extra > 0:
            old = [c.key for c in done[:extra]]
            if old:
                await self.redis.hdel(self.key, *old)

    async def boot_history(self) -> BootHistory:
        history = BootHistory(BOOTS_KEPT)
        raw = await self.redis.lrange(self.boots_key, 0, BOOTS_KEPT - 1)
        for item in reversed(raw):
            try:
                history.add(BootSample.from_json(item))
            except (ValueError, KeyError, orjson.JSONDecodeError):
                continue
        return history


def boot_sample(campaign: Campaign, cand: CandidateRecord, at: float, *, censored: bool) -> BootSample | None:
    """The candidate's boot, measured from the scheduler's own start (or rent) to registration (or its end)."""
    if cand.boot_recorded or cand.started_at is None or campaign.profile is None:
        return None
    seconds = at - cand.started_at
    if seconds <= 0:
        return None
    cand.boot_recorded = True
    if not censored:
        cand.boot_seconds = round(seconds, 3)
    kind: BootKind = "standby" if cand.kind is CandidateKind.STANDBY else "fresh"
    return BootSample(kind, campaign.profile, cand.gpu_name or "unknown", round(seconds, 3), at, censored)
