"""Issue #9: ``python -m hybrid_proxy`` as the operator runs it — settings from the environment, JSON logs without
keys or prompts, the node registered and announced on the bus (``proxy.node_registered``), its view and heartbeat in
Redis, metrics and status on the metrics port, and a graceful stop on SIGTERM."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import time
from collections.abc import AsyncIterator
from typing import Any

import aio_pika
import aiohttp
import pytest
from redis.asyncio import Redis

from hybrid_common.messages import parse
from hybrid_common.messages.events import ProxyNodeRegistered
from hybrid_common.redis_keys import RedisKeys
from hybrid_common.topology import OWNER_QUEUES, SUBSCRIPTIONS, Topology
from sim.network import start_dapi
from sim.upstream import RunningUpstream, start_upstream
from tests.integration.test_proxy_kit import EPOCH_MODEL, eventually
from tests.support.net import free_port, wait_port_async
from tests.support.procs import ManagedProcess

PROMPT = "a prompt that must never appear in the logs"


@pytest.fixture
async def upstream() -> AsyncIterator[RunningUpstream]:
    up = await start_upstream()
    try:
        yield up
    finally:
        await up.close()


async def test_the_service_process(upstream: RunningUpstream, amqp_url: str, redis_url: str, namespace: str) -> None:
    dapi = await start_dapi(first_poc_start=10_000)
    connection = await asyncio.wait_for(aio_pika.connect(amqp_url), 30)
    redis = Redis.from_url(redis_url)
    node_port, metrics_port = free_port(), free_port()
    topology = Topology(namespace)
    proc: ManagedProcess | None = None
    try:
        channel = await connection.channel()
        await topology.declare_exchanges(channel)
        announced = await channel.declare_queue(exclusive=True, auto_delete=True)
        await announced.bind(topology.events, routing_key=ProxyNodeRegistered.TYPE)

        env = {
            "MODE": "sim",
            "HYBRID_NAMESPACE": namespace,
            "AMQP_URL": amqp_url,
            "REDIS_URL": redis_url,
            "UPSTREAM_URL": upstream.url,
            "GONKA_ADMIN_API_URL": dapi.admin_url,
            "NODE_FRONT_HOST": "127.0.0.1",
            "PROXY_LISTEN_HOST": "127.0.0.1",
            "PROXY_NODE_PORT": str(node_port),
            "PROXY_METRICS_PORT": str(metrics_port),
            "PROXY_MODELS": EPOCH_MODEL,
            "PROXY_ALLOWED_SOURCES": "127.0.0.1",
            "HYPERBOLIC_API_KEY": "sk-live-key-that-must-not-leak",
            "HYBRID_TIME_PROFILE": "test",
        }
        proc = ManagedProcess(["-m", "hybrid_proxy"], env=env, name="proxy", timeout=30).start()
        await wait_port_async(node_port, timeout=30)

        # Announced on the bus, with the registration the dapi got.
        message = await eventually(lambda: announced.get(fail=False), timeout=20, what="proxy.node_registered")
        event = parse(message.body)
        assert isinstance(event.payload, ProxyNodeRegistered)
        assert (event.payload.node_id, event.payload.poc_port, event.payload.inference_port) == (
            "hyperbolic-proxy-1",
            node_port,
            node_port,
        )
        assert dapi.report()["nodes"]["hyperbolic-proxy-1"]["node_num"] >= 1

        async with aiohttp.ClientSession() as http:
            body = {"model": EPOCH_MODEL, "messages": [{"role": "user", "content": PROMPT}], "max_tokens": 4}
            async with http.post(f"http://127.0.0.1:{node_port}/v3.0.8/v1/chat/completions", json=body) as r:
                assert r.status == 200
            async with http.get(f"http://127.0.0.1:{metrics_port}/metrics") as r:
                text = await r.text()
            assert 'hybrid_proxy_requests_total{route="chat",status="200"} 1.0' in text
            assert "hybrid_proxy_added_latency_seconds_bucket" in text
            assert 'hybrid_proxy_tokens_total{kind="completion"}' in text

            async def front_started() -> dict[str, Any] | None:
                async with http.get(f"http://127.0.0.1:{metrics_port}/status") as r:
                    status: dict[str, Any] = await r.json()
                return status if status["front"] != "not started" else None

            status = await eventually(front_started, timeout=20, what="the node front started by the service")
            assert status["node"]["node_id"] == "hyperbolic-proxy-1" and status["bus"] == "connected"
            assert isinstance(status["front"], dict), status["front"]  # NodeFront.status()

        keys = RedisKeys(namespace)

        async def viewed() -> bool:
            raw = await redis.get(keys.proxy_node())
            return raw is not None and json.loads(raw)["registration"] is not None

        await eventually(viewed, timeout=10, what="proxy:node in Redis")
        assert [k async for k in redis.scan_iter(keys.status("proxy", "*"))]

        proc.kill(signal.SIGTERM)
        assert proc.proc is not None
        started = time.monotonic()
        await asyncio.to_thread(proc.proc.wait, 20)
        assert proc.proc.returncode == 0, proc.output()
        assert time.monotonic() - started < 15
        output = proc.output()
        assert "sk-live-key-that-must-not-leak" not in output and "sim-upstream-key" not in output
        assert PROMPT not in output
        lines = [json.loads(line) for line in output.splitlines() if line.startswith("{")]
        assert any("registered node hyperbolic-proxy-1" in line["msg"] for line in lines)
        assert any(line["msg"] == "stopped" for line in lines)
    finally:
        if proc is not None:
            proc.stop()
        await redis.aclose()
        with contextlib.suppress(Exception):  # the shared broker keeps no quorum queues of this test
            cleanup = await connection.channel()
            for spec in (*OWNER_QUEUES, *SUBSCRIPTIONS):
                if spec.name.startswith("proxy."):
                    for name in (topology.name(spec.name), topology.name(spec.name) + ".dead"):
                        await asyncio.wait_for(cleanup.queue_delete(name), 10)
        await connection.close()
        await dapi.close()
