"""Issue #4 acceptance: one accelerated epoch per PoC generation, MLNode simulators behind a test-only
prefix strip, and the rules that decide who earns weight (gonka-protocol.md §3)."""

from __future__ import annotations

import base64
from typing import Any

import aiohttp
import pytest

from hybrid_common import TEST, EpochShape
from sim.network import DEFAULT_EPOCH_MODEL, DEFAULT_POC_MODEL, start_dapi
from tests.integration.sim_network_helpers import DapiHTTP, FrontedMLNode, poll_until

PROFILE = TEST.model_copy(update={"block_seconds": 0.15})
SHAPE = EpochShape(
    epoch_length=200,
    poc_stage_duration=30,
    poc_exchange_duration=4,
    poc_validation_delay=4,
    poc_validation_duration=24,
    set_new_validators_delay=16,
    inference_validation_cutoff=8,
    confirmation_poc_safety_window=4,
)
P = 30  # first PoC start
GEN_END = P + SHAPE.poc_stage_duration
VAL_START = GEN_END + SHAPE.poc_validation_delay
VAL_END = VAL_START + SHAPE.poc_validation_duration
CRAFTED = 10**9  # nonces no MLNode generates


def _v2_artifact(nonce: int) -> dict[str, Any]:
    return {"nonce": nonce, "vector_b64": base64.b64encode(bytes(24)).decode()}


async def _all_serving(api: DapiHTTP, ids: list[str]) -> bool:
    nodes = await api.nodes()
    return all(nodes[i]["state"]["current_status"] == "INFERENCE" for i in ids)


