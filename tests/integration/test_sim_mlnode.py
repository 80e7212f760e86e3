"""The MLNode simulator on its own: the 3.0.11 and 3.0.12+ APIs, no prefix stripping, inference with
logprobs and enforced_tokens, and the callback senders' habits (gonka-protocol.md §1, §2, §4, §7)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web

from hybrid_common import TEST
from sim.mlnode import DEFAULT_EPOCH_MODEL, DEFAULT_POC_MODEL, RunningMLNode, start_mlnode
from tests.integration.sim_network_helpers import poll_until

MODEL = DEFAULT_EPOCH_MODEL


class CallbackSink:
    """Records callbacks; answers with ``status`` (changeable)."""

    def __init__(self, status: int = 200) -> None:
        self.status = status
        self.received: list[tuple[str, dict[str, Any]]] = []
        self._runner: web.AppRunner | None = None
        self.port = 0

    async def _handle(self, request: web.Request) -> web.Response:
        self.received.append((request.path, await request.json()))
        return web.Response(status=self.status)

    async def start(self) -> str:
        app = web.Application(client_max_size=64 * 1024**2)
        app.router.add_post("/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = int(self._runner.addresses[0][1])
        return f"http://127.0.0.1:{self.port}"

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


async def call(s: aiohttp.ClientSession, method: str, url: str, body: Any = None) -> tuple[int, Any]:
    async with s.request(method, url, json=body) as r:
        text = await r.text()
        return r.status, orjson.loads(text) if text else None


def api(node: RunningMLNode, path: str) -> str:
    return f"{node.api_url}{path}"


def pow_init(url: str, node_id: int = 1) -> dict[str, Any]:
    return {
        "node_id": node_id,
        "node_count": 2,
        "block_hash": "ABC",
        "block_height": 100,
        "public_key": "pk",
        "batch_size": 10,
        "r_target": 1.398,
        "fraud_threshold": 1e-7,
        "params": {},
        "url": url,
    }


@pytest.mark.timeout(30)
async def test_v1_api_states_conflicts_and_no_prefix_stripping(session: aiohttp.ClientSession) -> None:
    node = await start_mlnode(generation="v1", profile=TEST, model_download_seconds=0.6, vllm_load_seconds=0.2)
    gpu_less = await start_mlnode(generation="v1", profile=TEST, gpu_count=0, preload_models=[])
    try:
        assert await call(session, "GET", api(node, "/v3.0.8/api/v1/state")) == (404, {"detail": "Not Found"})
        assert await call(session, "GET", api(node, "/api/v1/state")) == (200, {"state": "STOPPED"})
        status, health = await call(session, "GET", api(node, "/health"))
        assert status == 200 and health["status"] == "healthy" and health["gpu"]["count"] == 1
        status, health = await call(session, "GET", api(gpu_less, "/health"))
        assert status == 503 and health["status"] == "unhealthy"
        status, devices = await call(session, "GET", api(node, "/api/v1/gpu/devices"))
        assert status == 200 and devices["count"] == 1 and devices["devices"][0]["total_memory_mb"] == 81920
        # No inference/pow routes in 3.0.11.
        assert (await call(session, "GET", api(node, "/api/v1/inference/pow/status")))[0] == 404

        # The model is still downloading at boot: status shows progress; inference/up waits for it.
        status, st = await call(session, "POST", api(node, "/api/v1/models/status"), {"hf_repo": MODEL})
        assert status == 200 and st["status"] == "DOWNLOADING" and st["progress"]["elapsed_seconds"] >= 0
        with pytest.raises(aiohttp.ClientConnectionError):  # vLLM is down: its port does not answer
            await call(session, "GET", f"{node.inference_url}/health")
        started = time.monotonic()
        up = {"model": MODEL, "dtype": "float16", "additional_args": []}
        assert await call(session, "POST", api(node, "/api/v1/inference/up"), up) == (200, {"status": "OK"})
        assert time.monotonic() - started >= 0.3
        st = (await call(session, "POST", api(node, "/api/v1/models/status"), {"hf_repo": MODEL}))[1]
        assert st["status"] == "DOWNLOADED"
        assert await call(session, "GET", api(node, "/api/v1/state")) == (200, {"state": "INFERENCE"})
        async with session.get(f"{node.inference_url}/health") as r:
            assert r.status == 200
        async with session.get(f"{node.inference_url}/v3.0.8/v1/models") as r:
            assert r.status == 404

        # Mode conflicts are 409s; bad init bodies 400/422; phase switches need a running PoW.
        status, body = await call(
            session, "POST", api(node, "/api/v1/pow/init/generate"), pow_init("http://127.0.0.1:9")
        )
        assert status == 409 and "INFERENCE" in body["detail"]
        assert (await call(session, "POST", api(node, "/api/v1/inference/up"), up))[0] == 409
        assert await call(session, "POST", api(node, "/api/v1/stop")) == (200, {"status": "OK"})
        status, body = await call(session, "POST", api(node, "/api/v1/pow/init/generate"), {"node_id": 1})
        assert status == 422 and {e["loc"][1] for e in body["detail"]} >= {"node_count", "block_hash", "url"}
        status, _ = await call(
            session, "POST", api(node, "/api/v1/pow/init/generate"), pow_init("http://x", node_id=-1)
        )
        assert status == 400
        assert await call(session, "POST", api(node, "/api/v1/pow/phase/generate")) == (
            400,
            {"detail": "PoW is not running"},
        )
        status, body = await call(
            session, "POST", api(node, "/api/v1/pow/init/generate"), pow_init("http://127.0.0.1:9")
        )
        assert status == 200
        assert await call(session, "GET", api(node, "/api/v1/state")) == (200, {"state": "POW"})
        status, body = await call(session, "POST", api(node, "/api/v1/inference/up"), up)
        assert status == 409 and "POW" in body["detail"]
        status, body = await call(session, "POST", api(node, "/api/v1/pow/stop"))
        assert status == 200 and body["status"] == "OK"
    finally:
        await node.close()
        await gpu_less.close()


@pytest.mark.timeout(30)
async def test_inference_logprobs_stream_and_enforced_tokens(session: aiohttp.ClientSession) -> None:
    a = await start_mlnode(generation="v1", profile=TEST, model_download_seconds=0.05, vllm_load_seconds=0.05)
    b = await start_mlnode(
        generation="v2", profile=TEST, model_download_seconds=0.05, vllm_load_seconds=0.05, preload_models=[MODEL]
    )
    try:
        up = {"model": MODEL, "dtype": "auto", "additional_args": []}
        async with session.get(f"{b.inference_url}/health") as r:
            assert r.status == 503  # 3.0.12+: the proxy holds the port and says there is no backend
        for node in (a, b):
            assert (await call(session, "POST", api(node, "/api/v1/inference/up"), up))[0] == 200
        models = (await call(session, "GET", f"{a.inference_url}/v1/models"))[1]
        assert [m["id"] for m in models["data"]] == [MODEL]

        request = {
            "model": MODEL,
            "messages": [{"role": "user", "content": "Say something."}],
            "max_tokens": 20,
            "logprobs": True,
            "top_logprobs": 5,
            "seed": 42,
        }
        status, out = await call(session, "POST", f"{a.inference_url}/v1/chat/completions", request)
        assert status == 200 and out["model"] == MODEL
        content = out["choices"][0]["logprobs"]["content"]
        assert 0 < len(content) <= 20 and out["usage"]["completion_tokens"] == len(content)
        assert all(len(c["top_logprobs"]) == 5 and c["bytes"] == list(c["token"].encode()) for c in content)

        # A validator node with the same model reproduces the top logprobs under enforced_tokens.
        enforced = {
            "tokens": [{"token": c["token"], "top_tokens": [t["token"] for t in c["top_logprobs"]]} for c in content]
        }
        check = {**request, "enforced_tokens": enforced, "max_tokens": len(content)}
        status, again = await call(session, "POST", f"{b.inference_url}/v1/chat/completions", check)
        assert status == 200
        assert again["choices"][0]["logprobs"]["content"] == content

        status, err = await call(session, "POST", f"{a.inference_url}/v1/chat/completions", {**request, "model": "x/y"})
        assert status == 404 and err["type"] == "NotFoundError"

        stream = {**request, "stream": True, "stream_options": {"include_usage": True}}
        async with session.post(f"{a.inference_url}/v1/chat/completions", json=stream) as r:
            assert r.status == 200 and r.headers["Content-Type"].startswith("text/event-stream")
            raw = await r.read()
        events = [line[6:] for line in raw.decode().split("\n") if line.startswith("data: ")]
        assert events[-1] == "[DONE]"
        chunks = [orjson.loads(e) for e in events[:-1]]
        assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == len(content)
        streamed = [
            c["choices"][0]["logprobs"]["content"][0] for c in chunks if c["choices"] and c["choices"][0]["logprobs"]
        ]
        assert streamed == content
        status, tok = await call(session, "POST", f"{a.inference_url}/tokenize", {"model": MODEL, "prompt": "a b c"})
        assert status == 200 and tok["count"] == 3
    finally:
        await a.close()
        await b.close()


@pytest.mark.timeout(30)
async def test_v1_sender_retries_and_drops_unsent_batches_at_the_phase_switch(session: aiohttp.ClientSession) -> None:
    sink = CallbackSink(status=500)
    base = await sink.start()
    node = await start_mlnode(generation="v1", profile=TEST, preload_models=[])
    try:
        assert (
            await call(session, "POST", api(node, "/api/v1/pow/init/generate"), pow_init(f"{base}/v1/poc-batches"))
        )[0] == 200

        async def some_retries() -> bool:
            stats = (await call(session, "GET", api(node, "/_sim/stats")))[1]
            return stats["senders"]["v1_pending"] >= 2 and stats["senders"]["v1"]["failed_attempts"] >= 3

        await poll_until(some_retries, timeout=10, what="unsent batches being retried")
        assert all(path == "/v1/poc-batches/generated" for path, _ in sink.received)
        assert (
            await call(session, "POST", api(node, "/api/v1/pow/init/validate"), pow_init(f"{base}/v1/poc-batches"))
        )[0] == 200
        stats = (await call(session, "GET", api(node, "/_sim/stats")))[1]
        assert stats["senders"]["v1_pending"] == 0 and stats["senders"]["v1"]["dropped_at_phase_switch"] >= 2

        # A batch to validate comes back as a ValidatedBatch once the callback URL accepts.
        sink.status = 200
        batch = sink.received[0][1]
        assert (await call(session, "POST", api(node, "/api/v1/pow/validate"), batch)) == (200, None)

        async def validated() -> list[dict[str, Any]]:
            return [b for p, b in sink.received if p == "/v1/poc-batches/validated"]

        done = await poll_until(validated, timeout=10, what="a validated batch")
        assert done[0]["n_invalid"] == 0 and done[0]["fraud_detected"] is False
        assert done[0]["received_dist"] == batch["dist"]
    finally:
        await node.close()
        await sink.close()


@pytest.mark.timeout(30)
async def test_v2_pow_routes_and_sender_gives_up_after_ten_retries(session: aiohttp.ClientSession) -> None:
    fast = TEST.with_acceleration(600.0)
    sink = CallbackSink(status=400)
    base = await sink.start()
    node = await start_mlnode(generation="v2", profile=fast, model_download_seconds=0.05, vllm_load_seconds=0.05)
    try:
        init = {
            "block_hash": "ABC",
            "block_height": 7,
            "public_key": "pk",
            "node_id": 1,
            "node_count": 1,
            "batch_size": 4,
            "params": {"model": DEFAULT_POC_MODEL, "seq_len": 1024, "k_dim": 12},
            "url": f"{base}/v2/poc-batches",
        }
        status, body = await call(session, "POST", api(node, "/api/v1/inference/pow/init/generate"), init)
        assert status == 503 and body == {"detail": "No vLLM backends available"}
        assert await call(session, "GET", api(node, "/api/v1/inference/pow/status")) == (
            200,
            {"status": "NO_BACKENDS", "backends": []},
        )
        up = {"model": "Qwen/Qwen2.5-7B-Instruct", "dtype": "auto", "additional_args": []}
        assert (await call(session, "POST", api(node, "/api/v1/inference/up"), up))[0] == 200
        status, _ = await call(session, "POST", api(node, "/api/v1/inference/pow/init/generate"), init)
        assert status == 502  # serving another model: every backend refuses
        up["model"] = DEFAULT_POC_MODEL
        assert (await call(session, "POST", api(node, "/api/v1/inference/up"), up))[0] == 200  # 3.0.12 restarts vLLM
        status, body = await call(session, "POST", api(node, "/api/v1/inference/pow/init/generate"), init)
        assert status == 200 and body["status"] == "OK" and body["backends"] == 1
        state = (await call(session, "GET", api(node, "/api/v1/state")))[1]
        assert state["state"] == "INFERENCE" and state["poc_status"] == "GENERATING"
        assert state["loaded_model"] == DEFAULT_POC_MODEL and state["version"] == "3.0.12"

        async def dropped() -> bool:
            stats = (await call(session, "GET", api(node, "/_sim/stats")))[1]
            return stats["senders"]["v2"]["dropped"] >= 1

        await poll_until(dropped, timeout=20, what="the v2 sender to drop a payload")
        first = sink.received[0][1]
        attempts = sum(1 for _, b in sink.received if b == first)
        assert attempts == 11, "one try and ten retries, 400s included"
        assert set(first) >= {"block_hash", "block_height", "public_key", "node_id", "artifacts", "encoding"}
        assert first["encoding"] == {"dtype": "f16", "k_dim": 12, "endian": "le"}
        assert await call(session, "POST", api(node, "/api/v1/inference/pow/stop"), {}) == (
            200,
            {"status": "OK", "results": [{"port": node.inference_port, "status": "stopped"}], "errors": None},
        )
        await asyncio.sleep(0)
    finally:
        await node.close()
        await sink.close()
