"""A confirmation PoC drives serving nodes through generation and validation at the trigger height,
then back to inference; the confirmation weight is reported (gonka-protocol.md §8)."""

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
    epoch_length=100,
    poc_stage_duration=12,
    poc_exchange_duration=2,
    poc_validation_delay=2,
    poc_validation_duration=8,
    set_new_validators_delay=6,
    inference_validation_cutoff=4,
    confirmation_poc_safety_window=2,
)


@pytest.mark.parametrize("generation", ["v1", "v2"])
@pytest.mark.timeout(60)
async def test_confirmation_poc_drives_serving_nodes(generation: str) -> None:
    v2 = generation == "v2"
    model = DEFAULT_POC_MODEL if v2 else DEFAULT_EPOCH_MODEL
    dapi = await start_dapi(
        profile=PROFILE, epoch=SHAPE, first_poc_start=200, poc_v2_enabled=v2, inference_interval_seconds=0
    )
    node = await FrontedMLNode.start(
        generation=generation, profile=PROFILE, model_download_seconds=0.05, vllm_load_seconds=0.05
    )
    try:
        async with aiohttp.ClientSession() as s:
            api = DapiHTTP(s, dapi.public_url, dapi.admin_url, dapi.callback_url)
            await api.register(node.registration("gpu", model))

            async def serving() -> bool:
                return (await api.nodes())["gpu"]["state"]["current_status"] == "INFERENCE"

            await poll_until(serving, timeout=15, what="the node serving")
            # Into epoch 2's inference phase (PoC 1 at 200, PoC 2 at 300), then fire one.
            async with s.post(f"{api.public}/_sim/clock/jump", json={"height": 330}) as r:
                assert r.status == 200
            await api.wait_height(330)
            await poll_until(serving, timeout=15, what="the node serving again after the jump")
            async with s.post(f"{api.public}/_sim/confirmation-poc") as r:
                assert r.status == 200

            async def completed() -> dict[str, Any] | None:
                ep = (await api.report())["epochs"][-1]
                events = ep["confirmation_poc"]
                return ep if events and events[0]["outcome"] != "active" else None

            ep = await poll_until(completed, timeout=30, what="the confirmation PoC to complete")
            await poll_until(serving, timeout=15, what="the node back in inference")
            history = ep["nodes"]["gpu"]["status_history"]
    finally:
        await node.close()
        await dapi.close()

    event = ep["confirmation_poc"][0]
    assert ep["index"] == 2 and event["outcome"] == "passed"
    assert event["generation_start_height"] == event["trigger_height"] + SHAPE.inference_validation_cutoff
    assert event["node_weights"].get("gpu", 0) > 0 and event["confirmation_weight"] == event["node_weights"]["gpu"]
    assert ep["nodes"]["gpu"]["confirmation_nonces_accepted"] == event["confirmation_weight"]
    assert ep["nodes"]["gpu"]["weight"] == 0, "confirmation nonces are not the epoch's PoC weight"
    states = [(h["status"], h["poc_status"]) for h in history]
    assert ("POC", "GENERATING") in states and ("POC", "VALIDATING") in states


# An event triggered late in epoch 2 (P 300; epoch 3's PoC starts at 400): T 395, G = T + cutoff = 399,
# generation to 410, batch window to the exchange end 412, validation 414..421, completed at 422 — which is
# also where epoch 3's own PoC validation ends. The random window stops well before the next PoC (§8), so only
# a manual trigger can run an event into the next epoch; it still belongs to epoch 2.
LATE_T = 395
LATE_G = LATE_T + SHAPE.inference_validation_cutoff
LATE_EXCHANGE_END = LATE_G + SHAPE.poc_stage_duration - 1 + SHAPE.poc_exchange_duration
LATE_VALIDATION_START = LATE_EXCHANGE_END + SHAPE.poc_validation_delay
LATE_COMPLETED = LATE_VALIDATION_START + SHAPE.poc_validation_duration


