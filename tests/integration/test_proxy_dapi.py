"""Issue #9 acceptance against the network simulator (the dapi): the proxy registers itself, is driven
``stop`` → ``inference/up`` → INFERENCE, passes the state, health and ``/v1/models`` checks, serves the dapi's
inference (with its body rewrites), and stays non-FAILED across a full PoC, v1 and v2. A negative control — a proxy
configured with the wrong model id — is marked FAILED, so the checks above are not vacuous. A restarted dapi gets
the node back; an unreachable one is said so in the log.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from redis.asyncio import Redis

from hybrid_common import TEST
from hybrid_common.messages import Event
from hybrid_common.messages.events import ProxyNodeRegistered
from hybrid_common.redis_keys import RedisKeys
from sim.network import RunningDapi, start_dapi
from sim.upstream import RunningUpstream, start_upstream
from tests.integration.test_proxy_kit import BIG_MODEL, EPOCH_MODEL, eventually, running_node
from tests.support.net import free_port

NODE_ID = "hyperbolic-proxy-1"
# The test profile with 0.1 s blocks: a PoC (stage 20 + exchange 4 + delay 4 + validation 20 blocks) takes ~5 s,
# while the dapi still polls its nodes every scaled minute (1 s).
PROFILE = TEST.model_copy(update={"block_seconds": 0.1})
FIRST_POC = 30


@pytest.fixture
async def upstream() -> AsyncIterator[RunningUpstream]:
    up = await start_upstream(profile=PROFILE, seed=5)
    try:
        yield up
    finally:
        await up.close()


def node_report(dapi: RunningDapi, node_id: str = NODE_ID) -> dict[str, Any] | None:
    node: dict[str, Any] | None = dapi.report()["nodes"].get(node_id)
    return node


def history(dapi: RunningDapi, node_id: str = NODE_ID) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for epoch in dapi.report()["epochs"]:
        rec = epoch["nodes"].get(node_id)
        if rec is not None:
            out += rec["status_history"]
    return out


async def sim_inference(dapi: RunningDapi, **body: Any) -> dict[str, Any]:
    async with aiohttp.ClientSession() as http, http.post(dapi.public_url + "/_sim/inference", json=body) as r:
        assert r.status == 200
        result: dict[str, Any] = await r.json()
        return result


@pytest.mark.parametrize("generation", ["v1", "v2"])
async def test_registered_driven_to_inference_and_never_failed_across_a_poc(
    upstream: RunningUpstream, generation: str
) -> None:
    dapi = await start_dapi(profile=PROFILE, first_poc_start=FIRST_POC, poc_v2_enabled=generation == "v2")
    try:
        async with running_node(
            upstream.url,
            self_register=True,
            dapi_admin_url=dapi.admin_url,
            public_host="127.0.0.1",
            models=[EPOCH_MODEL],
            registration_check_seconds=0.5,
        ) as node:
            # Registered with the seeds' defaults.
            async def registered() -> bool:
                return node_report(dapi) is not None

            await eventually(registered, timeout=15, what="the proxy registering itself")
            async with aiohttp.ClientSession() as http, http.get(dapi.admin_url + "/admin/v1/nodes") as r:
                listed = await r.json()
            mine = next(n["node"] for n in listed if n["node"]["id"] == NODE_ID)
            assert mine["hardware"] == [{"type": "Hyperbolic-API", "count": 1}]
            assert (mine["host"], mine["poc_port"], mine["inference_port"]) == ("127.0.0.1", node.port, node.port)
            assert list(mine["models"]) == [EPOCH_MODEL]

            async def serving() -> bool:
                n = node_report(dapi)
                return n is not None and n["current_status"] == "INFERENCE"

            await eventually(serving, timeout=20, what="the dapi seeing the proxy in INFERENCE")
            assert node.record.state == "INFERENCE" and node.record.loaded_model == EPOCH_MODEL

            # The dapi's inference, with its rewrites, JSON and SSE.
            for stream in (False, True):
                result = await sim_inference(dapi, node_id=NODE_ID, stream=stream)
                assert result["ok"], result
                assert result["completion_tokens"] > 0
            sent = json.loads(upstream.state.stats.received[-1].body)
            assert sent["top_logprobs"] == 5 and sent["skip_special_tokens"] is False and isinstance(sent["seed"], int)
            assert sent["stream_options"] == {"include_usage": True}

            # A whole PoC: its weights get fixed, then the node is back in INFERENCE.
            async def poc_over() -> bool:
                epochs = dapi.report()["epochs"]
                return len(epochs) > 1 and epochs[1]["weights_fixed_at"] is not None and await serving()

            await eventually(poc_over, timeout=40, interval=0.2, what="a full PoC and the return to INFERENCE")
            report = dapi.report()
            statuses = [h["status"] for h in history(dapi)]
            assert "FAILED" not in statuses, history(dapi)
            assert "POC" in statuses  # the dapi did drive the node through the PoC
            assert report["epochs"][1]["nodes"][NODE_ID]["poc_commanded"] is True
            inference = [e["inference"] for e in report["epochs"]]
            assert sum(i["ok"] for i in inference) >= 2 and sum(i["failed"] for i in inference) == 0
            # Still registered, same node_num (never deleted across the PoC).
            assert node_report(dapi)["node_num"] == 1  # type: ignore[index]
    finally:
        await dapi.close()


async def test_negative_control_a_proxy_with_the_wrong_model_is_marked_failed(upstream: RunningUpstream) -> None:
    """The dapi expects the epoch model on this node; the proxy is configured for another one."""
    dapi = await start_dapi(profile=PROFILE, first_poc_start=10_000)
    try:
        async with running_node(upstream.url, models=[BIG_MODEL]) as node:
            registration = {
                "id": NODE_ID,
                "host": "127.0.0.1",
                "inference_port": node.port,
                "poc_port": node.port,
                "max_concurrent": 100,
                "models": {EPOCH_MODEL: {"args": []}},
                "hardware": [{"type": "Hyperbolic-API", "count": 1}],
            }
            async with (
                aiohttp.ClientSession() as http,
                http.post(dapi.admin_url + "/admin/v1/nodes", json=registration) as r,
            ):
                assert r.status == 200

            async def failed() -> dict[str, Any] | None:
                n = node_report(dapi)
                return n if n is not None and n["current_status"] == "FAILED" else None

            n = await eventually(failed, timeout=20, what="the dapi marking the misconfigured proxy FAILED")
            assert "model mismatch" in n["failure_reason"]
    finally:
        await dapi.close()


async def test_reregisters_after_a_dapi_restart_and_logs_while_unreachable(
    upstream: RunningUpstream, redis_url: str, namespace: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="hybrid.proxy")
    admin_port = free_port()
    events: list[Event] = []

    async def publish(event: Event) -> None:
        events.append(event)

    redis = Redis.from_url(redis_url)
    key = RedisKeys(namespace).proxy_node()
    try:
        async with running_node(
            upstream.url,
            redis=redis,
            namespace=namespace,
            publish=publish,
            self_register=True,
            dapi_admin_url=f"http://127.0.0.1:{admin_port}",
            public_host="127.0.0.1",
            registration_check_seconds=0.3,
        ) as node:
            assert node.registration is not None

            async def said_unreachable() -> bool:
                return "unreachable" in caplog.text and f"127.0.0.1:{admin_port}" in caplog.text

            await eventually(said_unreachable, timeout=10, what="a log line saying the dapi is unreachable")
            assert not node.registration.registered.is_set()
            stored = json.loads(await redis.get(key) or b"{}")
            assert "unreachable" in (stored.get("last_error") or "")

            for round_ in (1, 2):
                dapi = await start_dapi(profile=PROFILE, admin_port=admin_port, first_poc_start=10_000)
                try:

                    async def registered(d: RunningDapi = dapi) -> bool:
                        return node_report(d) is not None

                    await eventually(registered, timeout=15, what=f"registration in dapi #{round_}")

                    async def announced(n: int = round_) -> bool:
                        return len([e for e in events if isinstance(e, ProxyNodeRegistered)]) == n

                    await eventually(announced, timeout=5, what=f"proxy.node_registered #{round_}")
                finally:
                    await dapi.close()  # a dapi restart: the next one starts with an empty node list

            assert "no longer lists node hyperbolic-proxy-1" in caplog.text
            event = events[-1]
            assert isinstance(event, ProxyNodeRegistered)
            assert (event.node_id, event.host, event.poc_port, event.models) == (
                NODE_ID,
                "127.0.0.1",
                node.port,
                [EPOCH_MODEL],
            )
            stored = json.loads(await redis.get(key) or b"{}")
            assert stored["registration"]["id"] == NODE_ID and stored["registration"]["poc_port"] == node.port
    finally:
        await redis.aclose()
