"""The leader's tick: plan the next PoC window, drive every open campaign through the rental policy, send commands
through the outbox, release after the end of PoC validation.

Rules that come from the protocol (gonka-protocol.md §3):

- the deadline is ``poc_start``: a node id registered after it does not join that PoC;
- the release waits for the end of PoC validation plus a margin covering the dapi's 60 s node-sync tick (weight is
  fixed in that block from the chain's node list), or for ``set_new_validators`` when configured; and it is decided
  on an *observed* height only — never on a projection, never on a stale view;
- the profile follows the live ``poc_v2_enabled`` flag; an image that cannot speak it is refused, loudly.

Without a fresh chain view (older than ``max_stale_blocks`` blocks) and while paused, no rental command leaves;
dropping a candidate (which only saves money) still does.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import Any

import orjson
from redis.asyncio import Redis

from hybrid_common.bus import Publisher
from hybrid_common.messages.domain import PocGeneration, PocWindowHeights, Purpose
from hybrid_common.messages.events import AlertRaised, PocWindowPlanned
from hybrid_common.redis_keys import RedisKeys
from hybrid_scheduler import telemetry
from hybrid_scheduler.blockclock import BlockClock
from hybrid_scheduler.book import Campaign, CandidateRecord, EpochBook, FencedOut, boot_sample
from hybrid_scheduler.boots import BootHistory, BootSample, BootStats
from hybrid_scheduler.chain import ChainView
from hybrid_scheduler.commands import ProvisionerCommands
from hybrid_scheduler.policy import (
    Action,
    ActionKind,
    CandidateKind,
    CandidateState,
    Decision,
    PolicyConfig,
    RentalPolicy,
)
from hybrid_scheduler.protocol import IncompatibleImage, check
from hybrid_scheduler.settings import SchedulerSettings

log = logging.getLogger("hybrid.scheduler.planner")

OPEN_STATES = frozenset({"planned", "renting", "registered", "missed"})
RENTAL_ACTIONS = frozenset({ActionKind.PREPULL, ActionKind.START, ActionKind.RENT})


class Tick:
    """What one tick knows."""

    def __init__(
        self,
        view: ChainView,
        clock: BlockClock,
        now: float,
        token: int,
        fresh: bool,
        paused: bool,
        history: BootHistory,
    ) -> None:
        self.view = view
        self.clock = clock
        self.now = now
        self.token = token
        self.fresh = fresh
        self.paused = paused
        self.history = history


class Planner:
    def __init__(
        self,
        settings: SchedulerSettings,
        redis: Redis,
        keys: RedisKeys,
        book: EpochBook,
        commands: ProvisionerCommands,
        publisher: Publisher,
    ) -> None:
        self.s = settings
        self.redis = redis
        self.keys = keys
        self.book = book
        self.commands = commands
        self.publisher = publisher
        self.config: PolicyConfig = settings.wall_policy()
        self.policy = RentalPolicy(self.config)
        self._published_plan: str | None = None
        self._alerted: set[str] = set()

    # ------------------------------------------------------------------ naming

    def poc_key(self, epoch: int) -> str:
        return f"{self.s.slot_prefix}-e{epoch}"

    def generation(self, view: ChainView) -> PocGeneration | None:
        if view.poc_v2_enabled is None:
            return None
        return "v2" if view.poc_v2_enabled else "v1"

    def profile_for(self, generation: PocGeneration) -> tuple[str, str | None]:
        if generation == "v2":
            return self.s.profile_v2, self.s.image_v2
        return self.s.profile_v1, self.s.image_v1

    def stats(self, history: BootHistory, profile: str | None) -> tuple[BootStats, BootStats]:
        name = profile or self.s.profile_v1
        gpu = self.s.vastai_gpu_type.split(",")[0].strip() if self.s.vastai_gpu_type else None
        return (
            history.stats("standby", name, self.config.prior_standby_boot, gpu),
            history.stats("fresh", name, self.config.prior_fresh_boot, gpu),
        )

    # ------------------------------------------------------------------ the tick

    async def tick(self, t: Tick) -> dict[str, Campaign]:
        campaigns = await self.book.all()
        nxt = t.view.next_window()
        key = self.poc_key(nxt.epoch_index)
        if key not in campaigns and t.fresh and not t.paused:
            created = await self._plan_window(t, nxt.epoch_index, nxt.heights)
            if created is not None:
                campaigns[key] = created
        for name in sorted(campaigns):
            campaign = campaigns[name]
            if campaign.state in OPEN_STATES:
                updated = await self.drive(campaign, t)
                if updated is not None:
                    campaigns[name] = updated
        await self.flush(campaigns, t.token)
        await self._publish_plan(campaigns.get(key), t)
        return campaigns

    async def _plan_window(self, t: Tick, epoch: int, heights: PocWindowHeights) -> Campaign | None:
        generation = self.generation(t.view)
        if generation is None:
            log.info("epoch %d: waiting for the chain's poc_v2_enabled before planning", epoch)
            return None
        profile, image = self.profile_for(generation)
        campaign = Campaign(
            key=self.poc_key(epoch),
            purpose=Purpose.POC,
            epoch_index=epoch,
            generation=generation,
            profile=profile,
            slots=self.s.slots,
            window=heights,
            fence=t.token,
        )
        try:
            check(generation, profile, image)
        except IncompatibleImage as exc:
            campaign.state = "refused"
            campaign.plan = {"refused": str(exc)}
            campaign.note(f"refused: {exc}")
            if await self.book.create(campaign):
                telemetry.WINDOWS.labels("refused").inc()
                await self._alert("critical", f"epoch {epoch}: PoC window not planned", str(exc), "poc.window_planned")
            return campaign
        for slot in range(1, self.s.slots + 1):
            for cand in self.config.pool():
                slot_id = f"{campaign.key}-{slot}{cand.name}"
                campaign.candidates[slot_id] = CandidateRecord(
                    slot_id=slot_id, slot=slot, name=cand.name, kind=cand.kind
                )
        self._refresh_window(campaign, t, heights)
        campaign.note(f"planned {self.s.slots} slot(s), {generation} ({profile})")
        if not await self.book.create(campaign):
            return await self.book.get(campaign.key)
        log.info("epoch %d planned: %s, %d slot(s), poc_start %d", epoch, profile, self.s.slots, heights.poc_start)
        return campaign

    # ------------------------------------------------------------------ one campaign

    @staticmethod
    def deadline(t: Tick, poc_start: int) -> float:
        """The wall time of ``poc_start``: the measured clock's estimate, but never earlier than the blocks still to
        come allow — a stalled chain (no new height for a while) pushes the deadline out instead of letting the
        estimate slide into the past and declare a window missed that has not even begun.

        The window opens at a height (gonka-protocol.md §5): while the last view is below it, the next block comes
        no earlier than now and each further one a block time later. From *now*, not from when the view was read: a
        view that went stale (the dapi down through a halt) would otherwise date the floor back by its age. One block
        less than the remaining ones, as the next may be due this instant: on a chain that keeps time the floor stays
        at or below the measured estimate, which then decides."""
        remaining = poc_start - t.view.block_height
        floor = t.now + (remaining - 1) * t.clock.block_seconds if remaining > 0 else float("-inf")
        return max(t.clock.time_of(poc_start), floor)

    def _refresh_window(self, campaign: Campaign, t: Tick, heights: PocWindowHeights) -> None:
        """Follow the live parameters: the chain computes the stages with the current ones (gonka-protocol.md §5)."""
        campaign.window = heights
        campaign.deadline_at = self.deadline(t, heights.poc_start)
        margin = t.clock.blocks_for(self.s.scale(self.s.release_margin))
        base = heights.set_new_validators if self.s.release_after == "set_new_validators" else heights.validation_end
        campaign.release_height = base + margin
        standby, fresh = self.stats(t.history, campaign.profile)
        deadline = campaign.deadline_at
        lead = self.policy.lead(standby, fresh)
        prepull = self.policy.prepull_at(deadline, standby, fresh)
        start_at = deadline - lead
        first = prepull if prepull is not None else start_at
        campaign.plan = {
            "strategy": self.config.strategy,
            "deadline_at": round(deadline, 3),
            "lead_seconds": round(lead, 3),
            "start_at": round(start_at, 3),
            "start_at_height": int(t.clock.height_at(start_at)),
            "prepull_at": round(prepull, 3) if prepull is not None else None,
            "rent_at": round(first, 3),
            "rent_at_height": int(t.clock.height_at(first)),
            "release_after_height": campaign.release_height,
            "release_margin_blocks": margin,
            "release_after": self.s.release_after,
            "block_seconds": round(t.clock.block_seconds, 4),
            "boots": {
                "standby": {
                    "measured": standby.measured,
                    "finished": standby.finished,
                    "p90": round(standby.quantile(0.9), 3),
                },
                "fresh": {"measured": fresh.measured, "finished": fresh.finished, "p90": round(fresh.quantile(0.9), 3)},
            },
            "standby_per_slot": self.config.standby_count if self.config.strategy == "prepull" else 0,
            "min_inet_down_mbps": self.config.min_inet_down_mbps,
        }

    async def drive(self, campaign: Campaign, t: Tick) -> Campaign | None:
        if campaign.purpose is Purpose.POC:
            return await self._drive_poc(campaign, t)
        return await self._drive_simple(campaign, t)

    async def _drive_poc(self, campaign: Campaign, t: Tick) -> Campaign | None:
        view = t.view
        heights: PocWindowHeights | None = None
        if campaign.epoch_index == view.epoch_index + 1:
            heights = view.next_window().heights
        elif campaign.epoch_index == view.epoch_index and view.window() is not None:
            heights = view.window().heights  # type: ignore[union-attr]
        generation = self.generation(view)
        replan = (
            generation is not None
            and generation != campaign.generation
            and not any(c.provisioned for c in campaign.candidates.values())
            and campaign.epoch_index == view.epoch_index + 1
        )
        standby, fresh = self.stats(t.history, campaign.profile)
        samples: list[BootSample] = []
        missed_before: set[int] = set()

        def change(c: Campaign) -> None:
            # From the copy being changed (re-read on every retry), so a slot missed before is never alerted twice.
            missed_before.clear()
            missed_before.update(c.missed_slots)
            if heights is not None:
                self._refresh_window(c, t, heights)
            if replan and generation is not None:
                profile, image = self.profile_for(generation)
                c.note(f"the chain switched to PoC {generation}: replanned with {profile}")
                c.generation, c.profile = generation, profile
                try:
                    check(generation, profile, image)
                except IncompatibleImage as exc:
                    c.state = "refused"
                    c.plan = {"refused": str(exc)}
                    c.note(f"refused: {exc}")
                    return
            if c.state in {"planned", "renting"} and c.deadline_at is not None:
                for slot in range(1, c.slots + 1):
                    self._decide_slot(c, slot, t, standby, fresh, samples)
                self._settle(c, t)
            if (
                c.state in {"registered", "missed", "renting"}
                and t.fresh
                and c.release_height is not None
                and view.block_height >= c.release_height
                and view.epoch_index >= (c.epoch_index or 0)
            ):
                self._release_all(c, t, f"end of PoC validation passed (height {view.block_height})")

        updated = await self._update(campaign.key, change, t, samples)
        # A slot with nothing registered at poc_start earns no weight this epoch: the operator is paged. Its candidates
        # are dropped before the provisioner's own deadline_missed could fire, so no job.failed says it.
        if updated is None:
            return None
        poc_start = updated.window.poc_start if updated.window is not None else "?"
        for slot in set(updated.missed_slots) - missed_before:
            await self._alert(
                "critical",
                f"epoch {updated.epoch_index}: slot {slot} missed its PoC window (missed registration)",
                f"nothing of {updated.key} slot {slot} was registered by poc_start {poc_start}: "
                "this slot earns no weight this epoch",
                "poc.window_planned",
            )
        return updated

    def _decide_slot(
        self,
        c: Campaign,
        slot: int,
        t: Tick,
        standby: BootStats,
        fresh: BootStats,
        samples: list[BootSample],
    ) -> Decision:
        assert c.deadline_at is not None
        records = c.slot_candidates(slot)
        decision = self.policy.decide(t.now, c.deadline_at, [r.policy_view() for r in records], standby, fresh)
        by_name = {r.name: r for r in records}
        for action in decision.actions:
            if action.kind in RENTAL_ACTIONS and (t.paused or not t.fresh):
                continue  # no money spent on a stale view or while paused
            self._apply(c, by_name[action.candidate], action, t, samples)
        if decision.missed and slot not in c.missed_slots:
            c.missed_slots.append(slot)
            c.note(f"slot {slot}: nothing registered by poc_start: window missed")
            telemetry.WINDOWS.labels("missed_slot").inc()
        c.plan["lead_seconds"] = round(decision.lead_seconds, 3)
        c.plan["start_at"] = round(decision.start_at, 3)
        return decision

    def _apply(self, c: Campaign, r: CandidateRecord, action: Action, t: Tick, samples: list[BootSample]) -> None:
        now = t.now
        if action.kind is ActionKind.PREPULL and r.state is CandidateState.PLANNED:
            r.state, r.created_at, r.provisioned = CandidateState.PULLING, now, True
            r.pending.append("prepull")
        elif action.kind is ActionKind.RENT and r.state is CandidateState.PLANNED:
            r.state, r.created_at, r.started_at, r.provisioned = CandidateState.STARTING, now, now, True
            r.pending.append("rent")
        elif action.kind is ActionKind.START and r.state in {CandidateState.STOPPED, CandidateState.PULLING}:
            r.state, r.started_at = CandidateState.STARTING, now
            r.pending.append("start")
        elif action.kind is ActionKind.DROP and r.live:
            if r.state is CandidateState.STARTING:
                sample = boot_sample(c, r, now, censored=True)
                if sample is not None:
                    samples.append(sample)
            r.state, r.ended_at = CandidateState.DROPPED, now
            self._queue_release(r)
        else:
            return
        c.note(f"{r.slot_id}: {action.kind.value} ({action.reason})")
        telemetry.DECISIONS.labels(action.kind.value).inc()

    @staticmethod
    def _queue_release(r: CandidateRecord) -> None:
        unsent = [p for p in r.pending if p in {"prepull", "rent"}]
        if unsent:
            # never published: nothing to release at the provisioner
            r.pending = [p for p in r.pending if p not in {"prepull", "rent", "start"}]
            r.provisioned = False
            return
        if r.provisioned and not r.release_sent and "release" not in r.pending:
            r.pending = [p for p in r.pending if p != "start"]
            r.pending.append("release")

    def _settle(self, c: Campaign, t: Tick) -> None:
        winners = c.winners()
        if any(x.provisioned for x in c.candidates.values()) and c.state == "planned":
            c.state = "renting"
        assert c.deadline_at is not None
        if len(winners) == c.slots and c.state != "registered":
            c.state = "registered"
            telemetry.WINDOWS.labels("registered").inc()
            c.note(f"all {c.slots} slot(s) registered")
        elif t.now > c.deadline_at and c.state in {"planned", "renting"}:
            c.state = "registered" if winners else "missed"
            if not winners:
                telemetry.WINDOWS.labels("missed").inc()

    def _release_all(self, c: Campaign, t: Tick, reason: str) -> None:
        for r in c.candidates.values():
            if r.live or (r.provisioned and not r.release_sent):
                if r.live and r.state is not CandidateState.READY:
                    r.state, r.ended_at = CandidateState.DROPPED, t.now
                self._queue_release(r)
        c.state = "released"
        c.released_at_height = t.view.block_height
        c.note(f"released: {reason}")
        telemetry.WINDOWS.labels("released").inc()

    async def _drive_simple(self, campaign: Campaign, t: Tick) -> Campaign | None:
        """Confirmation-PoC bursts and standbys, and rehearsals: rent at once, release by height or time."""
        samples: list[BootSample] = []

        def change(c: Campaign) -> None:
            if c.state == "planned" and not t.paused and t.fresh:
                for r in c.candidates.values():
                    if r.state is CandidateState.PLANNED:
                        self._apply(
                            c,
                            r,
                            Action(
                                ActionKind.PREPULL if r.kind is CandidateKind.STANDBY else ActionKind.RENT,
                                r.name,
                                c.purpose.value,
                            ),
                            t,
                            samples,
                        )
                c.state = "renting"
            winners = c.winners()
            if winners and c.state == "renting" and len(winners) == c.slots:
                c.state = "registered"
            if c.purpose is Purpose.REHEARSAL and winners and c.release_height is None and c.release_at is None:
                self._rehearsal_release(c, t, min(w.ready_at or t.now for w in winners.values()))
            due_height = c.release_height is not None and t.fresh and t.view.block_height >= c.release_height
            due_time = c.release_at is not None and t.now >= c.release_at
            if c.state in {"renting", "registered"} and (due_height or due_time):
                self._release_all(c, t, "its window is over" if due_height else "hold time over")
            elif (
                c.state == "renting"
                and all(
                    r.state in {CandidateState.FAILED, CandidateState.DROPPED}
                    for r in c.candidates.values()
                    if r.provisioned
                )
                and any(r.provisioned for r in c.candidates.values())
            ):
                self._release_all(c, t, "every rental failed")

        return await self._update(campaign.key, change, t, samples)

    def _rehearsal_release(self, c: Campaign, t: Tick, ready_at: float) -> None:
        """Keep the rehearsal GPU through the next PoC when it registered before it and that PoC ends soon enough."""
        nxt = t.view.next_window()
        poc_at = t.clock.time_of(nxt.heights.poc_start)
        margin = t.clock.blocks_for(self.s.scale(self.s.release_margin))
        release_height = nxt.heights.validation_end + margin
        release_at = t.clock.time_of(release_height)
        if ready_at + self.config.deadline_margin <= poc_at and release_at - ready_at <= self.s.scale(
            self.s.rehearsal_max_wait
        ):
            c.release_height = release_height
            c.window = nxt.heights
            c.epoch_index = nxt.epoch_index
            c.note(
                f"registered before the PoC of epoch {nxt.epoch_index}: kept through it, released after {release_height}"
            )
        else:
            c.release_at = ready_at + self.s.scale(self.s.rehearsal_hold)
            c.note("the next PoC is too far or too near: released after the hold time")

    async def _update(self, key: str, change: Any, t: Tick, samples: list[BootSample]) -> Campaign | None:
        try:
            result = await self.book.update(key, change, fence=t.token, boots=samples)
        except FencedOut:
            raise
        return None if result is None else result[0]

    # ------------------------------------------------------------------ the outbox

    async def flush(self, campaigns: dict[str, Campaign], token: int) -> None:
        """Publish every pending command (in order per candidate); a failed publish stays pending for the next tick."""
        for campaign in list(campaigns.values()):
            for r in list(campaign.candidates.values()):
                while r.pending:
                    kind = r.pending[0]
                    try:
                        if kind in {"prepull", "rent"}:
                            hedge = campaign.purpose is Purpose.CONFIRMATION_POC
                            await self.commands.provision(campaign, r, start_stopped=kind == "prepull", hedge=hedge)
                        elif kind == "start":
                            await self.commands.start(campaign, r, "scheduled start")
                        elif kind == "release":
                            how = self.s.release_how if r.state is CandidateState.READY else "delete"
                            await self.commands.release(campaign, r, how=how, reason=f"{campaign.key}: {r.state.value}")
                    except Exception as exc:
                        log.warning("could not send %s for %s (kept in the outbox): %r", kind, r.slot_id, exc)
                        return
                    telemetry.COMMANDS.labels(kind).inc()

                    def sent(c: Campaign, slot_id: str = r.slot_id, kind: str = kind) -> None:
                        rec = c.candidates[slot_id]
                        if rec.pending and rec.pending[0] == kind:
                            rec.pending.pop(0)
                        if kind == "release":
                            rec.release_sent = True

                    result = await self.book.update(campaign.key, sent, fence=token)
                    if result is None:
                        break
                    campaign = result[0]
                    campaigns[campaign.key] = campaign
                    r = campaign.candidates[r.slot_id]

    # ------------------------------------------------------------------ the plan as others see it

    async def _publish_plan(self, campaign: Campaign | None, t: Tick) -> None:
        view = t.view
        nxt = view.next_window()
        plan: dict[str, Any] = {
            "updated_at": t.now,
            "paused": t.paused,
            "chain_fresh": t.fresh,
            "block_height": view.block_height,
            "block_seconds": round(t.clock.block_seconds, 4),
            "epoch_index": view.epoch_index,
            "phase": view.phase,
            "poc_v2_enabled": view.poc_v2_enabled,
            "next_window": {
                "epoch_index": nxt.epoch_index,
                "heights": nxt.heights.model_dump(),
                "times": {k: round(v, 3) for k, v in nxt.times(t.clock).items()},
            },
            "campaign": campaign.summary() if campaign is not None else None,
        }
        await self.redis.set(self.keys.scheduler("plan"), orjson.dumps(plan))
        if campaign is None or campaign.state == "refused" or campaign.window is None:
            return
        p = campaign.plan
        # Republished when the plan changes, not when the measured clock moves the rent height by a block or two.
        rent_band = int(p.get("rent_at_height", 0)) // 10
        fingerprint = orjson.dumps(
            [
                campaign.epoch_index,
                campaign.generation,
                campaign.profile,
                campaign.window.model_dump(),
                campaign.release_height,
                campaign.slots,
                rent_band,
            ]
        ).decode()
        if fingerprint == self._published_plan:
            return
        first_slots = [r.slot_id for r in campaign.candidates.values() if r.name == "a"]
        event = PocWindowPlanned(
            epoch_index=campaign.epoch_index or 0,
            generation=campaign.generation or "v1",
            profile=campaign.profile or "",
            slot_ids=first_slots,
            poc_start_height=campaign.window.poc_start,
            rent_at=datetime.fromtimestamp(p.get("rent_at", t.now), UTC),
            rent_at_height=int(p.get("rent_at_height", view.block_height)),
            release_after_height=campaign.release_height or campaign.window.validation_end,
            lead_seconds=float(p.get("lead_seconds", 0.0)),
            reason=(
                f"{p.get('strategy')}: {p.get('standby_per_slot')} standby per slot pre-pulled at height "
                f"{p.get('rent_at_height')}, first start {p.get('lead_seconds')} s before poc_start "
                f"{campaign.window.poc_start}; release after height {campaign.release_height} "
                f"({p.get('release_after')} + {p.get('release_margin_blocks')} blocks for the dapi's node sync)"
            ),
        )
        try:
            await self.publisher.publish(event, correlation_id=f"epoch-{campaign.epoch_index}", deadline=5.0)
            self._published_plan = fingerprint
        except Exception as exc:
            log.warning("could not publish poc.window_planned: %r", exc)

    async def _alert(self, severity: str, title: str, detail: str, source_type: str) -> None:
        if title in self._alerted:
            return
        self._alerted.add(title)
        try:
            await self.publisher.publish(
                AlertRaised(severity=severity, title=title, detail=detail, source_type=source_type), deadline=5.0
            )
        except Exception as exc:
            log.warning("could not raise alert %r: %r", title, exc)
