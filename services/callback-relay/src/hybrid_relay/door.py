"""The public door: MLNode callbacks in, validated, durably queued, answered fast.

A small HTTP/1.1 server on ``asyncio.Protocol`` + httptools (the parser uvicorn uses) rather than an ASGI stack: it
has one hot route and must answer thousands of batches a second on a 2-core VPS next to the broker, and a framework's
per-request objects and task cost more than the route itself. Keep-alive, pipelining (answers in request order),
chunked bodies and ``Expect: 100-continue`` are handled; idle connections close after ``keepalive`` seconds.

Answers, as the dapi's callback server gives them (gonka-protocol.md §2, §7, §10): bad JSON → 400; a body that does
not fit the route's schema → 400 naming the field; too large → 413; valid → the batch is handed to the group commit
(handoff.py) and the broker's confirm awaited, **then** 200 with an empty body. When the relay already knows the dapi
would refuse, it answers as the dapi would: 503 on v1 routes while ``poc_v2_enabled`` is on, 503 for a v2 batch whose
window has closed. A batch it cannot queue (broker away past the deadline) gets 503 so the sender keeps it — the v1
sender waits forever on a hanging URL, the v2 sender times out after 10 s.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from collections import deque
from datetime import UTC, datetime
from functools import partial
from http import HTTPStatus
from typing import Any

import httptools
import orjson
from pydantic import ValidationError

from hybrid_common.messages.poc_batches import BATCH_MODELS
from hybrid_relay.guard import DoorGuard, Refusal
from hybrid_relay.handoff import GroupHandoff, Reply
from hybrid_relay.metrics import ACCEPT_SECONDS, ACCEPTED, ACCEPTED_ITEMS, DOOR_ANSWERS
from hybrid_relay.routes import CallbackRoute, parse_route
from hybrid_relay.windows import PocWindows
from hybrid_relay.wire import new_id

log = logging.getLogger("hybrid.relay.door")

Headers = list[tuple[bytes, bytes]]

_OK = b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n"
_OK_CLOSE = b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
_MAX_PIPELINED = 16  # answers owed on one connection before it stops reading
_DISCARD_LIMIT = 64  # an oversized body is read and dropped up to this many times the limit, then the socket closes
_ANSWERS = {s: DOOR_ANSWERS.labels(str(s)) for s in (200, 400, 401, 403, 404, 405, 413, 503)}


class _Answer(Exception):
    def __init__(self, status: int, error: str) -> None:
        super().__init__(error)
        self.status = status
        self.error = error


def batch_digest(route: CallbackRoute, body: dict[str, Any]) -> str:
    """The content identity the forwarder deduplicates on: same route (aliases folded), same JSON content whatever
    the key order or spacing of the sender's serialisation."""
    canonical = orjson.dumps(body, option=orjson.OPT_SORT_KEYS)
    return hashlib.sha256(route.key.encode() + b"\n" + canonical).hexdigest()


def _response(status: int, error: str, *, close: bool) -> bytes:
    if status == 200:
        return _OK_CLOSE if close else _OK
    body = orjson.dumps({"error": error})
    connection = "connection: close\r\n" if close else ""
    head = (
        f"HTTP/1.1 {status} {HTTPStatus(status).phrase}\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\n{connection}\r\n"
    )
    return head.encode() + body


def _count(status: int) -> None:
    counter = _ANSWERS.get(status)
    if counter is None:
        counter = _ANSWERS[status] = DOOR_ANSWERS.labels(str(status))
    counter.inc()


