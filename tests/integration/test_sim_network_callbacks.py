"""The simulated dapi callback server: v1 answers and chain windows, v2 status codes, model paths, and
"the dapi is down for a stretch" (gonka-protocol.md §2, §7, §10)."""

from __future__ import annotations

import base64
from typing import Any
from urllib.parse import quote

import aiohttp
import pytest

from hybrid_common import TEST, EpochShape
from sim.network import DEFAULT_EPOCH_MODEL, DEFAULT_POC_MODEL, start_dapi
from tests.integration.sim_network_helpers import DapiHTTP

SHAPE = EpochShape(
    epoch_length=200,
    poc_stage_duration=20,
    poc_exchange_duration=4,
    poc_validation_delay=4,
    poc_validation_duration=20,
    set_new_validators_delay=8,
    inference_validation_cutoff=4,
)
P = 20


def registration(node_id: str, port: int, model: str) -> dict[str, Any]:
    # Nobody listens there: the callbacks under test do not need a live node, only its node_num.
    return {
        "id": node_id,
        "host": "127.0.0.1",
        "inference_port": port,
        "poc_port": port + 1,
        "max_concurrent": 5,
        "models": {model: {"args": []}},
    }


async def raw_post(s: aiohttp.ClientSession, url: str, data: bytes) -> tuple[int, Any]:
    async with s.post(url, data=data, headers={"Content-Type": "application/json"}) as r:
        text = await r.text()
        return r.status, (await r.json(content_type=None)) if text else None


async def jump(api: DapiHTTP, height: int) -> None:
    async with api.s.post(f"{api.public}/_sim/clock/jump", json={"height": height}) as r:
        assert r.status == 200
    await api.wait_height(height)
    async with api.s.post(f"{api.public}/_sim/clock/pause") as r:
        assert r.status == 200


def statuses(batches: list[dict[str, Any]], nonce: int) -> list[str]:
    return [b["status"] for b in batches if b["nonce_sample"][:1] == [nonce]]


@pytest.mark.timeout(30)
async def test_v1_callbacks_answer_200_and_the_chain_judges() -> None:
    running = await start_dapi(profile=TEST, epoch=SHAPE, first_poc_start=P, inference_interval_seconds=0)
    try:
        async with aiohttp.ClientSession() as s:
            api = DapiHTTP(s, running.public_url, running.admin_url, running.callback_url)
            await api.register(registration("n1", 40001, DEFAULT_EPOCH_MODEL))
            num = (await api.nodes())["n1"]["node"]["node_num"]

            def batch(nonce: int, height: int = P, node_id: int = num) -> dict[str, Any]:
                return {
                    "public_key": "pk",
                    "block_hash": "h",
                    "block_height": height,
                    "node_id": node_id,
                    "nonces": [nonce],
                    "dist": [1.2],
                }

            status, body = await raw_post(s, f"{api.callback}/v1/poc-batches/generated", b"{oops")
            assert status == 400 and body["error"]["message"].startswith("Syntax error")
            # Before the PoC: 200 anyway, the chain rejects it.
            assert await api.post_callback("/v1/poc-batches/generated", batch(1)) == (200, None)
            await jump(api, P + 2)
            assert await api.post_callback("/v1/poc-batches/generated", batch(2)) == (200, None)
            assert await api.post_callback("/mlnode/v1/poc-batches/generated", batch(3)) == (200, None)
            assert await api.post_callback("/v1/poc-batches/generated", batch(3)) == (200, None)
            assert await api.post_callback("/v1/poc-batches/generated", batch(4, node_id=99)) == (200, None)
            assert await api.post_callback("/v1/poc-batches/generated", batch(5, height=P + 1)) == (200, None)
            # The exchange window is [P+1, P+stage+exchange]; the transaction lands one block after arrival.
            await running.dapi.scheduler.close()  # freeze the chain exactly where we put it
            running.dapi.chain.height = P + SHAPE.poc_stage_duration + SHAPE.poc_exchange_duration - 1
            assert await api.post_callback("/v1/poc-batches/generated", batch(6)) == (200, None)
            running.dapi.chain.height += 1
            assert await api.post_callback("/v1/poc-batches/generated", batch(7)) == (200, None)
            batches = await api.batches(kind="generated")

            running.dapi.update_params({"poc_v2_enabled": True})
            status, _ = await api.post_callback("/v1/poc-batches/generated", batch(8))
            assert status == 503
    finally:
        await running.close()

    assert statuses(batches, 1) == ["rejected"]
    assert statuses(batches, 2) == ["accepted"]
    assert statuses(batches, 3) == ["accepted", "duplicate"]
    assert statuses(batches, 4) == ["rejected"]  # unknown node id
    assert statuses(batches, 5) == ["rejected"]  # not a PoC stage start
    assert statuses(batches, 6) == ["accepted"]
    assert statuses(batches, 7) == ["out_of_window"]


