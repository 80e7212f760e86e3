"""One provisioner replica: the owner-queue consumer, the job runner, the reconciler and a heartbeat.

Any number of replicas share ``provisioner.commands`` (competing consumers) and the job records; leases decide who
drives which job, and one replica at a time (lease ``provisioner.reconciler``) runs the periodic reconciler.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

import orjson
from aio_pika.abc import AbstractRobustConnection
from redis.asyncio import Redis

from hybrid_common.bus import Consumer, Publisher, connect
from hybrid_common.lease import Lease
from hybrid_common.redis_keys import RedisKeys
from hybrid_common.topology import OWNER_QUEUES, SUBSCRIPTIONS, Topology
from hybrid_provisioner import metrics
from hybrid_provisioner.chain import ChainViews
from hybrid_provisioner.commands import CommandHandlers
from hybrid_provisioner.dapi import DapiAdmin
from hybrid_provisioner.faulthook import FaultHook
from hybrid_provisioner.jobs.deps import Deps
from hybrid_provisioner.jobs.model import TrackState
from hybrid_provisioner.jobs.runner import JobRunner
from hybrid_provisioner.jobs.store import JobStore
from hybrid_provisioner.money import Budget, Ledger
from hybrid_provisioner.profiles import load_profiles
from hybrid_provisioner.readiness import ReadinessProbe
from hybrid_provisioner.reconciler import Reconciler
from hybrid_provisioner.settings import ProvisionerSettings
from hybrid_provisioner.vast import VastClient
from hybrid_provisioner.watcher import InstanceWatcher

log = logging.getLogger("hybrid.provisioner")

SERVICE = "provisioner"
COMMANDS_QUEUE = next(q for q in OWNER_QUEUES if q.name == "provisioner.commands")
EPOCHS_QUEUE = next(q for q in SUBSCRIPTIONS if q.name == "provisioner.epochs")
HEARTBEAT_TTL = 30


class ProvisionerWorker:
    def __init__(self, settings: ProvisionerSettings) -> None:
        self.settings = settings
        self.topology = Topology(settings.namespace)
        self.keys = RedisKeys(settings.namespace)
        self.profiles = load_profiles(settings)
        self.redis: Redis | None = None
        self.conn: AbstractRobustConnection | None = None
        self.consumers: list[Consumer] = []
        self.tasks: list[asyncio.Task[None]] = []
        self.runner: JobRunner | None = None
        self.deps: Deps | None = None
        self.reconciler: Reconciler | None = None

    async def start(self) -> None:
        s = self.settings
        self.redis = Redis.from_url(s.redis_url)
        await self.redis.ping()
        self.conn = await connect(s.amqp_url, name=f"{SERVICE}-{s.replica_id}")
        publisher = Publisher(self.conn, self.topology, SERVICE)
        vast = VastClient(
            s.vast_url or "",
            s.vast_key(),
            timeout=s.vast_timeout,
            retries=s.vast_retries,
            backoff=s.vast_backoff,
            backoff_cap=s.vast_backoff_cap,
        )
        store = JobStore(self.redis, self.keys)
        ledger = Ledger(self.redis, self.keys, s.effective_billing_acceleration)
        chain = ChainViews(self.redis, self.keys)
        self.deps = Deps(
            settings=s,
            profiles=self.profiles,
            vast=vast,
            watcher=InstanceWatcher(vast),
            store=store,
            ledger=ledger,
            budget=Budget(ledger, s.budget_day_usd, s.budget_epoch_usd, s.rental_hours_estimate),
            publisher=publisher,
            probe=ReadinessProbe(s.probe_timeout),
            dapi=DapiAdmin(s.dapi_admin_url or "", s.dapi_timeout),
            chain=chain,
            hook=FaultHook(s.die_at, s.die_once_dir),
        )
        self.reconciler = Reconciler(vast, store, ledger, publisher, s.label_prefix)
        self.runner = JobRunner(self.deps, s.replica_id)
        handlers = CommandHandlers(
            s, self.profiles, store, vast, self.deps.dapi, publisher, self.reconciler, chain, self.runner.wake
        )
        self.consumers = [
            Consumer(self.conn, self.topology, self.redis, COMMANDS_QUEUE, handlers.handle, prefetch=8),
            Consumer(self.conn, self.topology, self.redis, EPOCHS_QUEUE, handlers.epoch, prefetch=16),
        ]
        for c in self.consumers:
            await c.start()
        self.tasks = [
            asyncio.create_task(self.runner.run(), name="job-runner"),
            asyncio.create_task(self._reconcile_loop(), name="reconciler"),
            asyncio.create_task(self._heartbeat(), name="heartbeat"),
        ]
        log.info(
            "provisioner %s up: profiles %s, vast %s, dapi admin %s",
            s.replica_id,
            ", ".join(self.profiles),
            s.vast_url,
            s.dapi_admin_url,
        )

    async def _reconcile_loop(self) -> None:
        assert self.redis is not None and self.reconciler is not None
        s = self.settings
        lease = Lease(
            self.redis,
            self.keys,
            "provisioner.reconciler",
            s.replica_id,
            ttl=max(s.lease_ttl, s.reconcile_interval * 2),
        )
        while True:
            await asyncio.sleep(s.reconcile_interval)
            try:
                if await lease.try_acquire() is None:
                    continue
                report = await self.reconciler.run_once()
                if report.destroyed:
                    log.warning("reconciler destroyed %d orphan(s): %s", len(report.destroyed), report.destroyed)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("reconciler pass failed: %r", exc)

    async def _heartbeat(self) -> None:
        assert self.redis is not None and self.runner is not None and self.deps is not None
        s = self.settings
        key = self.keys.status(SERVICE, s.replica_id)
        while True:
            try:
                jobs = [j for j in await self.deps.store.all() if j.job_id in self.runner.active]
                counts: dict[str, int] = {}
                for j in jobs:
                    for t in j.tracks:
                        if t.state != TrackState.DESTROYED:
                            counts[t.state.value] = counts.get(t.state.value, 0) + 1
                for state in TrackState:
                    metrics.INSTANCES.labels(state.value).set(counts.get(state.value, 0))
                summary = {
                    "replica": s.replica_id,
                    "at": time.time(),
                    "jobs": {j.job_id: {"slot": j.slot_id, "state": j.state.value} for j in jobs},
                    "instances": counts,
                    "vast_calls": self.deps.vast.calls,
                    "vast_retries": self.deps.vast.retried,
                }
                await self.redis.set(key, orjson.dumps(summary), ex=HEARTBEAT_TTL)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.debug("heartbeat failed: %r", exc)
            await asyncio.sleep(min(5.0, HEARTBEAT_TTL / 3))

    async def stop(self) -> None:
        for c in self.consumers:
            await c.stop()
        if self.runner is not None:
            await self.runner.stop()
        for t in self.tasks:
            t.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        if self.deps is not None:
            await self.deps.vast.close()
            await self.deps.probe.close()
            await self.deps.dapi.close()
        if self.redis is not None:
            with contextlib.suppress(Exception):
                await self.redis.delete(self.keys.status(SERVICE, self.settings.replica_id))
            await self.redis.aclose()
        if self.conn is not None:
            with contextlib.suppress(Exception):
                await self.conn.close()
