"""The dapi simulator's ``GET /v1/epochs/{epoch|current}/participants`` (issue #12): the epoch's active participants
with their weight, from the same record ``/_sim/report`` shows, available from the epoch's ``set_new_validators``.

The clock is paused and moved by jumps, so every height is processed in order and the test decides exactly which
block the chain has reached: no timing on this loaded machine can make it flaky.
"""

from __future__ import annotations

from typing import Any

import aiohttp
import pytest

from sim.network import DEFAULT_EPOCH_MODEL, start_dapi
from sim.network.public_api import NO_PARTICIPANTS, SIM_PARTICIPANT_ADDRESS, SIM_PEERS
from tests.integration.sim_network_helpers import (
    SHORT_P,
    SHORT_PROFILE,
    SHORT_SET_NEW_VALIDATORS,
    SHORT_SHAPE,
    SHORT_VAL_END,
    DapiHTTP,
    silent_gpu,
)

PROFILE, SHAPE, P = SHORT_PROFILE, SHORT_SHAPE, SHORT_P
VAL_END, SET_NEW_VALIDATORS = SHORT_VAL_END, SHORT_SET_NEW_VALIDATORS

pytestmark = pytest.mark.timeout(60)


async def participants(api: DapiHTTP, epoch: str) -> tuple[int, Any]:
    return await api._json("GET", f"{api.public}/v1/epochs/{epoch}/participants")


async def jump(api: DapiHTTP, height: int) -> None:
    status, body = await api._json("POST", f"{api.public}/_sim/clock/jump", {"height": height})
    assert status == 200, body
    await api.wait_height(height, timeout=20)


async def test_participants_appear_at_set_new_validators_with_the_reported_weight() -> None:
    dapi = await start_dapi(profile=PROFILE, epoch=SHAPE, first_poc_start=P, inference_interval_seconds=0, seed=3)
    try:
        async with aiohttp.ClientSession() as s:
            api = DapiHTTP(s, dapi.public_url, dapi.admin_url, dapi.callback_url)
            status, _ = await api._json("POST", f"{api.public}/_sim/clock/pause")
            assert status == 200

            # Bad ids are refused as the dapi's echo handler does; epoch 0 (and "current" while it is effective)
            # has no participants record at all.
            assert await participants(api, "abc") == (400, {"message": "Invalid epoch id"})
            assert await participants(api, "-1") == (400, {"message": "Invalid epoch id"})
            assert await participants(api, "0") == (400, {"message": "Epoch enumeration starts with 1"})
            assert await participants(api, "current") == (400, {"message": "Epoch enumeration starts with 1"})
            assert await participants(api, "1") == (404, {"message": NO_PARTICIPANTS})

            # A GPU of ours registered before the PoC (nothing answers at its address: the batch below is its work).
            gpu = silent_gpu("gpu-1", DEFAULT_EPOCH_MODEL)
            await api.register(gpu)
            await jump(api, P + 1)
            node_num = (await api.nodes())["gpu-1"]["node"]["node_num"]
            batch = {
                "public_key": "02" + "5a" * 32,
                "block_hash": "H",
                "block_height": P,
                "node_id": node_num,
                "nonces": [11, 12, 13],
                "dist": [0.1, 0.2, 0.3],
            }
            assert await api.post_callback("/v1/poc-batches/generated", batch) == (200, None)

            # Weights are fixed at the end of PoC validation, but the chain stores the participants record only at
            # set_new_validators: until then the epoch has none.
            await jump(api, VAL_END + 1)
            reported = next(e for e in (await api.report())["epochs"] if e["index"] == 1)
            assert reported["weights_fixed_at"] == VAL_END and reported["total_weight"] == 3
            assert await participants(api, "1") == (404, {"message": NO_PARTICIPANTS})

            await jump(api, SET_NEW_VALIDATORS)
            status, body = await participants(api, "1")
            assert status == 200, body
            assert (await participants(api, "current")) == (200, body)  # epoch 1 is now the effective epoch
            assert await participants(api, "2") == (404, {"message": NO_PARTICIPANTS})
    finally:
        await dapi.close()

    active = body["active_participants"]
    assert active["epoch_group_id"] == 1 and active["epoch_id"] == 1
    assert active["poc_start_block_height"] == P
    assert active["created_at_block_height"] == active["effective_block_height"] == SET_NEW_VALIDATORS
    by_address = {p["index"]: p for p in active["participants"]}
    assert sorted(by_address) == sorted([SIM_PARTICIPANT_ADDRESS, *SIM_PEERS])
    assert [p["index"] for p in active["participants"]] == sorted(by_address)  # ours is not simply the first
    ours = by_address[SIM_PARTICIPANT_ADDRESS]
    assert ours["weight"] == reported["total_weight"] == reported["nodes"]["gpu-1"]["weight"] == 3
    assert ours["ml_nodes"] == [
        {"ml_nodes": [{"node_id": "gpu-1", "poc_weight": 3, "timeslot_allocation": [True, False]}]}
    ]
    assert ours["inference_url"] == dapi.public_url and ours["models"] == [DEFAULT_EPOCH_MODEL]
    assert ours["seed"]["participant"] == SIM_PARTICIPANT_ADDRESS and ours["seed"]["epoch_index"] == 1
    assert all(isinstance(p["weight"], int) and p["weight"] > 0 for p in active["participants"])
    assert len(body["addresses"]) == len(body["validators"]) == 3
    assert {v["voting_power"] for v in body["validators"]} == {p["weight"] for p in active["participants"]}
    assert bytes.fromhex(body["active_participants_bytes"])


async def test_a_participant_that_earned_nothing_is_not_listed() -> None:
    dapi = await start_dapi(profile=PROFILE, epoch=SHAPE, first_poc_start=P, inference_interval_seconds=0, seed=3)
    try:
        async with aiohttp.ClientSession() as s:
            api = DapiHTTP(s, dapi.public_url, dapi.admin_url, dapi.callback_url)
            await api._json("POST", f"{api.public}/_sim/clock/pause")
            await jump(api, SET_NEW_VALIDATORS)
            status, body = await participants(api, "current")
    finally:
        await dapi.close()
    assert status == 200, body
    assert [p["index"] for p in body["active_participants"]["participants"]] == sorted(SIM_PEERS)


def test_the_schedulers_sim_default_is_the_simulated_participant() -> None:
    from hybrid_scheduler.settings import SIM_PARTICIPANT_ADDRESS as scheduler_default

    assert scheduler_default == SIM_PARTICIPANT_ADDRESS
