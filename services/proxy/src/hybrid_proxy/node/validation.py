"""Validation requests (``enforced_tokens``) go to a rented GPU, never to the upstream (gonka-protocol.md §4).

``enforced_tokens`` is Gonka's vLLM extension; a third-party API ignores it and would answer with its own tokens,
which a validator would judge against. So such a request is forwarded, bytes unchanged, to a GPU slot the node front
reports ``up`` (Redis ``front:routes``: ``http://{host}:{gateway_inference_port}/v1/chat/completions``), and when no
slot is up the answer is a clear 503 — not a 400/422, which the dapi would count as a passed validation (§10).
"""

from __future__ import annotations

import itertools
import logging
import time
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson
from aiohttp import web
from redis.asyncio import Redis

from hybrid_proxy.node import metrics
from hybrid_proxy.node.errors import JSON, openai_error

log = logging.getLogger("hybrid.proxy.validation")

_REFUSAL_LOG_EVERY = 60.0  # the dapi may send many: one line a minute says it


@dataclass(frozen=True)
class SlotTarget:
    slot_id: str
    url: str


def is_validation(body: bytes) -> bool:
    """True when the request carries a top-level ``enforced_tokens``.

    The byte test is the hot path's only cost: inside a prompt the key's quotes would be escaped, so a request
    without the literal ``"enforced_tokens"`` is never one; a match is confirmed by parsing.
    """
    if b'"enforced_tokens"' not in body:
        return False
    try:
        parsed = orjson.loads(body)
    except orjson.JSONDecodeError:
        return False
    return isinstance(parsed, dict) and parsed.get("enforced_tokens") is not None


def no_validating_node(why: str) -> web.Response:
    return openai_error(
        503,
        "no validating node is available: this is an inference-only node without a GPU, and enforced_tokens "
        f"(validation) needs the model on a GPU it controls; {why}",
        code="no_validating_node",
        type_="service_unavailable",
        headers={"Retry-After": "30"},
    )


class ValidationRouter:
    def __init__(self, redis: Redis | None, routes_key: str, *, timeout: float) -> None:
        self.redis = redis
        self.routes_key = routes_key
        self.timeout = timeout
        self._session: aiohttp.ClientSession | None = None
        self._turn = itertools.count()
        self._refused = 0
        self._refusal_logged_at = float("-inf")

    async def start(self) -> None:
        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=self.timeout, sock_connect=5.0),
            cookie_jar=aiohttp.DummyCookieJar(),
            auto_decompress=True,
            trust_env=False,
        )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def ready_slots(self) -> list[SlotTarget]:
        """GPU slots whose route the front reports ``up``, in a rotating order."""
        if self.redis is None:
            return []
        raw: dict[Any, Any] = await self.redis.hgetall(self.routes_key)
        slots: list[SlotTarget] = []
        for slot_id, value in sorted(raw.items()):
            try:
                route = orjson.loads(value)
            except orjson.JSONDecodeError:
                continue
            if not isinstance(route, dict) or route.get("state") != "up":
                continue
            host, port = route.get("host"), route.get("gateway_inference_port")
            if not isinstance(host, str) or not isinstance(port, int):
                continue
            sid = slot_id.decode() if isinstance(slot_id, bytes) else str(slot_id)
            slots.append(SlotTarget(sid, f"http://{host}:{port}/v1/chat/completions"))
        if slots:
            k = next(self._turn) % len(slots)
            slots = slots[k:] + slots[:k]
        return slots

    async def forward(self, body: bytes) -> web.Response:
        try:
            slots = await self.ready_slots()
        except Exception as exc:
            log.warning("validation request: cannot read the node front's routes: %r", exc)
            metrics.VALIDATIONS.labels("no_slot").inc()
            return no_validating_node("the node front's routes cannot be read right now")
        if not slots:
            self._refused += 1
            now = time.monotonic()
            if now - self._refusal_logged_at >= _REFUSAL_LOG_EVERY:
                log.warning(
                    "validation requests refused with 503 (no GPU slot is up): %d since the last report", self._refused
                )
                self._refused = 0
                self._refusal_logged_at = now
            metrics.VALIDATIONS.labels("no_slot").inc()
            return no_validating_node("no rented GPU slot is up")
        assert self._session is not None
        last_error = ""
        for slot in slots:
            try:
                async with self._session.post(
                    slot.url, data=body, headers={"Content-Type": "application/json"}
                ) as resp:
                    data = await resp.read()
                    status = resp.status
                    ctype = resp.headers.get("Content-Type", JSON)
            except (aiohttp.ClientError, TimeoutError) as exc:
                last_error = f"{slot.slot_id}: {type(exc).__name__}"
                log.warning("validation request: GPU slot %s did not answer (%r); trying the next", slot.slot_id, exc)
                continue
            log.info("validation request answered by GPU slot %s: HTTP %d", slot.slot_id, status)
            metrics.VALIDATIONS.labels("forwarded").inc()
            return web.Response(status=status, body=data, headers={"Content-Type": ctype})
        metrics.VALIDATIONS.labels("slot_failed").inc()
        return no_validating_node(f"every GPU slot that was up failed to answer ({last_error})")
