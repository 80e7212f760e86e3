"""The provisioner's Prometheus metrics (``hybrid_provisioner_*``), served on ``PROVISIONER_METRICS_PORT``."""

from __future__ import annotations

from hybrid_common.metrics import SLOW_BUCKETS, counter, gauge, histogram

INSTANCES = gauge("provisioner_instances", "instances held by this replica's jobs, by track state", ("state",))
JOBS = gauge("provisioner_jobs", "jobs driven by this replica, by state", ("state",))
PROVISIONING_SECONDS = histogram(
    "provisioner_provisioning_seconds",
    "job accepted → instance ready (through the node front)",
    ("profile",),
    buckets=SLOW_BUCKETS,
)
BOOT_SECONDS = histogram(
    "provisioner_boot_seconds", "instance created → workload answering", ("profile", "gpu"), buckets=SLOW_BUCKETS
)
READINESS_LAG = histogram(
    "provisioner_readiness_lag_seconds",
    "service answering → seen by the probe (upper bound: last failed probe → first success)",
    buckets=(0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0),
)
FAILURES = counter("provisioner_failures_total", "instance and job failures by cause", ("cause",))
CREATES = counter("provisioner_creates_total", "create calls by outcome", ("outcome",))
SPEND = counter("provisioner_spend_usd_total", "USD of destroyed instances (final ledger)")
GPU_SECONDS = counter("provisioner_billed_gpu_seconds_total", "billed GPU seconds of destroyed instances")
ORPHANS = counter("provisioner_orphans_destroyed_total", "labelled instances no live job owned")
BUDGET_BLOCKED = counter("provisioner_budget_blocked_total", "rentals refused by a budget cap", ("scope",))
