"""Every Redis key the system uses: its writing owner, readers and lifetime (docs/architecture.md shows this table).

One writing owner per key (docs/architecture.md, "Parts"). Keys are built only through :class:`RedisKeys` so a
namespace can isolate tests or several systems sharing one Redis.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final


@dataclass(frozen=True)
class KeySpec:
    pattern: str
    owner: str
    readers: str
    lifetime: str
    purpose: str


KEY_TABLE: Final[tuple[KeySpec, ...]] = (
    KeySpec(
        "idem:{consumer}:{envelope_id}",
        "each consumer",
        "same consumer",
        "7 days",
        "envelope ids whose handler succeeded (consumer idempotency)",
    ),
    KeySpec(
        "attempts:{consumer}:{envelope_id}",
        "each consumer",
        "same consumer",
        "7 days",
        "failed handler attempts before dead-lettering",
    ),
    KeySpec(
        "lease:{role}",
        "holder of the lease",
        "candidates, status",
        "lease TTL (renewed at TTL/3)",
        "leader / job lease: holder id",
    ),
    KeySpec("fence:{role}", "lease acquirer (INCR)", "side effects carry it", "permanent", "fencing token counter"),
    KeySpec(
        "chain:view",
        "scheduler",
        "CLI status, relay, provisioner",
        "permanent (overwritten)",
        "last good chain view (EpochObserved JSON) and its age",
    ),
    KeySpec("scheduler:plan", "scheduler", "CLI status", "permanent (overwritten)", "current rental plan"),
    KeySpec("scheduler:paused", "scheduler", "CLI status", "until resume", "scheduling paused flag"),
    KeySpec(
        "scheduler:boots",
        "scheduler",
        "scheduler",
        "last 200 entries",
        "measured boot-to-ready seconds per profile and GPU (list of JSON)",
    ),
    KeySpec(
        "scheduler:epochs",
        "scheduler",
        "CLI status",
        "permanent (hash by epoch)",
        "per-epoch summary: rentals, registration, weight, cost",
    ),
    KeySpec(
        "scheduler:confirmation",
        "scheduler",
        "CLI status",
        "permanent (overwritten)",
        "confirmation-PoC policy, events seen, cost and risk",
    ),
    KeySpec(
        "idempotency:{key}",
        "provisioner",
        "provisioner",
        "7 days",
        "provision/release idempotency keys already applied",
    ),
    KeySpec(
        "jobs",
        "provisioner",
        "provisioner replicas, CLI status",
        "until job ends + 1 day",
        "hash job_id → job record (JSON): the durable state machine",
    ),
    KeySpec(
        "slot:{slot_id}",
        "provisioner",
        "proxy, CLI status",
        "slot's life",
        "slot record: job (the one live job renting it), instance, state, node (registered / disabled / empty),"
        " release/start requests, label seq",
    ),
    KeySpec(
        "offer:claim:{offer_id}",
        "provisioner (the job about to create on the offer)",
        "provisioner replicas",
        "60 s TTL",
        "job_id renting this Vast offer now: other jobs take the next offer instead of racing it to a 410",
    ),
    KeySpec(
        "gateway:ports",
        "provisioner",
        "proxy",
        "entry: while a job holds the slot or the dapi keeps its node",
        "hash slot_id → 'poc_port,inference_port'; freed pairs are reused, the front closes their listeners",
    ),
    KeySpec(
        "instances",
        "provisioner",
        "CLI status",
        "until destroyed + 1 day",
        "hash instance_id → instance view (state, route, $/h, spend)",
    ),
    KeySpec("spend:day:{date}", "provisioner", "CLI status", "2 days", "USD spent per UTC day (float)"),
    KeySpec("spend:epoch:{epoch}", "provisioner", "CLI status", "7 days", "USD and GPU-seconds per epoch (hash)"),
    KeySpec("front:routes", "proxy", "CLI status", "permanent (hash)", "slot_id → route of the node front (JSON)"),
    KeySpec("tunnels", "proxy", "CLI status", "permanent (hash)", "instance_id → SSH tunnel state (JSON)"),
    KeySpec("proxy:node", "proxy", "CLI status", "permanent (overwritten)", "the proxy node's registration"),
    KeySpec(
        "relay:seen:{digest}",
        "callback-relay",
        "callback-relay",
        "2 epochs",
        "batch content digests already forwarded (dedupe)",
    ),
    KeySpec(
        "relay:stats",
        "callback-relay",
        "CLI status",
        "permanent (hash)",
        "per epoch and node: accepted, forwarded, duplicate, dead counts",
    ),
    KeySpec(
        "relay:batch:{batch_id}",
        "callback-relay",
        "callback-relay",
        "2 epochs",
        "outcome of each accepted batch (forwarded, duplicate or dead:<reason>): counts it exactly once",
    ),
    KeySpec(
        "relay:windows",
        "callback-relay",
        "callback-relay replicas, CLI status",
        "permanent (hash, last 8 windows)",
        "PoC windows learned from epoch.observed (poc_start → heights JSON) and the latest view",
    ),
    KeySpec(
        "status:{service}:{instance}",
        "each service",
        "CLI status",
        "30 s TTL (heartbeat)",
        "service heartbeat and summary",
    ),
)


class RedisKeys:
    """Key builders with the namespace applied (``ns:`` prefix when set)."""

    def __init__(self, namespace: str = "") -> None:
        self.prefix = f"{namespace}:" if namespace else ""

    def _k(self, *parts: str | int) -> str:
        return self.prefix + ":".join(str(p) for p in parts)

    def idem(self, consumer: str, envelope_id: str) -> str:
        return self._k("idem", consumer, envelope_id)

    def attempts(self, consumer: str, envelope_id: str) -> str:
        return self._k("attempts", consumer, envelope_id)

    def lease(self, role: str) -> str:
        return self._k("lease", role)

    def fence(self, role: str) -> str:
        return self._k("fence", role)

    def chain_view(self) -> str:
        return self._k("chain", "view")

    def scheduler(self, what: str) -> str:
        return self._k("scheduler", what)

    def idempotency(self, key: str) -> str:
        return self._k("idempotency", key)

    def jobs(self) -> str:
        return self._k("jobs")

    def slot(self, slot_id: str) -> str:
        return self._k("slot", slot_id)

    def offer_claim(self, offer_id: int) -> str:
        return self._k("offer", "claim", offer_id)

    def gateway_ports(self) -> str:
        return self._k("gateway", "ports")

    def instances(self) -> str:
        return self._k("instances")

    def spend_day(self, date: str) -> str:
        return self._k("spend", "day", date)

    def spend_epoch(self, epoch: int) -> str:
        return self._k("spend", "epoch", epoch)

    def front_routes(self) -> str:
        return self._k("front", "routes")

    def tunnels(self) -> str:
        return self._k("tunnels")

    def proxy_node(self) -> str:
        return self._k("proxy", "node")

    def relay_seen(self, digest: str) -> str:
        return self._k("relay", "seen", digest)

    def relay_stats(self) -> str:
        return self._k("relay", "stats")

    def relay_batch(self, batch_id: str) -> str:
        return self._k("relay", "batch", batch_id)

    def relay_windows(self) -> str:
        return self._k("relay", "windows")

    def status(self, service: str, instance: str) -> str:
        return self._k("status", service, instance)
