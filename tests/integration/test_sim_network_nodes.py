"""Issue #4 acceptance: the driver's health checks and the version-prefix trap (gonka-protocol.md §1, §3, §9)."""

from __future__ import annotations

from typing import Any

import aiohttp
import pytest
from aiohttp import web

from hybrid_common import TEST, EpochShape
from sim.mlnode import start_mlnode
from sim.network import DEFAULT_EPOCH_MODEL, start_dapi
from tests.integration.sim_network_helpers import DapiHTTP, FrontedMLNode, poll_until

PROFILE = TEST.model_copy(update={"block_seconds": 0.2})
SMALL = EpochShape(
    epoch_length=120,
    poc_stage_duration=12,
    poc_exchange_duration=2,
    poc_validation_delay=2,
    poc_validation_duration=10,
    set_new_validators_delay=8,
    inference_validation_cutoff=4,
)


class InferenceOnlyStub:
    """A node that only answers what the dapi polls — on any path prefix — serving ``model``."""

    def __init__(self, model: str) -> None:
        self.model = model
        self.paths: list[str] = []
        self.chat_bodies: list[dict[str, Any]] = []
        self.completion: dict[str, Any] | None = None  # what /v1/chat/completions answers (JSON)
        self._runner: web.AppRunner | None = None
        self.port = 0

    async def _handle(self, request: web.Request) -> web.Response:
        path = request.path
        self.paths.append(f"{request.method} {path}")
        if path.endswith("/api/v1/state"):
            return web.json_response({"state": "INFERENCE"})
        if path.endswith("/api/v1/inference/pow/status"):
            return web.json_response({"status": "IDLE", "backends": []})
        if path.endswith("/health"):
            return web.Response(status=200)
        if path.endswith("/v1/chat/completions"):
            self.chat_bodies.append(await request.json())
            return web.json_response(self.completion or {})
        if path.endswith("/tokenize"):
            return web.json_response({"count": 7})
        if path.endswith("/v1/models"):
            return web.json_response({"object": "list", "data": [{"id": self.model, "object": "model"}]})
        return web.json_response({"status": "OK"})

    async def start(self) -> int:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = int(self._runner.addresses[0][1])
        return self.port

    def registration(self, node_id: str) -> dict[str, Any]:
        return {
            "id": node_id,
            "host": "127.0.0.1",
            "inference_port": self.port,
            "poc_port": self.port,
            "max_concurrent": 10,
            "models": {DEFAULT_EPOCH_MODEL: {"args": []}},
        }

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()


@pytest.mark.timeout(60)
async def test_health_polls_keep_a_good_node_and_fail_a_wrong_model() -> None:
    dapi = await start_dapi(profile=PROFILE, epoch=SMALL, first_poc_start=100_000, inference_interval_seconds=0)
    good, bad = InferenceOnlyStub(DEFAULT_EPOCH_MODEL), InferenceOnlyStub("someone/else-7B")
    await good.start()
    await bad.start()
    try:
        async with aiohttp.ClientSession() as s:
            api = DapiHTTP(s, dapi.public_url, dapi.admin_url, dapi.callback_url)
            await api.register(good.registration("good"))
            await api.register(bad.registration("bad"))

            async def bad_failed() -> dict[str, Any] | None:
                state = (await api.nodes())["bad"]["state"]
                return state if state["current_status"] == "FAILED" else None

            state = await poll_until(bad_failed, timeout=15, what="the wrong-model node to be FAILED")
            assert "model mismatch" in state["failure_reason"]

            async def polled_often() -> bool:
                return sum(p.endswith("/api/v1/state") for p in good.paths) >= 4

            await poll_until(polled_often, timeout=15, what="four status polls of the good node")
            good_state = (await api.nodes())["good"]["state"]
            history = (await api.report())["epochs"][-1]["nodes"]["good"]["status_history"]

            # The chain's mlnode_version is the prefix of every call, and it is read live.
            await api.set_params(mlnode_version="v3.0.9")
            marker = len(good.paths)
            await poll_until(
                lambda: _async_bool(len(good.paths) > marker + 2), timeout=10, what="calls after the version change"
            )
    finally:
        await good.close()
        await bad.close()
        await dapi.close()

    assert good_state["current_status"] == "INFERENCE" and good_state["failure_reason"] == ""
    assert all(h["status"] != "FAILED" for h in history), history
    before, after = good.paths[:marker], good.paths[marker + 1 :]
    assert before and all(p.split(" ", 1)[1].startswith("/v3.0.8/") for p in before), before
    assert after and all(p.split(" ", 1)[1].startswith("/v3.0.9/") for p in after), after
    # The poll covers the four checks of §9.
    polled = {p.split(" ", 1)[1].removeprefix("/v3.0.8") for p in before}
    assert {"/api/v1/state", "/api/v1/inference/pow/status", "/health", "/v1/models"} <= polled


