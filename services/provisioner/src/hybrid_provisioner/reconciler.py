"""The orphan reconciler: our labelled instances that no live job owns are destroyed (vastai-api.md "Billing": an
instance nobody tracks bills until someone destroys it — the costliest bug in this domain).

Ownership is read *after* listing: an instance in the list was created after its job recorded the create intent,
so a job alive at listing time is visible when ownership is read. Owned: instance ids of live jobs' tracks not yet
destroyed, and labels of create intents whose outcome is still unknown. Instances of failed or released jobs are
not owned.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from hybrid_common.bus import Publisher
from hybrid_common.messages.events import InstanceDestroyed, OrphanDestroyed
from hybrid_provisioner import metrics
from hybrid_provisioner.jobs.model import TrackState
from hybrid_provisioner.jobs.store import JobStore
from hybrid_provisioner.money import Ledger
from hybrid_provisioner.vast import VastClient, VastError

log = logging.getLogger("hybrid.provisioner.reconciler")


@dataclass
class ReconcileReport:
    listed: int = 0
    ours: int = 0
    destroyed: list[int] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


class Reconciler:
    def __init__(
        self, vast: VastClient, store: JobStore, ledger: Ledger, publisher: Publisher, label_prefix: str
    ) -> None:
        self.vast = vast
        self.store = store
        self.ledger = ledger
        self.publisher = publisher
        self.prefix = f"{label_prefix}-"

    def ours(self, label: object) -> bool:
        return isinstance(label, str) and label.startswith(self.prefix)

    async def run_once(self, reason: str = "periodic") -> ReconcileReport:
        report = ReconcileReport()
        instances = await self.vast.list_instances()
        report.listed = len(instances)
        jobs = await self.store.all()  # read after listing (see the module docstring)
        owned_ids: set[int] = set()
        owned_labels: set[str] = set()
        failed_labels: set[str] = set()
        for job in jobs:
            for t in job.tracks:
                if job.terminal:
                    failed_labels.add(t.label)
                    continue
                if t.instance_id is not None and t.state != TrackState.DESTROYED:
                    owned_ids.add(t.instance_id)
                if t.state == TrackState.CREATING and t.instance_id is None:
                    owned_labels.add(t.label)
        listed_ids: set[int] = set()
        for inst in instances:
            iid = inst.get("id")
            if not isinstance(iid, int):
                continue
            listed_ids.add(iid)
            label = inst.get("label")
            if not self.ours(label) or inst.get("actual_status") == "destroyed":
                continue
            report.ours += 1
            if iid in owned_ids or label in owned_labels:
                continue
            why = "its job ended" if label in failed_labels else "no live job owns it"
            try:
                await self.vast.destroy_instance(iid)
            except VastError as exc:
                report.errors.append(f"{iid}: {exc}")
                continue
            report.destroyed.append(iid)
            metrics.ORPHANS.inc()
            log.warning("destroyed orphan %s (label %s): %s", iid, label, why)
            await self.publisher.publish(
                OrphanDestroyed(instance_id=iid, label=label if isinstance(label, str) else None, reason=why)
            )
            await self._close_view(iid, f"orphan ({why}, {reason})")
        # Views of instances the API no longer has: booked as destroyed.
        for iid, view in (await self.store.instance_views()).items():
            if view.get("state") != "destroyed" and iid not in listed_ids and iid not in owned_ids:
                await self._close_view(iid, "gone from the account")
        return report

    async def _close_view(self, instance_id: int, reason: str) -> None:
        views = await self.store.instance_views()
        view = views.get(instance_id)
        if view is None or view.get("state") == "destroyed":
            return
        now = time.time()
        acc = self.ledger.acceleration
        storage = max(0.0, now - (view.get("created_at") or now)) * acc
        running = view.get("running_at")
        gpu = max(0.0, now - running) * acc if running else 0.0
        sd = min(float(view.get("storage_dph") or 0.0), float(view.get("dph_total") or 0.0))
        usd = storage / 3600.0 * sd + gpu / 3600.0 * (float(view.get("dph_total") or 0.0) - sd)
        await self.ledger.close_view(instance_id, view, usd, gpu, storage, now)
        await self.publisher.publish(
            InstanceDestroyed(
                slot_id=view.get("slot_id"),
                instance_id=instance_id,
                reason=reason,
                gpu_seconds=round(gpu, 3),
                storage_seconds=round(storage, 3),
                cost_usd=round(usd, 6),
            )
        )
