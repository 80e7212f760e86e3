"""The upstream's HTTP surface: ``/v1/chat/completions``, ``/v1/completions``, ``/v1/models`` and ``/_sim/...``.

The hot path (a cached non-streaming completion) is kept short on purpose: the simulator must never be a
benchmark's bottleneck (issue #5: ≥ 5,000 req/s at concurrency 32 on this machine). Response bytes are a
pure function of (route, request body, server seed), so they are rendered once and served from an LRU cache.

Test controls (no auth; also reachable in-process through ``RunningUpstream.state``):

- ``GET /_sim/stats`` → requests, ``by_status``, ``by_path``, completion tokens, streams
  (``opened``/``open``/``completed``/``client_disconnect``/``fault_disconnect``) and the last 32 stream records
  (``opened_at``/``closed_at`` wall times, ``outcome``, ``steps_sent``)
- ``GET /_sim/requests?limit=N`` → the last requests as received: method, path, headers, body
- ``GET|POST /_sim/config`` → ``latency_ms``, ``ttft_ms``, ``tokens_per_s``, ``rate_limit_per_min`` (live)
- ``GET|POST|DELETE /_sim/faults`` → queue ``{"kind": "status", "status": 503, "count": 2}``,
  ``{"kind": "disconnect", "after_tokens": 3}``, ``{"kind": "stall", "seconds": 3}`` (see ``controls.Fault``)
- ``POST /_sim/reset`` → counters, request log, faults and rate-limit windows cleared
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from typing import Any

import orjson
from aiohttp import web

from hybrid_common import TimeProfile
from sim.upstream.controls import Fault, FaultQueue, ReceivedRequest, StreamOutcome, UpstreamSettings, UpstreamStats
from sim.upstream.errors import ApiError, invalid, rate_limited, server_error, unauthorized
from sim.upstream.ratelimit import SlidingWindowLimiter
from sim.upstream.rendering import Rendered, render
from sim.upstream.validation import GenerationKind, parse_generation

CHAT_PATH = "/v1/chat/completions"
COMPLETIONS_PATH = "/v1/completions"
MODELS_PATH = "/v1/models"
_MODELS_CREATED = 1_735_689_600
_CACHE_ENTRIES = 4096
_CACHE_BYTES = 64 * 1024 * 1024  # a benchmark sending unique prompts must not grow the simulator without bound
_JSON = "application/json"
_JSON_HEADERS = {"Content-Type": _JSON}


class UpstreamState:
    """Configuration, live controls and observations of one running upstream."""

    def __init__(
        self,
        *,
        api_key: str,
        models: list[str],
        settings: UpstreamSettings,
        profile: TimeProfile,
        seed: int,
    ) -> None:
        self.api_key = api_key
        self.bearer = f"Bearer {api_key}"
        self.models = tuple(models)
        self.model_set = frozenset(models)
        self.settings = settings
        self.profile = profile
        self.seed = seed
        self.faults = FaultQueue()
        self.stats = UpstreamStats()
        # inference-proxy.md: limits are per minute; one real minute, scaled like every real-world interval.
        self.limiter = SlidingWindowLimiter(settings.rate_limit_per_min, profile.scale(60.0))
        self._cache: OrderedDict[tuple[GenerationKind, bytes], Rendered | ApiError] = OrderedDict()
        self._cache_bytes = 0
        self.models_body = orjson.dumps(
            {
                "object": "list",
                "data": [
                    {"id": m, "object": "model", "created": _MODELS_CREATED, "owned_by": "sim-upstream"}
                    for m in self.models
                ],
            }
        )

    def configure(self, changes: dict[str, Any]) -> dict[str, Any]:
        self.settings.update(changes)
        self.limiter.limit = self.settings.rate_limit_per_min
        return self.settings_json()

    def settings_json(self) -> dict[str, Any]:
        s = self.settings
        return {
            "latency_ms": s.latency_ms,
            "ttft_ms": s.ttft_ms,
            "tokens_per_s": s.tokens_per_s,
            "rate_limit_per_min": s.rate_limit_per_min,
            "rate_window_s": self.limiter.window_s,
            "models": list(self.models),
            "seed": self.seed,
        }

    def inject(self, fault: Fault) -> None:
        self.faults.add(fault)

    def reset(self) -> None:
        self.stats.reset()
        self.faults.clear()
        self.limiter.reset()

    def rendered(self, kind: GenerationKind, body: bytes) -> Rendered | ApiError:
        key = (kind, body)
        cache = self._cache
        hit = cache.get(key)
        if hit is not None:
            cache.move_to_end(key)
            return hit
        result: Rendered | ApiError
        try:
            result = render(parse_generation(kind, body, self.model_set, self.seed))
        except ApiError as e:
            result = e
        cache[key] = result
        self._cache_bytes += _footprint(key, result)
        while len(cache) > _CACHE_ENTRIES or self._cache_bytes > _CACHE_BYTES:
            old_key, old = cache.popitem(last=False)
            self._cache_bytes -= _footprint(old_key, old)
        return result


def _footprint(key: tuple[GenerationKind, bytes], value: Rendered | ApiError) -> int:
    if isinstance(value, ApiError):
        return len(key[1]) + 256
    body = value.json_body if value.json_body is not None else value.stream.whole if value.stream else b""
    return len(key[1]) + len(body)


def _abort(request: web.Request) -> None:
    """Drop the TCP connection without a response (a provider's load balancer resetting it)."""
    transport = request.transport
    if transport is not None:
        transport.abort()


class UpstreamApp:
    def __init__(self, state: UpstreamState) -> None:
        self.state = state

    def build(self) -> web.Application:
        app = web.Application(client_max_size=32 * 1024 * 1024)
        app.router.add_post(CHAT_PATH, self.chat_completions)
        app.router.add_post(COMPLETIONS_PATH, self.completions)
        app.router.add_get(MODELS_PATH, self.list_models)
        app.router.add_get("/_sim/health", self.sim_health)
        app.router.add_get("/_sim/stats", self.sim_stats)
        app.router.add_get("/_sim/requests", self.sim_requests)
        app.router.add_get("/_sim/config", self.sim_config)
        app.router.add_post("/_sim/config", self.sim_config)
        app.router.add_get("/_sim/faults", self.sim_faults)
        app.router.add_post("/_sim/faults", self.sim_faults)
        app.router.add_delete("/_sim/faults", self.sim_faults)
        app.router.add_post("/_sim/reset", self.sim_reset)
        return app

    # -- OpenAI routes -------------------------------------------------------------------------

    def _error(self, error: ApiError) -> web.Response:
        self.state.stats.by_status[error.status] += 1
        return web.Response(status=error.status, body=error.body(), content_type=_JSON, headers=error.headers)

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generation(request, "chat", CHAT_PATH)

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generation(request, "completion", COMPLETIONS_PATH)

    async def list_models(self, request: web.Request) -> web.Response:
        st = self.state
        st.stats.requests += 1
        st.stats.by_path[MODELS_PATH] += 1
        if request.headers.get("Authorization") != st.bearer:
            return self._error(unauthorized())
        st.stats.by_status[200] += 1
        return web.Response(body=st.models_body, content_type=_JSON)

    async def _generation(self, request: web.Request, kind: GenerationKind, path: str) -> web.StreamResponse:
        st = self.state
        stats = st.stats
        stats.requests += 1
        stats.by_path[path] += 1
        body = await request.read()
        stats.received.append(ReceivedRequest(time.time(), request.method, path, request.raw_headers, body))
        auth = request.headers.get("Authorization")
        if auth != st.bearer:
            return self._error(unauthorized())
        fault = st.faults.take() if st.faults else None
        if fault is not None:
            if fault.kind == "status":
                error = server_error(fault.status, fault.message)
                if fault.retry_after is not None:
                    error.headers["Retry-After"] = f"{fault.retry_after:g}"
                return self._error(error)
            if fault.kind == "stall":
                await asyncio.sleep(fault.seconds)
        if not st.limiter.allow(auth):
            return self._error(rate_limited(st.limiter.limit or 0))
        rendered = st.rendered(kind, body)
        if isinstance(rendered, ApiError):
            return self._error(rendered)
        disconnect_after = fault.after_tokens if fault is not None and fault.kind == "disconnect" else None
        if rendered.json_body is not None:
            return await self._send_json(request, rendered, rendered.json_body, disconnect_after is not None)
        return await self._send_stream(request, rendered, path, disconnect_after)

    async def _send_json(self, request: web.Request, rendered: Rendered, body: bytes, disconnect: bool) -> web.Response:
        s = self.state.settings
        delay = s.latency_ms + s.ttft_ms
        if s.tokens_per_s:
            delay += 1000.0 * rendered.completion_tokens / s.tokens_per_s
        if delay > 0:
            await asyncio.sleep(delay / 1000.0)
        if disconnect:
            _abort(request)
            self.state.stats.by_status[0] += 1  # no status: the connection was dropped
            return web.Response(status=500)
        stats = self.state.stats
        stats.by_status[200] += 1
        stats.completion_tokens += rendered.completion_tokens
        return web.Response(body=body, headers=_JSON_HEADERS)

    async def _send_stream(
        self, request: web.Request, rendered: Rendered, path: str, disconnect_after: int | None
    ) -> web.StreamResponse:
        st = self.state
        s = st.settings
        plan = rendered.stream
        assert plan is not None
        if s.latency_ms:
            await asyncio.sleep(s.latency_ms / 1000.0)
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        record = st.stats.open_stream(path, rendered.model)
        st.stats.by_status[200] += 1
        # Until the stream completes, an exit means the client went away (a failed write, or aiohttp
        # cancelling the handler when the connection closes: handler_cancellation=True).
        outcome: StreamOutcome = "client_disconnect"
        try:
            await resp.prepare(request)
            tps, ttft = s.tokens_per_s, s.ttft_ms
            if not tps and not ttft and disconnect_after is None:
                await resp.write(plan.whole)
                record.steps_sent = len(plan.steps)
            else:
                if ttft:
                    await asyncio.sleep(ttft / 1000.0)
                loop = asyncio.get_running_loop()
                started = loop.time()
                head = plan.head
                for i, step in enumerate(plan.steps):
                    if disconnect_after is not None and i >= disconnect_after:
                        outcome = "fault_disconnect"
                        _abort(request)
                        return resp
                    if tps and i:
                        wait = started + i / tps - loop.time()
                        if wait > 0:
                            await asyncio.sleep(wait)
                    await resp.write(head + step)
                    head = b""
                    record.steps_sent = i + 1
                if disconnect_after is not None:
                    # Cut after every token but before finish_reason / usage / [DONE].
                    outcome = "fault_disconnect"
                    _abort(request)
                    return resp
                await resp.write(head + plan.tail)
            await resp.write_eof()
            st.stats.completion_tokens += rendered.completion_tokens
            outcome = "completed"
        except ConnectionResetError:
            outcome = "client_disconnect"
        finally:
            st.stats.close_stream(record, outcome)
        return resp

    # -- /_sim control routes ------------------------------------------------------------------

    async def sim_health(self, request: web.Request) -> web.Response:
        return web.json_response({"ok": True})

    async def sim_stats(self, request: web.Request) -> web.Response:
        return web.json_response(self.state.stats.snapshot())

    async def sim_requests(self, request: web.Request) -> web.Response:
        limit = int(request.query.get("limit", "50"))
        out: list[dict[str, Any]] = []
        for r in list(self.state.stats.received)[-limit:]:
            try:
                body: Any = orjson.loads(r.body)
            except orjson.JSONDecodeError:
                body = r.body.decode(errors="replace")
            out.append({"at": r.at, "method": r.method, "path": r.path, "headers": r.headers(), "body": body})
        return web.json_response(out)

    async def sim_config(self, request: web.Request) -> web.Response:
        if request.method == "POST":
            try:
                return web.json_response(self.state.configure(await request.json()))
            except (ValueError, TypeError) as e:
                return self._error(invalid(str(e)))
        return web.json_response(self.state.settings_json())

    async def sim_faults(self, request: web.Request) -> web.Response:
        if request.method == "POST":
            try:
                self.state.inject(Fault.from_json(await request.json()))
            except (ValueError, TypeError) as e:
                return self._error(invalid(str(e)))
        elif request.method == "DELETE":
            self.state.faults.clear()
        return web.json_response(self.state.faults.pending())

    async def sim_reset(self, request: web.Request) -> web.Response:
        self.state.reset()
        return web.json_response({"ok": True})
