"""The hot path's link to the upstream: a lean HTTP/1.1 keep-alive connection pool for ``POST`` + body.

Why not aiohttp's ``ClientSession`` for this one call: profiled under load (issue #10), its per-request machinery
(request/response objects, payload wrappers, header multidicts, trace hooks, one timer per read) was more than half
of the proxy's CPU per request, and the CPU per request is what caps one worker's throughput. What is left here:

- the request head is encoded once per path (inference-proxy.md: upstream headers built from scratch — the key,
  JSON, ``identity`` encoding; nothing of the caller's), so a request is one ``writelines`` of head, length, body;
- answers are parsed by httptools (llhttp in C, what uvicorn uses): status, the few headers the proxy relays, and
  the body with Content-Length, chunked or close-delimited framing;
- one timer per exchange enforces the longest silence (``read_timeout``), never a total: long generations live;
- SSE bytes are handed over as they arrive, whatever arrived in one socket read together (as aiohttp's
  ``iter_any`` does), never parsed; a slow client pauses reading from the upstream instead of buffering;
- connections are reused newest-first and dropped after ``keepalive`` idle seconds (below the upstream's own, so a
  connection is not reused just as the upstream closes it); at most ``limit`` are open, further callers wait.

The rest of the node's upstream traffic (``GET /models`` for health, ``/tokenize``) is rare and stays on aiohttp.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import zlib
from collections import deque

import httptools
from yarl import URL

_STREAM_HIGH_WATER = 256 * 1024  # buffered SSE bytes a slow client may leave behind before the upstream is paused
_DECODERS = {"gzip": 16 + zlib.MAX_WBITS, "x-gzip": 16 + zlib.MAX_WBITS, "deflate": zlib.MAX_WBITS}


class UpstreamConnectionError(Exception):
    """No answer could be read over the connection (``reason`` names why, for logs and error messages)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class UpstreamUnreachable(UpstreamConnectionError):
    """The connection could not be opened (refused, DNS, TLS)."""


class UpstreamConnectTimeout(UpstreamUnreachable):
    """Opening the connection took longer than ``connect_timeout``."""


class UpstreamDisconnected(UpstreamConnectionError):
    """The connection dropped (or the upstream spoke broken HTTP) before the answer was complete."""


