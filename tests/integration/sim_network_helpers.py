"""Test-only helpers for the network/MLNode simulator tests (issue #4).

``PrefixStripFront`` is the *minimal* stand-in for a node front: it strips the dapi's ``/{version}``
prefix and forwards to an MLNode simulator (gonka-protocol.md §1: "whatever answers for a node must
accept both prefixed and bare paths"). It is not production code; the real node front is the proxy
service's job.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
from aiohttp import web

from hybrid_common import TEST, EpochShape
from tests.support.net import free_port

# A short epoch on a fast, jump-driven clock for the weight-reading tests: the participants list exists from the
# epoch's set_new_validators block (P + stage + validation delay + validation + delay, gonka-protocol.md §5).
SHORT_PROFILE = TEST.model_copy(update={"block_seconds": 0.1})
SHORT_SHAPE = EpochShape(
    epoch_length=100,
    poc_stage_duration=10,
    poc_exchange_duration=2,
    poc_validation_delay=2,
    poc_validation_duration=10,
    set_new_validators_delay=6,
    inference_validation_cutoff=4,
)
SHORT_P = 40
SHORT_VAL_END = SHORT_P + 10 + 2 + 10
SHORT_SET_NEW_VALIDATORS = SHORT_VAL_END + 6


def silent_gpu(node_id: str, model: str) -> dict[str, Any]:
    """A registration for a GPU at addresses where nothing answers: the batches a test posts for it are its work."""
    return {
        "id": node_id,
        "host": "127.0.0.1",
        "inference_port": free_port(),
        "poc_port": free_port(),
        "max_concurrent": 10,
        "models": {model: {"args": []}},
        "hardware": [{"type": "H100", "count": 1}],
    }


_VERSION_PREFIX = re.compile(r"^/v\d+\.\d+\.\d+[^/]*(?=/)")
_HOP = {"connection", "keep-alive", "transfer-encoding", "content-length", "host", "te", "trailer", "upgrade"}


class PrefixStripFront:
    def __init__(self, target_port: int, target_host: str = "127.0.0.1") -> None:
        self.target_host = target_host
        self.target_port = target_port
        self.requests: list[str] = []
        self._runner: web.AppRunner | None = None
        self._session: aiohttp.ClientSession | None = None
        self.port = 0

    def retarget(self, port: int) -> None:
        self.target_port = port

    async def start(self) -> int:
        app = web.Application(client_max_size=256 * 1024**2)
        app.router.add_route("*", "/{tail:.*}", self._forward)
        self._session = aiohttp.ClientSession()
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = int(self._runner.addresses[0][1])
        return self.port

    async def _forward(self, request: web.Request) -> web.StreamResponse:
        assert self._session is not None
        path = _VERSION_PREFIX.sub("", request.raw_path, count=1)
        self.requests.append(f"{request.method} {path}")
        url = f"http://{self.target_host}:{self.target_port}{path}"
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _HOP}
        try:
            async with self._session.request(
                request.method,
                aiohttp.client.URL(url, encoded=True),
                data=await request.read(),
                headers=headers,
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=5),
            ) as upstream:
                resp = web.StreamResponse(status=upstream.status)
                for k, v in upstream.headers.items():
                    if k.lower() not in _HOP and k.lower() != "content-encoding":
                        resp.headers[k] = v
                await resp.prepare(request)
                async for chunk in upstream.content.iter_any():
                    await resp.write(chunk)
                await resp.write_eof()
                return resp
        except (aiohttp.ClientError, OSError) as exc:
            return web.json_response({"error": f"front: upstream unreachable: {exc}"}, status=502)

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
        if self._session is not None:
            await self._session.close()


async def poll_until(
    check: Callable[[], Awaitable[Any]], *, timeout: float, interval: float = 0.1, what: str = "condition"
) -> Any:
    """Await ``check()`` until it returns something truthy; fail with ``what`` after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = await check()
        if last:
            return last
        await asyncio.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}; last value: {last!r}")