async def _async_bool(value: bool) -> bool:
    return value


@pytest.mark.timeout(60)
async def test_bare_mlnode_without_front_earns_nothing() -> None:
    """The dapi always prefixes ``/{version}``; the MLNode image does not strip it: 404s, no PoC, no weight."""
    p = 16
    dapi = await start_dapi(profile=PROFILE, epoch=SMALL, first_poc_start=p, inference_interval_seconds=0)
    bare = await start_mlnode(generation="v1", profile=PROFILE, model_download_seconds=0.2, vllm_load_seconds=0.1)
    control = await FrontedMLNode.start(
        generation="v1", profile=PROFILE, model_download_seconds=0.2, vllm_load_seconds=0.1
    )
    try:
        async with aiohttp.ClientSession() as s:
            api = DapiHTTP(s, dapi.public_url, dapi.admin_url, dapi.callback_url)
            await api.register(
                {
                    "id": "bare",
                    "host": "127.0.0.1",
                    "inference_port": bare.inference_port,
                    "poc_port": bare.api_port,
                    "max_concurrent": 10,
                    "models": {DEFAULT_EPOCH_MODEL: {"args": []}},
                }
            )
            await api.register(control.registration("fronted", DEFAULT_EPOCH_MODEL))

            async def weights() -> dict[str, Any] | None:
                ep = (await api.report())["epochs"][-1]
                return ep if ep["index"] == 1 and ep["weights_fixed_at"] is not None else None

            ep = await poll_until(weights, timeout=30, what="the end of the first PoC validation")
            async with s.get(f"http://127.0.0.1:{bare.api_port}/_sim/stats") as r:
                bare_stats = await r.json()
            async with s.get(f"http://127.0.0.1:{bare.api_port}/v3.0.8/api/v1/state") as r:
                prefixed_status = r.status
    finally:
        await control.close()
        await bare.close()
        await dapi.close()

    assert prefixed_status == 404
    node = ep["nodes"]["bare"]
    assert node["weight"] == 0 and node["nonces_accepted"] == 0
    failures = [h for h in node["status_history"] if h["status"] == "FAILED"]
    assert failures and "HTTP 404" in failures[0]["reason"], node["status_history"]
    assert bare_stats["pow_v1"]["batches_generated"] == 0 and bare_stats["vllm"]["state"] == "down"
    assert ep["nodes"]["fronted"]["weight"] > 0, "the same PoC paid a node behind a front"


def _completion(model: str, *, prompt_tokens: int = 9, top: int = 5) -> dict[str, Any]:
    entry = {
        "token": " hi",
        "logprob": -0.1,
        "bytes": [32, 104, 105],
        "top_logprobs": [{"token": f" t{i}", "logprob": -0.1 * (i + 1), "bytes": [32]} for i in range(top)],
    }
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": " hi"},
                "logprobs": {"content": [entry]},
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": 1, "total_tokens": prompt_tokens + 1},
    }