class UpstreamConnection(asyncio.Protocol):
    """One keep-alive connection; one exchange at a time. httptools calls the ``on_*`` methods while parsing."""

    def __init__(self, pool: UpstreamPool) -> None:
        self.pool = pool
        self.loop = pool.loop
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.closed = False
        self.busy = False  # an exchange is under way (between send and release)
        self.idle_since = 0.0
        self.streaming = False
        self._timer: asyncio.TimerHandle | None = None
        self._waiter: asyncio.Future[None] | None = None
        self.reset()

    def reset(self) -> None:
        """Ready for the next exchange (the parser itself moves on to the next answer by itself)."""
        self.status = 0
        self.content_type: str | None = None
        self.retry_after: str | None = None
        self.head_done = False
        self.received = False  # any byte of the answer
        self.complete = False
        self.keep_alive = False
        self.error: UpstreamConnectionError | TimeoutError | None = None
        self._chunks: list[bytes] = []
        self._buffered = 0
        self._framed = False  # Content-Length or Transfer-Encoding seen: the body does not end with the connection
        self._informational = False
        self._decoder: zlib._Decompress | None = None
        self._encoding: str | None = None
        self._paused = False
        self._last_read = 0.0

    # --- asyncio.Protocol -------------------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's transports are not asyncio subclasses

    def data_received(self, data: bytes) -> None:
        if not self.busy:  # bytes nobody asked for (on an idle connection): never let them pass for an answer
            self.abort()
            return
        self._last_read = self.loop.time()
        self.received = True
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(UpstreamDisconnected(f"malformed HTTP from the upstream ({exc})"))
            self.abort()
            self._wake()
            return
        if self._chunks and self.streaming and not self._paused and self._buffered > _STREAM_HIGH_WATER:
            self._paused = True
            if self.transport is not None:
                self.transport.pause_reading()
        self._wake()

    def eof_received(self) -> bool | None:
        self.closed = True  # never handed out again, even before connection_lost runs
        return None  # close the transport: connection_lost settles the exchange

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.transport = None
        if self.head_done and not self.complete and not self._framed and self.error is None:
            self.on_message_complete()  # a close-delimited body ends with the connection
        elif not self.complete and self.error is None:
            why = type(exc).__name__ if exc is not None else "ServerDisconnected"
            self._fail(UpstreamDisconnected(why))
        self._cancel_timer()
        self._wake()

    # --- httptools callbacks ----------------------------------------------------------------------------------

    def on_header(self, name: bytes, value: bytes) -> None:
        key = name.lower()
        if key == b"content-type":
            self.content_type = value.decode("latin-1")
        elif key == b"content-length" or key == b"transfer-encoding":
            self._framed = True
        elif key == b"retry-after":
            self.retry_after = value.decode("latin-1")
        elif key == b"content-encoding":
            self._encoding = value.decode("latin-1").strip().lower()

    def on_headers_complete(self) -> None:
        status = self.parser.get_status_code()
        if 100 <= status < 200:  # an interim answer (100 Continue): the real head follows
            self._informational = True
            self.content_type = self.retry_after = self._encoding = None
            self._framed = False
            return
        self.status = status
        if self._encoding and self._encoding != "identity":
            wbits = _DECODERS.get(self._encoding)
            if wbits is None:
                self._fail(
                    UpstreamDisconnected(f"unsupported Content-Encoding {self._encoding!r} (identity was asked)")
                )
            else:
                self._decoder = zlib.decompressobj(wbits)
        self.head_done = True

    def on_body(self, body: bytes) -> None:
        if self._decoder is not None:
            try:
                body = self._decoder.decompress(body)
            except zlib.error as exc:
                self._fail(UpstreamDisconnected(f"undecodable {self._encoding} body ({exc})"))
                return
            if not body:
                return
        self._chunks.append(body)
        self._buffered += len(body)

    def on_message_complete(self) -> None:
        if self._informational:
            self._informational = False
            return
        if self._decoder is not None:
            rest = self._decoder.flush()
            if rest:
                self._chunks.append(rest)
                self._buffered += len(rest)
        self.keep_alive = self.parser.should_keep_alive()  # llhttp forgets it once the next message may begin
        self.complete = True
        self._cancel_timer()

    # --- the exchange -----------------------------------------------------------------------------------------

    def send(self, head: bytes, body: bytes) -> None:
        """Write the request; the silence timer starts now."""
        self.busy = True
        if self.transport is None or self.transport.is_closing():
            raise UpstreamDisconnected("ServerDisconnected")
        self._last_read = now = self.loop.time()
        self._timer = self.loop.call_at(now + self.pool.read_timeout, self._check_silence)
        self.transport.writelines((head, b"%d\r\n\r\n" % len(body), body))

    def _check_silence(self) -> None:
        self._timer = None
        if self.complete or self.closed:
            return
        now = self.loop.time()
        if self._paused:  # silent because our client is slow, not the upstream: not a timeout
            self._last_read = now
        deadline = self._last_read + self.pool.read_timeout
        if now >= deadline:
            self._fail(TimeoutError(f"the upstream was silent for {self.pool.read_timeout:g}s"))
            self.abort()
            self._wake()
        else:
            self._timer = self.loop.call_at(deadline, self._check_silence)

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _fail(self, error: UpstreamConnectionError | TimeoutError) -> None:
        if self.error is None:
            self.error = error

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def _wait(self) -> None:
        self._waiter = self.loop.create_future()
        try:
            await self._waiter
        finally:
            self._waiter = None

    async def read_head(self) -> None:
        """Until the status line and headers are in (raises the connection's error)."""
        while not self.head_done:
            if self.error is not None:
                raise self.error
            await self._wait()
        if self.error is not None and not self._chunks:
            raise self.error

    async def read_body(self) -> bytes:
        """The whole body."""
        while not self.complete:
            if self.error is not None:
                raise self.error
            await self._wait()
        chunks = self._chunks
        self._chunks = []
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    async def next_chunk(self) -> bytes | None:
        """Every body byte that arrived since the last call (waiting for some); None once the body is complete."""
        while True:
            chunks = self._chunks
            if chunks:
                self._chunks = []
                self._buffered = 0
                if self._paused:
                    self._paused = False
                    self._last_read = self.loop.time()  # the silence limit counts from here again
                    if self.transport is not None:
                        self.transport.resume_reading()
                return chunks[0] if len(chunks) == 1 else b"".join(chunks)
            if self.complete:
                return None
            if self.error is not None:
                raise self.error
            await self._wait()

    def reusable(self) -> bool:
        return self.complete and self.keep_alive and not self.closed and self.error is None

    def abort(self) -> None:
        self._cancel_timer()
        self.closed = True
        if self.transport is not None:
            self.transport.abort()
            self.transport = None