class FrontedMLNode:
    """An MLNode simulator behind two prefix-stripping fronts (its API and its inference port)."""

    def __init__(self, mlnode: Any, api_front: PrefixStripFront, inference_front: PrefixStripFront) -> None:
        self.mlnode = mlnode
        self.api_front = api_front
        self.inference_front = inference_front

    @classmethod
    async def start(cls, **mlnode_kwargs: Any) -> FrontedMLNode:
        from sim.mlnode import start_mlnode

        mlnode = await start_mlnode(**mlnode_kwargs)
        api = PrefixStripFront(mlnode.api_port)
        inference = PrefixStripFront(mlnode.inference_port)
        await api.start()
        await inference.start()
        return cls(mlnode, api, inference)

    def registration(self, node_id: str, model: str, host: str = "127.0.0.1") -> dict[str, Any]:
        return {
            "id": node_id,
            "host": host,
            "inference_port": self.inference_front.port,
            "inference_segment": "",
            "poc_port": self.api_front.port,
            "poc_segment": "",
            "max_concurrent": 100,
            "models": {model: {"args": []}},
            "hardware": [{"type": "H100", "count": 1}],
        }

    async def stats(self, session: aiohttp.ClientSession) -> dict[str, Any]:
        async with session.get(f"http://127.0.0.1:{self.mlnode.api_port}/_sim/stats") as r:
            data: dict[str, Any] = await r.json()
            return data

    async def close(self) -> None:
        await self.api_front.close()
        await self.inference_front.close()
        await self.mlnode.close()


class DapiHTTP:
    """The few calls tests make to a simulated dapi, over HTTP like any other client."""

    def __init__(self, session: aiohttp.ClientSession, public_url: str, admin_url: str, callback_url: str) -> None:
        self.s = session
        self.public = public_url
        self.admin = admin_url
        self.callback = callback_url

    async def _json(self, method: str, url: str, body: Any = None) -> tuple[int, Any]:
        async with self.s.request(method, url, json=body) as r:
            text = await r.text()
            try:
                return r.status, (await r.json(content_type=None)) if text else None
            except ValueError:
                return r.status, text

    async def register(self, body: dict[str, Any]) -> dict[str, Any]:
        status, data = await self._json("POST", f"{self.admin}/admin/v1/nodes", body)
        assert status == 200, (status, data)
        return dict(data)

    async def delete(self, node_id: str) -> Any:
        status, data = await self._json("DELETE", f"{self.admin}/admin/v1/nodes/{node_id}")
        assert status == 200, (status, data)
        return data

    async def nodes(self) -> dict[str, dict[str, Any]]:
        _, data = await self._json("GET", f"{self.admin}/admin/v1/nodes")
        return {item["node"]["id"]: item for item in data}

    async def report(self) -> dict[str, Any]:
        _, data = await self._json("GET", f"{self.public}/_sim/report")
        return dict(data)

    async def batches(self, **query: Any) -> list[dict[str, Any]]:
        q = "&".join(f"{k}={v}" for k, v in query.items())
        _, data = await self._json("GET", f"{self.public}/_sim/batches?{q}")
        return list(data)

    async def epoch(self) -> dict[str, Any]:
        _, data = await self._json("GET", f"{self.public}/v1/epochs/latest")
        return dict(data)

    async def height(self) -> int:
        return int((await self.epoch())["block_height"])

    async def wait_height(self, height: int, timeout: float = 30.0) -> int:
        async def reached() -> int:
            h = await self.height()
            return h if h >= height else 0

        return int(await poll_until(reached, timeout=timeout, interval=0.05, what=f"height {height}"))

    async def set_params(self, **params: Any) -> dict[str, Any]:
        status, data = await self._json("POST", f"{self.public}/_sim/params", params)
        assert status == 200, (status, data)
        return dict(data)

    async def post_callback(self, path: str, body: Any) -> tuple[int, Any]:
        return await self._json("POST", f"{self.callback}{path}", body)
