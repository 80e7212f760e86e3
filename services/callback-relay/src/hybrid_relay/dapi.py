"""POSTs to the dapi's internal callback server over kept-alive connections.

One POST per batch (the dapi takes one batch per request, gonka-protocol.md §2, §7), thousands a second: a general
HTTP client's per-request machinery (sessions, tracing hooks, header objects, a response object and a stream reader)
costs more CPU than the dapi takes to answer. This client writes a pre-built request and reads the status with
httptools; each connection carries one request at a time and goes back to an idle pool after a complete answer.
Anything unexpected — refused connection, reset, timeout, malformed answer — closes that connection and returns None:
the forwarder retries with backoff.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from urllib.parse import urlsplit

import httptools

_IDLE_MAX_S = 10.0  # a connection idle longer may have been closed by the server: do not reuse it


class _Exchange(asyncio.Protocol):
    """One keep-alive connection to the dapi."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.waiter: asyncio.Future[int] | None = None
        self.status = 0
        self.reusable = False
        self.closed = False
        self.idle_since = 0.0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's transports are not subclasses

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(ConnectionError("the dapi closed the connection mid-answer"))

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            if self.waiter is not None and not self.waiter.done():
                self.waiter.set_exception(ConnectionError(f"malformed answer from the dapi: {exc}"))
            self.close()

    def on_headers_complete(self) -> None:
        self.status = self.parser.get_status_code()

    def on_message_complete(self) -> None:
        self.reusable = self.parser.should_keep_alive()
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(self.status)

    def send(self, request: bytes) -> asyncio.Future[int]:
        assert self.transport is not None
        self.waiter = asyncio.get_running_loop().create_future()
        self.reusable = False
        self.transport.write(request)
        return self.waiter

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()


class DapiCallbackClient:
    """``post(path, body)`` → the dapi's status, or None when no answer came (connection error, timeout)."""

    def __init__(self, base_url: str, *, timeout: float) -> None:
        parts = urlsplit(base_url)
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError(f"DAPI_CALLBACK_URL must be http://host[:port][/prefix], got {base_url!r}")
        self.host = parts.hostname
        self.port = parts.port or 80
        self.prefix = parts.path.rstrip("/")
        self.timeout = timeout
        self._head = f"Host: {parts.netloc}\r\nContent-Type: application/json\r\n"
        self._idle: list[_Exchange] = []
        self._all: set[_Exchange] = set()

    def _request(self, path: str, body: bytes) -> bytes:
        head = f"POST {self.prefix}{path} HTTP/1.1\r\n{self._head}Content-Length: {len(body)}\r\n\r\n"
        return head.encode("latin-1") + body  # the path as received (v2 model ids stay escaped twice, §7)

    def _idle_connection(self) -> _Exchange | None:
        now = time.monotonic()
        while self._idle:
            conn = self._idle.pop()
            if not conn.closed and now - conn.idle_since < _IDLE_MAX_S:
                return conn
            conn.close()
            self._all.discard(conn)
        return None

    async def _new_connection(self) -> _Exchange:
        loop = asyncio.get_running_loop()
        _, conn = await loop.create_connection(_Exchange, self.host, self.port)
        self._all.add(conn)
        return conn

    async def post(self, path: str, body: bytes) -> int | Exception:
        """The status the dapi answered, or the exception that stood in the way of an answer."""
        conn: _Exchange | None = None
        try:
            async with asyncio.timeout(self.timeout):
                conn = self._idle_connection() or await self._new_connection()
                status = await conn.send(self._request(path, body))
        except (OSError, TimeoutError, ConnectionError) as exc:
            if conn is not None:
                conn.close()
                self._all.discard(conn)
            return exc
        except asyncio.CancelledError:
            if conn is not None:
                conn.close()
                self._all.discard(conn)
            raise
        if conn.reusable and not conn.closed:
            conn.idle_since = time.monotonic()
            self._idle.append(conn)
        else:
            conn.close()
            self._all.discard(conn)
        return status

    async def close(self) -> None:
        for conn in self._all:
            with contextlib.suppress(Exception):
                conn.close()
        self._all.clear()
        self._idle.clear()
