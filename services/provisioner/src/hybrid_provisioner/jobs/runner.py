"""Finding and driving jobs: every replica scans the job records and drives those whose lease it wins.

A job's lease (``lease:job:<id>``, renewed at TTL/3) is held for as long as a replica drives it; a SIGKILLed replica's
leases lapse after ``PROVISIONER_LEASE_TTL`` and the next scan of any other replica takes the jobs over from their
records. A graceful stop releases the leases at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time

from hybrid_common.lease import Lease
from hybrid_provisioner.dapi import DapiError, DapiRejected
from hybrid_provisioner.jobs.deps import Deps
from hybrid_provisioner.jobs.driver import JobDriver, LeaseLost
from hybrid_provisioner.jobs.store import lease_role

log = logging.getLogger("hybrid.provisioner.runner")

FORGET_EVERY = 600.0


class JobRunner:
    def __init__(self, deps: Deps, holder: str) -> None:
        self.d = deps
        self.holder = holder
        self.active: dict[str, asyncio.Task[None]] = {}
        self._wake = asyncio.Event()
        self._stopping = False
        self._last_forget = 0.0

    def wake(self) -> None:
        self._wake.set()

    async def run(self) -> None:
        while not self._stopping:
            self._wake.clear()
            delay = self.d.settings.scan_interval
            try:
                if await self.scan():
                    # More jobs waiting: look again shortly, leaving the other replicas a chance to take some.
                    delay = min(delay, 0.5) * (0.5 + random.random())
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # Redis down: keep the loop, the leases protect the jobs
                log.warning("job scan failed: %r", exc)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), delay)

    async def scan(self) -> bool:
        """Take up to ``take_per_scan`` jobs nobody drives; True when more were left waiting."""
        jobs = await self.d.store.all()
        taken = 0
        more = False
        for job in sorted(jobs, key=lambda j: j.accepted_at):
            if self._stopping or len(self.active) >= self.d.settings.max_jobs:
                break
            if taken >= self.d.settings.take_per_scan:
                more = True
                break
            if job.terminal or job.job_id in self.active:
                continue
            lease = Lease(
                self.d.store.redis, self.d.store.keys, lease_role(job.job_id), self.holder, self.d.settings.lease_ttl
            )
            if await lease.try_acquire() is None:
                continue
            task = asyncio.create_task(self._drive(job.job_id, lease), name=f"job-{job.job_id}")
            self.active[job.job_id] = task
            taken += 1
        if time.monotonic() - self._last_forget > FORGET_EVERY:
            self._last_forget = time.monotonic()
            await self.d.store.forget_old()
            await self.sweep_gateway_ports()
        return more

    async def sweep_gateway_ports(self) -> list[str]:
        """Return to the pool gateway pairs no job and no dapi node holds (at start, then every FORGET_EVERY)."""
        try:
            nodes = await self.d.dapi.nodes()
        except (DapiError, DapiRejected) as exc:
            log.info("gateway sweep skipped: the dapi node list is unavailable (%s)", exc)
            return []
        host = self.d.settings.node_front_host
        in_use: set[int] = set()
        for entry in nodes:
            node = entry.get("node") or {}
            if node.get("host") == host:
                in_use.update(p for p in (node.get("poc_port"), node.get("inference_port")) if isinstance(p, int))
        freed = await self.d.store.sweep_gateway_ports(in_use)
        if freed:
            log.info("gateway sweep: %d idle slot(s) returned their pairs: %s", len(freed), ", ".join(sorted(freed)))
        return freed

    async def _drive(self, job_id: str, lease: Lease) -> None:
        task = asyncio.current_task()

        async def lost() -> None:
            log.warning("lost the lease of job %s", job_id)
            if task is not None:
                task.cancel()

        lease.start_renewing(lost)
        delay = self.d.settings.tick
        try:
            while not self._stopping:
                job = await self.d.store.load(job_id)
                if job is None or job.terminal:
                    return
                log.info("driving job %s (slot %s, state %s)", job_id, job.slot_id, job.state.value)
                try:
                    await JobDriver(self.d, job, self.holder).run()
                    return
                except LeaseLost:
                    return
                except asyncio.CancelledError:
                    raise
                except Exception:
                    log.exception("job %s: driver error; resuming from its record", job_id)
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 30.0)
        except asyncio.CancelledError:
            pass
        finally:
            self.active.pop(job_id, None)
            with contextlib.suppress(Exception):
                await asyncio.shield(lease.release())

    async def stop(self) -> None:
        """Stop driving (the jobs stay in Redis; their leases are released for another replica)."""
        self._stopping = True
        self._wake.set()
        tasks = list(self.active.values())
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
