"""Shared helpers of the proxy node's tests (issue #9): no tests here, only builders used by ``test_proxy_*.py``."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

from redis.asyncio import Redis

from hybrid_proxy.node import InferenceNode
from hybrid_proxy.settings import ProxySettings

EPOCH_MODEL = "Qwen/Qwen2.5-7B-Instruct"
BIG_MODEL = "Qwen/Qwen3-235B-A22B-Instruct-2507-FP8"
PREFIX = "/v3.0.8"


def proxy_settings(upstream_url: str, **overrides: Any) -> ProxySettings:
    """Settings for an in-process node on a free loopback port, registration and metrics off unless asked."""
    values: dict[str, Any] = {
        "mode": "sim",
        "upstream_url": upstream_url,
        "listen_host": "127.0.0.1",
        "node_port": 0,
        "self_register": False,
        "metrics_port": 0,
        "restore_state": False,
        "upstream_retry_backoff": 0.02,
        "health_cache_seconds": 0.2,
        "log_json": False,
    }
    values.update(overrides)
    return ProxySettings(**values)


@asynccontextmanager
async def running_node(
    upstream_url: str, *, redis: Redis | None = None, publish: Any = None, **overrides: Any
) -> AsyncIterator[InferenceNode]:
    node = InferenceNode(proxy_settings(upstream_url, **overrides), redis=redis, publish=publish)
    await node.start()
    try:
        yield node
    finally:
        await node.stop()


def base(node: InferenceNode) -> str:
    return f"http://127.0.0.1:{node.port}"


async def eventually(
    check: Callable[[], Awaitable[Any]], *, timeout: float = 20.0, interval: float = 0.05, what: str = "condition"
) -> Any:
    """Poll ``check`` until it returns something truthy; fail with ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = await check()
        if last:
            return last
        await asyncio.sleep(interval)
    raise AssertionError(f"{what} not reached within {timeout}s (last: {last!r})")
