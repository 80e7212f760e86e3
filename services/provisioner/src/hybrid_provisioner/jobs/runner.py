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
from typing import Any

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
        """Return to the pool gateway pairs no job and no dapi node holds (at start, then every FORGET_EVERY).

        A node released with ``how=disable`` stays in the dapi with its host and ports (gonka-protocol.md §3: unique per
        host), so its pair stays taken; every epoch's slots are new ids, so the range would drain one pair per slot and
        epoch. Once such a node was disabled two epochs ago or more — past the next PoC it was kept for, and that PoC's
        weights fixed — and no job rents its slot, it is deleted here and its pair freed."""
        try:
            nodes = await self.d.dapi.nodes()
        except (DapiError, DapiRejected) as exc:
            log.info("gateway sweep skipped: the dapi node list is unavailable (%s)", exc)
            return []
        host = self.d.settings.node_front_host
        view = await self.d.chain.current()
        epoch = view.epoch_index if view is not None else None
        in_use: set[int] = set()
        for entry in nodes:
            node = entry.get("node") or {}
            if node.get("host") != host:
                continue
            if epoch is not None and await self._retire_disabled(node, entry.get("state") or {}, epoch):
                continue
            in_use.update(p for p in (node.get("poc_port"), node.get("inference_port")) if isinstance(p, int))
        freed = await self.d.store.sweep_gateway_ports(in_use)
        if freed:
            log.info("gateway sweep: %d idle slot(s) returned their pairs: %s", len(freed), ", ".join(sorted(freed)))
        return freed

    async def _retire_disabled(self, node: dict[str, Any], state: dict[str, Any], epoch: int) -> bool:
        """Delete a node we disabled two or more epochs ago whose slot no job rents; True once it is gone."""
        admin = state.get("admin_state") or {}
        node_id = node.get("id")
        try:
            disabled_in = int(admin.get("epoch", ""))  # Go renders int64 as a number or a string
        except (TypeError, ValueError):
            return False
        # Go omits a false bool (omitempty): a missing "enabled" is a disabled node.
        if admin.get("enabled") or not isinstance(node_id, str) or epoch - disabled_in < 2:
            return False
        slot = await self.d.store.slot(node_id)
        if slot.get("node") != "disabled" or slot.get("job"):
            return False  # not ours to retire: an operator's node, or a job rents the slot again
        try:
            deleted = await self.d.dapi.delete(node_id)
        except (DapiError, DapiRejected) as exc:
            log.info("disabled node %s not deleted yet: %s", node_id, exc)
            return False
        if not deleted:  # refused, or not answered in time: the ports stay taken until a later sweep sees it gone
            return False
        await self.d.store.set_slot(node_id, node="")
        log.info(
            "deleted node %s, disabled in epoch %d (now %d): its gateway pair is free again",
            node_id,
            disabled_in,
            epoch,
        )
        return True

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
