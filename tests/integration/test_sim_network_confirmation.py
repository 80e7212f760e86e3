"""A confirmation PoC drives serving nodes through generation and validation at the trigger height,
then back to inference; the confirmation weight is reported (gonka-protocol.md §8)."""

from __future__ import annotations

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