class CallbackDoor:
    """What the door answers; the HTTP plumbing is :class:`DoorServer`."""

    def __init__(
        self,
        *,
        handoff: GroupHandoff,
        windows: PocWindows,
        guard: DoorGuard,
        max_body_bytes: int,
        refuse_at_door: bool = True,
    ) -> None:
        self.handoff = handoff
        self.windows = windows
        self.guard = guard
        self.max_body = max_body_bytes
        self.refuse_at_door = refuse_at_door
        self._accepted = {(g, k): ACCEPTED.labels(g, k) for g in ("v1", "v2") for k in ("generated", "validated")}

    def handle(
        self,
        method: bytes,
        raw_path: str,
        headers: Headers,
        body: bytes,
        client: str | None,
        oversize: bool,
        reply: Reply,
    ) -> tuple[int, str] | None:
        """(status, error) at once; or None for a valid batch, handed off: ``reply(None)`` once its group is
        confirmed (200), ``reply(error)`` if it cannot be (503)."""
        try:
            return self._handle(method, raw_path, headers, body, client, oversize, reply)
        except _Answer as answer:
            return answer.status, answer.error
        except Refusal as refusal:
            return refusal.status, {401: "Unauthorized", 403: "Forbidden"}.get(refusal.status, "Not Found")

    def _handle(
        self,
        method: bytes,
        raw_path: str,
        headers: Headers,
        raw: bytes,
        client: str | None,
        oversize: bool,
        reply: Reply,
    ) -> tuple[int, str] | None:
        path = self.guard.check(raw_path, client, headers)
        if method == b"GET" and path in ("/healthz", "/health"):
            return 200, ""
        route = parse_route(path)
        if route is None:
            raise _Answer(404, "Not Found")
        if method != b"POST":
            raise _Answer(405, "Method Not Allowed")
        if oversize:
            raise _Answer(413, f"body larger than {self.max_body} bytes")
        try:
            data = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            raise _Answer(400, f"invalid JSON: {exc}") from None
        if not isinstance(data, dict):
            raise _Answer(400, "invalid body: expected a JSON object")
        try:
            batch = BATCH_MODELS[(route.generation, route.kind)].model_validate(data)
        except ValidationError as exc:
            raise _Answer(400, _validation_message(exc)) from None
        self._refuse_known(route, batch.block_height)
        items: int = batch.items  # type: ignore[attr-defined]
        batch_id = new_id()
        payload = {
            "batch_id": batch_id,
            "digest": batch_digest(route, data),
            "path": route.dapi_path,
            "body": raw.decode(),  # the sender's bytes (orjson already refused anything but UTF-8)
            "generation": route.generation,
            "kind": route.kind,
            "node_id": batch.node_id,
            "block_height": batch.block_height,
            "received_at": datetime.now(UTC),
            "source_ip": client,
            "items": items,
        }
        accepted = self._accepted[(route.generation, route.kind)]

        def handed_off(error: BaseException | None) -> None:
            if error is None:
                accepted.inc()
                ACCEPTED_ITEMS.inc(items)
            reply(error)

        self.handoff.submit(payload, len(raw), handed_off)
        return None

    def _refuse_known(self, route: CallbackRoute, block_height: int) -> None:
        if not self.refuse_at_door:
            return
        if route.generation == "v1" and self.windows.v1_refused():
            raise _Answer(503, "PoC v1 callbacks are disabled while poc_v2_enabled is set")
        if route.generation == "v2" and self.windows.closed(block_height, route.kind):
            phase = "generate" if route.kind == "generated" else "validate"
            raise _Answer(503, f"not in PoC {phase} phase")


