"""The one shared client to the upstream provider (Hyperbolic or any OpenAI-compatible API).

inference-proxy.md, applied:
- one client per process, created at start, its pool sized above the dapi's concurrency;
- no default timeouts that cut long generations: the only read limit is the longest *silence* from the upstream
  (``PROXY_UPSTREAM_READ_TIMEOUT``), never a total;
- idle keep-alive kept below the upstream's so a pooled connection is not reused just as the upstream drops it;
- headers built from scratch: the upstream key, JSON, ``identity`` encoding — the caller's ``Authorization`` and
  everything else it sent stay here;
- retries only before the first byte reaches the client: a refused connection, a connection dropped before the
  answer, and 429/5xx answers whose body has not been relayed are retried with capped, jittered backoff.

Generations (the hot path, :meth:`UpstreamClient.exchange`) go through :class:`UpstreamPool`, a lean HTTP/1.1
keep-alive client (issue #10: aiohttp's ClientSession was over half of the proxy's CPU per request; see
``upstream_pool``). The rare calls (``GET /models`` for health and ``inference/up``, a remote ``/tokenize``) use
an aiohttp session: a full client where speed does not matter. Why not httpx at all: the team measured on this
machine, at concurrency 32, bare FastAPI + httpx collapsing to ~450 req/s (pool contention).
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson
from yarl import URL

from hybrid_proxy.node import metrics
from hybrid_proxy.node.upstream_pool import (
    UpstreamConnectionError,
    UpstreamConnectTimeout,
    UpstreamPool,
    UpstreamStream,
)

log = logging.getLogger("hybrid.proxy.upstream")

RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})
_EVENT_STREAM = "text/event-stream"
_BROKEN_CREDENTIALS = frozenset({401, 403})  # an answer, but every request will fail the same way


class UpstreamFailure(Exception):
    """No usable answer from the upstream: ``status`` is what the client gets (502 unreachable, 504 timeout)."""

    def __init__(self, status: int, message: str, code: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code


@dataclass(slots=True)
class Answer:
    """The upstream's answer once its headers are in: a whole body, or an open SSE stream the caller must close."""

    status: int
    content_type: str
    body: bytes | None
    stream: UpstreamStream | None
    retry_after: str | None
    received_at: float  # loop time the headers (stream) or the whole body (JSON) were in hand


@dataclass(frozen=True, slots=True)
class UpstreamConfig:
    base_url: str  # ends in /v1
    api_key: str
    connect_timeout: float = 10.0
    read_timeout: float = 900.0
    retries: int = 2
    retry_backoff: float = 0.25
    retry_after_cap: float = 2.0
    pool_size: int = 1024
    keepalive_seconds: float = 10.0


