"""The simulated dapi admin API: validation rules and error bodies, node_num and admin-epoch semantics
(gonka-protocol.md §3, §10)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from hybrid_common import TEST
from sim.network import DEFAULT_EPOCH_MODEL, start_dapi
from tests.integration.sim_network_helpers import DapiHTTP


def node(node_id: str, port: int, host: str = "127.0.0.1", **extra: Any) -> dict[str, Any]:
    body = {
        "id": node_id,
        "host": host,
        "inference_port": port,
        "poc_port": port + 1,
        "max_concurrent": 500,
        "models": {DEFAULT_EPOCH_MODEL: {"args": ["--quantization", "fp8"]}},
        "hardware": [{"type": "H100", "count": 1}],
    }
    body.update(extra)
    return body


@pytest.fixture
async def api() -> AsyncIterator[DapiHTTP]:
    # Nothing listens on the registered ports: the driver marks those nodes FAILED, which is fine here.
    running = await start_dapi(profile=TEST, first_poc_start=100_000, inference_interval_seconds=0)
    try:
        async with aiohttp.ClientSession() as s:
            yield DapiHTTP(s, running.public_url, running.admin_url, running.callback_url)
    finally:
        await running.close()


async def call(api: DapiHTTP, method: str, path: str, body: Any = None, raw: bytes | None = None) -> tuple[int, Any]:
    url = f"{api.admin}{path}"
    if raw is not None:
        async with api.s.request(method, url, data=raw, headers={"Content-Type": "application/json"}) as r:
            return r.status, await r.json(content_type=None)
    async with api.s.request(method, url, json=body) as r:
        return r.status, await r.json(content_type=None)


@pytest.mark.timeout(30)
async def test_create_validation_rules_and_error_bodies(api: DapiHTTP) -> None:
    status, body = await call(api, "POST", "/admin/v1/nodes", {})
    assert status == 400
    assert body == {
        "error": "failed to create node: validation failed: node id is required and cannot be empty; "
        "host is required and cannot be empty; inference_port must be between 1 and 65535, got 0; "
        "poc_port must be between 1 and 65535, got 0; max_concurrent must be greater than 0, got 0; "
        "at least one model must be specified"
    }
    status, body = await call(api, "POST", "/admin/v1/nodes", node("x", 70000))
    assert status == 400 and "inference_port must be between 1 and 65535, got 70000" in body["error"]
    status, body = await call(api, "POST", "/admin/v1/nodes", node("x", 5000, models={"not/governance": {}}))
    assert (status, body) == (
        400,
        {"error": "failed to create node: one or more models are not valid governance models. Check logs for details."},
    )
    status, body = await call(api, "POST", "/admin/v1/nodes", raw=b"{not json")
    assert status == 400 and body["error"].startswith("invalid request body: code=400, message=Syntax error")
    status, body = await call(api, "POST", "/admin/v1/nodes", node("x", 5000, inference_port="5000"))
    assert status == 400 and "Unmarshal type error" in body["error"] and "inference_port" in body["error"]

    status, created = await call(api, "POST", "/admin/v1/nodes", node("a", 5000))
    assert status == 200 and created["id"] == "a" and "node_num" not in created  # the config is echoed
    status, body = await call(api, "POST", "/admin/v1/nodes", node("b", 5000))
    assert status == 400
    assert body["error"] == (
        "failed to create node: validation failed: duplicate inference host+port combination: "
        "127.0.0.1:5000 (already used by node 'a'); duplicate PoC host+port combination: "
        "127.0.0.1:5001 (already used by node 'a')"
    )
    status, body = await call(api, "GET", "/admin/v1/nope")
    assert (status, body) == (404, {"error": "Not Found"})


@pytest.mark.timeout(30)
async def test_node_num_upsert_delete_and_put(api: DapiHTTP) -> None:
    await api.register(node("a", 5000))
    await api.register(node("b", 6000))
    nums = {k: v["node"]["node_num"] for k, v in (await api.nodes()).items()}
    assert nums == {"a": 1, "b": 2}

    # Upsert with a new host keeps node_num; PUT ignores the id in the path (the body's id wins).
    await api.register(node("a", 5000, host="10.0.0.9"))
    status, _ = await call(api, "PUT", "/admin/v1/nodes/zzz", node("b", 6100))
    assert status == 200
    nodes = await api.nodes()
    assert set(nodes) == {"a", "b"}
    assert nodes["a"]["node"]["node_num"] == 1 and nodes["a"]["node"]["host"] == "10.0.0.9"
    assert nodes["b"]["node"]["node_num"] == 2 and nodes["b"]["node"]["inference_port"] == 6100
    # A failed update of an existing id is a 500, not a 400.
    status, body = await call(api, "POST", "/admin/v1/nodes", node("a", 0))
    assert status == 500 and body["error"].startswith("failed to update node: validation failed: inference_port")

    # Delete + add changes node_num.
    assert await api.delete("a") is True
    assert await api.delete("a") is False
    await api.register(node("a", 5000))
    assert (await api.nodes())["a"]["node"]["node_num"] == 3

    state = (await api.nodes())["a"]["state"]
    for key in ("intended_status", "current_status", "poc_intended_status", "poc_current_status", "failure_reason"):
        assert key in state
    assert state["admin_state"] == {"enabled": True, "epoch": 0}


@pytest.mark.timeout(30)
async def test_batch_enable_disable_and_config(api: DapiHTTP) -> None:
    status, body = await call(api, "POST", "/admin/v1/nodes/batch", [node("a", 5000), node("b", 6000)])
    assert status == 201 and [n["id"] for n in body] == ["a", "b"]
    status, body = await call(api, "POST", "/admin/v1/nodes/batch", [node("c", 7000), node("d", 5000)])
    assert status == 206 and [n["id"] for n in body["nodes"]] == ["c"]
    assert body["errors"][0].startswith("node[1] (id: d): code=400, message=failed to create node: validation failed")
    status, body = await call(api, "POST", "/admin/v1/nodes/batch", [node("e", 5000)])
    assert status == 400 and body["error"]["error"] == "all nodes failed validation"
    assert len(body["error"]["errors"]) == 1

    status, body = await call(api, "POST", "/admin/v1/nodes/ghost/disable")
    assert (status, body) == (404, {"error": "node not found: ghost"})
    status, body = await call(api, "POST", "/admin/v1/nodes/a/disable")
    assert (status, body) == (200, {"message": "node disabled successfully", "node_id": "a"})
    assert (await api.nodes())["a"]["state"]["admin_state"]["enabled"] is False
    status, body = await call(api, "POST", "/admin/v1/nodes/a/enable")
    assert (status, body) == (200, {"message": "node enabled successfully", "node_id": "a"})

    status, config = await call(api, "GET", "/admin/v1/config")
    assert status == 200 and config["api"]["poc_callback_url"] == api.callback
    assert [n["id"] for n in config["nodes"]] == ["a", "b", "c"]
    await api.set_params(callback_base="http://127.0.0.1:9399")
    _, config = await call(api, "GET", "/admin/v1/config")
    assert config["api"]["poc_callback_url"] == "http://127.0.0.1:9399"
