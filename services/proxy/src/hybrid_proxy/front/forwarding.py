"""HTTP forwarding of one gateway port to a GPU: version prefix stripped, bodies streamed both ways.

gonka-protocol.md §1: the dapi calls ``http://{host}:{port}/{version}/api/v1/...`` and the MLNode image does not strip
the ``/{version}`` prefix (the official deployment has nginx do it). So a path beginning ``/vX.Y.Z`` (at least one dot:
``/v1/chat/completions`` is a real path, not a version) loses that segment; bare paths pass unchanged. Everything else
is byte-for-byte: no JSON is parsed, request and response bodies are streamed as they arrive (SSE included), and
compressed bodies stay compressed (``auto_decompress=False``).

The one exception is the callback rewrite (see :mod:`hybrid_proxy.front`): for a tunnel-mode GPU that cannot reach
the relay, the small PoC ``init``/``generate`` command bodies get the relay's origin replaced, as bytes, by the local end
of the SSH remote forward.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import aiohttp
import orjson
from aiohttp import web
from yarl import URL

from hybrid_common.metrics import counter

log = logging.getLogger("hybrid.proxy.front")

PortKind = Literal["poc", "inference"]

# A chain mlnode_version segment such as /v3.0.8 or /v3.0.12-post1 (never /v1, which is the OpenAI path).
_VERSION_PREFIX = re.compile(r"^/v\d+(?:\.\d+)+(?:[-+][0-9A-Za-z.\-]*)?(?=/|\?|$)")

# RFC 9110 §7.6.1 hop-by-hop fields, plus Host (set for the GPU's address by the client).
_HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "host",
    }
)

# The MLNode commands that carry the callback base in their body (gonka-protocol.md §1 init body ``url``, §7 v2).
_CALLBACK_CARRIERS = ("/api/v1/pow/init/", "/api/v1/inference/pow/init/", "/api/v1/inference/pow/generate")

REQUESTS = counter("front_requests_total", "requests through the node front", ("kind", "outcome"))


def strip_version(raw_path: str) -> str:
    """``/v3.0.8/api/v1/state?x=1`` → ``/api/v1/state?x=1``; anything else unchanged."""
    stripped = _VERSION_PREFIX.sub("", raw_path, count=1)
    if not stripped or stripped[0] != "/":
        stripped = "/" + stripped
    return stripped


@dataclass(frozen=True)
class Upstream:
    """Where one gateway port forwards right now."""

    host: str
    port: int
    instance_id: int
    callback_rewrite: tuple[bytes, bytes] | None = None  # (relay origin, local end of the remote forward)


Resolver = Callable[[PortKind], "Upstream | str"]
FailureHook = Callable[[PortKind, str], None]


def unavailable(slot_id: str, state: str, message: str, status: int = 503) -> web.Response:
    """What a slot's port answers while no GPU answers behind it: like an MLNode that is not up, never a hang."""
    body = {"error": "gpu_unavailable", "message": message, "slot_id": slot_id, "state": state}
    return web.Response(status=status, body=orjson.dumps(body), content_type="application/json")


def _rewrite(body: bytes, rewrite: tuple[bytes, bytes]) -> bytes:
    old, new = rewrite
    body = body.replace(old, new)
    # A JSON encoder may escape "/" (PHP, some Java); Go's and Python's do not. Cover both.
    return body.replace(old.replace(b"/", b"\\/"), new.replace(b"/", b"\\/"))


