"""The simulated chain: epoch arithmetic and rendering, live parameters, the clock, confirmation PoC
(gonka-protocol.md §5, §8)."""

from __future__ import annotations

import re
from typing import Any

import aiohttp
import pytest

from hybrid_common import TEST, EpochShape
from sim.network import start_dapi
from tests.integration.sim_network_helpers import DapiHTTP, poll_until

FAST = TEST.model_copy(update={"block_seconds": 0.1})
REST = "/chain-api/productscience/inference/inference"
SHAPE = EpochShape(
    epoch_length=100,
    poc_stage_duration=10,
    poc_exchange_duration=2,
    poc_validation_delay=2,
    poc_validation_duration=10,
    set_new_validators_delay=6,
    inference_validation_cutoff=4,
    confirmation_poc_safety_window=2,
)


async def get(api: DapiHTTP, path: str) -> Any:
    async with api.s.get(f"{api.public}{path}") as r:
        assert r.status == 200, await r.text()
        return await r.json()


async def post(api: DapiHTTP, path: str, body: Any = None) -> tuple[int, Any]:
    async with api.s.post(f"{api.public}{path}", json=body) as r:
        return r.status, await r.json()


@pytest.mark.timeout(30)
async def test_epoch_rendering_dapi_json_vs_chain_rest() -> None:
    running = await start_dapi(profile=FAST, epoch=SHAPE, first_poc_start=40, inference_interval_seconds=0)
    try:
        async with aiohttp.ClientSession() as s:
            api = DapiHTTP(s, running.public_url, running.admin_url, running.callback_url)
            e = await api.epoch()
            assert e["latest_epoch"] == {"index": 0, "poc_start_block_height": 0}  # the DTO keeps zeros
            assert e["phase"] == "Inference" and e["is_confirmation_poc_active"] is False
            assert "active_confirmation_poc_event" not in e
            assert e["epoch_stages"]["next_poc_start"] == 40 and e["next_epoch_stages"]["poc_start"] == 40
            nxt = e["next_epoch_stages"]
            assert (nxt["poc_generation_end"], nxt["poc_validation_start"], nxt["poc_validation_end"]) == (50, 52, 62)
            assert nxt["set_new_validators"] == 68 and nxt["poc_exchange_window"] == {"start": 41, "end": 52}

            # Go omitempty: a zero parameter vanishes from the dapi's JSON, not from chain REST.
            await api.set_params(epoch_params={"poc_exchange_duration": 0})
            e = await api.epoch()
            assert "poc_exchange_duration" not in e["epoch_params"] and e["epoch_params"]["epoch_length"] == 100
            params = await get(api, f"{REST}/params")
            assert params["params"]["epoch_params"]["poc_exchange_duration"] == "0"
            assert params["params"]["epoch_params"]["epoch_length"] == "100"
            assert params["params"]["poc_params"]["poc_v2_enabled"] is False

            info = await get(api, f"{REST}/epoch_info")
            assert isinstance(info["block_height"], str) and info["latest_epoch"] == {
                "index": "0",
                "poc_start_block_height": "0",
            }
            assert info["active_confirmation_poc_event"] is None
            assert (await get(api, f"{REST}/mlnode_version")) == {"mlnode_version": {"current_version": "v3.0.8"}}
            await api.set_params(mlnode_version="v3.0.9", poc_v2_enabled=True)
            assert (await get(api, f"{REST}/mlnode_version"))["mlnode_version"]["current_version"] == "v3.0.9"
            assert (await get(api, f"{REST}/params"))["params"]["poc_params"]["poc_v2_enabled"] is True

            rpc = await get(api, "/chain-rpc/status")
            sync = rpc["result"]["sync_info"]
            assert int(sync["latest_block_height"]) >= 1 and sync["catching_up"] is False
            assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{9}Z", sync["latest_block_time"])

            status, body = await post(api, "/_sim/params", {"no_such_param": 1})
            assert status == 400 and "no_such_param" in body["error"]
            status, body = await post(api, "/_sim/params", {"epoch_length": 0})
            assert status == 400
            # Live epoch length: the next PoC moves with it.
            await api.set_params(epoch_length=120)
            assert (await api.epoch())["epoch_stages"]["next_poc_start"] == 60
    finally:
        await running.close()


