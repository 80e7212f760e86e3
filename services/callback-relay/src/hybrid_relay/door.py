"""The public door: MLNode callbacks in, validated, durably queued, answered fast.

A plain ASGI application (served by uvicorn with httptools) rather than a FastAPI router: it has one hot route and
must answer thousands of batches a second on a 2-core VPS next to the broker; routing, validation and the envelope
are done by hand around the shared pydantic schemas (hybrid_common.messages.poc_batches).

Answers, as the dapi's callback server gives them (gonka-protocol.md §2, §7, §10): bad JSON → 400; a body that does
not fit the route's schema → 400 naming the field; too large → 413; valid → the batch is published as
``callback.forward`` and the broker's confirm awaited, **then** 200 with an empty body. When the relay already knows
the dapi would refuse, it answers as the dapi would: 503 on v1 routes while ``poc_v2_enabled`` is on, 503 for a v2
batch whose window has closed. A batch it cannot queue (broker away past the deadline) gets 503 so the sender keeps it
— the v1 sender waits forever on a hanging URL, the v2 sender times out after 10 s.
"""

from __future__ import annotations

import hashlib
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, MutableMapping
from datetime import UTC, datetime
from typing import Any

import orjson
from pydantic import ValidationError

from hybrid_common.bus import Publisher, PublishFailed, Unroutable
from hybrid_common.messages.poc_batches import BATCH_MODELS
from hybrid_relay.announcer import Announcer
from hybrid_relay.guard import DoorGuard, Refusal
from hybrid_relay.metrics import ACCEPT_SECONDS, ACCEPTED, ACCEPTED_ITEMS, DOOR_ANSWERS
from hybrid_relay.routes import CallbackRoute, parse_route
from hybrid_relay.windows import PocWindows
from hybrid_relay.wire import envelope

log = logging.getLogger("hybrid.relay.door")

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]

_JSON = [(b"content-type", b"application/json")]
_EMPTY_200 = {"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"0")]}


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


class CallbackDoor:
    def __init__(
        self,
        *,
        publisher: Publisher,
        announcer: Announcer,
        windows: PocWindows,
        guard: DoorGuard,
        max_body_bytes: int,
        publish_deadline: float,
        refuse_at_door: bool = True,
        accepted_events: bool = True,
    ) -> None:
        self.publisher = publisher
        self.announcer = announcer
        self.windows = windows
        self.guard = guard
        self.max_body = max_body_bytes
        self.publish_deadline = publish_deadline
        self.refuse_at_door = refuse_at_door
        self.accepted_events = accepted_events
        self.commands_exchange = publisher.topology.commands

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return  # lifespan is handled by the service, not the server
        status, error = 200, ""
        try:
            await self._handle(scope, receive)
        except _Answer as answer:
            status, error = answer.status, answer.error
        except Refusal as refusal:
            status, error = refusal.status, {401: "Unauthorized", 403: "Forbidden"}.get(refusal.status, "Not Found")
        DOOR_ANSWERS.labels(str(status)).inc()
        if status == 200:
            await send(_EMPTY_200)
            await send({"type": "http.response.body", "body": b""})
        else:
            await _send_error(send, status, error)

    async def _handle(self, scope: Scope, receive: Receive) -> None:
        started = time.perf_counter()
        raw_path = scope.get("raw_path") or scope["path"].encode()
        client = scope.get("client")
        path = self.guard.check(raw_path.decode("latin-1"), client[0] if client else None, scope["headers"])
        if scope["method"] == "GET" and path in ("/healthz", "/health"):
            raise _Answer(200, "")
        route = parse_route(path)
        if route is None:
            raise _Answer(404, "Not Found")
        if scope["method"] != "POST":
            raise _Answer(405, "Method Not Allowed")
        raw = await self._read_body(scope, receive)
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
        digest = batch_digest(route, data)
        batch_id = str(uuid.uuid4())  # also the envelope id: a publish retried through a reconnect keeps both
        _, message = envelope(
            "callback.forward",
            {
                "batch_id": batch_id,
                "digest": digest,
                "path": route.dapi_path,
                "body": raw.decode(),
                "generation": route.generation,
                "kind": route.kind,
                "node_id": batch.node_id,
                "block_height": batch.block_height,
                "received_at": datetime.now(UTC),
                "source_ip": client[0] if client else None,
            },
            env_id=batch_id,
            correlation_id=f"poc:{batch.block_height}",
        )
        try:
            await self.publisher.publish_raw(
                self.commands_exchange, "callback.forward", message, mandatory=True, deadline=self.publish_deadline
            )
        except (PublishFailed, Unroutable) as exc:
            log.error("batch not queued, answering 503: %s", exc)
            raise _Answer(503, "relay cannot queue the batch right now") from None
        ACCEPTED.labels(route.generation, route.kind).inc()
        ACCEPTED_ITEMS.inc(items)
        ACCEPT_SECONDS.observe(time.perf_counter() - started)
        if not self.accepted_events:
            return
        self.announcer.emit(
            "callback.accepted",
            {
                "batch_id": batch_id,
                "path": route.dapi_path,
                "generation": route.generation,
                "kind": route.kind,
                "node_id": batch.node_id,
                "block_height": batch.block_height,
                "items": items,
            },
            correlation_id=f"poc:{batch.block_height}",
        )

    def _refuse_known(self, route: CallbackRoute, block_height: int) -> None:
        if not self.refuse_at_door:
            return
        if route.generation == "v1" and self.windows.v1_refused():
            raise _Answer(503, "PoC v1 callbacks are disabled while poc_v2_enabled is set")
        if route.generation == "v2" and self.windows.closed(block_height, route.kind):
            phase = "generate" if route.kind == "generated" else "validate"
            raise _Answer(503, f"not in PoC {phase} phase")

    async def _read_body(self, scope: Scope, receive: Receive) -> bytes:
        for name, value in scope["headers"]:
            if name == b"content-length":
                try:
                    if int(value) > self.max_body:
                        raise _Answer(413, f"body larger than {self.max_body} bytes")
                except ValueError:
                    raise _Answer(400, "invalid Content-Length") from None
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise _Answer(400, "client went away")
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body:
                raise _Answer(413, f"body larger than {self.max_body} bytes")
            chunks.append(chunk)
            if not message.get("more_body", False):
                return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def _validation_message(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors()[:3]:
        where = ".".join(str(p) for p in err.get("loc", ())) or "body"
        parts.append(f"{where}: {err.get('msg')}")
    return "invalid body: " + "; ".join(parts)


async def _send_error(send: Send, status: int, error: str) -> None:
    body = orjson.dumps({"error": error})
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [*_JSON, (b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body})