class Forwarder:
    """Forwards requests with one shared client session (its pool is keyed by GPU address)."""

    def __init__(self, *, connect_timeout: float) -> None:
        self._connect_timeout = connect_timeout
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=30, enable_cleanup_closed=True),
            # The dapi's own client waits up to 15 min (inference/up blocks until vLLM is up): no total timeout here.
            timeout=aiohttp.ClientTimeout(
                total=None, connect=self._connect_timeout, sock_connect=self._connect_timeout
            ),
            auto_decompress=False,
            skip_auto_headers=("Accept-Encoding", "User-Agent", "Content-Type"),
            cookie_jar=aiohttp.DummyCookieJar(),
        )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    @property
    def session(self) -> aiohttp.ClientSession:
        assert self._session is not None, "Forwarder.start() first"
        return self._session

    async def forward(
        self, request: web.BaseRequest, kind: PortKind, upstream: Upstream, on_failure: FailureHook, slot_id: str
    ) -> web.StreamResponse:
        path = strip_version(request.raw_path)
        url = URL(f"http://{upstream.host}:{upstream.port}{path}", encoded=True)
        headers = [(k, v) for k, v in request.headers.items() if k.lower() not in _HOP_BY_HOP]
        data: Any = None
        if upstream.callback_rewrite is not None and request.method == "POST" and path.startswith(_CALLBACK_CARRIERS):
            data = _rewrite(await request.read(), upstream.callback_rewrite)
            headers = [(k, v) for k, v in headers if k.lower() != "content-length"]
        elif request.body_exists:
            data = request.content
        try:
            response = await self.session.request(
                request.method, url, headers=headers, data=data, allow_redirects=False, compress=None
            )
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            REQUESTS.labels(kind, "gpu_unreachable").inc()
            reason = f"{type(exc).__name__}: {exc}"
            on_failure(kind, reason)
            return unavailable(
                slot_id,
                "down",
                f"the GPU of slot {slot_id} (instance {upstream.instance_id}) does not answer: {reason}",
            )
        complete = False
        try:
            out = web.StreamResponse(status=response.status, reason=response.reason)
            for name, value in response.headers.items():
                if name.lower() not in _HOP_BY_HOP:
                    out.headers.add(name, value)
            await out.prepare(request)
            if request.method != "HEAD":
                async for chunk in response.content.iter_any():
                    await out.write(chunk)
            await out.write_eof()
            complete = True
            REQUESTS.labels(kind, "ok").inc()
            return out
        except (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError, OSError, asyncio.CancelledError) as exc:
            # Upstream cut mid-body or the caller went away: cut the other side too, never fake a clean end.
            REQUESTS.labels(kind, "cut").inc()
            log.info("slot %s %s %s: stream cut: %r", slot_id, request.method, path, exc)
            if request.transport is not None:
                request.transport.abort()
            if isinstance(exc, asyncio.CancelledError):
                raise
            return out
        finally:
            if complete:
                response.release()
            else:
                response.close()


class GatewayListener:
    """One listening gateway port of a slot."""

    def __init__(
        self,
        slot_id: str,
        kind: PortKind,
        host: str,
        port: int,
        resolve: Resolver,
        forwarder: Forwarder,
        on_failure: FailureHook,
    ) -> None:
        self.slot_id = slot_id
        self.kind = kind
        self.host = host
        self.port = port
        self._resolve = resolve
        self._forwarder = forwarder
        self._on_failure = on_failure
        self._web: web.Server | None = None
        self._server: asyncio.Server | None = None
        self.error: str | None = None

    @property
    def listening(self) -> bool:
        return self._server is not None

    async def start(self) -> bool:
        if self._server is not None:
            return True
        self._web = web.Server(self._handle, access_log=None)
        try:
            self._server = await asyncio.get_running_loop().create_server(
                self._web, self.host, self.port, reuse_address=True, backlog=512
            )
        except OSError as exc:
            self.error = f"cannot listen on {self.host}:{self.port}: {exc}"
            self._web = None
            return False
        self.error = None
        return True

    async def close(self) -> None:
        server, self._server = self._server, None
        web_server, self._web = self._web, None
        if server is not None:
            server.close()
        if web_server is not None:
            with contextlib.suppress(Exception):
                await web_server.shutdown(1.0)
        if server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(server.wait_closed(), 2.0)

    async def _handle(self, request: web.BaseRequest) -> web.StreamResponse:
        target = self._resolve(self.kind)
        if isinstance(target, str):
            REQUESTS.labels(self.kind, "no_route").inc()
            return unavailable(self.slot_id, "down", target)
        return await self._forwarder.forward(request, self.kind, target, self._on_failure, self.slot_id)