@pytest.mark.timeout(30)
async def test_clock_pause_resume_and_jump_processes_every_height() -> None:
    running = await start_dapi(profile=FAST, epoch=SHAPE, first_poc_start=30, inference_interval_seconds=0)
    try:
        async with aiohttp.ClientSession() as s:
            api = DapiHTTP(s, running.public_url, running.admin_url, running.callback_url)
            await api.wait_height(3)
            _, clock = await post(api, "/_sim/clock/pause")
            paused_at = clock["clock_height"]
            await api.wait_height(paused_at)
            await poll_until(lambda: _still(api, paused_at), timeout=5, what="a paused clock to hold still")
            await post(api, "/_sim/clock/resume")
            await api.wait_height(paused_at + 2)

            status, _ = await post(api, "/_sim/clock/jump", {"height": 1})
            assert status == 400  # never backwards
            status, clock = await post(api, "/_sim/clock/jump", {"height": 250})
            assert status == 200 and clock["clock_height"] >= 250
            await api.wait_height(250)
            report = await api.report()
            indexes = [ep["index"] for ep in report["epochs"]]
            assert indexes == [0, 1, 2, 3]  # PoCs at 30, 130, 230: none skipped
            assert [ep["poc_start"] for ep in report["epochs"][1:]] == [30, 130, 230]
            assert report["epochs"][1]["weights_fixed_at"] == 30 + 10 + 2 + 10
    finally:
        await running.close()


async def _still(api: DapiHTTP, height: int) -> bool:
    import asyncio

    await asyncio.sleep(0.8)  # several block times: a running clock would have moved
    return await api.height() == height


@pytest.mark.timeout(40)
async def test_confirmation_poc_trigger_and_seeded_random_events() -> None:
    running = await start_dapi(profile=FAST, epoch=SHAPE, first_poc_start=10, inference_interval_seconds=0)
    twins = [
        await start_dapi(
            profile=FAST,
            epoch=SHAPE,
            first_poc_start=10,
            seed=7,
            confirmation_poc_enabled=True,
            inference_interval_seconds=0,
        )
        for _ in range(2)
    ]
    try:
        async with aiohttp.ClientSession() as s:
            api = DapiHTTP(s, running.public_url, running.admin_url, running.callback_url)
            # Epoch 2's inference phase: past set_new_validators of the PoC at 110.
            await post(api, "/_sim/clock/jump", {"height": 140})
            await api.wait_height(140)
            status, _ = await post(api, "/_sim/confirmation-poc")
            assert status == 200

            async def active() -> dict[str, Any] | None:
                e = await api.epoch()
                return e if e["is_confirmation_poc_active"] else None

            e = await poll_until(active, timeout=10, what="an active confirmation PoC")
            event = e["active_confirmation_poc_event"]
            t = event["trigger_height"]
            assert event["generation_start_height"] == t + SHAPE.inference_validation_cutoff
            assert event["epoch_index"] == 2 and event["phase"] in (1, 2)
            assert "event_sequence" not in event  # 0 vanishes under omitempty
            rest = await get(api, f"{REST}/active_confirmation_poc_event")
            assert rest["is_active"] is True and rest["event"]["event_sequence"] == "0"
            assert rest["event"]["trigger_height"] == str(t)
            status, _ = await post(api, "/_sim/confirmation-poc")
            assert status == 409

            async def completed() -> dict[str, Any] | None:
                events = (await api.report())["epochs"][-1]["confirmation_poc"]
                return events[0] if events and events[0]["outcome"] != "active" else None

            done = await poll_until(completed, timeout=20, what="the confirmation PoC to complete")
            assert done["cause"] == "manual" and done["outcome"] == "passed" and done["ratio"] == 1.0

            # Random events are a pure function of the seed: two twins agree on every trigger height.
            runs = []
            for twin in twins:
                twin.dapi.update_params({"expected_confirmations_per_epoch": 20})
                tw = DapiHTTP(s, twin.public_url, twin.admin_url, twin.callback_url)
                async with s.post(f"{twin.public_url}/_sim/clock/jump", json={"height": 420}) as r:
                    assert r.status == 200
                await tw.wait_height(420)
                runs.append(
                    [
                        (ep["index"], ev["trigger_height"])
                        for ep in (await tw.report())["epochs"]
                        for ev in ep["confirmation_poc"]
                    ]
                )
            assert runs[0] and runs[0] == runs[1]
            assert all(epoch > 1 for epoch, _ in runs[0]), "no confirmation PoC before epoch 2"
    finally:
        for twin in twins:
            await twin.close()
        await running.close()