def _retry_after_seconds(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        return None  # an HTTP date: not worth honouring for a sub-second backoff


class UpstreamClient:
    def __init__(self, config: UpstreamConfig) -> None:
        self.config = config
        base = config.base_url.rstrip("/")
        self.urls = {path: URL(base + path, encoded=True) for path in ("/chat/completions", "/completions", "/models")}
        self.headers = {
            "Authorization": f"Bearer {config.api_key}",
            "Content-Type": "application/json",
            "Accept-Encoding": "identity",
            "User-Agent": "gonka-hybrid-proxy/0.1",
        }
        self._session: aiohttp.ClientSession | None = None
        self._pool: UpstreamPool | None = None
        # Evidence of life from real traffic (loop time): the health check need not probe while answers flow.
        self.last_answer_at = float("-inf")
        self.last_failure_at = float("-inf")

    @property
    def session(self) -> aiohttp.ClientSession:
        assert self._session is not None, "UpstreamClient.start() first"
        return self._session

    @property
    def pool(self) -> UpstreamPool:
        """The hot path's connections (``exchange``): one pool per process, shared by every request."""
        assert self._pool is not None, "UpstreamClient.start() first"
        return self._pool

    async def start(self) -> None:
        c = self.config
        self._pool = UpstreamPool(
            c.base_url,
            self.headers,
            limit=c.pool_size,
            keepalive=c.keepalive_seconds,
            connect_timeout=c.connect_timeout,
            read_timeout=c.read_timeout,
        )
        self._pool.start()
        connector = aiohttp.TCPConnector(
            limit=c.pool_size,
            limit_per_host=0,
            keepalive_timeout=c.keepalive_seconds,
            ttl_dns_cache=300,
        )
        self._session = aiohttp.ClientSession(
            connector=connector,
            timeout=aiohttp.ClientTimeout(
                total=None, connect=None, sock_connect=c.connect_timeout, sock_read=c.read_timeout
            ),
            cookie_jar=aiohttp.DummyCookieJar(),
            auto_decompress=True,
            trust_env=False,
            read_bufsize=2**16,
        )

    async def close(self) -> None:
        if self._pool is not None:
            await self._pool.close()
            self._pool = None
        if self._session is not None:
            await self._session.close()
            self._session = None

    def url(self, path: str) -> URL:
        return self.urls.get(path) or URL(self.config.base_url.rstrip("/") + path, encoded=True)

    def _backoff(self, attempt: int, retry_after: str | None) -> float:
        hinted = _retry_after_seconds(retry_after)
        if hinted is not None and hinted <= self.config.retry_after_cap:
            return hinted
        base: float = self.config.retry_backoff * 2.0**attempt
        return min(base * (0.5 + random.random()), max(self.config.retry_after_cap, self.config.retry_backoff))

    async def exchange(self, path: str, body: bytes) -> Answer:
        """POST ``body`` to ``path``; retried until an answer worth relaying (or the retries run out)."""
        pool = self.pool
        loop = pool.loop
        attempt = 0
        while True:
            try:
                conn = await pool.post(path, body)
            except UpstreamConnectTimeout:
                self.last_failure_at = loop.time()
                if attempt >= self.config.retries:
                    metrics.upstream_error("unreachable").inc()
                    raise UpstreamFailure(
                        502, "the upstream is unreachable (connect timeout)", "upstream_unreachable"
                    ) from None
                await self._retry(attempt, "ConnectionTimeoutError", None)
                attempt += 1
                continue
            except TimeoutError:
                self.last_failure_at = loop.time()
                metrics.upstream_error("timeout").inc()
                raise UpstreamFailure(504, "the upstream did not answer in time", "upstream_timeout") from None
            except UpstreamConnectionError as exc:
                self.last_failure_at = loop.time()
                if attempt >= self.config.retries:
                    metrics.upstream_error("unreachable").inc()
                    raise UpstreamFailure(
                        502, f"the upstream is unreachable ({exc.reason})", "upstream_unreachable"
                    ) from None
                await self._retry(attempt, exc.reason, None)
                attempt += 1
                continue
            headers_at = loop.time()
            status = conn.status
            ctype = conn.content_type or "application/json"
            if status < 400 and ctype.startswith(_EVENT_STREAM):
                self.last_answer_at = headers_at
                return Answer(status, ctype, None, UpstreamStream(pool, conn), None, headers_at)
            try:
                data = await conn.read_body()
            except TimeoutError:
                pool.discard(conn)
                self.last_failure_at = loop.time()
                metrics.upstream_error("timeout").inc()
                raise UpstreamFailure(504, "the upstream stopped answering mid-body", "upstream_timeout") from None
            except UpstreamConnectionError as exc:
                pool.discard(conn)
                self.last_failure_at = loop.time()
                if attempt >= self.config.retries:
                    metrics.upstream_error("broken").inc()
                    raise UpstreamFailure(
                        502, f"the upstream broke off its answer ({exc.reason})", "upstream_broken"
                    ) from None
                await self._retry(attempt, exc.reason, None)
                attempt += 1
                continue
            except BaseException:  # cancelled (the client went away): the upstream sees the connection close
                pool.discard(conn)
                raise
            retry_after = conn.retry_after
            pool.release(conn)
            done_at = loop.time()
            if status >= 500 or status in _BROKEN_CREDENTIALS:
                self.last_failure_at = done_at
            else:
                self.last_answer_at = done_at
            if status in RETRY_STATUSES and attempt < self.config.retries:
                metrics.upstream_error(status).inc()
                await self._retry(attempt, str(status), retry_after)
                attempt += 1
                continue
            if status >= 400:
                metrics.upstream_error(status).inc()
            return Answer(status, ctype, data, None, retry_after, done_at)

    async def _retry(self, attempt: int, reason: str, retry_after: str | None) -> None:
        delay = self._backoff(attempt, retry_after)
        metrics.UPSTREAM_RETRIES.labels(reason).inc()
        log.info("upstream attempt %d failed (%s); retrying in %.2fs", attempt + 1, reason, delay)
        await asyncio.sleep(delay)

    async def list_models(self, timeout: float) -> tuple[int, list[str]]:
        """(HTTP status, model ids) of ``GET /models``; raises ``UpstreamFailure`` when nothing answers."""
        loop = asyncio.get_running_loop()
        started = time.monotonic()
        try:
            async with asyncio.timeout(timeout):
                async with self.session.get(self.url("/models"), headers=self.headers) as resp:
                    raw = await resp.read()
                    status = resp.status
        except TimeoutError:
            self.last_failure_at = loop.time()
            raise UpstreamFailure(
                504, f"the upstream did not answer GET /models within {timeout:g}s", "upstream_timeout"
            ) from None
        except aiohttp.ClientError as exc:
            self.last_failure_at = loop.time()
            raise UpstreamFailure(
                502, f"the upstream is unreachable ({type(exc).__name__})", "upstream_unreachable"
            ) from None
        log.debug("upstream GET /models: %d in %.0f ms", status, 1000 * (time.monotonic() - started))
        if status >= 500 or status in _BROKEN_CREDENTIALS:
            self.last_failure_at = loop.time()
        ids: list[str] = []
        if status == 200:
            try:
                parsed: Any = orjson.loads(raw)
                data = parsed.get("data") if isinstance(parsed, dict) else None
                ids = [m["id"] for m in data or () if isinstance(m, dict) and isinstance(m.get("id"), str)]
            except orjson.JSONDecodeError:
                ids = []
        return status, ids
