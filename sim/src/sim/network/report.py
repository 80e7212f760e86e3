"""``GET /_sim/report``: what happened, per epoch, in JSON with stable keys.

Top level::

    {"schema": 1, "height", "phase", "poc_generation": "v1"|"v2", "clock": {...},
     "params": {"mlnode_version", "poc_v2_enabled", "callback_base", "epoch_model", "poc_model"},
     "chain_nodes": {id: node_num}, "last_sync_height",
     "nodes": {id: {node_num, registered_at_height, admin_enabled, admin_epoch,
                    current_status, poc_current_status, failure_reason}},
     "epochs": [epoch, ...]}

Each epoch::

    {"index", "poc_start", "poc_generation", "stages": {EpochStages},
     "weights_fixed_at": height|null, "chain_nodes_at_weights": [ids], "total_weight",
     "nodes": {id: {id, node_num, registered_at_height, admin_epoch, upserted_at_heights,
                    deleted_at_height, poc_commanded, status_history: [{height, status, poc_status, reason}],
                    batches: {generated|validated: {accepted, duplicate, out_of_window, rejected}},
                    nonces_accepted, confirmation_nonces_accepted, weight, weight_note}},
     "batches": {generated|validated: {accepted, duplicate, out_of_window, rejected}},
     "inference": {ok, failed, validations_passed, validations_failed, recent_failures},
     "confirmation_poc": [{epoch_index, event_sequence, trigger_height, generation_start_height,
                           generation_end_height, validation_start_height, validation_end_height, phase,
                           poc_seed_block_hash, cause, completed_at_height, node_weights,
                           confirmation_weight, expected_weight, ratio, outcome, ...}]}

``weight`` is 0 until ``weights_fixed_at`` is set (the block where PoC validation ends).
"""

from __future__ import annotations

from collections import Counter
from typing import TYPE_CHECKING, Any

from sim.network.chain import BATCH_STATUSES, EpochRecord
from sim.network.epochs import EpochContext

if TYPE_CHECKING:
    from sim.network.dapi import Dapi


def _batch_totals(dapi: Dapi, record: EpochRecord) -> dict[str, dict[str, int]]:
    counts: dict[str, Counter[str]] = {"generated": Counter(), "validated": Counter()}
    for entry in dapi.chain.batches:
        if entry.epoch_index == record.index and entry.kind in counts:
            counts[entry.kind][entry.status] += 1
    return {kind: {s: c[s] for s in BATCH_STATUSES} for kind, c in counts.items()}


def epoch_report(dapi: Dapi, record: EpochRecord) -> dict[str, Any]:
    ctx = EpochContext(index=record.index, poc_start=record.poc_start, params=dapi.params.epoch)
    return {
        "index": record.index,
        "poc_start": record.poc_start,
        "poc_generation": record.poc_generation,
        "stages": ctx.stages(),
        "weights_fixed_at": record.weights_fixed_at,
        "chain_nodes_at_weights": list(record.chain_nodes_at_weights),
        "total_weight": record.total_weight,
        "nodes": {node_id: rec.as_report() for node_id, rec in sorted(record.nodes.items())},
        "batches": _batch_totals(dapi, record),
        "inference": record.inference.as_report(),
        "confirmation_poc": [dict(e) for e in record.confirmation_events],
    }


def build_report(dapi: Dapi) -> dict[str, Any]:
    chain = dapi.chain
    ctx = chain.context()
    p = dapi.params
    return {
        "schema": 1,
        "height": chain.height,
        "phase": ctx.phase(chain.height),
        "poc_generation": chain.generation(),
        "clock": dapi.clock_info(),
        "params": {
            "mlnode_version": p.mlnode_version,
            "poc_v2_enabled": p.poc_v2_enabled,
            "callback_base": p.callback_base,
            "epoch_model": p.epoch_model,
            "poc_model": p.poc_model,
        },
        "chain_nodes": dict(sorted(chain.hardware_nodes.items())),
        "last_sync_height": chain.last_sync_height,
        "nodes": {
            node.config.id: {
                "node_num": node.node_num,
                "registered_at_height": node.registered_height,
                "admin_enabled": node.status.admin_enabled,
                "admin_epoch": node.status.admin_epoch,
                "current_status": node.status.current_status,
                "poc_current_status": node.status.poc_current_status,
                "failure_reason": node.status.failure_reason,
            }
            for node in sorted(dapi.registry.nodes.values(), key=lambda n: n.node_num)
        },
        "epochs": [epoch_report(dapi, rec) for rec in chain.epochs],
    }