def _validation_message(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors()[:3]:
        where = ".".join(str(p) for p in err.get("loc", ())) or "body"
        parts.append(f"{where}: {err.get('msg')}")
    return "invalid body: " + "; ".join(parts)


# --- HTTP ---------------------------------------------------------------------------------------------------------


class _Slot:
    """One request's place in its connection's answer order."""

    __slots__ = ("close", "data")

    def __init__(self, close: bool) -> None:
        self.close = close
        self.data: bytes | None = None


class _Connection(asyncio.Protocol):
    def __init__(self, server: DoorServer) -> None:
        self.server = server
        self.door = server.door
        self.max_body = server.door.max_body
        self.transport: asyncio.Transport | None = None
        self.client: str | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.slots: deque[_Slot] = deque()
        self.last_active = time.monotonic()
        self.reading = True
        self.in_request = False
        self.discarding = False  # a fatal error was answered: ignore whatever else arrives
        self._reset()

    def _reset(self) -> None:
        self.url = b""
        self.headers: Headers = []
        self.body: list[bytes] = []
        self.size = 0
        self.oversize = False

    # --- transport events -------------------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's transports are not subclasses
        peer = transport.get_extra_info("peername")
        self.client = peer[0] if isinstance(peer, tuple) else None
        self.server.connections.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.server.connections.discard(self)
        self.slots.clear()

    def data_received(self, data: bytes) -> None:
        if self.discarding:
            return
        self.last_active = time.monotonic()
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._fatal(400, "protocol upgrade not supported")
        except httptools.HttpParserError:
            self._fatal(400, "invalid HTTP request")

    def _fatal(self, status: int, error: str) -> None:
        _count(status)
        slot = _Slot(close=True)
        slot.data = _response(status, error, close=True)
        self.slots.append(slot)
        self.discarding = True
        self._flush()

    # --- parser callbacks (called from feed_data) ---------------------------------------------------------------

    def on_message_begin(self) -> None:
        self.in_request = True
        self._reset()

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name.lower(), value))

    def on_headers_complete(self) -> None:
        expect = False
        for name, value in self.headers:
            if name == b"content-length":
                with contextlib.suppress(ValueError):
                    if int(value) > self.max_body:
                        self.oversize = True
            elif name == b"expect" and value.lower() == b"100-continue":
                expect = True
        if expect and not self.oversize and not self.slots and self.transport is not None:
            self.transport.write(_CONTINUE)

    def on_body(self, body: bytes) -> None:
        self.size += len(body)
        if self.oversize or self.size > self.max_body:
            self.oversize = True
            self.body = []
            if self.size > _DISCARD_LIMIT * self.max_body:
                self._fatal(413, f"body larger than {self.max_body} bytes")
            return
        self.body.append(body)

    def on_message_complete(self) -> None:
        self.in_request = False
        if self.discarding:
            return
        parser = self.parser
        slot = _Slot(close=not parser.should_keep_alive())
        self.slots.append(slot)
        url = self.url
        if url[:1] == b"/":
            raw_path = url.split(b"?", 1)[0]
        else:  # absolute-form target
            try:
                raw_path = httptools.parse_url(url).path or b"/"
            except httptools.HttpParserInvalidURLError:
                raw_path = b""
        body = self.body[0] if len(self.body) == 1 else b"".join(self.body)
        reply = partial(self._answered, slot, time.perf_counter())
        try:
            result = self.door.handle(
                parser.get_method(), raw_path.decode("latin-1"), self.headers, body, self.client, self.oversize, reply
            )
        except Exception:  # a bug must answer 500, not pass for a malformed request
            log.exception("door failed on %r", raw_path[:200])
            result = 500, "internal error"
        if result is not None:
            status, error = result
            _count(status)
            slot.data = _response(status, error, close=slot.close)
            self._flush()
        if len(self.slots) >= _MAX_PIPELINED and self.reading and self.transport is not None:
            self.transport.pause_reading()
            self.reading = False

    # --- answers ------------------------------------------------------------------------------------------------

    def _answered(self, slot: _Slot, started: float, failure: BaseException | None) -> None:
        if failure is not None:
            status, error = 503, "relay cannot queue the batch right now"
        else:
            status, error = 200, ""
            ACCEPT_SECONDS.observe(time.perf_counter() - started)
        _count(status)
        slot.data = _response(status, error, close=slot.close)
        self._flush()

    def _flush(self) -> None:
        transport = self.transport
        if transport is None:
            return
        while self.slots and self.slots[0].data is not None:
            slot = self.slots.popleft()
            if transport.is_closing():
                self.slots.clear()
                return
            transport.write(slot.data)  # type: ignore[arg-type]
            if slot.close:
                transport.close()
                self.slots.clear()
                return
        if not self.reading and len(self.slots) < _MAX_PIPELINED // 2:
            self.reading = True
            transport.resume_reading()
        self.last_active = time.monotonic()

    @property
    def idle(self) -> bool:
        return not self.slots and not self.in_request


class DoorServer:
    """Listens for callbacks; closes idle keep-alive connections; on stop, answers what is in progress first."""

    def __init__(
        self, door: CallbackDoor, host: str, port: int, *, keepalive: float = 30.0, backlog: int = 2048
    ) -> None:
        self.door = door
        self.host = host
        self.port = port
        self.keepalive = keepalive
        self.backlog = backlog
        self.connections: set[_Connection] = set()
        self._server: asyncio.AbstractServer | None = None
        self._sweeper: asyncio.Task[None] | None = None

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: _Connection(self), self.host, self.port, backlog=self.backlog, reuse_address=True
        )
        self._sweeper = asyncio.create_task(self._sweep(), name="relay-door-sweeper")

    async def _sweep(self) -> None:
        # A connection silent for ``keepalive`` seconds is closed: idle keep-alives, and half-sent requests.
        while True:
            await asyncio.sleep(1.0)
            cutoff = time.monotonic() - self.keepalive
            for conn in list(self.connections):
                if conn.last_active < cutoff and not conn.slots and conn.transport is not None:
                    conn.transport.close()

    async def stop(self, grace: float = 5.0) -> None:
        if self._server is None:
            return
        self._server.close()
        if self._sweeper is not None:
            self._sweeper.cancel()
        deadline = time.monotonic() + grace
        while any(c.slots for c in self.connections) and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        for conn in list(self.connections):
            if conn.transport is not None:
                conn.transport.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._server.wait_closed(), 1.0)
        self._server = None