@pytest.mark.parametrize("generation", ["v1", "v2"])
@pytest.mark.timeout(150)
async def test_one_epoch_decides_who_earns_weight(generation: str) -> None:
    v2 = generation == "v2"
    model = DEFAULT_POC_MODEL if v2 else DEFAULT_EPOCH_MODEL
    dapi = await start_dapi(
        profile=PROFILE, epoch=SHAPE, first_poc_start=P, poc_v2_enabled=v2, inference_interval_seconds=15, seed=4
    )
    fronted: list[FrontedMLNode] = []

    async def mlnode() -> FrontedMLNode:
        node = await FrontedMLNode.start(
            generation=generation, profile=PROFILE, model_download_seconds=0.3, vllm_load_seconds=0.2
        )
        fronted.append(node)
        return node

    try:
        early, doomed, slot_gpu_1, slot_gpu_2, late = [await mlnode() for _ in range(5)]
        async with aiohttp.ClientSession() as s:
            api = DapiHTTP(s, dapi.public_url, dapi.admin_url, dapi.callback_url)
            await api.register(early.registration("early", model))
            await api.register(doomed.registration("deleted-early", model))
            await api.register(slot_gpu_1.registration("slot-1", model))
            before = await api.nodes()
            assert await api.height() < P, "registration must happen before poc_start"
            await poll_until(
                lambda: _all_serving(api, ["early", "deleted-early", "slot-1"]),
                timeout=P * PROFILE.block_seconds + 10,
                what="the three nodes serving inference",
            )

            # --- poc_start: the GPU behind slot-1 is lost; its replacement is upserted under the same id.
            await api.wait_height(P + 1)
            await slot_gpu_1.close()
            if v2:  # v2 runs PoC inside the serving vLLM: the new GPU must already serve the PoC model (§7)
                async with s.post(
                    f"http://127.0.0.1:{slot_gpu_2.mlnode.api_port}/api/v1/inference/up",
                    json={"model": model, "dtype": "auto", "additional_args": []},
                ) as r:
                    assert r.status == 200, await r.text()
            await api.register(slot_gpu_2.registration("slot-1", model, host="localhost"))
            await api.register(late.registration("late-new", model))

            # --- a batch sent twice during generation: the second is a duplicate.
            num = before["early"]["node"]["node_num"]
            pk = "02" + "ab" * 32
            if v2:
                dup = {
                    "block_hash": "H",
                    "block_height": P,
                    "public_key": pk,
                    "node_id": num,
                    "artifacts": [_v2_artifact(CRAFTED + 1), _v2_artifact(CRAFTED + 2)],
                    "encoding": {"dtype": "f16", "k_dim": 12, "endian": "le"},
                }
                path = "/v2/poc-batches/generated"
            else:
                dup = {
                    "public_key": pk,
                    "block_hash": "H",
                    "block_height": P,
                    "node_id": num,
                    "nonces": [CRAFTED + 1, CRAFTED + 2],
                    "dist": [1.1, 1.2],
                }
                path = "/v1/poc-batches/generated"
            assert await api.post_callback(path, dup) == (200, None)
            assert await api.post_callback(path, dup) == (200, None)

            # --- validation: a late batch does not count; a node deleted now loses the epoch's weight.
            await api.wait_height(VAL_START)
            late_batch = {**dup, "nonces": [CRAFTED + 3], "dist": [1.3]}
            if v2:
                late_batch = {**dup, "artifacts": [_v2_artifact(CRAFTED + 3)]}
            status, body = await api.post_callback(path, late_batch)
            # v1: 200 whatever the window (the chain rejects it later); v2: 503 outside the window (§2, §7).
            assert (status, body) == ((503, {"error": "not in PoC generate phase"}) if v2 else (200, None))
            assert await api.delete("deleted-early") is True

            # --- end of PoC validation: weights are fixed; a node deleted afterwards keeps its weight.
            async def fixed() -> dict[str, Any] | None:
                rep = await api.report()
                ep = next(e for e in rep["epochs"] if e["index"] == 1)
                return ep if ep["weights_fixed_at"] is not None else None

            await poll_until(fixed, timeout=(VAL_END - P) * PROFILE.block_seconds + 20, what="weights fixed")
            assert await api.delete("early") is True

            async def early_off_chain() -> bool:
                return "early" not in (await api.report())["chain_nodes"]

            await poll_until(early_off_chain, timeout=10, what="the deletion of 'early' to reach the chain")

            async def inference_validated() -> bool:
                # Traffic runs every 0.25 s to nodes in INFERENCE; on a loaded machine the first validated one of the
                # epoch can come a few seconds after the deletion above.
                ep = next(e for e in (await api.report())["epochs"] if e["index"] == 1)
                return ep["inference"]["ok"] > 0 and ep["inference"]["validations_passed"] > 0

            await poll_until(inference_validated, timeout=30, what="a validated inference in epoch 1")
            report = await api.report()
            ep = next(e for e in report["epochs"] if e["index"] == 1)
            nodes = ep["nodes"]
            batches = await api.batches(epoch=1, kind="generated")
            new_slot_stats = await slot_gpu_2.stats(s)
            late_stats = await late.stats(s)
    finally:
        for node in fronted:
            await node.close()
        await dapi.close()

    assert ep["weights_fixed_at"] == VAL_END
    assert ep["poc_generation"] == generation

    # Registered before poc_start and driven generate → validate → inference: it earns weight.
    e = nodes["early"]
    assert e["registered_at_height"] < P and e["poc_commanded"]
    assert e["weight"] > 0 and e["weight"] == e["nonces_accepted"]
    statuses = [(h["status"], h["poc_status"]) for h in e["status_history"]]
    assert ("POC", "GENERATING") in statuses and ("POC", "VALIDATING") in statuses
    assert statuses.index(("POC", "GENERATING")) < statuses.index(("POC", "VALIDATING"))
    assert statuses[-1] == ("INFERENCE", "IDLE"), statuses
    # ... and deleted after the weights were fixed, it keeps them.
    assert e["deleted_at_height"] is not None and e["deleted_at_height"] >= VAL_END

    # A new id registered after poc_start is kept in inference: nothing earned, no PoC command sent.
    n = nodes["late-new"]
    assert n["registered_at_height"] >= P and n["admin_epoch"] == 1
    assert not n["poc_commanded"] and n["weight"] == 0
    assert late_stats["pow_v1"]["batches_generated"] == 0 and late_stats["pow_v2"]["artifacts_generated"] == 0
    assert ("INFERENCE", "IDLE") in [(h["status"], h["poc_status"]) for h in n["status_history"]]

    # An existing id upserted after poc_start with a new host keeps node_num and admin epoch, and joins.
    slot = nodes["slot-1"]
    assert slot["node_num"] == before["slot-1"]["node"]["node_num"] and slot["admin_epoch"] == 0
    assert slot["upserted_at_heights"] and min(slot["upserted_at_heights"]) >= P
    assert new_slot_stats["senders"]["v2" if v2 else "v1"]["delivered_by_kind"]["generated"] > 0
    assert slot["weight"] > 0

    # Deleted early enough that the removal reached the chain before the end of validation: nothing.
    d = nodes["deleted-early"]
    assert d["nonces_accepted"] > 0, "it did generate"
    assert d["deleted_at_height"] < VAL_END and d["weight"] == 0
    assert "deleted-early" not in ep["chain_nodes_at_weights"]

    # The crafted batches: accepted once, then a duplicate; the late one is out of the window.
    def crafted(*nonces: int) -> list[str]:
        return [b["status"] for b in batches if b["nonce_sample"] == list(nonces)]

    assert crafted(CRAFTED + 1, CRAFTED + 2) == ["accepted", "duplicate"]
    assert crafted(CRAFTED + 3) == ["out_of_window"]
    assert ep["total_weight"] == e["weight"] + slot["weight"]
    # Inference kept flowing to serving nodes, with validations re-run under enforced_tokens.
    assert ep["inference"]["ok"] > 0 and ep["inference"]["validations_passed"] > 0
    assert ep["inference"]["validations_failed"] == 0
