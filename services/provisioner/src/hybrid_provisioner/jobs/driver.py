"""Driving one job from its durable record: offer → create → loading → running → reachable → service up → ready
→ registered → (held) → released, with retries on other machines, a deadline hedge, and takeover after a crash.

Rules that keep money safe:
- a create is preceded by its recorded intent (label + offer) and never re-sent blindly: an unknown outcome is
  resolved by looking the label up (vastai-api.md "Never retry a create blindly");
- every instance a track ever had is destroyed before the job ends, and its final cost is booked once;
- every transition is written (fenced by the job's lease) before the next side effect, with its events in an
  outbox inside the same record: a successor re-publishes them with the same envelope ids (consumers dedupe).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from dataclasses import dataclass
from typing import Any

from hybrid_common.messages import Payload, parse
from hybrid_common.messages.domain import Connectivity, FailureCause, PortMap
from hybrid_common.messages.events import (
    BudgetBlocked,
    InstanceCreated,
    InstanceDestroyed,
    InstanceFailed,
    InstanceReachable,
    InstanceReady,
    InstanceRunning,
    JobCompleted,
    JobFailed,
    NodeDeregistered,
    NodeRegistered,
)
from hybrid_provisioner import metrics
from hybrid_provisioner.dapi import DapiError, DapiRejected
from hybrid_provisioner.jobs.deps import Deps
from hybrid_provisioner.jobs.model import Failure, Job, JobState, ReleaseRequest, Track, TrackState
from hybrid_provisioner.offers import Offer, find_offers
from hybrid_provisioner.profiles import WorkloadProfile
from hybrid_provisioner.readiness import ProbeResult, model_served
from hybrid_provisioner.vast import (
    CreateOutcomeUnknown,
    InsufficientCredit,
    OfferUnavailable,
    VastError,
    VastRateLimited,
    VastUnavailable,
)
from hybrid_provisioner.vast.instance import address, failure, status_signature

log = logging.getLogger("hybrid.provisioner.job")

LABEL_LOOKUPS = 2  # a create intent with no instance under its label after this many looks did not happen
CREATE_RATE_LIMIT_RETRIES = 8
ATTEMPTS_PER_CREATE = 4  # offer-gone and refused creates allowed per instance of the budget
# How long a job's claim on an offer keeps other jobs off it (redis_keys "offer:claim"): it must outlast the checks
# between choosing the offer and recording the create intent; from then on the intent's track excludes the offer, and
# once the create succeeds Vast lists the offer as rented.
OFFER_CLAIM_TTL = 60.0


class LeaseLost(RuntimeError):
    """Another replica holds the job now: stop touching it."""


@dataclass
class _TrackRuntime:
    """What a driver keeps in memory about a track (rebuilt after a takeover)."""

    view: dict[str, Any] | None = None
    next_status: float = 0.0
    next_probe: float = 0.0
    last_probe_fail: float | None = None
    model_up: asyncio.Task[ProbeResult] | None = None
    probe_detail: str = ""
    reachable_at: float | None = None


class JobDriver:
    def __init__(self, deps: Deps, job: Job, holder: str) -> None:
        self.d = deps
        self.s = deps.settings
        self.job = job
        self.holder = holder
        self.rt: dict[int, _TrackRuntime] = {}
        self.log = logging.LoggerAdapter(log, {"job_id": job.job_id, "slot_id": job.slot_id})

    # ------------------------------------------------------------------ persistence and events

    @staticmethod
    def now() -> float:
        return time.time()

    async def save(self) -> None:
        if not await self.d.store.save(self.job, self.holder):
            raise LeaseLost(self.job.job_id)

    def emit(self, payload: Payload) -> None:
        env = self.d.publisher.envelope(
            payload, correlation_id=self.job.correlation_id, causation_id=self.job.causation_id
        )
        self.job.outbox.append(env.model_dump(mode="json"))

    async def flush(self) -> None:
        if not self.job.outbox:
            return
        for raw in list(self.job.outbox):
            await self.d.publisher.publish(parse(raw))
        self.job.outbox.clear()
        await self.save()

    async def commit(self) -> None:
        await self.save()
        await self.flush()

    def hook(self, point: str) -> None:
        self.d.hook(point)

    def runtime(self, track: Track) -> _TrackRuntime:
        return self.rt.setdefault(track.n, _TrackRuntime())

    @property
    def profile(self) -> WorkloadProfile:
        profile = self.d.profiles[self.job.profile]
        if self.job.disk_gb is not None:
            # The command's disk applies to the offer search (disk_space) and the create body alike.
            profile = profile.model_copy(update={"disk_gb": self.job.disk_gb})
        return profile

    async def deadline(self) -> float | None:
        """The wall time of poc_start. ``deadline`` is the scheduler's estimate when it sent the command, but the
        window opens at a *height* (gonka-protocol.md §5): once that time has passed while the chain view the
        scheduler publishes is still below ``deadline_height`` (a halted or slow chain), the deadline follows the
        chain — it stays at least the remaining blocks ahead of now, so the job is not missed before its window."""
        job = self.job
        if job.deadline_height is None or (job.deadline is not None and self.now() <= job.deadline):
            return job.deadline
        view = await self.d.chain.current()
        if view is None:
            return job.deadline
        estimate = view.height_to_time(job.deadline_height)
        remaining = job.deadline_height - view.block_height
        if remaining > 0:
            estimate = max(estimate, self.now() + remaining * view.block_seconds)
        return estimate if job.deadline is None else max(job.deadline, estimate)

    # ------------------------------------------------------------------ main loop

    async def run(self) -> None:
        await self.flush()
        if self.job.profile not in self.d.profiles and not self.job.terminal:
            await self.fail(FailureCause.API_ERROR, f"unknown profile {self.job.profile!r}")
        while not self.job.terminal:
            state = self.job.state
            metrics.JOBS.labels(state.value).inc()
            try:
                await self._step(state)
            finally:
                metrics.JOBS.labels(state.value).dec()

    async def _step(self, state: JobState) -> None:
        if state == JobState.ACCEPTED:
            self.hook("accepted")
            await self.on_accepted()
        elif state == JobState.PROVISIONING:
            await self.on_provisioning()
        elif state == JobState.READY:
            self.hook("ready")
            await self.on_ready()
        elif state in (JobState.REGISTERED, JobState.SERVING, JobState.STANDBY):
            if state == JobState.REGISTERED:
                self.hook("registered")
            await self.on_holding()
        elif state == JobState.RELEASING:
            self.hook("releasing")
            await self.on_releasing()
        elif state == JobState.FAILING:
            await self.on_failing()

    # ------------------------------------------------------------------ accepted: claim the slot

    async def on_accepted(self) -> None:
        job = self.job
        while True:
            if await self.pending_release() is not None:
                job.state = JobState.RELEASING
                await self.commit()
                return
            owner = await self.d.store.slot_owner(job.slot_id)
            stale: str | None = None
            if owner and owner != job.job_id:
                other = await self.d.store.load(owner)
                if other is None or other.terminal:
                    stale = owner
                else:
                    # One live job per slot: this one waits for the slot's previous job to be released.
                    deadline = await self.deadline()
                    if deadline is not None and self.now() > deadline + self.s.deadline_grace:
                        await self.fail(FailureCause.DEADLINE_MISSED, f"slot still held by job {owner}")
                        return
                    await asyncio.sleep(self.s.tick)
                    continue
            if await self.d.store.claim_slot(job.slot_id, job.job_id, stale):
                break
        if self.profile.front and job.gateway_poc_port is None:
            pair = await self.d.store.gateway_ports(job.slot_id, self.s.gateway_port_first, self.s.gateway_port_last)
            if pair is None:
                await self.fail(FailureCause.API_ERROR, "no free gateway port pair (GATEWAY_PORT_FIRST..LAST)")
                return
            job.gateway_poc_port, job.gateway_inference_port = pair
        pw_env = self.profile.password_env
        if pw_env and pw_env not in job.env and pw_env not in self.profile.env:
            job.env[pw_env] = secrets.token_urlsafe(18)  # comfyui.md: set our own WEB_PASSWORD at launch
        job.state = JobState.PROVISIONING
        await self.d.store.set_slot(job.slot_id, state="provisioning")
        await self.commit()

    # ------------------------------------------------------------------ provisioning: tracks

    async def on_provisioning(self) -> None:
        job = self.job
        while job.state == JobState.PROVISIONING:
            if await self.pending_release() is not None:
                job.state = JobState.RELEASING
                await self.commit()
                return
            if job.winner is not None:
                await self.promote(job.track(job.winner))
                return
            live = job.live_tracks()
            if live:
                await asyncio.gather(*(self.advance(t) for t in live))
            for t in job.tracks:
                unbooked = t.state == TrackState.DESTROYED and t.instance_id is not None and not t.booked
                if t.state == TrackState.FAILED or unbooked:
                    await self.discard(t, reason=f"failed: {t.failure.cause.value if t.failure else 'unknown'}")
            ready = [
                t for t in job.live_tracks() if t.state == TrackState.SERVICE_UP or (t.state == TrackState.STOPPED)
            ]
            if ready:
                winner = min(ready, key=lambda t: (t.service_up_at or t.created_at or 0.0, t.n))
                job.winner = winner.n
                await self.commit()
                await self.promote(winner)
                return
            now = self.now()
            deadline = await self.deadline()
            if deadline is not None and not job.registered and now > deadline + self.s.deadline_grace:
                await self.fail(FailureCause.DEADLINE_MISSED, "not ready before the deadline (poc_start)")
                return
            live = job.live_tracks()
            used = self.instances_tried()
            attempts = len(job.tracks) - job.attempt_base
            if not live:
                if used >= self.s.max_creates or attempts >= self.s.max_creates * ATTEMPTS_PER_CREATE:
                    last = next((t.failure for t in reversed(job.tracks) if t.failure), None)
                    cause = last.cause if last else FailureCause.API_ERROR
                    await self.fail(
                        cause, f"{used} instances in {attempts} attempts; last: {last.message if last else '-'}"
                    )
                    return
                await self.start_track(hedge=False)
            elif (
                job.hedge_allowed
                and not job.hedged
                and len(live) == 1
                and deadline is not None
                and now >= deadline - self.s.hedge_lead
                and used < self.s.max_creates + 1
            ):
                self.log.warning("slot %s not ready %.0fs before its deadline: hedging", job.slot_id, deadline - now)
                await self.start_track(hedge=True)
            if job.state != JobState.PROVISIONING:
                return
            probing = any(t.state in (TrackState.REACHABLE,) for t in job.live_tracks())
            await asyncio.sleep(min(self.s.tick, self.s.probe_interval) if probing else self.s.tick)

    def instances_tried(self) -> int:
        """Instances rented since the last replacement (offers that vanished before a create cost nothing)."""
        return sum(1 for t in self.job.tracks[self.job.attempt_base :] if t.instance_id is not None or t.live)

    async def start_track(self, *, hedge: bool) -> None:
        job = self.job
        profile = self.profile
        busy = [t.machine_id for t in job.live_tracks()]
        policy = profile.policy.narrowed(job.offer_filter, [*job.excluded_machines, *busy])
        # Offers other jobs are renting right now: racing them for one GPU only ends in a 410 for one of us.
        taken = {
            t.offer_id
            for other in await self.d.store.all()
            if other.job_id != job.job_id and not other.terminal
            for t in other.live_tracks()
        }
        try:
            offers = await find_offers(self.d.vast, profile, policy, exclude_offers={*job.excluded_offers, *taken})
        except VastError as exc:
            self.log.warning("offer search failed: %s", exc)
            await asyncio.sleep(self.s.tick)
            return
        if not offers:
            if hedge:
                job.hedged = True  # nothing to race with: keep waiting on the first instance
                await self.commit()
                return
            await self.fail(
                FailureCause.NO_OFFERS, f"no offer fits profile {profile.name} (excluded {policy.exclude_machine_ids})"
            )
            return
        offer = await self.claim_offer(offers)
        if offer is None:
            # Every fitting offer is being rented by another job right now (vastai-api.md: a second create on it
            # only gets a 410). Each claim ends in a rental, after which the offer is no longer listed, or lapses:
            # look again next tick.
            self.log.debug("all %d fitting offers are claimed by other jobs; waiting", len(offers))
            return
        deadline = await self.deadline()
        verdict = await self.d.budget.check(offer.dph_total, deadline, job.epoch_index, await self.d.store.all())
        if verdict is not None:
            metrics.BUDGET_BLOCKED.labels(verdict.scope).inc()
            self.emit(
                BudgetBlocked(
                    job_id=job.job_id,
                    scope=verdict.scope,
                    cap_usd=verdict.cap_usd,
                    spent_usd=verdict.spent_usd,
                    estimated_usd=verdict.estimated_usd,
                )
            )
            await self.d.store.drop_offer_claim(offer.id, job.job_id)
            if hedge:
                job.hedged = True
                await self.commit()
                return
            await self.fail(
                FailureCause.BUDGET,
                f"{verdict.scope} budget: spent ${verdict.spent_usd:.2f} + estimated ${verdict.estimated_usd:.2f} "
                f"> cap ${verdict.cap_usd:.2f}",
            )
            return
        estimate = self.d.budget.estimate(offer.dph_total, deadline)
        try:
            credit = await self.d.vast.credit()
        except VastError:
            credit = None
        if credit is not None and credit < estimate:
            self.emit(
                BudgetBlocked(job_id=job.job_id, scope="credit", cap_usd=credit, spent_usd=0.0, estimated_usd=estimate)
            )
            await self.d.store.drop_offer_claim(offer.id, job.job_id)
            await self.fail(FailureCause.INSUFFICIENT_CREDIT, f"credit ${credit:.2f} < estimated ${estimate:.2f}")
            return
        self.hook("offer")
        if not await self.d.store.claim_offer(offer.id, job.job_id, OFFER_CLAIM_TTL):
            self.log.warning("the claim on offer %d lapsed during the checks and another job took it", offer.id)
            return
        epoch_tag = str(job.epoch_index) if job.epoch_index is not None else "m"
        seq = await self.d.store.next_label_seq(job.slot_id, epoch_tag)
        label = f"{self.s.label_prefix}-{job.slot_id}-{epoch_tag}" + (f"-{seq}" if seq > 1 else "")
        storage = offer.raw.get("storage_total_cost")
        track = Track(
            n=len(job.tracks) + 1,
            label=label,
            offer_id=offer.id,
            machine_id=offer.machine_id,
            gpu_name=offer.gpu_name,
            num_gpus=offer.num_gpus,
            dph_total=offer.dph_total,
            storage_dph=float(storage) if isinstance(storage, (int, float)) else 0.0,
            estimate_usd=round(estimate, 6),
            hedge=hedge,
        )
        job.tracks.append(track)
        if hedge:
            job.hedged = True
        await self.commit()  # the intent: a successor finds the instance by this label
        self.hook("creating")
        await self.create(track, offer)

    async def claim_offer(self, offers: list[Offer]) -> Offer | None:
        """The cheapest of ``offers`` no other job is creating on, claimed for this job; None if all are claimed."""
        for offer in offers:
            if await self.d.store.claim_offer(offer.id, self.job.job_id, OFFER_CLAIM_TTL):
                return offer
        return None

    def create_payload(self, label: str) -> dict[str, Any]:
        job, profile = self.job, self.profile
        env: dict[str, str] = {f"-p {p}:{p}": "1" for p in profile.ports}
        env.update(profile.env)
        env.update(job.env)
        payload: dict[str, Any] = {
            "client_id": "me",
            "image": job.image or profile.image,
            "env": env,
            "price": None,
            "disk": profile.disk_gb,
            "label": label,
            "extra": None,
            "onstart": profile.onstart,
            "image_login": None,
            "python_utf8": False,
            "lang_utf8": False,
            "use_jupyter_lab": False,
            "jupyter_dir": None,
            "force": False,
            "cancel_unavail": True,
            "template_hash_id": None,
            "user": None,
            "runtype": profile.runtype,
            "args": profile.args,
        }
        if job.prepull:
            payload["target_state"] = "stopped"
        return payload

    async def create(self, track: Track, offer: Offer) -> None:
        job = self.job
        for attempt in range(CREATE_RATE_LIMIT_RETRIES + 1):
            try:
                result = await self.d.vast.create_instance(offer.id, self.create_payload(track.label))
            except OfferUnavailable as exc:
                metrics.CREATES.labels("offer_gone").inc()
                job.excluded_offers.append(offer.id)
                job.excluded_machines.append(offer.machine_id)
                await self.track_failed(track, FailureCause.OFFER_GONE, str(exc), logs=False)
                return
            except InsufficientCredit as exc:
                metrics.CREATES.labels("no_credit").inc()
                track.state = TrackState.DESTROYED
                track.failure = Failure(cause=FailureCause.INSUFFICIENT_CREDIT, message=str(exc))
                self.emit(
                    BudgetBlocked(job_id=job.job_id, scope="credit", cap_usd=0.0, spent_usd=0.0, estimated_usd=0.0)
                )
                await self.fail(FailureCause.INSUFFICIENT_CREDIT, str(exc))
                return
            except VastRateLimited:
                metrics.CREATES.labels("rate_limited").inc()
                # A 429 is refused before it runs; still, look before re-sending.
                await asyncio.sleep(min(self.s.vast_backoff * (2**attempt), self.s.vast_backoff_cap))
                if await self.adopt_by_label(track):
                    return
                continue
            except (CreateOutcomeUnknown, VastUnavailable) as exc:
                metrics.CREATES.labels("unknown").inc()
                self.log.warning("create on offer %d: outcome unknown (%s); looking up %s", offer.id, exc, track.label)
                if await self.resolve_intent(track):
                    return
                job.excluded_offers.append(offer.id)
                await self.track_failed(track, FailureCause.CREATE_FAILED, str(exc), logs=False)
                return
            except VastError as exc:
                metrics.CREATES.labels("refused").inc()
                job.excluded_offers.append(offer.id)
                await self.track_failed(track, FailureCause.CREATE_FAILED, str(exc), logs=False)
                return
            self.hook("created")
            metrics.CREATES.labels("created" if result.accepted else "trap").inc()
            await self.created(track, result.instance_id)
            if not result.accepted:
                # vastai-api.md "Trap": success:false with new_contract — it exists, stopped, billing storage.
                job.excluded_machines.append(offer.machine_id)
                await self.track_failed(
                    track, FailureCause.CREATE_FAILED, f"create refused but left instance: {result.error}: {result.msg}"
                )
            return
        job.excluded_offers.append(offer.id)
        await self.track_failed(track, FailureCause.API_ERROR, "create rate-limited on every attempt", logs=False)

    async def created(self, track: Track, instance_id: int) -> None:
        track.instance_id = instance_id
        track.created_at = track.created_at or self.now()
        track.boot_started_at = track.boot_started_at or track.created_at
        track.state = TrackState.LOADING
        track.status_changed_at = self.now()
        self.emit(
            InstanceCreated(
                job_id=self.job.job_id,
                slot_id=self.job.slot_id,
                instance_id=instance_id,
                offer_id=track.offer_id,
                machine_id=track.machine_id,
                gpu_name=track.gpu_name,
                num_gpus=track.num_gpus,
                dph_total=track.dph_total,
                label=track.label,
                hedge=track.hedge,
                stopped=self.job.prepull,
            )
        )
        await self.d.store.set_slot(self.job.slot_id, instance=str(instance_id))
        await self.commit()
        await self.d.ledger.record(self.job, track)
        self.hook("loading")
        if self.profile.gives_ssh and not track.ssh_key_attached:
            await self.attach_key(track)

    async def attach_key(self, track: Track) -> None:
        key = self.s.ssh_public_key()
        if key is None or track.instance_id is None:
            return
        try:
            await self.d.vast.attach_ssh_key(track.instance_id, key)
        except VastError as exc:
            self.log.warning("attaching the SSH key to %s failed: %s", track.instance_id, exc)
            return
        track.ssh_key_attached = True
        await self.save()

    async def adopt_by_label(self, track: Track) -> bool:
        try:
            found = await self.d.watcher.by_label(track.label)
        except VastError as exc:
            self.log.warning("label lookup %s failed: %s", track.label, exc)
            return False
        if not found:
            return False
        found.sort(key=lambda r: int(r["id"]))
        self.log.info("adopting instance %s found under label %s", found[0]["id"], track.label)
        await self.created(track, int(found[0]["id"]))
        return True

    async def resolve_intent(self, track: Track) -> bool:
        """An intent whose create outcome is unknown: adopt the instance under its label, or conclude there is none
        after looking twice a status interval apart."""
        for look in range(LABEL_LOOKUPS):
            if await self.adopt_by_label(track):
                return True
            if look + 1 < LABEL_LOOKUPS:
                await asyncio.sleep(self.s.status_poll)
        return False

    # ------------------------------------------------------------------ advancing one track

    async def advance(self, track: Track) -> None:
        rt = self.runtime(track)
        now = self.now()
        if track.state == TrackState.CREATING:
            # Taken over with an intent and no recorded outcome.
            if not await self.resolve_intent(track):
                track.state = TrackState.DESTROYED
                track.failure = Failure(cause=FailureCause.CREATE_FAILED, message="create outcome unknown; none found")
                await self.commit()
            return
        if now >= rt.next_status:
            rt.next_status = now + self.s.status_poll
            if not await self.poll_status(track):
                return
        if track.state == TrackState.RUNNING:
            await self.on_running(track)
        elif track.state == TrackState.REACHABLE and now >= rt.next_probe:
            rt.next_probe = now + self.s.probe_interval
            await self.probe_service(track)

    async def poll_status(self, track: Track) -> bool:
        """Refresh the track from the API; False when the track just failed or vanished."""
        assert track.instance_id is not None
        rt = self.runtime(track)
        try:
            inst = await self.d.watcher.get(track.instance_id, max_age=self.s.status_poll / 2)
        except VastError as exc:
            self.log.warning("status of %s unavailable: %s", track.instance_id, exc)
            return True
        now = self.now()
        if inst is None:
            track.state = TrackState.DESTROYED
            track.destroyed_at = now
            await self.track_failed(track, FailureCause.HOST_OFFLINE, "the instance vanished", logs=False)
            return False
        rt.view = inst
        sig = status_signature(inst)
        if sig != track.last_status:
            track.last_status = sig
            track.status_changed_at = now
        expect_stopped = self.job.prepull
        if (
            self.job.start_requested_at is not None
            and track.state == TrackState.LOADING
            and inst.get("actual_status") in ("exited", "stopped")
            and now - (track.boot_started_at or now) < self.s.stall_timeout
        ):
            # A standby we just started: the listing can predate the start PUT, and the container reads exited until
            # it is loading again (vastai-api.md: null -> loading -> running). Not a failure yet; the stall and boot
            # timeouts still bound a start that never takes.
            return True
        bad = failure(inst, expect_stopped=expect_stopped)
        if bad is not None:
            await self.track_failed(track, bad[0], bad[1])
            return False
        actual = inst.get("actual_status")
        if track.state in (TrackState.LOADING, TrackState.STOPPED):
            if actual == "running":
                track.state = TrackState.RUNNING
                track.running_at = now
                self.emit(
                    InstanceRunning(
                        job_id=self.job.job_id,
                        slot_id=self.job.slot_id,
                        instance_id=track.instance_id,
                        seconds_since_create=round(now - (track.created_at or now), 3),
                    )
                )
                await self.commit()
                await self.d.ledger.record(self.job, track)
                self.hook("running")
                return True
            if expect_stopped and actual == "stopped" and inst.get("intended_status") == "stopped":
                if track.state != TrackState.STOPPED:
                    track.state = TrackState.STOPPED
                    await self.commit()
                return True
            started = track.boot_started_at or track.created_at or track.intent_at
            if now - started > self.s.effective_boot_timeout:
                await self.track_failed(
                    track,
                    FailureCause.STUCK_LOADING,
                    f"not running after {now - started:.0f}s: {inst.get('status_msg')}",
                )
                return False
            if track.state == TrackState.LOADING and now - (track.status_changed_at or now) > self.s.stall_timeout:
                await self.track_failed(
                    track,
                    FailureCause.STUCK_LOADING,
                    f"no progress for {now - (track.status_changed_at or now):.0f}s: {inst.get('status_msg')}",
                )
                return False
        elif actual not in ("running", None, "loading"):
            await self.track_failed(track, FailureCause.HOST_OFFLINE, f"instance {actual}: {inst.get('status_msg')}")
            return False
        return True

    async def on_running(self, track: Track) -> None:
        rt = self.runtime(track)
        addr = address(rt.view or {})
        profile = self.profile
        needed = {profile.readiness.container_port}
        if profile.front:
            needed |= {profile.api_port, profile.inference_port}
        direct_ok = addr.public_ip is not None and needed <= set(addr.ports)
        connectivity: Connectivity
        if direct_ok and profile.connectivity in ("auto", "direct"):
            connectivity = "direct"
        elif profile.connectivity != "direct" and profile.gives_ssh and addr.ssh_host and addr.ssh_port:
            connectivity = "tunnel"
        else:
            # vastai-api.md: ports appear only once running, and may lag; give up at the service timeout.
            if self.now() - (track.running_at or self.now()) > self.s.service_timeout:
                await self.track_failed(track, FailureCause.NOT_REACHABLE, "running but its ports never appeared")
            return
        track.public_ip = addr.public_ip
        track.ports = addr.ports
        # vastai-api.md: an args runtype runs the image's entrypoint with no SSH daemon, yet the API still lists the
        # SSH proxy's host and port. Reporting them would send a tunnel client into a connection that never answers.
        track.ssh_host = addr.ssh_host if profile.gives_ssh else None
        track.ssh_port = addr.ssh_port if profile.gives_ssh else None
        track.connectivity = connectivity
        track.state = TrackState.REACHABLE
        rt.reachable_at = self.now()
        await self.commit()
        await self.d.ledger.record(self.job, track)
        self.hook("reachable")

    def base_url(self, track: Track, container_port: int) -> str | None:
        host_port = track.ports.get(container_port)
        if track.public_ip is None or host_port is None:
            return None
        return f"http://{track.public_ip}:{host_port}"

    async def probe_service(self, track: Track) -> None:
        rt = self.runtime(track)
        readiness = self.profile.readiness
        now = self.now()
        if track.connectivity == "tunnel":
            # Only the front (holding the SSH forward) can reach it: its probe decides.
            await self.service_up(track, ProbeResult(True, "tunnel: probed through the front"))
            return
        base = self.base_url(track, readiness.container_port)
        if base is None:
            return
        if readiness.kind == "mlnode":
            result = await self.d.probe.mlnode_state(base)
        elif readiness.kind == "comfyui":
            pw_env = self.profile.password_env
            password = (self.job.env.get(pw_env) or self.profile.env.get(pw_env)) if pw_env else None
            result = await self.d.probe.comfyui(base, password)
        elif readiness.kind == "mlnode_model":
            result = await self.probe_model(track, base)
        else:
            result = await self.d.probe.tcp(track.public_ip or "127.0.0.1", track.ports[readiness.container_port])
        if result.ok:
            await self.service_up(track, result)
            return
        rt.last_probe_fail = now
        rt.probe_detail = result.detail
        if now - (track.running_at or now) > self.s.service_timeout:
            await self.track_failed(
                track,
                FailureCause.SERVICE_NOT_READY,
                f"service not answering after {self.s.service_timeout:.0f}s: {result.detail}",
            )

    async def probe_model(self, track: Track, base: str) -> ProbeResult:
        """PoC v2 readiness (gonka-protocol.md §7): the PoC model loaded and served by vLLM."""
        rt = self.runtime(track)
        readiness = self.profile.readiness
        state = await self.d.probe.mlnode_state(base)
        if not state.ok or not isinstance(state.body, dict):
            return state
        if model_served(state.body, readiness.model):
            return ProbeResult(True, f"vLLM serves {readiness.model}", state.body)
        task = rt.model_up
        if task is not None and task.done():
            outcome = task.result()
            rt.model_up = None
            if not outcome.ok:
                self.log.warning("inference/up on %s: %s", track.instance_id, outcome.detail)
            return ProbeResult(False, f"inference/up answered {outcome.detail}")
        loading = state.body.get("state") == "INFERENCE"
        if task is None and not loading:
            rt.model_up = asyncio.create_task(self.d.probe.model_up(base, readiness, self.s.service_timeout))
            track.model_up_requested_at = self.now()
            await self.save()
        return ProbeResult(False, f"loading {readiness.model}")

    async def service_up(self, track: Track, result: ProbeResult) -> None:
        rt = self.runtime(track)
        now = self.now()
        track.state = TrackState.SERVICE_UP
        track.service_up_at = now
        # Upper bound of how late the probe saw the service: since the last failed probe, or — when the very first
        # probe succeeded — since probing could start (the ports became known).
        since = rt.last_probe_fail if rt.last_probe_fail is not None else rt.reachable_at
        if since is not None:
            track.readiness_lag = round(now - since, 3)
            metrics.READINESS_LAG.observe(track.readiness_lag)
        self.log.info("instance %s: %s", track.instance_id, result.detail)
        await self.commit()
        self.hook("service_up")

    # ------------------------------------------------------------------ failures and destruction

    async def track_failed(self, track: Track, cause: FailureCause, message: str, *, logs: bool = True) -> None:
        job = self.job
        metrics.FAILURES.labels(cause.value).inc()
        if track.machine_id and cause not in (FailureCause.CREATE_FAILED, FailureCause.API_ERROR):
            job.excluded_machines.append(track.machine_id)
        tail = ""
        if logs and track.instance_id is not None:
            with contextlib.suppress(VastError, TimeoutError):
                tail = (await asyncio.wait_for(self.d.vast.request_logs(track.instance_id, 100), 15.0))[-4000:]
        track.failure = Failure(cause=cause, message=message)
        if track.state != TrackState.DESTROYED:
            track.state = TrackState.FAILED if track.instance_id is not None else TrackState.DESTROYED
        will_retry = self.instances_tried() < self.s.max_creates or len(job.live_tracks()) > 0
        self.emit(
            InstanceFailed(
                job_id=job.job_id,
                slot_id=job.slot_id,
                instance_id=track.instance_id,
                machine_id=track.machine_id or None,
                cause=cause,
                message=message[:2000],
                logs_tail=tail,
                will_retry=will_retry,
            )
        )
        self.log.warning(
            "instance %s on machine %s failed: %s: %s", track.instance_id, track.machine_id, cause, message
        )
        await self.commit()

    async def discard(self, track: Track, reason: str) -> None:
        """Destroy a track's instance (resolving an unknown create first) and book its cost."""
        if track.state == TrackState.DESTROYED and track.instance_id is None:
            return
        if track.state == TrackState.CREATING and track.instance_id is None and not await self.resolve_intent(track):
            track.state = TrackState.DESTROYED
            await self.commit()
            return
        if track.instance_id is None:
            track.state = TrackState.DESTROYED
            await self.commit()
            return
        if track.state == TrackState.DESTROYED and track.destroyed_at is not None and track.booked:
            return
        rt = self.runtime(track)
        if rt.model_up is not None:
            rt.model_up.cancel()
        if track.state != TrackState.DESTROYED:
            await self.d.vast.destroy_instance(track.instance_id)
            self.hook("destroying")
            track.destroyed_at = self.now()
            track.state = TrackState.DESTROYED
            # The GPU is free again: other jobs need not wait out our claim on its offer.
            await self.d.store.drop_offer_claim(track.offer_id, self.job.job_id)
        cost = await self.d.ledger.finalise(self.job, track)
        track.booked = True
        metrics.SPEND.inc(cost.usd)
        metrics.GPU_SECONDS.inc(cost.gpu_seconds)
        self.emit(
            InstanceDestroyed(
                slot_id=self.job.slot_id,
                instance_id=track.instance_id,
                reason=reason,
                gpu_seconds=round(cost.gpu_seconds, 3),
                storage_seconds=round(cost.storage_seconds, 3),
                cost_usd=round(cost.usd, 6),
            )
        )
        await self.commit()

    async def fail(self, cause: FailureCause, message: str) -> None:
        job = self.job
        metrics.FAILURES.labels(cause.value).inc()
        job.failure = Failure(cause=cause, message=message)
        job.state = JobState.FAILING
        self.log.error("job failed: %s: %s", cause, message)
        await self.commit()
        await self.on_failing()

    async def on_failing(self) -> None:
        job = self.job
        for t in job.tracks:
            await self.discard(t, reason=f"job failed: {job.failure.cause.value if job.failure else '?'}")
        await self.d.store.free_slot(job.slot_id, job.job_id, "failed")
        job.state = JobState.FAILED
        job.ended_at = self.now()
        failure_ = job.failure or Failure(cause=FailureCause.API_ERROR, message="failed")
        self.emit(
            JobFailed(
                job_id=job.job_id,
                slot_id=job.slot_id,
                cause=failure_.cause,
                message=failure_.message[:2000],
                standby=job.prepull,
            )
        )
        await self.commit()

    # ------------------------------------------------------------------ promotion: the winner serves the slot

    async def promote(self, winner: Track | None) -> None:
        job = self.job
        if winner is None or not winner.live:
            job.winner = None
            await self.commit()
            return
        for t in job.tracks:
            if t is not winner and t.live:
                t.state = TrackState.FAILED
                t.failure = Failure(cause=FailureCause.DEADLINE_MISSED, message="lost the hedge race")
                await self.discard(t, reason="hedge lost")
        if winner.state == TrackState.STOPPED:
            job.state = JobState.STANDBY
            await self.d.store.set_slot(job.slot_id, state="standby", instance=str(winner.instance_id))
            await self.commit()
            return
        profile = self.profile
        assert winner.instance_id is not None
        if job.front_published_for != winner.instance_id:
            self.emit(
                InstanceReachable(
                    job_id=job.job_id,
                    slot_id=job.slot_id,
                    instance_id=winner.instance_id,
                    connectivity=winner.connectivity or "direct",
                    public_ip=winner.public_ip,
                    ports=[PortMap(container_port=c, host_port=h) for c, h in sorted(winner.ports.items())],
                    ssh_host=winner.ssh_host,
                    ssh_port=winner.ssh_port,
                    api_container_port=profile.api_port,
                    inference_container_port=profile.inference_port,
                    gateway_poc_port=job.gateway_poc_port if profile.front else None,
                    gateway_inference_port=job.gateway_inference_port if profile.front else None,
                )
            )
            job.front_published_for = winner.instance_id
            await self.commit()
        if profile.front and self.s.probe_via == "front" and not await self.wait_front(winner):
            return
        now = self.now()
        job.ready_at = now
        job.state = JobState.READY
        boot = now - (winner.boot_started_at or winner.created_at or now)
        self.emit(
            InstanceReady(
                job_id=job.job_id,
                slot_id=job.slot_id,
                instance_id=winner.instance_id,
                profile=job.profile,
                gpu_name=winner.gpu_name,
                boot_seconds=round(boot, 3),
                pull_seconds=round(winner.running_at - winner.created_at, 3)
                if winner.running_at and winner.created_at
                else None,
                readiness_lag_seconds=winner.readiness_lag,
            )
        )
        metrics.BOOT_SECONDS.labels(job.profile, winner.gpu_name).observe(boot)
        metrics.PROVISIONING_SECONDS.labels(job.profile).observe(now - job.accepted_at)
        await self.d.store.set_slot(job.slot_id, state="ready", instance=str(winner.instance_id))
        await self.commit()

    async def wait_front(self, winner: Track) -> bool:
        """Until ``GET /{version}/api/v1/state`` answers through the front; False if the winner failed meanwhile."""
        job = self.job
        assert job.gateway_poc_port is not None
        started = self.now()
        rt = self.runtime(winner)
        while True:
            view = await self.d.chain.current()
            version = (view.mlnode_version if view and view.mlnode_version else None) or self.s.mlnode_version
            result = await self.d.probe.front(self.s.node_front_probe_host, job.gateway_poc_port, version)
            if result.ok:
                return True
            now = self.now()
            if now >= rt.next_status:
                rt.next_status = now + self.s.status_poll
                if not await self.poll_status(winner):
                    job.winner = None
                    await self.discard(winner, reason="failed before the front reached it")
                    await self.commit()
                    return False
            if await self.pending_release() is not None:
                job.state = JobState.RELEASING
                await self.commit()
                return False
            if now - started > self.s.service_timeout:
                winner.state = TrackState.FAILED
                winner.failure = Failure(
                    cause=FailureCause.NOT_REACHABLE, message=f"the node front never reached it: {result.detail}"
                )
                job.winner = None
                await self.track_failed(winner, FailureCause.NOT_REACHABLE, winner.failure.message)
                return False
            await asyncio.sleep(self.s.probe_interval)

    # ------------------------------------------------------------------ registration (gonka-protocol.md §3)

    def node_config(self, winner: Track) -> dict[str, Any]:
        job, profile = self.job, self.profile
        assert job.gateway_poc_port is not None and job.gateway_inference_port is not None
        return {
            "id": job.slot_id,
            "host": self.s.node_front_host,
            "inference_port": job.gateway_inference_port,
            "inference_segment": "",
            "poc_port": job.gateway_poc_port,
            "poc_segment": "",
            "max_concurrent": self.s.node_max_concurrent,
            "models": profile.node_models,
            "hardware": [{"type": winner.gpu_name, "count": winner.num_gpus}],
        }

    async def on_ready(self) -> None:
        job = self.job
        winner = job.winning
        if not (job.register_node and self.profile.front) or winner is None:
            job.state = JobState.SERVING
            await self.d.store.set_slot(job.slot_id, state="serving")
            await self.commit()
            return
        delay = self.s.tick
        while True:
            if await self.pending_release() is not None:
                job.state = JobState.RELEASING
                await self.commit()
                return
            try:
                await self.d.dapi.upsert(self.node_config(winner))
                # A slot disabled at an earlier release is enabled again (the upsert keeps its admin state).
                await self.d.dapi.enable(job.slot_id)
                break
            except DapiRejected as exc:
                await self.fail(FailureCause.REGISTRATION_FAILED, f"the dapi refused the node: {exc}")
                return
            except DapiError as exc:
                deadline = await self.deadline()
                if deadline is not None and self.now() > deadline + self.s.deadline_grace and not job.registered:
                    await self.fail(FailureCause.REGISTRATION_FAILED, f"dapi unreachable until the deadline: {exc}")
                    return
                self.log.warning("registration of %s failed (%s); retrying", job.slot_id, exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 10.0)
        self.hook("registering")
        deadline = await self.deadline()
        now = self.now()
        job.registered = True
        job.deregistered = False
        job.registered_at = now
        job.state = JobState.REGISTERED
        assert job.gateway_poc_port is not None and job.gateway_inference_port is not None
        self.emit(
            NodeRegistered(
                job_id=job.job_id,
                slot_id=job.slot_id,
                node_id=job.slot_id,
                host=self.s.node_front_host,
                poc_port=job.gateway_poc_port,
                inference_port=job.gateway_inference_port,
                epoch_index=job.epoch_index,
                before_deadline=deadline is None or now <= deadline,
            )
        )
        await self.d.store.set_slot(job.slot_id, state="registered", node="registered")
        await self.commit()

    # ------------------------------------------------------------------ holding until release

    async def pending_release(self) -> ReleaseRequest | None:
        job = self.job
        if job.release is not None:
            return job.release
        req = await self.d.store.release_request(job.slot_id)
        if req is None:
            return None
        same_epoch = req.epoch_index is not None and job.epoch_index is not None and req.epoch_index == job.epoch_index
        if not same_epoch and (req.epoch_index is not None and job.epoch_index is not None):
            return None
        if not same_epoch and req.requested_at < job.accepted_at:
            return None  # a release for an earlier job of this slot
        job.release = req
        return req

    async def on_holding(self) -> None:
        job = self.job
        winner = job.winning
        next_poll = 0.0
        while job.state in (JobState.REGISTERED, JobState.SERVING, JobState.STANDBY):
            if await self.pending_release() is not None:
                job.state = JobState.RELEASING
                await self.commit()
                return
            if job.state == JobState.STANDBY:
                start = await self.d.store.start_request(job.slot_id)
                if start is not None and start >= job.accepted_at and winner is not None:
                    await self.start_standby(winner, start)
                    return
            now = self.now()
            if winner is not None and winner.instance_id is not None and now >= next_poll:
                next_poll = now + self.s.hold_poll
                try:
                    inst = await self.d.watcher.get(winner.instance_id, max_age=self.s.hold_poll / 2)
                except VastError:
                    inst = {}
                bad = None
                if inst is None:
                    bad = (FailureCause.HOST_OFFLINE, "the instance vanished")
                    winner.state = TrackState.DESTROYED
                    winner.destroyed_at = now
                elif inst:
                    bad = failure(inst, expect_stopped=job.state == JobState.STANDBY)
                if bad is not None:
                    await self.replace(winner, bad[0], bad[1])
                    return
            await asyncio.sleep(self.s.tick)

    async def start_standby(self, winner: Track, at: float) -> None:
        job = self.job
        assert winner.instance_id is not None
        await self.d.vast.set_state(winner.instance_id, "running")
        job.start_requested_at = at
        winner.state = TrackState.LOADING
        winner.status_changed_at = self.now()
        winner.boot_started_at = self.now()
        job.winner = None
        job.state = JobState.PROVISIONING
        await self.commit()

    async def replace(self, winner: Track, cause: FailureCause, message: str) -> None:
        """The serving GPU is gone before the release: rent another for the same slot (same id, same gateway ports:
        the upsert keeps node_num and the node's admin epoch, gonka-protocol.md §3)."""
        job = self.job
        self.log.warning("slot %s lost its instance %s (%s); replacing", job.slot_id, winner.instance_id, message)
        await self.track_failed(winner, cause, message)
        await self.discard(winner, reason=f"failed while serving: {cause.value}")
        job.winner = None
        job.replacements += 1
        job.front_published_for = None
        job.attempt_base = len(job.tracks)
        job.state = JobState.PROVISIONING
        await self.commit()

    # ------------------------------------------------------------------ release

    async def on_releasing(self) -> None:
        job = self.job
        req = job.release or ReleaseRequest(requested_at=self.now())
        if job.registered and not job.deregistered:
            await self.deregister(req.how)
            self.hook("deregistered")
        for t in job.tracks:
            await self.discard(t, reason=f"released: {req.reason}")
        await self.d.store.free_slot(job.slot_id, job.job_id, "released")
        job.state = JobState.RELEASED
        job.ended_at = self.now()
        self.emit(
            JobCompleted(job_id=job.job_id, slot_id=job.slot_id, outcome="released" if job.ready_at else "cancelled")
        )
        await self.commit()
        self.hook("released")

    async def deregister(self, how: str) -> None:
        job = self.job
        delay = self.s.tick
        while True:
            try:
                if how == "disable":
                    await self.d.dapi.disable(job.slot_id)
                else:
                    await self.d.dapi.delete(job.slot_id)
                break
            except DapiRejected as exc:
                self.log.warning("the dapi refused to %s node %s: %s", how, job.slot_id, exc)
                break
            except DapiError as exc:
                self.log.warning("deregistering %s failed (%s); retrying", job.slot_id, exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 10.0)
        job.deregistered = True
        self.emit(NodeDeregistered(slot_id=job.slot_id, node_id=job.slot_id, how=how))
        # A disabled node stays in the dapi with its host and ports (unique per host, gonka-protocol.md §3): the
        # slot keeps its gateway pair; a deleted one frees it when the job ends (JobStore.free_slot).
        await self.d.store.set_slot(job.slot_id, node="disabled" if how == "disable" else "")
        await self.commit()
