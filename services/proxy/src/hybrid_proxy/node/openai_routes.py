"""The OpenAI-compatible routes: the hot path (``/v1/chat/completions``, ``/v1/completions``), ``/v1/models``,
``/tokenize``.

Bytes pass through (inference-proxy.md "practices for speed"): the request body goes upstream unchanged (only the
model id renamed in place when a model map is set), so ``logprobs``, ``top_logprobs``, ``seed``, ``stream_options``
and the dapi's own fields (gonka-protocol.md §4) reach the upstream as sent; the answer comes back as the upstream's
bytes — a JSON body whole, an SSE stream chunk by chunk as it arrives, never re-chunked or re-serialized. With a
model map the stream is cut at line ends so a model string split across two reads is still renamed.

Failures before the first byte become OpenAI-style errors with the right status (502 unreachable, 504 timeout,
the upstream's own 429/5xx); after the first byte nothing can be retried or re-said, so a broken upstream stream
breaks the client's stream too (it must not look complete). A client that goes away cancels the handler
(``handler_cancellation``) and the upstream response is closed in ``finally``: the upstream sees the disconnect.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

import aiohttp
import orjson
from aiohttp import web

from hybrid_proxy.node import metrics
from hybrid_proxy.node.errors import JSON, json_response, openai_error, openai_error_body, too_large
from hybrid_proxy.node.model_map import ModelMap
from hybrid_proxy.node.tokens import estimate, scan_usage
from hybrid_proxy.node.upstream import Answer, UpstreamClient, UpstreamFailure
from hybrid_proxy.node.upstream_pool import UpstreamConnectionError
from hybrid_proxy.node.validation import ValidationRouter, is_validation

log = logging.getLogger("hybrid.proxy.inference")

_SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}  # never buffered by a reverse proxy
_MODELS_CREATED = 1_735_689_600


def _count_usage(data: bytes) -> None:
    usage = scan_usage(data)
    if usage is not None:
        metrics.PROMPT_TOKENS.inc(usage[0])
        metrics.COMPLETION_TOKENS.inc(usage[1])


def _error_body(status: int, data: bytes) -> bytes:
    """The upstream's error as sent when it is OpenAI-shaped, else wrapped into that shape with the same status."""
    try:
        parsed = orjson.loads(data)
    except orjson.JSONDecodeError:
        parsed = None
    if isinstance(parsed, dict) and isinstance(parsed.get("error"), dict):
        return data
    if isinstance(parsed, dict):
        said = parsed.get("detail") or parsed.get("message") or parsed.get("error") or parsed
        text = said if isinstance(said, str) else orjson.dumps(said).decode()
    else:
        text = data[:300].decode(errors="replace").strip()
    return openai_error_body(
        status, f"upstream answered HTTP {status}: {text}" if text else f"upstream answered HTTP {status}"
    )


