"""The rental policy: when each GPU of a PoC window is pre-pulled, started, hedged and dropped.

This is the one decision function the service runs every tick and ``bench/schedule.py`` runs over 1,000 simulated
epochs, so the cost model proves the code that spends the money.

Per GPU slot the planner gives the policy a pool of *candidates* (rentals that may become that slot's node):

- ``standby`` candidates are created with ``target_state: "stopped"`` well before the window (vastai-api.md: the
  image is pulled, only storage is billed) and started in turn when the measured boot history says it is time;
- ``fresh`` candidates are ordinary rentals (pull + load on a billed GPU), the fallback when no standby is left, and
  the whole pool when the ``fresh`` strategy is configured (a provisioner without pre-pull support).

Rules, evaluated whenever anything changes:

1. Once one candidate is registered, every other one is dropped (the loser of a hedge stops billing at once).
2. The first start happens at ``deadline − lead``, where ``lead`` = the ``lead_quantile`` of the measured boots + the
   registration margin + ``retry_allowance`` median boots (room for one failure), never below ``min_lead``.
3. After that, whenever no booting candidate is *on track* — its projected ready time (the ``on_track_quantile`` of
   the measured boots that lasted at least as long as it has so far) falls before the deadline margin — the next
   candidate is started, up to ``max_parallel`` at once. A failure, an overdue boot, or a host whose download
   progress shows it is slow thus triggers the next start immediately; a slow host is dropped as soon as another
   candidate is on track (early replacement).
4. Past the deadline with nothing registered, the window is missed: everything is dropped (a node id registered after
   ``poc_start`` does not join that PoC, gonka-protocol.md §3), and the miss is reported.

The policy is pure: no I/O, no clock; times are wall seconds on any common origin.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from hybrid_scheduler.boots import BootStats


class CandidateKind(StrEnum):
    STANDBY = "standby"
    FRESH = "fresh"


class CandidateState(StrEnum):
    PLANNED = "planned"  # nothing asked yet
    PULLING = "pulling"  # standby: create (stopped) asked, image being pulled
    STOPPED = "stopped"  # standby: pulled and stopped, only storage billed
    STARTING = "starting"  # booting on a billed GPU (standby started, or fresh rental asked)
    READY = "ready"  # registered: this is the slot's node
    FAILED = "failed"
    DROPPED = "dropped"  # released by the policy (loser, unused standby, slow host, missed window)


LIVE_STATES = frozenset({CandidateState.PULLING, CandidateState.STOPPED, CandidateState.STARTING, CandidateState.READY})


@dataclass
class Candidate:
    name: str
    kind: CandidateKind
    state: CandidateState = CandidateState.PLANNED
    created_at: float | None = None
    started_at: float | None = None  # when the boot clock started: start (standby) / provision (fresh)
    ready_at: float | None = None
    ended_at: float | None = None
    slow: bool = False  # download progress shows a slow host

    @property
    def live(self) -> bool:
        return self.state in LIVE_STATES


class ActionKind(StrEnum):
    PREPULL = "prepull"  # create stopped (pull only)
    START = "start"  # start a pre-pulled standby
    RENT = "rent"  # fresh rental
    DROP = "drop"  # release it


@dataclass(frozen=True)
class Action:
    kind: ActionKind
    candidate: str
    reason: str


@dataclass
class Decision:
    actions: list[Action] = field(default_factory=list)
    wake_at: float | None = None  # the next time the decision can change without a new event
    lead_seconds: float = 0.0
    start_at: float = 0.0
    prepull_at: float | None = None
    missed: bool = False


class PolicyConfig(BaseModel):
    """Tunables in *real-world* seconds (the service divides them by the time profile's acceleration)."""

    model_config = ConfigDict(frozen=True)

    strategy: Literal["prepull", "fresh"] = "prepull"
    standby_count: int = Field(default=6, ge=0, description="stopped instances pre-pulled per slot")
    standby_spares: int = Field(default=2, ge=0, description="pulled standbys kept in reserve once starts begin")
    standby_pool: int = Field(default=10, ge=0, description="standby rentals allowed per slot, replacements included")
    fresh_count: int = Field(default=2, ge=0, description="fresh rentals allowed per slot (fallback or strategy)")
    prepull_lead: float = Field(default=1800.0, gt=0, description="pre-pull this long before poc_start (at least)")
    deadline_margin: float = Field(default=60.0, ge=0, description="be registered this long before poc_start")
    lead_quantile: float = Field(default=0.9, gt=0, le=1)
    retry_allowance: float = Field(default=1.0, ge=0, description="median boots of slack in the first start's lead")
    on_track_quantile: float = Field(default=0.95, gt=0, le=1)
    max_parallel: int = Field(default=3, ge=1, description="healthy candidates booting at once (slow hosts aside)")
    hedge_quantile: float = Field(default=0.99, gt=0, le=1, description="of a new start's boot, for the last call")
    hedge_count: int = Field(default=2, ge=1, description="candidates on track wanted after the last call")
    initial_parallel: int = Field(default=1, ge=1, description="candidates on track wanted from the first start")
    min_lead: float = Field(default=0.0, ge=0, description="configurable floor of the lead")
    prior_standby_boot: float = Field(default=480.0, gt=0, description="standby boot assumed until measured")
    prior_fresh_boot: float = Field(default=1500.0, gt=0, description="fresh boot assumed until measured")
    drop_slow: bool = True
    min_inet_down_mbps: float | None = Field(
        default=2000.0, gt=0, description="offer choice by bandwidth: the model download dominates a GPU's boot"
    )

    def scaled(self, scale: float) -> PolicyConfig:
        """Every duration multiplied by ``scale`` (1 / acceleration)."""
        return self.model_copy(
            update={
                name: getattr(self, name) * scale
                for name in (
                    "prepull_lead",
                    "deadline_margin",
                    "min_lead",
                    "prior_standby_boot",
                    "prior_fresh_boot",
                )
            }
        )

    def pool(self) -> list[Candidate]:
        """A slot's candidate pool, in the order they are used."""
        standby = max(self.standby_pool, self.standby_count) if self.strategy == "prepull" else 0
        letters = "abcdefghijklmnopqrstuvwxyz"
        kinds = [CandidateKind.STANDBY] * standby + [CandidateKind.FRESH] * self.fresh_count
        return [
            Candidate(name=letters[i % 26] + (str(i // 26) if i >= 26 else ""), kind=k) for i, k in enumerate(kinds)
        ]


class RentalPolicy:
    def __init__(self, config: PolicyConfig) -> None:
        self.config = config

    def lead(self, standby: BootStats, fresh: BootStats) -> float:
        """Seconds before the deadline at which the first candidate starts booting."""
        c = self.config
        stats = standby if c.strategy == "prepull" and c.standby_count > 0 else fresh
        lead = stats.quantile(c.lead_quantile) + c.deadline_margin + c.retry_allowance * stats.quantile(0.5)
        return max(lead, c.min_lead)

    def prepull_at(self, deadline: float, standby: BootStats, fresh: BootStats) -> float | None:
        c = self.config
        if c.strategy != "prepull" or c.standby_count == 0:
            return None
        # At least the configured lead, and always enough for a slow pull before the first start.
        return deadline - max(c.prepull_lead, self.lead(standby, fresh) + fresh.quantile(0.99))

    def decide(
        self, now: float, deadline: float, candidates: list[Candidate], standby: BootStats, fresh: BootStats
    ) -> Decision:
        c = self.config
        lead = self.lead(standby, fresh)
        d = Decision(lead_seconds=lead, start_at=deadline - lead, prepull_at=self.prepull_at(deadline, standby, fresh))

        if any(x.state is CandidateState.READY for x in candidates):
            for x in candidates:
                if x.state in {CandidateState.PULLING, CandidateState.STOPPED, CandidateState.STARTING}:
                    d.actions.append(Action(ActionKind.DROP, x.name, "another candidate is registered"))
            return d

        if now > deadline:
            d.missed = True
            for x in candidates:
                if x.live:
                    d.actions.append(Action(ActionKind.DROP, x.name, "window missed: nothing registered by poc_start"))
            return d

        wakes: list[float] = []
        if d.prepull_at is not None:
            if now >= d.prepull_at:
                d.actions.extend(self._prepulls(now >= d.start_at, candidates))
            else:
                wakes.append(d.prepull_at)

        if now < d.start_at:
            wakes.append(d.start_at)
            d.wake_at = min(wakes) if wakes else None
            return d

        target = deadline - c.deadline_margin
        last_call = self.last_call(deadline, standby, fresh)
        if now < last_call:
            wakes.append(last_call)
        booting = [x for x in candidates if x.state is CandidateState.STARTING]
        healthy = [x for x in booting if not x.slow]
        on_track: list[Candidate] = []
        for x in healthy:
            stats = standby if x.kind is CandidateKind.STANDBY else fresh
            started = x.started_at if x.started_at is not None else now
            elapsed = now - started
            change = stats.next_change(elapsed)
            if change is not None:
                wakes.append(max(started + change, now + 1e-3))
            remaining = stats.remaining(elapsed, c.on_track_quantile)
            if remaining is not None and now + remaining <= target:
                on_track.append(x)

        # Past the last call a fresh start could no longer make it on its own: keep a second one in flight.
        needed = c.initial_parallel if now < last_call else max(c.hedge_count, c.initial_parallel)
        if len(on_track) >= needed:
            if c.drop_slow:
                for x in booting:
                    if x.slow:
                        d.actions.append(Action(ActionKind.DROP, x.name, "slow host replaced early"))
        elif len(healthy) < c.max_parallel:
            reason = "no booting candidate is on track" if not on_track else "last call: hedge the one in flight"
            nxt = self._next(candidates, d.actions, reason)
            if nxt is not None:
                d.actions.append(nxt)
        d.wake_at = min(wakes) if wakes else None
        return d

    def last_call(self, deadline: float, standby: BootStats, fresh: BootStats) -> float:
        """The last moment a candidate started now would still be registered in time (``hedge_quantile``)."""
        c = self.config
        stats = standby if c.strategy == "prepull" and c.standby_count > 0 else fresh
        return deadline - c.deadline_margin - stats.quantile(c.hedge_quantile)

    def _prepulls(self, starting: bool, candidates: list[Candidate]) -> list[Action]:
        """Pre-pull ``standby_count`` standbys; once starts begin, keep ``standby_spares`` pulled ones in reserve,
        replacing the ones that failed or were started (a pull takes minutes: a spare is useful for a second failure)."""
        c = self.config
        standbys = [x for x in candidates if x.kind is CandidateKind.STANDBY]
        unstarted = sum(1 for x in standbys if x.state in {CandidateState.PULLING, CandidateState.STOPPED})
        if starting:
            want = c.standby_spares - unstarted
        else:
            want = c.standby_count - unstarted - sum(1 for x in standbys if x.state is CandidateState.STARTING)
        planned = [x for x in standbys if x.state is CandidateState.PLANNED]
        return [Action(ActionKind.PREPULL, x.name, "pre-pull a standby") for x in planned[: max(want, 0)]]

    @staticmethod
    def _next(candidates: list[Candidate], already: list[Action], reason: str) -> Action | None:
        """A pulled standby first, then one still pulling (it boots as soon as its pull ends), then a fresh rental."""
        asked = {a.candidate for a in already}
        for wanted in (CandidateState.STOPPED, CandidateState.PULLING):
            for x in candidates:
                if x.kind is CandidateKind.STANDBY and x.state is wanted:
                    return Action(ActionKind.START, x.name, reason)
        for x in candidates:
            if x.kind is CandidateKind.STANDBY and x.state is CandidateState.PLANNED and x.name in asked:
                return None  # its pre-pull was asked just now: start it on the next evaluation
        for x in candidates:
            if x.kind is CandidateKind.FRESH and x.state is CandidateState.PLANNED:
                return Action(ActionKind.RENT, x.name, f"{reason}; no standby left: fresh rental")
        return None