@pytest.mark.parametrize("generation", ["v1", "v2"])
@pytest.mark.timeout(60)
async def test_confirmation_poc_running_into_the_next_epoch_is_completed_under_its_own(generation: str) -> None:
    v2 = generation == "v2"
    dapi = await start_dapi(
        profile=PROFILE, epoch=SHAPE, first_poc_start=200, poc_v2_enabled=v2, inference_interval_seconds=0
    )
    vector = base64.b64encode(bytes(24)).decode()
    try:
        async with aiohttp.ClientSession() as s:
            api = DapiHTTP(s, dapi.public_url, dapi.admin_url, dapi.callback_url)

            async def sim(path: str) -> None:
                async with s.post(f"{api.public}/_sim/{path}") as r:
                    assert r.status == 200, await r.text()

            async def at(height: int) -> None:
                # The clock stays paused: every callback below arrives at exactly this height.
                async with s.post(f"{api.public}/_sim/clock/jump", json={"height": height}) as r:
                    assert r.status == 200
                await api.wait_height(height)

            await sim("clock/pause")
            # Nothing listens on these ports: the callbacks are posted here as the MLNode would post them.
            await api.register(
                {
                    "id": "n1",
                    "host": "127.0.0.1",
                    "inference_port": 40021,
                    "poc_port": 40022,
                    "max_concurrent": 5,
                    "models": {(DEFAULT_POC_MODEL if v2 else DEFAULT_EPOCH_MODEL): {"args": []}},
                }
            )
            num = (await api.nodes())["n1"]["node"]["node_num"]

            async def generated(stage: int, nonces: list[int]) -> tuple[int, Any]:
                if v2:
                    artifacts = [{"nonce": n, "vector_b64": vector} for n in nonces]
                    body = {"block_hash": "h", "block_height": stage, "public_key": "pk", "node_id": num}
                    return await api.post_callback("/v2/poc-batches/generated", {**body, "artifacts": artifacts})
                body = {"block_hash": "h", "block_height": stage, "public_key": "pk", "node_id": num}
                return await api.post_callback(
                    "/v1/poc-batches/generated", {**body, "nonces": nonces, "dist": [1.0] * len(nonces)}
                )

            async def validated(stage: int) -> tuple[int, Any]:
                body = {"block_hash": "h", "block_height": stage, "public_key": "pk", "node_id": num}
                if v2:
                    extra = {"request_id": "1:late", "n_total": 4, "n_mismatch": 0, "fraud_detected": False}
                    return await api.post_callback("/v2/poc-batches/validated", {**body, **extra})
                extra = {"nonces": [1, 2, 3, 4], "dist": [1.0] * 4, "received_dist": [1.0] * 4, "n_invalid": 0}
                return await api.post_callback("/v1/poc-batches/validated", {**body, **extra})

            # Epoch 2's own PoC gives n1 a weight of 10: what the event's confirmation weight is measured against.
            await at(301)
            assert await generated(300, list(range(10))) == (200, None)
            await at(LATE_T - 1)
            await sim("confirmation-poc")
            await at(LATE_T)
            event = (await api.epoch())["active_confirmation_poc_event"]
            assert (event["epoch_index"], event["trigger_height"]) == (2, LATE_T)
            assert event["generation_start_height"] == LATE_G

            await at(LATE_G)  # still epoch 2
            assert await generated(LATE_T, [100, 101]) == (200, None)
            await at(401)  # epoch 3's PoC generation, inside the event's batch window
            e = await api.epoch()
            assert e["latest_epoch"]["index"] == 3 and e["phase"] == "PoCGenerate"
            assert e["active_confirmation_poc_event"]["epoch_index"] == 2
            assert await generated(LATE_T, list(range(102, 110))) == (200, None)
            assert await generated(400, list(range(5))) == (200, None)  # epoch 3's own stage is open alongside
            await at(LATE_EXCHANGE_END + 1)  # the event's batch window has closed; epoch 3's is still open
            late = await generated(LATE_T, [110])
            await at(LATE_VALIDATION_START + 1)  # the event validates while epoch 3 is in PoCValidate
            assert await validated(LATE_T) == (200, None)
            await at(LATE_COMPLETED + 1)  # the event is over and epoch 3 is back in inference
            assert (await api.epoch())["is_confirmation_poc_active"] is False
            closed = await generated(LATE_T, [111])
            report = await api.report()
            batches = await api.batches()
    finally:
        await dapi.close()

    # The real dapi's answers for a closed event: v2 refuses it (400: not the open stage; 503: no generation
    # open), v1 answers 200 and the chain drops the transaction outside the window (gonka-protocol.md §2, §7).
    if v2:
        assert late == (400, {"error": "block_height is not the active PoC stage"})
        assert closed == (503, {"error": "not in PoC generate phase"})
    else:
        assert late == closed == (200, None)
    epochs = {ep["index"]: ep for ep in report["epochs"]}
    assert epochs[3]["confirmation_poc"] == []
    [outcome] = epochs[2]["confirmation_poc"]
    # 2 nonces before the boundary alone would give ratio 2 / 10 / 0.909 < alpha 0.5 (§8): the 8 after it count.
    assert outcome["trigger_height"] == LATE_T and outcome["completed_at_height"] == LATE_COMPLETED
    assert outcome["phase"] == 4 and outcome["outcome"] == "passed" and outcome["ratio"] == 1.0
    assert outcome["node_weights"] == {"n1": 10}
    assert (outcome["confirmation_weight"], outcome["expected_weight"]) == (10, 10)
    assert epochs[2]["nodes"]["n1"]["confirmation_nonces_accepted"] == 10
    assert epochs[2]["nodes"]["n1"]["nonces_accepted"] == 10
    assert epochs[3]["nodes"]["n1"]["confirmation_nonces_accepted"] == 0
    assert epochs[3]["nodes"]["n1"]["nonces_accepted"] == 5

    def fate(kind: str, height: int) -> list[tuple[int, bool, str]]:
        return [
            (b["epoch_index"], b["confirmation"], b["status"])
            for b in batches
            if b["kind"] == kind and b["arrival_height"] == height and b["block_height"] == LATE_T
        ]

    assert fate("generated", LATE_G) == [(2, True, "accepted")]
    assert fate("generated", 401) == [(2, True, "accepted")]
    assert fate("validated", LATE_VALIDATION_START + 1) == [(2, True, "accepted")]
    assert [s for _, _, s in fate("generated", LATE_EXCHANGE_END + 1)] == ["rejected" if v2 else "out_of_window"]
    assert [s for _, _, s in fate("generated", LATE_COMPLETED + 1)] == ["out_of_window"]