class OpenAIRoutes:
    def __init__(
        self,
        *,
        upstream: UpstreamClient,
        model_map: ModelMap,
        validation: ValidationRouter,
        configured_models: list[str],
        max_request_bytes: int,
        tokenize_url: str | None = None,
        log_bodies: bool = False,
    ) -> None:
        self.upstream = upstream
        self.model_map = model_map
        self.validation = validation
        self.max_request_bytes = max_request_bytes
        self.tokenize_url = tokenize_url
        self.log_bodies = log_bodies
        self.models_body = orjson.dumps(
            {
                "object": "list",
                "data": [
                    {
                        "id": m,
                        "object": "model",
                        "created": _MODELS_CREATED,
                        "owned_by": "gonka-hybrid-proxy",
                        "root": model_map.upstream_name(m),
                    }
                    for m in configured_models
                ],
            }
        )

    def routes(self) -> list[tuple[str, str, Callable[[web.Request], Awaitable[web.StreamResponse]]]]:
        return [
            ("POST", "/v1/chat/completions", self.chat_completions),
            ("POST", "/v1/completions", self.completions),
            ("GET", "/v1/models", self.models),
            ("POST", "/tokenize", self.tokenize),
            ("POST", "/v1/tokenize", self.tokenize),
        ]

    # --- generation (the hot path) ---------------------------------------------------------------------------

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generation(request, "/chat/completions", "chat")

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generation(request, "/completions", "completions")

    async def _generation(self, request: web.Request, path: str, route: str) -> web.StreamResponse:
        loop = asyncio.get_running_loop()
        started = loop.time()
        try:
            body = await request.read()
        except web.HTTPRequestEntityTooLarge:
            metrics.requests(route, 413).inc()
            return too_large(self.max_request_bytes)
        if self.log_bodies:
            log.debug("%s body: %s", route, body[:4000].decode(errors="replace"))
        if route == "chat" and is_validation(body):
            response = await self.validation.forward(body)
            metrics.requests("validation", response.status).inc()
            return response
        if self.model_map:
            body = self.model_map.request(body)
        sent_at = loop.time()
        try:
            answer = await self.upstream.exchange(path, body)
        except UpstreamFailure as exc:
            log.warning("%s: %s", route, exc.message)
            metrics.requests(route, exc.status).inc()
            return openai_error(exc.status, exc.message, code=exc.code)
        if answer.stream is not None:
            return await self._relay_stream(request, answer, route, started, sent_at)
        data = answer.body or b""
        status = answer.status
        headers: dict[str, str] = {"Content-Type": answer.content_type}
        if status < 400:
            if self.model_map:
                data = self.model_map.response(data)
            _count_usage(data)
        else:
            data = _error_body(status, data)
            headers["Content-Type"] = JSON
            if answer.retry_after:
                headers["Retry-After"] = answer.retry_after
            log.info("%s: upstream answered HTTP %d", route, status)
        response = web.Response(status=status, body=data, headers=headers)
        done = loop.time()
        metrics.requests(route, status).inc()
        metrics.added_latency(route).observe((sent_at - started) + (done - answer.received_at))
        metrics.ttfb(route).observe(done - started)
        return response

    async def _relay_stream(
        self, request: web.Request, answer: Answer, route: str, started: float, sent_at: float
    ) -> web.StreamResponse:
        loop = asyncio.get_running_loop()
        upstream = answer.stream
        assert upstream is not None
        out = web.StreamResponse(status=answer.status, headers={"Content-Type": answer.content_type, **_SSE_HEADERS})
        mm = self.model_map
        complete = False
        last = previous = b""
        metrics.STREAMS_OPEN.inc()
        try:
            await out.prepare(request)
            first_at = loop.time()
            metrics.added_latency(route).observe((sent_at - started) + (first_at - answer.received_at))
            carry = b""
            first = True
            async for chunk in upstream:  # the bytes of each socket read, unparsed
                if mm:
                    chunk = carry + chunk
                    cut = chunk.rfind(b"\n") + 1
                    carry = chunk[cut:]
                    if not cut:
                        continue
                    chunk = mm.response(chunk[:cut])
                await out.write(chunk)
                if first:
                    metrics.ttfb(route).observe(loop.time() - started)
                    first = False
                previous, last = last, chunk
            if carry:
                await out.write(mm.response(carry))
                previous, last = last, carry
            await out.write_eof()
            complete = True
            metrics.requests(route, answer.status).inc()
        except (UpstreamConnectionError, TimeoutError) as exc:
            # The upstream broke off mid-stream: nothing can be retried after bytes went out. Drop the client's
            # connection too, so the stream cannot pass for a complete one.
            log.warning("%s: upstream stream broke off: %r", route, exc)
            metrics.upstream_error("broken_stream").inc()
            metrics.requests(route, 502).inc()
            if request.transport is not None:
                request.transport.abort()
        except (ConnectionResetError, asyncio.CancelledError):
            metrics.CLIENT_DISCONNECTS.inc()
            metrics.requests(route, 499).inc()  # nginx's "client closed request"
            raise
        finally:
            metrics.STREAMS_OPEN.dec()
            if complete:
                upstream.release()
            else:
                upstream.close()  # the upstream sees the connection go: its generation stops
            if previous or last:
                _count_usage(previous + last)
        return out

    # --- models and tokenize --------------------------------------------------------------------------------

    async def models(self, request: web.Request) -> web.Response:
        metrics.requests("models", 200).inc()
        return web.Response(body=self.models_body, content_type=JSON)

    async def tokenize(self, request: web.Request) -> web.Response:
        """``{"model","prompt"}`` → ``{"count": N}`` (gonka-protocol.md §4: asked only when usage says 0 prompt tokens).

        Hosted providers have no tokenize route; unless ``PROXY_TOKENIZE_URL`` names a real one, the count is an
        estimate (see :mod:`hybrid_proxy.node.tokens`)."""
        try:
            raw = await request.read()
        except web.HTTPRequestEntityTooLarge:
            return too_large(self.max_request_bytes)
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError:
            return openai_error(400, 'the body must be JSON: {"model": str, "prompt": str | list}', code="invalid_json")
        if not isinstance(body, dict) or ("prompt" not in body and "messages" not in body):
            return openai_error(400, "expected a JSON object with 'prompt' (or 'messages')", code="missing_prompt")
        if self.tokenize_url:
            counted = await self._tokenize_remote(raw)
            if counted is not None:
                return json_response({"count": counted, "estimated": False})
        prompt = body.get("prompt", body.get("messages"))
        metrics.requests("tokenize", 200).inc()
        return json_response({"count": estimate(prompt), "estimated": True})

    async def _tokenize_remote(self, raw: bytes) -> int | None:
        assert self.tokenize_url is not None
        started = time.monotonic()
        try:
            async with self.upstream.session.post(
                self.tokenize_url, data=raw, headers={"Content-Type": JSON}, timeout=aiohttp.ClientTimeout(total=10)
            ) as resp:
                if resp.status != 200:
                    log.warning("tokenize at %s answered HTTP %d; estimating", self.tokenize_url, resp.status)
                    return None
                parsed = orjson.loads(await resp.read())
        except (aiohttp.ClientError, TimeoutError, orjson.JSONDecodeError) as exc:
            log.warning(
                "tokenize at %s failed (%r) after %.1fs; estimating", self.tokenize_url, exc, time.monotonic() - started
            )
            return None
        count = parsed.get("count") if isinstance(parsed, dict) else None
        return count if isinstance(count, int) else None
