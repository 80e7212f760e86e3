"""What a job driver works with: one set per replica, built by the worker."""

from __future__ import annotations

from dataclasses import dataclass

from hybrid_common.bus import Publisher
from hybrid_provisioner.chain import ChainViews
from hybrid_provisioner.dapi import DapiAdmin
from hybrid_provisioner.faulthook import FaultHook
from hybrid_provisioner.jobs.store import JobStore
from hybrid_provisioner.money import Budget, Ledger
from hybrid_provisioner.profiles import WorkloadProfile
from hybrid_provisioner.readiness import ReadinessProbe
from hybrid_provisioner.settings import ProvisionerSettings
from hybrid_provisioner.vast import VastClient
from hybrid_provisioner.watcher import InstanceWatcher


@dataclass
class Deps:
    settings: ProvisionerSettings
    profiles: dict[str, WorkloadProfile]
    vast: VastClient
    watcher: InstanceWatcher
    store: JobStore
    ledger: Ledger
    budget: Budget
    publisher: Publisher
    probe: ReadinessProbe
    dapi: DapiAdmin
    chain: ChainViews
    hook: FaultHook
