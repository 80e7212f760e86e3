"""Handlers of the provisioner's owner queue (``provisioner.commands``): short, idempotent, never holding a delivery
for long work (reliability.md: 30-minute consumer timeout).

- ``provision``: one durable job per slot (ids derived from the idempotency key, created with HSETNX together with
  the key), acked once recorded; the jobs' own drivers do the renting.
- ``release``: a release request on each slot's record, picked up by the slot's job driver (disable/delete the node,
  then destroy — never earlier than the scheduler says).
- ``start``: a start request for a slot's pre-pulled instance.
- ``destroy``: one instance now, or every labelled instance (emergency: every live job is released too).
- ``reconcile``: a reconciler pass now.
- ``offers.query`` / ``logs.query``: answered from Vast.ai over the reply queue.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable

from hybrid_common.bus import Delivery, Publisher, reply
from hybrid_common.messages.commands import (
    Destroy,
    ErrorReply,
    LogsQuery,
    LogsReply,
    OffersQuery,
    OffersReply,
    Provision,
    Reconcile,
    Release,
    StartStandby,
)
from hybrid_common.messages.domain import FailureCause
from hybrid_common.messages.events import EpochObserved, InstanceDestroyed, JobAccepted, JobFailed, NodeDeregistered
from hybrid_provisioner.chain import ChainViews
from hybrid_provisioner.dapi import DapiAdmin, DapiError, DapiRejected
from hybrid_provisioner.jobs.model import Job, JobState, ReleaseRequest
from hybrid_provisioner.jobs.store import JobStore, job_id_for
from hybrid_provisioner.offers import find_offers
from hybrid_provisioner.profiles import WorkloadProfile
from hybrid_provisioner.reconciler import Reconciler
from hybrid_provisioner.settings import ProvisionerSettings
from hybrid_provisioner.vast import VastClient, VastError

log = logging.getLogger("hybrid.provisioner.commands")


class CommandHandlers:
    def __init__(
        self,
        settings: ProvisionerSettings,
        profiles: dict[str, WorkloadProfile],
        store: JobStore,
        vast: VastClient,
        dapi: DapiAdmin,
        publisher: Publisher,
        reconciler: Reconciler,
        chain: ChainViews,
        wake: Callable[[], None],
    ) -> None:
        self.s = settings
        self.profiles = profiles
        self.store = store
        self.vast = vast
        self.dapi = dapi
        self.publisher = publisher
        self.reconciler = reconciler
        self.chain = chain
        self.wake = wake

    async def handle(self, d: Delivery) -> None:
        handlers: dict[type, Callable[[Delivery], Awaitable[None]]] = {
            Provision: self.provision,
            Release: self.release,
            StartStandby: self.start,
            Destroy: self.destroy,
            Reconcile: self.reconcile,
            OffersQuery: self.offers,
            LogsQuery: self.logs,
        }
        handler = handlers.get(type(d.payload))
        if handler is None:
            log.warning("ignoring %s on the provisioner queue", d.envelope.type)
            return
        await handler(d)

    async def epoch(self, d: Delivery) -> None:
        if isinstance(d.payload, EpochObserved):
            self.chain.observed(d.payload, d.envelope.occurred_at.timestamp())

    # ---- provision

    async def provision(self, d: Delivery) -> None:
        cmd = d.payload
        assert isinstance(cmd, Provision)
        if await self.store.seen(cmd.idempotency_key):
            log.info("provision %s already applied", cmd.idempotency_key)
            self.wake()
            return
        env = d.envelope
        correlation = env.correlation_id or (f"epoch-{cmd.epoch_index}" if cmd.epoch_index is not None else str(env.id))
        if cmd.profile not in self.profiles:
            for slot in cmd.slot_ids:
                await self.publisher.publish(
                    JobFailed(
                        job_id=job_id_for(cmd.idempotency_key, slot),
                        slot_id=slot,
                        cause=FailureCause.API_ERROR,
                        message=f"unknown profile {cmd.profile!r}; known: {', '.join(sorted(self.profiles))}",
                        standby=cmd.start_stopped,
                    ),
                    correlation_id=correlation,
                    causation_id=str(env.id),
                )
            await self.store.mark_seen(cmd.idempotency_key, "rejected")
            return
        deadline = cmd.deadline.timestamp() if cmd.deadline is not None else None
        if deadline is None and cmd.deadline_height is not None:
            view = await self.chain.current()
            if view is not None:
                deadline = view.height_to_time(cmd.deadline_height)
        now = time.time()
        jobs = []
        for slot in dict.fromkeys(cmd.slot_ids):
            job = Job(
                job_id=job_id_for(cmd.idempotency_key, slot),
                slot_id=slot,
                profile=cmd.profile,
                purpose=cmd.purpose,
                epoch_index=cmd.epoch_index,
                deadline=deadline,
                deadline_height=cmd.deadline_height,
                register_node=cmd.register_node,
                hedge_allowed=cmd.hedge,
                start_stopped=cmd.start_stopped,
                offer_filter=cmd.offer_filter,
                image=cmd.image,
                disk_gb=cmd.disk_gb,
                env=dict(cmd.env),
                correlation_id=correlation,
                causation_id=str(env.id),
                idempotency_key=cmd.idempotency_key,
                accepted_at=now,
            )
            # job.accepted leaves through the job's outbox: published by whichever replica drives it.
            accepted = self.publisher.envelope(
                JobAccepted(
                    job_id=job.job_id,
                    slot_id=slot,
                    profile=cmd.profile,
                    purpose=cmd.purpose,
                    deadline=cmd.deadline,
                ),
                correlation_id=correlation,
                causation_id=str(env.id),
            )
            job.outbox.append(accepted.model_dump(mode="json"))
            jobs.append(job)
        created = await self.store.create(jobs, cmd.idempotency_key)
        log.info("provision %s: %d job(s) recorded for %s", cmd.idempotency_key, len(created), cmd.slot_ids)
        self.wake()

    # ---- release

    async def release(self, d: Delivery) -> None:
        cmd = d.payload
        assert isinstance(cmd, Release)
        if await self.store.seen(cmd.idempotency_key):
            return
        request = ReleaseRequest(
            how=cmd.how,
            reason=cmd.reason,
            requested_at=time.time(),
            epoch_index=cmd.epoch_index,
            idempotency_key=cmd.idempotency_key,
        )
        live = {j.slot_id for j in await self.store.all() if not j.terminal}
        for slot in dict.fromkeys(cmd.slot_ids):
            await self.store.request_release(slot, request)
            if slot not in live and (await self.store.slot(slot)).get("node") == "registered":
                # No job holds the slot any more (it failed after registering): take the node out here.
                await self._deregister(slot, cmd.how)
        await self.store.mark_seen(cmd.idempotency_key, "release")
        self.wake()

    async def _deregister(self, slot: str, how: str) -> None:
        try:
            if how == "disable":
                await self.dapi.disable(slot)
            else:
                await self.dapi.delete(slot)
        except DapiRejected as exc:
            log.warning("the dapi refused to %s %s: %s", how, slot, exc)
        await self.store.set_slot(slot, node="disabled" if how == "disable" else "")
        # The slot's job ended earlier (it kept the pair while the node was registered): the pair is free now.
        await self.store.free_gateway_ports(slot)
        await self.publisher.publish(NodeDeregistered(slot_id=slot, node_id=slot, how=how))

    # ---- start, destroy, reconcile

    async def start(self, d: Delivery) -> None:
        cmd = d.payload
        assert isinstance(cmd, StartStandby)
        for slot in cmd.slot_ids:
            await self.store.request_start(slot, time.time())
        self.wake()

    async def destroy(self, d: Delivery) -> None:
        cmd = d.payload
        assert isinstance(cmd, Destroy)
        if cmd.instance_id is not None:
            await self._destroy_one(cmd.instance_id, cmd.reason)
            return
        # Emergency: stop every live job from renting more, then destroy everything carrying our label prefix.
        now = time.time()
        for job in await self.store.all():
            if not job.terminal and job.state != JobState.RELEASING:
                await self.store.request_release(
                    job.slot_id,
                    ReleaseRequest(how="disable", reason=f"destroy --all-labelled: {cmd.reason}", requested_at=now),
                )
        for inst in await self.vast.list_instances():
            if self.reconciler.ours(inst.get("label")) and isinstance(inst.get("id"), int):
                await self._destroy_one(int(inst["id"]), f"destroy --all-labelled: {cmd.reason}")
        self.wake()

    async def _destroy_one(self, instance_id: int, reason: str) -> None:
        destroyed = await self.vast.destroy_instance(instance_id)
        view = (await self.store.instance_views()).get(instance_id) or {}
        log.warning("destroy %s (%s): %s", instance_id, reason, "destroyed" if destroyed else "already gone")
        await self.publisher.publish(
            InstanceDestroyed(slot_id=view.get("slot_id"), instance_id=instance_id, reason=f"operator: {reason}")
        )

    async def reconcile(self, d: Delivery) -> None:
        cmd = d.payload
        assert isinstance(cmd, Reconcile)
        report = await self.reconciler.run_once(reason=cmd.reason)
        log.info(
            "reconcile (%s): %d listed, %d ours, destroyed %s", cmd.reason, report.listed, report.ours, report.destroyed
        )

    # ---- queries

    async def offers(self, d: Delivery) -> None:
        q = d.payload
        assert isinstance(q, OffersQuery)
        profile = self.profiles.get(q.profile)
        if profile is None:
            await reply(self.publisher, d.envelope, d.reply_to, ErrorReply(error="unknown_profile", message=q.profile))
            return
        try:
            offers = await find_offers(self.vast, profile, profile.policy.narrowed(q.offer_filter, []))
        except VastError as exc:
            await reply(self.publisher, d.envelope, d.reply_to, ErrorReply(error="vast", message=str(exc)))
            return
        summaries = [o.summary(q.estimated_minutes) for o in offers[: q.limit]]
        await reply(self.publisher, d.envelope, d.reply_to, OffersReply(profile=q.profile, offers=summaries))

    async def logs(self, d: Delivery) -> None:
        q = d.payload
        assert isinstance(q, LogsQuery)
        try:
            text = await self.vast.request_logs(q.instance_id, q.tail)
        except VastError as exc:
            await reply(self.publisher, d.envelope, d.reply_to, ErrorReply(error="vast", message=str(exc)))
            return
        await reply(self.publisher, d.envelope, d.reply_to, LogsReply(instance_id=q.instance_id, text=text))


__all__ = ["CommandHandlers", "DapiError"]
