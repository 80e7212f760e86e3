"""Chain state the simulator keeps per height and per epoch: the record the report is built from.

What the chain knows about this participant's hardware is ``hardware_nodes``: the dapi's admin list
as of its last node sync (gonka-protocol.md §3 — weights are computed from that list in the block where
PoC validation ends). Accepted PoC nonces are kept per stage height (P, or a confirmation PoC's trigger
height) and per node id.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from sim.network.epochs import ConfirmationEvent, EpochContext
from sim.network.nodes import ManagedNode
from sim.network.params import NetworkParams

BATCH_STATUSES = ("accepted", "duplicate", "out_of_window", "rejected")


def _counts() -> Counter[str]:
    return Counter(dict.fromkeys(BATCH_STATUSES, 0))


@dataclass
class EpochNodeRecord:
    node_id: str
    node_num: int
    registered_at_height: int
    admin_epoch: int
    upserted_at_heights: list[int] = field(default_factory=list)
    deleted_at_height: int | None = None
    poc_commanded: bool = False
    status_history: list[dict[str, Any]] = field(default_factory=list)
    generated: Counter[str] = field(default_factory=_counts)
    validated: Counter[str] = field(default_factory=_counts)
    nonces_accepted: int = 0
    weight: int | None = None
    weight_note: str = ""
    confirmation_nonces: int = 0

    def as_report(self) -> dict[str, Any]:
        return {
            "id": self.node_id,
            "node_num": self.node_num,
            "registered_at_height": self.registered_at_height,
            "admin_epoch": self.admin_epoch,
            "upserted_at_heights": list(self.upserted_at_heights),
            "deleted_at_height": self.deleted_at_height,
            "poc_commanded": self.poc_commanded,
            "status_history": list(self.status_history),
            "batches": {
                "generated": {k: self.generated[k] for k in BATCH_STATUSES},
                "validated": {k: self.validated[k] for k in BATCH_STATUSES},
            },
            "nonces_accepted": self.nonces_accepted,
            "confirmation_nonces_accepted": self.confirmation_nonces,
            "weight": self.weight if self.weight is not None else 0,
            "weight_note": self.weight_note,
        }


@dataclass
class InferenceCounts:
    ok: int = 0
    failed: int = 0
    validations_passed: int = 0
    validations_failed: int = 0
    recent_failures: list[str] = field(default_factory=list)

    def fail(self, reason: str) -> None:
        self.failed += 1
        self.recent_failures = [*self.recent_failures[-19:], reason]

    def as_report(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "failed": self.failed,
            "validations_passed": self.validations_passed,
            "validations_failed": self.validations_failed,
            "recent_failures": list(self.recent_failures),
        }


@dataclass
class EpochRecord:
    index: int
    poc_start: int
    poc_generation: str
    started_at_height: int
    nodes: dict[str, EpochNodeRecord] = field(default_factory=dict)
    nonces: dict[int, dict[str, set[int]]] = field(default_factory=dict)
    weights_fixed_at: int | None = None
    chain_nodes_at_weights: list[str] = field(default_factory=list)
    total_weight: int = 0
    inference: InferenceCounts = field(default_factory=InferenceCounts)
    confirmation_events: list[dict[str, Any]] = field(default_factory=list)
    validator_keys: dict[str, str] = field(default_factory=dict)

    def node(self, managed: ManagedNode) -> EpochNodeRecord:
        rec = self.nodes.get(managed.config.id)
        if rec is None or rec.node_num != managed.node_num:
            previous = rec
            rec = EpochNodeRecord(
                node_id=managed.config.id,
                node_num=managed.node_num,
                registered_at_height=managed.registered_height,
                admin_epoch=managed.status.admin_epoch,
                upserted_at_heights=list(managed.upserted_heights),
            )
            if previous is not None:  # deleted and added again: keep the older history visible
                rec.status_history = [*previous.status_history]
                rec.generated, rec.validated = previous.generated, previous.validated
            self.nodes[managed.config.id] = rec
        return rec


@dataclass
class BatchEntry:
    kind: str  # generated | validated
    generation: str  # v1 | v2
    arrival_height: int
    chain_height: int
    block_height: int | None
    node_num: int | None
    node_id: str | None
    nonces: int
    new_nonces: int
    status: str
    reason: str
    epoch_index: int
    confirmation: bool
    model_id: str | None = None
    public_key: str = ""
    nonce_sample: list[int] = field(default_factory=list)  # the first few nonces, to find a batch again

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


class Chain:
    def __init__(self, params: NetworkParams, *, start_height: int, seed: int) -> None:
        self.params = params
        self.seed = seed
        self.height = start_height - 1
        self.last_block_time = 0.0  # wall time (unix) of the latest processed block
        self.epochs: list[EpochRecord] = [
            EpochRecord(index=0, poc_start=0, poc_generation=self.generation(), started_at_height=start_height)
        ]
        self.hardware_nodes: dict[str, int] = {}  # node id -> node_num, as of the last sync
        self.last_sync_height: int | None = None
        self.applied_changes = 0
        self.active_event: ConfirmationEvent | None = None
        self.event_sequence: dict[int, int] = {}
        self.pending_confirmation_trigger = False
        self.batches: list[BatchEntry] = []
        self._seen_batches: set[str] = set()

    def generation(self) -> str:
        return "v2" if self.params.poc_v2_enabled else "v1"

    @property
    def latest(self) -> EpochRecord:
        return self.epochs[-1]

    def context(self) -> EpochContext:
        return EpochContext(index=self.latest.index, poc_start=self.latest.poc_start, params=self.params.epoch)

    def block_hash(self, height: int) -> str:
        return hashlib.sha256(f"gonka-sim:{self.seed}:{height}".encode()).hexdigest().upper()

    def record_for_stage(self, stage_height: int) -> EpochRecord | None:
        """The epoch a PoC stage height belongs to: its P, or a confirmation trigger inside it."""
        for rec in reversed(self.epochs):
            if rec.index > 0 and rec.poc_start == stage_height:
                return rec
            if stage_height in rec.nonces:
                return rec
        return None

    def record_of(self, event: ConfirmationEvent) -> EpochRecord:
        """The epoch a confirmation PoC belongs to: the one it was triggered in (gonka-protocol.md §8), even
        once the chain has moved into the next epoch while the event still runs."""
        for rec in reversed(self.epochs):
            if rec.index == event.epoch_index:
                return rec
        # Unreachable while events last less than an epoch and KEEP_EPOCHS records are kept.
        raise LookupError(f"epoch {event.epoch_index} of confirmation PoC {event.trigger_height} is not kept")

    def seen_before(self, key: str) -> bool:
        if key in self._seen_batches:
            return True
        self._seen_batches.add(key)
        return False

    def add_batch(self, entry: BatchEntry) -> None:
        self.batches.append(entry)
        if len(self.batches) > 20000:
            del self.batches[:5000]
