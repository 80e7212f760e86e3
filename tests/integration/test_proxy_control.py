"""Issue #9: the MLNode control surface of the inference-only node, its health check, validation routing and
inbound protection (gonka-protocol.md §1, §4, §9, §10)."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import orjson
import pytest
from redis.asyncio import Redis

from hybrid_common import TEST
from hybrid_common.redis_keys import RedisKeys
from sim.mlnode import start_mlnode
from sim.upstream import RunningUpstream, start_upstream
from tests.integration.test_proxy_kit import BIG_MODEL, EPOCH_MODEL, PREFIX, base, eventually, running_node
from tests.support.net import free_port

VALIDATION_BODY: dict[str, Any] = {
    "model": EPOCH_MODEL,
    "messages": [{"role": "user", "content": "Name three rivers and one mountain."}],
    "max_tokens": 4,
    "seed": 11,
    "logprobs": True,
    "top_logprobs": 5,
    "stream": False,
    "enforced_tokens": {"tokens": [{"token": t, "top_tokens": [t]} for t in ("Rivers", " flow", " down", " hills")]},
}


@pytest.fixture
async def upstream() -> AsyncIterator[RunningUpstream]:
    up = await start_upstream(profile=TEST, seed=1)
    try:
        yield up
    finally:
        await up.close()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


@pytest.fixture
async def redis(redis_url: str) -> AsyncIterator[Redis]:
    client = Redis.from_url(redis_url)
    try:
        yield client
    finally:
        await client.aclose()


async def call(http: aiohttp.ClientSession, method: str, url: str, body: Any = None) -> tuple[int, Any]:
    data = orjson.dumps(body) if body is not None else None
    async with http.request(method, url, data=data, headers={"Content-Type": "application/json"}) as r:
        raw = await r.read()
        return r.status, (orjson.loads(raw) if raw else None)


async def test_control_surface_bare_and_version_prefixed(
    upstream: RunningUpstream, http: aiohttp.ClientSession
) -> None:
    async with running_node(upstream.url, models=[EPOCH_MODEL]) as node:
        for prefix in ("", PREFIX, "/v3.0.12-post1"):
            url = base(node) + prefix
            assert await call(http, "GET", url + "/api/v1/state") == (
                200,
                {
                    "state": "STOPPED",
                    "version": "3.0.12",
                    "poc_status": None,
                    "inference_healthy": None,
                    "loaded_model": None,
                    "poc_validation_inference": False,
                },
            )
            assert await call(http, "GET", url + "/api/v1/gpu/devices") == (200, {"devices": [], "count": 0})
            status, up = await call(
                http, "POST", url + "/api/v1/inference/up", {"model": EPOCH_MODEL, "dtype": "float16"}
            )
            assert (status, up) == (200, {"status": "OK"})
            status, state = await call(http, "GET", url + "/api/v1/state")
            assert status == 200
            assert state["state"] == "INFERENCE" and state["loaded_model"] == EPOCH_MODEL
            assert state["poc_status"] == "IDLE" and state["inference_healthy"] in (True, None)
            status, health = await call(http, "GET", url + "/health")
            assert status == 200 and health["status"] == "healthy" and health["gpu"]["count"] == 0
            status, models = await call(http, "GET", url + "/v1/models")
            assert status == 200 and [m["id"] for m in models["data"]] == [EPOCH_MODEL]
            assert await call(http, "POST", url + "/api/v1/stop") == (200, {"status": "OK"})
            assert (await call(http, "GET", url + "/api/v1/state"))[1]["state"] == "STOPPED"
            await call(http, "POST", url + "/api/v1/inference/up", {"model": EPOCH_MODEL})
            assert await call(http, "POST", url + "/api/v1/inference/down") == (200, {"status": "OK"})
            assert (await call(http, "GET", url + "/api/v1/state"))[1]["state"] == "STOPPED"

        # A model the upstream does not serve: a clear error, and the node stays as it was.
        status, refused = await call(http, "POST", base(node) + "/api/v1/inference/up", {"model": "acme/not-served"})
        assert status == 400 and "not served by the upstream" in refused["detail"]
        assert (await call(http, "GET", base(node) + "/api/v1/state"))[1]["state"] == "STOPPED"
        # Malformed bodies get FastAPI's 422, like the image.
        assert (await call(http, "POST", base(node) + "/api/v1/inference/up", {"dtype": "auto"}))[0] == 422
        # A model the upstream serves but the operator did not configure: accepted; /v1/models stays as configured.
        assert (await call(http, "POST", base(node) + "/api/v1/inference/up", {"model": BIG_MODEL}))[0] == 200
        assert [m["id"] for m in (await call(http, "GET", base(node) + "/v1/models"))[1]["data"]] == [EPOCH_MODEL]
        # Unknown paths and methods.
        assert await call(http, "GET", base(node) + "/api/v1/nope") == (404, {"detail": "Not Found"})
        assert (await call(http, "GET", base(node) + PREFIX + "/api/v1/stop"))[0] == 405
        assert (await call(http, "GET", base(node) + "/v1/chat/completions"))[0] == 405


async def test_poc_routes_answer_below_400_and_produce_nothing(
    upstream: RunningUpstream, http: aiohttp.ClientSession
) -> None:
    init_v1 = {
        "node_id": 1,
        "node_count": 2,
        "block_hash": "ab" * 32,
        "block_height": 100,
        "public_key": "pk",
        "batch_size": 100,
        "r_target": 1.398,
        "fraud_threshold": 1e-7,
        "params": {"dim": 512},
        "url": "http://127.0.0.1:1/v1/poc-batches",
    }
    init_v2 = {**init_v1, "params": {"model": BIG_MODEL, "seq_len": 1024, "k_dim": 12}, "poc_stronger_rng": True}
    async with running_node(upstream.url) as node:
        for prefix in ("", PREFIX):
            url = base(node) + prefix
            await call(http, "POST", url + "/api/v1/inference/up", {"model": EPOCH_MODEL})
            # v2: PoC inside vLLM — init answered, nothing generated, the node keeps serving (state INFERENCE).
            status, body = await call(http, "POST", url + "/api/v1/inference/pow/init/generate", init_v2)
            assert status == 200 and body["status"] == "OK" and body["backends"] == 0
            assert await call(http, "GET", url + "/api/v1/inference/pow/status") == (
                200,
                {"status": "IDLE", "backends": []},
            )
            status, queued = await call(
                http, "POST", url + "/api/v1/inference/pow/generate", {**init_v2, "nonces": [1, 2], "wait": False}
            )
            assert status == 200 and queued["queued_count"] == 0
            assert (await call(http, "POST", url + "/api/v1/inference/pow/stop", {}))[0] == 200
            assert (await call(http, "GET", url + "/api/v1/state"))[1]["state"] == "INFERENCE"
            # v1: stop → init/generate → the commanded mode is POW, the PoC status honestly IDLE.
            await call(http, "POST", url + "/api/v1/stop")
            for path in ("/api/v1/pow/init/generate", "/api/v1/pow/init/validate"):
                status, body = await call(http, "POST", url + path, init_v1)
                assert status == 200 and body["pow_status"]["status"] == "IDLE"
            for path in ("/api/v1/pow/phase/generate", "/api/v1/pow/phase/validate"):
                assert (await call(http, "POST", url + path))[0] == 200
            batch = {"public_key": "x", "block_hash": "y", "block_height": 1, "nonces": [1], "dist": [0.5]}
            assert await call(http, "POST", url + "/api/v1/pow/validate", batch) == (200, None)
            assert await call(http, "GET", url + "/api/v1/pow/status") == (
                200,
                {"status": "IDLE", "is_model_initialized": False},
            )
            assert (await call(http, "GET", url + "/api/v1/state"))[1]["state"] == "POW"
            # Even a body the image would refuse is answered below 400 (a v2 init ≥ 400 marks the node FAILED).
            async with http.post(url + "/api/v1/inference/pow/init/generate", data=b"{not json") as r:
                assert r.status == 200
            assert (await call(http, "POST", url + "/api/v1/pow/stop"))[0] == 200
            assert (await call(http, "GET", url + "/api/v1/state"))[1]["state"] == "STOPPED"


async def test_health_is_a_real_cached_check_of_the_upstream(http: aiohttp.ClientSession) -> None:
    port = free_port()
    up = await start_upstream(profile=TEST, port=port)
    async with running_node(up.url, health_cache_seconds=0.3) as node:
        # A burst of polls costs one upstream probe (single flight, then cached).
        results = await asyncio.gather(*(call(http, "GET", base(node) + "/health") for _ in range(20)))
        assert all(status == 200 for status, _ in results)
        assert up.state.stats.by_path["/v1/models"] == 1

        await up.close()

        async def unhealthy() -> bool:
            status, body = await call(http, "GET", base(node) + PREFIX + "/health")
            return status == 503 and body["status"] == "unhealthy"

        await eventually(unhealthy, timeout=10, what="/health 503 with the upstream down")
        status, body = await call(http, "GET", base(node) + "/health")
        assert "unreachable" in body["upstream"]["reason"]

        up = await start_upstream(profile=TEST, port=port)

        async def healthy() -> bool:
            return (await call(http, "GET", base(node) + "/health"))[0] == 200

        await eventually(healthy, timeout=10, what="/health 200 with the upstream back")
        # A wrong key is not health: every inference would fail.
        node.upstream.headers["Authorization"] = "Bearer wrong-key"
        await asyncio.sleep(0.35)
        status, body = await call(http, "GET", base(node) + "/health")
        assert status == 503 and "401" in body["upstream"]["reason"]
    await up.close()


async def test_validation_requests_never_reach_the_upstream(
    upstream: RunningUpstream, http: aiohttp.ClientSession, redis: Redis, namespace: str
) -> None:
    keys = RedisKeys(namespace)
    mlnode = await start_mlnode(generation="v1", profile=TEST.with_acceleration(600), preload_models=[EPOCH_MODEL])
    try:
        async with running_node(upstream.url, redis=redis, namespace=namespace) as node:
            url = base(node) + PREFIX + "/v1/chat/completions"
            status, body = await call(http, "POST", url, VALIDATION_BODY)
            assert status == 503 and body["error"]["code"] == "no_validating_node"
            assert "no rented GPU slot is up" in body["error"]["message"]

            # A slot that is not up is no help either.
            mlnode_port = mlnode.inference_port
            route = {
                "slot_id": "gpu-1",
                "state": "connecting",
                "host": "127.0.0.1",
                "gateway_poc_port": mlnode.api_port,
                "gateway_inference_port": mlnode_port,
            }
            await redis.hset(keys.front_routes(), "gpu-1", json.dumps(route))
            assert (await call(http, "POST", url, VALIDATION_BODY))[0] == 503

            # Once the front reports the slot up (here pointed at an MLNode simulator), validations reach it.
            async with http.post(mlnode.api_url + "/api/v1/inference/up", json={"model": EPOCH_MODEL}) as r:
                assert r.status == 200
            await redis.hset(keys.front_routes(), "gpu-1", json.dumps({**route, "state": "up"}))
            status, answer = await call(http, "POST", url, VALIDATION_BODY)
            assert status == 200, answer
            tokens = [e["token"] for e in answer["choices"][0]["logprobs"]["content"]]
            assert tokens == [t["token"] for t in VALIDATION_BODY["enforced_tokens"]["tokens"]]
            served = mlnode.node.openai.requests_served
            assert served == 1

            # Ordinary inference still goes to the upstream; no enforced_tokens request ever did.
            plain = {k: v for k, v in VALIDATION_BODY.items() if k != "enforced_tokens"}
            assert (await call(http, "POST", url, plain))[0] == 200
            assert all(b"enforced_tokens" not in r.body for r in upstream.state.stats.received)
            assert mlnode.node.openai.requests_served == served
    finally:
        await mlnode.close()


async def test_inbound_allowlist_and_size_limit(
    upstream: RunningUpstream, http: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="hybrid.proxy")
    async with running_node(upstream.url, allowed_sources=["10.9.8.7", "192.168.0.0/16"]) as node:
        for path in ("/api/v1/state", PREFIX + "/health", "/v1/models"):
            status, body = await call(http, "GET", base(node) + path)
            assert status == 403 and body["error"]["code"] == "source_not_allowed"
        assert "refused GET /api/v1/state from 127.0.0.1" in caplog.text
    async with running_node(upstream.url, allowed_sources="10.9.8.7, 127.0.0.0/8") as node:
        assert (await call(http, "GET", base(node) + "/api/v1/state"))[0] == 200

    async with running_node(upstream.url, max_request_bytes=4096) as node:
        big = {"model": EPOCH_MODEL, "messages": [{"role": "user", "content": "x" * 8000}]}
        status, body = await call(http, "POST", base(node) + "/v1/chat/completions", big)
        assert status == 413 and body["error"]["code"] == "request_too_large"
        assert upstream.state.stats.requests == 0
        assert (await call(http, "POST", base(node) + "/api/v1/inference/up", {"model": "x" * 8000}))[0] == 413
    assert "PROXY_ALLOWED_SOURCES is empty" in caplog.text


async def test_tokenize_openapi_and_state_restore(
    upstream: RunningUpstream, http: aiohttp.ClientSession, redis: Redis, namespace: str
) -> None:
    async with running_node(upstream.url, redis=redis, namespace=namespace) as node:
        for prefix in ("", PREFIX):
            status, body = await call(
                http,
                "POST",
                base(node) + prefix + "/tokenize",
                {"model": EPOCH_MODEL, "prompt": "How many tokens is this?"},
            )
            assert status == 200 and 4 <= body["count"] <= 10
        messages = [{"role": "user", "content": "Hello there"}]
        assert (await call(http, "POST", base(node) + "/tokenize", {"model": EPOCH_MODEL, "prompt": messages}))[1][
            "count"
        ] > 2
        assert (await call(http, "POST", base(node) + "/tokenize", {"model": EPOCH_MODEL}))[0] == 400
        status, doc = await call(http, "GET", base(node) + "/openapi.json")
        assert status == 200 and "/v1/chat/completions" in doc["paths"] and "/api/v1/state" in doc["paths"]
        await call(http, "POST", base(node) + "/api/v1/inference/up", {"model": EPOCH_MODEL})
        stored = orjson.loads(await redis.get(RedisKeys(namespace).proxy_node()) or b"{}")
        assert stored["state"] == "INFERENCE" and stored["loaded_model"] == EPOCH_MODEL
    # A restarted proxy comes back serving the model the dapi brought up.
    async with running_node(upstream.url, redis=redis, namespace=namespace, restore_state=True) as node:
        status, state = await call(http, "GET", base(node) + "/api/v1/state")
        assert state["state"] == "INFERENCE" and state["loaded_model"] == EPOCH_MODEL