@pytest.mark.timeout(30)
async def test_inference_body_rewrites_and_response_checks() -> None:
    dapi = await start_dapi(profile=PROFILE, epoch=SMALL, first_poc_start=100_000, inference_interval_seconds=0)
    stub = InferenceOnlyStub(DEFAULT_EPOCH_MODEL)
    await stub.start()
    try:
        async with aiohttp.ClientSession() as s:
            api = DapiHTTP(s, dapi.public_url, dapi.admin_url, dapi.callback_url)
            await api.register(stub.registration("proxy"))

            async def serving() -> bool:
                return (await api.nodes())["proxy"]["state"]["current_status"] == "INFERENCE"

            await poll_until(serving, timeout=10, what="the node in INFERENCE")

            async def infer(**body: Any) -> dict[str, Any]:
                async with s.post(f"{api.public}/_sim/inference", json=body) as r:
                    assert r.status == 200
                    data: dict[str, Any] = await r.json()
                    return data

            stub.completion = _completion(DEFAULT_EPOCH_MODEL, prompt_tokens=0)
            client_body = {"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2, "logprobs": False}
            ok = await infer(node_id="proxy", body=client_body, stream=False, validate=False)
            stub.completion = _completion(DEFAULT_EPOCH_MODEL, top=0)
            bad = await infer(node_id="proxy", stream=False, validate=False)
            stub.completion = {"model": DEFAULT_EPOCH_MODEL, "choices": []}
            no_usage = await infer(node_id="proxy", stream=False, validate=False)
            counts = (await api.report())["epochs"][-1]["inference"]
    finally:
        await stub.close()
        await dapi.close()

    sent = stub.chat_bodies[0]
    assert sent["logprobs"] is True and sent["top_logprobs"] == 5  # rewritten whatever the client asked
    assert sent["max_tokens"] == 5000 and sent["skip_special_tokens"] is False and isinstance(sent["seed"], int)
    assert sent["model"] == DEFAULT_EPOCH_MODEL
    assert any(p.endswith("/tokenize") for p in stub.paths), "prompt_tokens == 0 makes the dapi ask /tokenize"
    assert ok["ok"] is True
    assert bad["ok"] is False and "top_logprobs" in bad["reason"]
    assert no_usage["ok"] is False and "usage" in no_usage["reason"]
    assert counts["ok"] == 1 and counts["failed"] == 2


@pytest.mark.timeout(60)
async def test_v2_init_generate_answered_with_an_error_marks_the_node_failed() -> None:
    """v1 and inference/up status codes are ignored, but a v2 init/generate >= 400 is a FAILED node (§10)."""
    p = 16
    dapi = await start_dapi(
        profile=PROFILE, epoch=SMALL, first_poc_start=p, poc_v2_enabled=True, inference_interval_seconds=0
    )
    gpu = await FrontedMLNode.start(
        generation="v2", profile=PROFILE, model_download_seconds=0.05, vllm_load_seconds=0.05
    )
    try:
        async with aiohttp.ClientSession() as s:
            api = DapiHTTP(s, dapi.public_url, dapi.admin_url, dapi.callback_url)
            # The node serves the epoch model; the chain's PoC model is another one: vLLM refuses PoC.
            await api.register(gpu.registration("gpu", DEFAULT_EPOCH_MODEL))

            async def failed_in_poc() -> list[dict[str, Any]]:
                ep = (await api.report())["epochs"][-1]
                history = ep["nodes"].get("gpu", {}).get("status_history", []) if ep["index"] == 1 else []
                return [h for h in history if h["status"] == "FAILED"]

            failures = await poll_until(failed_in_poc, timeout=20, what="a FAILED status during the PoC")
    finally:
        await gpu.close()
        await dapi.close()
    assert "inference/pow/init/generate answered HTTP 502" in failures[0]["reason"]