@pytest.mark.timeout(30)
async def test_v2_callbacks_status_codes_and_model_path() -> None:
    running = await start_dapi(
        profile=TEST, epoch=SHAPE, first_poc_start=P, poc_v2_enabled=True, inference_interval_seconds=0
    )
    vector = base64.b64encode(bytes(24)).decode()
    try:
        async with aiohttp.ClientSession() as s:
            api = DapiHTTP(s, running.public_url, running.admin_url, running.callback_url)
            await api.register(registration("n1", 40011, DEFAULT_POC_MODEL))
            num = (await api.nodes())["n1"]["node"]["node_num"]

            def batch(nonce: int, *, height: int = P, node_id: int = num, vec: str = vector) -> dict[str, Any]:
                return {
                    "block_hash": "h",
                    "block_height": height,
                    "public_key": "pk",
                    "node_id": node_id,
                    "artifacts": [{"nonce": nonce, "vector_b64": vec}],
                    "encoding": {"dtype": "f16", "k_dim": 12, "endian": "le"},
                }

            gen = "/v2/poc-batches/generated"
            model_path = "/v2/poc-batches/" + quote(quote(DEFAULT_POC_MODEL, safe=""), safe="") + "/generated"
            assert await api.post_callback(gen, batch(1)) == (503, {"error": "not in PoC generate phase"})
            await jump(api, P + 1)
            assert await api.post_callback(gen, batch(2)) == (200, None)
            assert await api.post_callback(model_path, batch(3)) == (200, None)
            assert await api.post_callback(model_path, batch(3)) == (200, None)
            assert await api.post_callback(gen, batch(4, node_id=77)) == (400, {"error": "unknown node_num"})
            assert await api.post_callback(gen, batch(5, vec="***")) == (
                400,
                {"error": "invalid base64 in artifact vector"},
            )
            assert await api.post_callback(gen, batch(6, height=P - 1)) == (
                400,
                {"error": "block_height is not the active PoC stage"},
            )
            status, body = await raw_post(s, f"{api.callback}{gen}", b"[")
            assert status == 400 and "message" in body["error"]
            validated = {
                "request_id": "1:x",
                "block_hash": "h",
                "block_height": P,
                "public_key": "pk",
                "node_id": num,
                "n_total": 1,
                "n_mismatch": 0,
                "mismatch_nonces": [],
                "p_value": 1.0,
                "fraud_detected": False,
            }
            assert await api.post_callback("/v2/poc-batches/validated", validated) == (
                503,
                {"error": "not in PoC validate phase"},
            )
            status, _ = await api.post_callback("/v1/poc-batches/generated", {})
            assert status == 503  # v1 routes are closed while poc_v2_enabled
            batches = await api.batches(kind="generated")
    finally:
        await running.close()

    assert statuses(batches, 1) == ["out_of_window"]
    assert statuses(batches, 2) == ["accepted"]
    assert statuses(batches, 3) == ["accepted", "duplicate"]
    assert [b["model_id"] for b in batches if b["nonce_sample"] == [3]] == [DEFAULT_POC_MODEL] * 2
    assert statuses(batches, 4) == statuses(batches, 5) == statuses(batches, 6) == ["rejected"]


@pytest.mark.timeout(30)
async def test_callback_server_can_go_dark_and_come_back_on_the_same_port() -> None:
    running = await start_dapi(profile=TEST, epoch=SHAPE, first_poc_start=P, inference_interval_seconds=0)
    try:
        async with aiohttp.ClientSession() as s:
            api = DapiHTTP(s, running.public_url, running.admin_url, running.callback_url)
            assert (await api.post_callback("/v1/poc-batches/generated", {}))[0] == 200
            async with s.post(f"{api.public}/_sim/callback/stop") as r:
                assert (await r.json()) == {"callback_server": "stopped"}
            with pytest.raises(aiohttp.ClientError):
                await api.post_callback("/v1/poc-batches/generated", {})
            async with s.post(f"{api.public}/_sim/callback/start") as r:
                assert (await r.json()) == {"callback_server": "running"}
            assert (await api.post_callback("/v1/poc-batches/generated", {}))[0] == 200
    finally:
        await running.close()
