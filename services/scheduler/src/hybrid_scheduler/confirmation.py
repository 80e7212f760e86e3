"""Confirmation PoC: detect ``active_confirmation_poc_event``, act by policy, and say honestly what it costs and risks.

gonka-protocol.md §6/§8: about once per epoch a confirmation PoC fires at a random height of the inference phase; its
generation starts ``max(inference_validation_cutoff, 1)`` blocks after the trigger (2 blocks live). The dapi moves to
PoC generation only the nodes that are operational at that height: a GPU rented — or a stopped one started — when
the event appears is registered minutes later, long after generation began. Only a GPU already serving can answer.
A participant whose nodes submit nothing gets confirmation weight 0; below the alpha ratio (0.5) it is INACTIVE
(collateral slashed 10 %, no rewards that epoch).

Policies (``SCHEDULER_CONFIRMATION_POLICY``, or the ``scheduler.confirmation_policy`` command):

- ``ignore``: nothing is rented; costs nothing; risks the penalty whenever the GPUs are gone.
- ``burst``: rent at detection and submit whatever the window still allows (usually nothing), release after the
  event's validation.
- ``standby``: keep one pre-pulled stopped instance per slot through the inference phase (storage only) and start it
  at detection; a start still takes minutes.

The status (``scheduler:confirmation``) records every event, what each policy did and what it cost.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from pydantic import BaseModel, Field
from redis.asyncio import Redis

from hybrid_common.bus import Publisher
from hybrid_common.messages.domain import ConfirmationPolicy, Purpose
from hybrid_common.messages.events import ConfirmationPocDetected, ConfirmationPocEnded
from hybrid_common.redis_keys import RedisKeys
from hybrid_scheduler import telemetry
from hybrid_scheduler.book import Campaign, CandidateRecord, EpochBook
from hybrid_scheduler.chain import ConfirmationEvent
from hybrid_scheduler.planner import Planner, Tick
from hybrid_scheduler.policy import CandidateKind, CandidateState
from hybrid_scheduler.window import EpochParams

log = logging.getLogger("hybrid.scheduler.confirmation")


class SeenEvent(BaseModel):
    key: str
    epoch_index: int
    event_sequence: int
    trigger_height: int
    generation_start_height: int
    validation_end_height: int
    detected_height: int
    detected_at: float
    policy: ConfirmationPolicy
    action: str
    campaign: str | None = None
    ended_height: int | None = None
    registered_height: int | None = None
    answered_in_time: bool | None = None


class ConfirmationStatus(BaseModel):
    policy: ConfirmationPolicy
    policy_set_by: str = "settings"
    active: str | None = None
    events: list[SeenEvent] = Field(default_factory=list)
    statement: str = ""
    policies: dict[str, dict[str, Any]] = Field(default_factory=dict)
    updated_at: float = 0.0


def validation_end(event: ConfirmationEvent, p: EpochParams) -> int:
    """§8: generation G … G+stage−1, exchange after it, validation ``delay`` later for ``validation`` blocks."""
    if event.validation_end_height:
        return event.validation_end_height
    m = p.epoch_multiplier
    generation_end = event.generation_start_height + p.poc_stage_duration * m - 1
    return generation_end + (p.poc_exchange_duration + p.poc_validation_delay + p.poc_validation_duration) * m - 1


class ConfirmationWatcher:
    def __init__(
        self,
        redis: Redis,
        keys: RedisKeys,
        book: EpochBook,
        planner: Planner,
        publisher: Publisher,
        default_policy: ConfirmationPolicy,
        slots: int,
    ) -> None:
        self.redis = redis
        self.key = keys.scheduler("confirmation")
        self.book = book
        self.planner = planner
        self.publisher = publisher
        self.default_policy = default_policy
        self.slots = slots
        self.prefix = planner.s.slot_prefix

    async def status(self) -> ConfirmationStatus:
        raw = await self.redis.get(self.key)
        if raw:
            try:
                return ConfirmationStatus.model_validate_json(raw)
            except ValueError:
                log.warning("unreadable %s: starting a new one", self.key)
        return ConfirmationStatus(policy=self.default_policy)

    async def save(self, status: ConfirmationStatus) -> None:
        status.updated_at = time.time()
        await self.redis.set(self.key, status.model_dump_json())

    async def set_policy(self, policy: ConfirmationPolicy, by: str) -> None:
        """Written by whichever replica takes the command (a read-modify-write of a small record)."""
        status = await self.status()
        status.policy, status.policy_set_by = policy, by
        await self.save(status)

    # ------------------------------------------------------------------ per tick (leader)

    async def observe(self, t: Tick, campaigns: dict[str, Campaign]) -> bool:
        """One tick's worth; True when a new event was acted on (the caller drives the campaigns at once: with a
        couple of blocks of warning, even one poll interval matters)."""
        status = await self.status()
        view = t.view
        event = view.confirmation if view.confirmation_active else None
        seen = {e.key for e in status.events}
        acted = False
        # Close the event we hold before taking a new one: two events can follow each other with no poll in between
        # that sees neither (a couple of blocks of warning, gonka-protocol.md §6), and detecting first would overwrite
        # ``active`` and leave the earlier event open for ever (no end, no answered_in_time, no ended event).
        if status.active is not None and (event is None or event.key != status.active):
            await self._ended(status, t, campaigns)
        if event is not None and event.key not in seen and t.fresh:
            await self._detected(status, event, t)
            acted = status.policy is not ConfirmationPolicy.IGNORE
        await self._maintain_standby(status, t, campaigns)
        self._account(status, t, campaigns)
        await self.save(status)
        return acted

    async def _detected(self, status: ConfirmationStatus, event: ConfirmationEvent, t: Tick) -> None:
        view = t.view
        policy = status.policy
        end = validation_end(event, view.params)
        margin = t.clock.blocks_for(self.planner.s.scale(self.planner.s.release_margin))
        campaign_key: str | None = None
        action = "nothing"
        if policy is ConfirmationPolicy.STANDBY:
            campaign_key = await self._start_standby(t, end + margin)
            action = "started standby" if campaign_key else "no standby ready"
        if policy is ConfirmationPolicy.BURST or (policy is ConfirmationPolicy.STANDBY and campaign_key is None):
            campaign_key = await self._burst(event, t, end + margin)
            action = "rented" if policy is ConfirmationPolicy.BURST else "no standby ready: rented"
        seen = SeenEvent(
            key=event.key,
            epoch_index=event.epoch_index,
            event_sequence=event.event_sequence,
            trigger_height=event.trigger_height,
            generation_start_height=event.generation_start_height,
            validation_end_height=end,
            detected_height=view.block_height,
            detected_at=t.now,
            policy=policy,
            action=action,
            campaign=campaign_key,
        )
        status.events = [*status.events[-19:], seen]
        status.active = event.key
        telemetry.CONFIRMATIONS.labels(action).inc()
        log.warning(
            "confirmation PoC %s: trigger %d, generation from %d (now %d): policy %s → %s",
            event.key,
            event.trigger_height,
            event.generation_start_height,
            view.block_height,
            policy.value,
            action,
        )
        await self.publisher.publish(
            ConfirmationPocDetected(
                epoch_index=event.epoch_index,
                event_sequence=event.event_sequence,
                trigger_height=event.trigger_height,
                generation_start_height=event.generation_start_height,
                phase=event.phase,
                policy=policy,
                action=action,
            ),
            correlation_id=f"epoch-{event.epoch_index}",
            deadline=10.0,
        )

    async def _burst(self, event: ConfirmationEvent, t: Tick, release_height: int) -> str:
        key = f"{self.prefix}c-e{event.epoch_index}n{event.event_sequence}"
        campaign = self._campaign(
            key,
            t,
            event.epoch_index,
            CandidateKind.FRESH,
            release_height,
            deadline_at=self.planner.deadline(t, event.generation_start_height),
        )
        campaign.note(f"confirmation PoC {event.key}: burst rental, release after height {release_height}")
        await self.book.create(campaign)
        return key

    def _campaign(
        self,
        key: str,
        t: Tick,
        epoch: int,
        kind: CandidateKind,
        release_height: int,
        deadline_at: float | None = None,
    ) -> Campaign:
        """A confirmation-PoC campaign: one candidate of ``kind`` per slot, on the profile of the chain's PoC."""
        generation = self.planner.generation(t.view) or "v1"
        profile, _ = self.planner.profile_for(generation)
        campaign = Campaign(
            key=key,
            purpose=Purpose.CONFIRMATION_POC,
            epoch_index=epoch,
            generation=generation,
            profile=profile,
            slots=self.slots,
            deadline_at=deadline_at,
            release_height=release_height,
            fence=t.token,
        )
        for slot in range(1, self.slots + 1):
            slot_id = f"{key}-{slot}a"
            campaign.candidates[slot_id] = CandidateRecord(slot_id=slot_id, slot=slot, name="a", kind=kind)
        return campaign

    def _standby_key(self, epoch: int) -> str:
        return f"{self.prefix}s-e{epoch}"

    async def _start_standby(self, t: Tick, release_height: int) -> str | None:
        key = self._standby_key(t.view.epoch_index)

        def start(c: Campaign) -> bool:
            ready = [
                r
                for r in c.candidates.values()
                if r.state in {CandidateState.STOPPED, CandidateState.PULLING} and "prepull" not in r.pending
            ]
            for r in ready:
                r.state, r.started_at = CandidateState.STARTING, t.now
                r.pending.append("start")
            if ready:
                c.release_height = release_height
                c.note(f"confirmation PoC: standby started, release after height {release_height}")
            return bool(ready)

        result = await self.book.update(key, start, fence=t.token)
        return key if result is not None and result[1] else None

    async def _maintain_standby(self, status: ConfirmationStatus, t: Tick, campaigns: dict[str, Campaign]) -> None:
        """Under ``standby``, keep a pulled stopped instance per slot from ``set_new_validators`` (when events can
        fire, §8) until the next PoC; released there if unused."""
        view = t.view
        window = view.window()
        key = self._standby_key(view.epoch_index)
        if status.policy is not ConfirmationPolicy.STANDBY:
            existing = campaigns.get(key)
            if existing is not None and existing.state in {"planned", "renting"} and existing.release_height is None:

                def stop(c: Campaign) -> None:
                    c.release_height = view.block_height
                    c.note("confirmation policy is no longer standby")

                await self.book.update(key, stop, fence=t.token)
            return
        if window is None or key in campaigns or t.paused or not t.fresh:
            return
        cutoff = view.next_poc_start - view.params.inference_validation_cutoff
        if not (window.heights.set_new_validators <= view.block_height < cutoff):
            return
        campaign = self._campaign(key, t, view.epoch_index, CandidateKind.STANDBY, view.next_poc_start)
        campaign.note("confirmation standby: pre-pulled, stopped, started only on an event")
        if await self.book.create(campaign):
            campaigns[key] = campaign

    async def _ended(self, status: ConfirmationStatus, t: Tick, campaigns: dict[str, Campaign]) -> None:
        key = status.active
        status.active = None
        seen = next((e for e in status.events if e.key == key), None)
        if seen is None:
            return
        seen.ended_height = t.view.block_height
        campaign = campaigns.get(seen.campaign or "")
        if campaign is not None:
            heights = [r.registered_height for r in campaign.candidates.values() if r.registered_height is not None]
            if heights:
                seen.registered_height = min(heights)
            seen.answered_in_time = bool(heights) and min(heights) <= seen.generation_start_height
        elif seen.action == "nothing":
            seen.answered_in_time = False
        await self.publisher.publish(
            ConfirmationPocEnded(epoch_index=seen.epoch_index, event_sequence=seen.event_sequence),
            correlation_id=f"epoch-{seen.epoch_index}",
            deadline=10.0,
        )

    # ------------------------------------------------------------------ the honest status

    def _account(self, status: ConfirmationStatus, t: Tick, campaigns: dict[str, Campaign]) -> None:
        p = t.view.params
        bs = t.clock.block_seconds
        warning = max(p.inference_validation_cutoff, 1)
        standby, fresh = self.planner.stats(
            t.history, self.planner.profile_for(self.planner.generation(t.view) or "v1")[0]
        )
        per: dict[str, dict[str, Any]] = {}
        for policy in ConfirmationPolicy:
            events = [e for e in status.events if e.policy is policy]
            mine = [
                c
                for c in campaigns.values()
                if c.purpose is Purpose.CONFIRMATION_POC
                and (
                    (policy is ConfirmationPolicy.STANDBY and c.key.startswith(f"{self.prefix}s-"))
                    or (policy is not ConfirmationPolicy.STANDBY and any(e.campaign == c.key for e in events))
                )
            ]
            per[policy.value] = {
                "events": len(events),
                "answered_in_time": sum(1 for e in events if e.answered_in_time),
                "rentals": sum(1 for c in mine for r in c.candidates.values() if r.provisioned),
                "gpu_seconds": round(sum(r.gpu_seconds for c in mine for r in c.candidates.values()), 3),
                "cost_usd": round(sum(r.cost_usd for c in mine for r in c.candidates.values()), 6),
            }
        per["ignore"]["risk"] = (
            "no GPU answers: confirmation weight 0 while our GPUs are gone; below alpha 0.5 the participant is "
            "INACTIVE (collateral slashed 10 %, no rewards that epoch)"
        )
        per["burst"]["risk"] = (
            f"pays for a rental per event; a fresh boot takes ~{fresh.quantile(0.5):.0f} s "
            f"({fresh.quantile(0.5) / bs:.0f} blocks) against {warning} block(s) of warning and a "
            f"{p.poc_stage_duration}-block generation: it registers after generation began, so usually earns nothing"
        )
        per["standby"]["risk"] = (
            f"pays storage for a stopped instance all inference phase; a start takes ~{standby.quantile(0.5):.0f} s "
            f"({standby.quantile(0.5) / bs:.0f} blocks), still far more than {warning} block(s) of warning; a start "
            "can fail when the host's GPU was taken"
        )
        status.policies = per
        status.statement = (
            f"A confirmation PoC gives {warning} block(s) (~{warning * bs:.0f} s) of warning before generation "
            "starts, and the dapi only moves nodes already operational at that height into it: only a GPU already "
            "serving can answer. A GPU rented or started on detection cannot, whatever the policy. "
            f"Current policy: {status.policy.value}."
        )
