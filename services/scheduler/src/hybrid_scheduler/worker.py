"""The scheduler service: one active leader (Redis lease with renewal and a fencing token) runs the chain clock and the
planner; every replica records the provisioner's facts and answers its own commands.

A standby replica retries the lease every third of its TTL, so when the leader dies its successor takes over within
about one TTL and resumes from Redis: the campaigns, their outboxes and the boot history are all there, and the
commands it re-sends carry the same idempotency keys.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from datetime import UTC, datetime
from typing import Any

import orjson
from aio_pika.abc import AbstractRobustConnection
from redis.asyncio import Redis

from hybrid_common.bus import Consumer, Delivery, Publisher, connect, reply
from hybrid_common.lease import Lease
from hybrid_common.messages.commands import (
    ErrorReply,
    PauseScheduling,
    PlanQuery,
    PlanReply,
    Rehearse,
    ResumeScheduling,
    SetConfirmationPolicy,
)
from hybrid_common.messages.domain import PocWindowHeights, Purpose
from hybrid_common.messages.events import (
    ChainUnreachable,
    EpochObserved,
    EpochPhaseChanged,
    SchedulerLeaderElected,
    SchedulerPaused,
    SchedulerResumed,
)
from hybrid_common.redis_keys import RedisKeys
from hybrid_common.topology import OWNER_QUEUES, SUBSCRIPTIONS, QueueSpec, Topology
from hybrid_scheduler import telemetry
from hybrid_scheduler.blockclock import BlockClock
from hybrid_scheduler.book import Campaign, CandidateRecord, EpochBook, FencedOut
from hybrid_scheduler.chain import ChainClient, ChainView
from hybrid_scheduler.commands import ProvisionerCommands
from hybrid_scheduler.confirmation import ConfirmationWatcher
from hybrid_scheduler.facts import ProvisionerFacts
from hybrid_scheduler.observer import ChainObserver
from hybrid_scheduler.planner import Planner, Tick
from hybrid_scheduler.policy import CandidateKind
from hybrid_scheduler.settings import SchedulerSettings
from hybrid_scheduler.weights import EpochWeights

log = logging.getLogger("hybrid.scheduler")

SOURCE = "scheduler"
_ZERO_WINDOW = PocWindowHeights(
    poc_start=0,
    generation_end=0,
    exchange_end=0,
    validation_start=0,
    validation_end=0,
    set_new_validators=0,
    next_poc_start=0,
)


def _spec(specs: tuple[QueueSpec, ...], name: str) -> QueueSpec:
    return next(s for s in specs if s.name == name)


class Scheduler:
    def __init__(self, settings: SchedulerSettings) -> None:
        self.s = settings
        self.keys = RedisKeys(settings.namespace)
        self.topology = Topology(settings.namespace)
        self.redis: Redis = Redis.from_url(settings.redis_url)
        self.book = EpochBook(self.redis, self.keys)
        self.clock = BlockClock(settings.block_seconds_prior())
        self.client = ChainClient(settings.dapi_public_url or "", timeout=settings.http_timeout)
        self.observer = ChainObserver(
            self.client,
            self.clock,
            on_unreachable=self._unreachable,
            report_every=settings.report_every,
            flags_every=settings.flags_every,
        )
        self.weights = EpochWeights(self.client, self.book, settings.our_address(), settings.weight_retry_seconds)
        self.lease = Lease(self.redis, self.keys, "scheduler", settings.holder, settings.lease_ttl)
        self.conn: AbstractRobustConnection | None = None
        self.publisher: Publisher | None = None
        self.planner: Planner | None = None
        self.confirmation: ConfirmationWatcher | None = None
        self.consumers: list[Consumer] = []
        self.tasks: list[asyncio.Task[None]] = []
        self.token: int | None = None
        self._stopping = asyncio.Event()
        self._last_published: tuple[Any, ...] | None = None
        self._last_published_at = 0.0
        self._last_phase: str | None = None

    @property
    def leader(self) -> bool:
        return self.token is not None

    # ------------------------------------------------------------------ life cycle

    async def start(self) -> None:
        self.conn = await connect(self.s.amqp_url, name=f"scheduler-{self.s.holder}")
        self.publisher = Publisher(self.conn, self.topology, SOURCE)
        commands = ProvisionerCommands(
            self.publisher,
            min_inet_down_mbps=self.s.policy.min_inet_down_mbps,
            images={"v1": self.s.image_v1, "v2": self.s.image_v2},
        )
        self.planner = Planner(self.s, self.redis, self.keys, self.book, commands, self.publisher)
        self.confirmation = ConfirmationWatcher(
            self.redis,
            self.keys,
            self.book,
            self.planner,
            self.publisher,
            self.s.confirmation_policy,
            self.s.confirmation_slots,
        )
        facts = ProvisionerFacts(self.redis, self.keys, self.book)
        self.consumers = [
            Consumer(self.conn, self.topology, self.redis, _spec(OWNER_QUEUES, "scheduler.commands"), self.on_command),
            Consumer(self.conn, self.topology, self.redis, _spec(SUBSCRIPTIONS, "scheduler.boots"), facts.handle),
        ]
        for consumer in self.consumers:
            await consumer.start()
        telemetry.PAUSED.set(1 if await self.redis.exists(self.keys.scheduler("paused")) else 0)
        self.tasks = [
            asyncio.create_task(self._leadership(), name="scheduler-lease"),
            asyncio.create_task(self._ticks(), name="scheduler-ticks"),
        ]
        log.info("scheduler %s started (namespace %r)", self.s.holder, self.s.namespace)
        if self.weights.address is None:
            log.warning("GONKA_PARTICIPANT_ADDRESS is not set: the weight earned per epoch will not be recorded")

    async def stop(self) -> None:
        """Graceful: stop ticking, hand the lease back so a standby takes over at once, close connections."""
        self._stopping.set()
        for task in self.tasks:
            task.cancel()
        for task in self.tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        for consumer in self.consumers:
            await consumer.stop()
        if self.token is not None:
            await self.lease.release()
            self.token = None
        telemetry.LEADER.set(0)
        await self.client.close()
        if self.conn is not None:
            with contextlib.suppress(Exception):
                await self.conn.close()
        with contextlib.suppress(Exception):
            await self.redis.aclose()

    async def wait(self) -> None:
        await self._stopping.wait()

    # ------------------------------------------------------------------ leadership

    async def _leadership(self) -> None:
        interval = max(self.s.lease_ttl / 3, 0.05)
        while not self._stopping.is_set():
            if self.token is None:
                try:
                    token = await self.lease.try_acquire()
                except Exception as exc:
                    log.warning("lease attempt failed: %r", exc)
                    token = None
                if token is not None:
                    self.token = token
                    telemetry.LEADER.set(1)
                    self.lease.start_renewing(self._lost)
                    log.warning("leader now: %s (fencing token %d)", self.s.holder, token)
                    with contextlib.suppress(Exception):
                        assert self.publisher is not None
                        await self.publisher.publish(
                            SchedulerLeaderElected(holder=self.s.holder, fencing_token=token), deadline=5.0
                        )
            await asyncio.sleep(interval)

    async def _lost(self) -> None:
        log.warning("lost the scheduler lease: standing by")
        self.token = None
        telemetry.LEADER.set(0)

    async def _step_down(self, why: str) -> None:
        log.warning("stepping down: %s", why)
        self.token = None
        telemetry.LEADER.set(0)
        await self.lease.stop_renewing()

    # ------------------------------------------------------------------ ticks

    async def _ticks(self) -> None:
        while not self._stopping.is_set():
            began = time.monotonic()
            if self.token is not None:
                try:
                    await self.tick(self.token)
                except FencedOut as exc:
                    await self._step_down(str(exc))
                except Exception:
                    log.exception("tick failed")
            await asyncio.sleep(max(0.0, self.s.poll_seconds - (time.monotonic() - began)))

    async def tick(self, token: int) -> None:
        assert self.planner is not None and self.confirmation is not None
        view = await self.observer.poll()
        if view is None:
            return
        now = time.time()
        stale = self.observer.stale_seconds(now) or 0.0
        fresh = stale <= self.s.max_stale_blocks * self.clock.block_seconds and self.observer.good_at is not None
        telemetry.CHAIN_HEIGHT.set(view.block_height)
        telemetry.BLOCK_SECONDS.set(self.clock.block_seconds)
        telemetry.STALE_SECONDS.set(stale)
        await self._share_view(view, stale, now)
        if self.token != token:
            return
        paused = bool(await self.redis.exists(self.keys.scheduler("paused")))
        history = await self.book.boot_history()
        t = Tick(view, self.clock, now, token, fresh, paused, history)
        campaigns = await self.planner.tick(t)
        if await self.confirmation.observe(t, campaigns):
            campaigns = await self.planner.tick(t)
        await self.weights.record(view, campaigns, token, now)
        plan = campaigns.get(self.planner.poc_key(view.epoch_index + 1))
        if plan is not None and "lead_seconds" in plan.plan:
            telemetry.LEAD_SECONDS.set(float(plan.plan["lead_seconds"]))
        if view.epoch_index % 16 == 0 and view.phase == "Inference":
            await self.book.prune()

    def _observed(self, view: ChainView, stale: float) -> EpochObserved:
        window = view.window()
        return EpochObserved(
            epoch_index=view.epoch_index,
            block_height=view.block_height,
            phase=view.phase,
            window=window.heights if window is not None else _ZERO_WINDOW,
            next_window=view.next_window().heights,
            block_seconds=self.clock.block_seconds,
            poc_v2_enabled=bool(view.poc_v2_enabled),
            mlnode_version=view.mlnode_version or "",
            source=view.source,
            stale_seconds=round(stale, 3),
        )

    async def _share_view(self, view: ChainView, stale: float, now: float) -> None:
        """``chain:view`` on every poll; ``epoch.observed`` on every change of epoch, phase, parameters or flags, and
        as a heartbeat; ``epoch.phase_changed`` when the phase moves."""
        assert self.publisher is not None
        event = self._observed(view, stale)
        observed_at = datetime.fromtimestamp(view.observed_at, UTC).isoformat()
        await self.redis.set(
            self.keys.chain_view(),
            orjson.dumps(
                {
                    "view": event.model_dump(mode="json"),
                    "observed_at": observed_at,
                    "good_at": self.observer.good_at,
                    "stale_seconds": round(stale, 3),
                    "source": view.source,
                    "failures": {k: {"error": f.error, "at": f.at} for k, f in self.observer.failures.items()},
                    "confirmation_active": view.confirmation_active,
                }
            ),
        )
        signature = (view.epoch_index, view.phase, view.params, view.poc_v2_enabled, view.mlnode_version)
        heartbeat = now - self._last_published_at >= self.s.observe_every
        if signature != self._last_published or heartbeat:
            try:
                await self.publisher.publish(event, correlation_id=f"epoch-{view.epoch_index}", deadline=5.0)
                if self._last_phase is not None and view.phase != self._last_phase:
                    await self.publisher.publish(
                        EpochPhaseChanged(
                            epoch_index=view.epoch_index,
                            block_height=view.block_height,
                            previous_phase=self._last_phase,
                            phase=view.phase,
                        ),
                        correlation_id=f"epoch-{view.epoch_index}",
                        deadline=5.0,
                    )
                self._last_published, self._last_published_at = signature, now
                self._last_phase = view.phase
            except Exception as exc:
                log.warning("could not publish epoch.observed: %r", exc)

    async def _unreachable(self, endpoint: str, error: str, age: float | None) -> None:
        telemetry.CHAIN_FAILURES.labels(endpoint).inc()
        if self.publisher is None:
            return
        try:
            await self.publisher.publish(
                ChainUnreachable(endpoint=endpoint, error=error[:500], last_good_age_seconds=age), deadline=5.0
            )
        except Exception as exc:
            log.warning("could not publish chain.unreachable: %r", exc)

    # ------------------------------------------------------------------ commands (any replica)

    async def on_command(self, d: Delivery) -> None:
        assert self.publisher is not None and self.confirmation is not None
        p = d.payload
        paused_key = self.keys.scheduler("paused")
        if isinstance(p, PauseScheduling):
            await self.redis.set(paused_key, orjson.dumps({"by": p.reason, "at": time.time()}))
            telemetry.PAUSED.set(1)
            await self.publisher.publish(SchedulerPaused(by=p.reason), **d.envelope.caused())
        elif isinstance(p, ResumeScheduling):
            await self.redis.delete(paused_key)
            telemetry.PAUSED.set(0)
            await self.publisher.publish(SchedulerResumed(by=p.reason), **d.envelope.caused())
        elif isinstance(p, SetConfirmationPolicy):
            await self.confirmation.set_policy(p.policy, d.envelope.source)
        elif isinstance(p, Rehearse):
            await self.rehearse(p, str(d.envelope.id))
        elif isinstance(p, PlanQuery):
            try:
                await reply(self.publisher, d.envelope, d.reply_to, PlanReply(plan=await self.plan_snapshot()))
            except Exception as exc:
                await reply(self.publisher, d.envelope, d.reply_to, ErrorReply(error="plan", message=str(exc)))
        else:
            log.warning("ignoring %s on scheduler.commands", d.envelope.type)

    async def rehearse(self, cmd: Rehearse, request_id: str) -> None:
        """One GPU through a PoC cycle now: rented at once (fresh), registered, kept through the next PoC when it
        registers before it and that PoC ends soon enough, else released after a short hold. The leader rents it."""
        assert self.planner is not None
        key = f"{self.s.slot_prefix}r-{request_id[:8]}"
        profile = cmd.profile or self.s.profile_v1
        raw = await self.redis.get(self.keys.chain_view())
        if raw and cmd.profile is None:
            with contextlib.suppress(Exception):
                if orjson.loads(raw)["view"]["poc_v2_enabled"]:
                    profile = self.s.profile_v2
        slot_id = f"{key}-1a"
        campaign = Campaign(
            key=key,
            purpose=Purpose.REHEARSAL,
            generation="v2" if profile == self.s.profile_v2 else "v1",
            profile=profile,
            slots=1,
        )
        campaign.candidates[slot_id] = CandidateRecord(slot_id=slot_id, slot=1, name="a", kind=CandidateKind.FRESH)
        campaign.note(f"rehearsal requested ({cmd.slot_id} asked; slot {slot_id})")
        await self.book.create(campaign)

    async def plan_snapshot(self) -> dict[str, Any]:
        raw_plan = await self.redis.get(self.keys.scheduler("plan"))
        raw_view = await self.redis.get(self.keys.chain_view())
        campaigns = await self.book.all()
        status = await self.confirmation.status() if self.confirmation is not None else None
        recent = sorted(campaigns.values(), key=lambda c: c.created_at)[-8:]
        return {
            "plan": orjson.loads(raw_plan) if raw_plan else None,
            "chain": orjson.loads(raw_view) if raw_view else None,
            "paused": bool(await self.redis.exists(self.keys.scheduler("paused"))),
            "leader": await self.lease.holder_now(),
            "campaigns": [c.summary() for c in recent],
            "confirmation": status.model_dump(mode="json") if status is not None else None,
            "boots": (await self.book.boot_history()).summary(),
        }