class UpstreamPool:
    """Keep-alive connections to one upstream origin; :meth:`post` sends a request and returns its connection once the
    answer's head is in. The caller reads the body from it and gives it back with :meth:`release` (or :meth:`discard`).
    """

    def __init__(
        self,
        base_url: str,
        headers: dict[str, str],
        *,
        limit: int,
        keepalive: float,
        connect_timeout: float,
        read_timeout: float,
    ) -> None:
        url = URL(base_url)
        if url.scheme not in ("http", "https") or not url.raw_host:
            raise ValueError(f"the upstream URL must be http(s)://host[:port]/path, not {base_url!r}")
        self.host = url.raw_host
        self.port = url.port or (443 if url.scheme == "https" else 80)
        self.ssl: ssl.SSLContext | None = ssl.create_default_context() if url.scheme == "https" else None
        self.base_path = url.raw_path.rstrip("/")
        self.limit = limit
        self.keepalive = keepalive
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        lines = [f"Host: {url.host_port_subcomponent}", *(f"{k}: {v}" for k, v in headers.items())]
        self._head_lines = ("\r\n".join(lines) + "\r\nContent-Length: ").encode("latin-1")
        self._heads: dict[str, bytes] = {}
        self._idle: deque[UpstreamConnection] = deque()
        self._in_use = 0
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._sweeper: asyncio.Task[None] | None = None
        self.opened = 0  # connections ever opened (reuse shows as opened << requests)
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        assert self._loop is not None, "UpstreamPool.start() first"
        return self._loop

    @property
    def in_use(self) -> int:
        return self._in_use

    @property
    def idle(self) -> int:
        return sum(1 for c in self._idle if not c.closed)

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._sweeper = asyncio.create_task(self._sweep(), name="upstream-pool-sweeper")

    async def close(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
            self._sweeper = None
        while self._idle:
            self._idle.pop().abort()

    def head(self, path: str) -> bytes:
        """``POST <base path><path> HTTP/1.1`` and the fixed headers, up to ``Content-Length: ``."""
        head = self._heads.get(path)
        if head is None:
            head = f"POST {self.base_path}{path} HTTP/1.1\r\n".encode("latin-1") + self._head_lines
            self._heads[path] = head
        return head

    async def post(self, path: str, body: bytes) -> UpstreamConnection:
        """Send ``body``; the connection with the answer's head read. Raises ``UpstreamConnectionError`` or
        ``TimeoutError`` (the upstream stayed silent for ``read_timeout``)."""
        head = self.head(path)
        conn, reused = await self._acquire(reuse=True)
        while True:
            try:
                conn.send(head, body)
                await conn.read_head()
                return conn
            except UpstreamDisconnected:
                self.discard(conn)
                if not reused or conn.received:
                    raise
            except BaseException:
                self.discard(conn)
                raise
            # A kept-alive connection that the upstream closed while it sat idle, before a byte of answer: the
            # request never reached a handler there. Once more on a new connection (not one of the retries).
            conn, reused = await self._acquire(reuse=False)

    def release(self, conn: UpstreamConnection) -> None:
        """The exchange is over: keep the connection for the next one when it can be, else close it."""
        if conn.reusable():
            conn.idle_since = self.loop.time()
            conn.busy = conn.streaming = False
            conn.reset()
            self._idle.append(conn)
        else:
            conn.abort()
        self._in_use -= 1
        self._wake_one()

    def discard(self, conn: UpstreamConnection) -> None:
        """The exchange was abandoned (error, cancelled, client gone): close the connection, the upstream sees it."""
        conn.abort()
        self._in_use -= 1
        self._wake_one()

    async def _acquire(self, *, reuse: bool) -> tuple[UpstreamConnection, bool]:
        while self._in_use >= self.limit:
            waiter = self.loop.create_future()
            self._waiters.append(waiter)
            try:
                await waiter
            except asyncio.CancelledError:
                if waiter.done() and not waiter.cancelled():
                    self._wake_one()  # it was our turn: pass it on
                raise
        self._in_use += 1
        try:
            idle = self._idle
            if idle and reuse:
                expired_before = self.loop.time() - self.keepalive
                while idle:
                    conn = idle.pop()  # newest first: the warmest connection, the least likely to be closing
                    if not conn.closed and conn.idle_since > expired_before:
                        return conn, True
                    conn.abort()
            return await self._connect(), False
        except BaseException:
            self._in_use -= 1
            self._wake_one()
            raise

    async def _connect(self) -> UpstreamConnection:
        conn = UpstreamConnection(self)
        try:
            async with asyncio.timeout(self.connect_timeout):
                await self.loop.create_connection(
                    lambda: conn,
                    self.host,
                    self.port,
                    ssl=self.ssl,
                    server_hostname=self.host if self.ssl is not None else None,
                )
        except TimeoutError:
            conn.abort()
            raise UpstreamConnectTimeout(f"connect timeout after {self.connect_timeout:g}s") from None
        except OSError as exc:
            raise UpstreamUnreachable(type(exc).__name__) from None
        self.opened += 1
        return conn

    def _wake_one(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    async def _sweep(self) -> None:
        """Close connections idle past ``keepalive`` (oldest sit at the left end) while no request comes to."""
        while True:
            await asyncio.sleep(max(self.keepalive / 2, 0.05))
            expired_before = self.loop.time() - self.keepalive
            idle = self._idle
            while idle and (idle[0].closed or idle[0].idle_since <= expired_before):
                idle.popleft().abort()


class UpstreamStream:
    """An SSE answer being relayed: ``async for`` its bytes as they arrive, then :meth:`release` it (complete) or
    :meth:`close` it (abandoned: the upstream sees the connection go and stops generating)."""

    __slots__ = ("_conn", "_pool", "_settled")

    def __init__(self, pool: UpstreamPool, conn: UpstreamConnection) -> None:
        self._pool = pool
        self._conn = conn
        self._settled = False
        conn.streaming = True

    def __aiter__(self) -> UpstreamStream:
        return self

    async def __anext__(self) -> bytes:
        chunk = await self._conn.next_chunk()
        if chunk is None:
            raise StopAsyncIteration
        return chunk

    def release(self) -> None:
        if not self._settled:
            self._settled = True
            self._pool.release(self._conn)

    def close(self) -> None:
        if not self._settled:
            self._settled = True
            self._pool.discard(self._conn)
