"""The inference-only ML node: one aiohttp application on the node port (``port("proxy.node")``).

Why aiohttp.web: the next issue demands ≥ 5,000 req/s (≥ 2,000 streaming) from one worker; on this machine bare
aiohttp.web measured ~6,500 / ~4,500 against Starlette + aiohttp client ~6,000 / ~2,100 and FastAPI + httpx ~450
(the team's figures, issue #10). So: aiohttp server, no middleware (the source allowlist wraps handlers only when
configured), exact routes resolved from aiohttp's index, and generations sent upstream through the lean keep-alive
pool of ``upstream_pool`` (aiohttp's client cost over half of the CPU per request: ~0.19 → ~0.09 ms, issue #10).

Version prefixes (gonka-protocol.md §1): the dapi calls ``/{version}/api/v1/...`` and ``/{version}/v1/...``, and
whatever answers for a node must accept both prefixed and bare paths. Bare paths are ordinary routes; everything
else lands in one catch-all that strips a ``/vX.Y.Z`` segment (at least one dot — ``/v1/...`` is an OpenAI path, not
a version; the node front uses the same rule) and dispatches from the same table, or answers 404/405.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from aiohttp import web
from redis.asyncio import Redis

from hybrid_common.redis_keys import RedisKeys
from hybrid_proxy.node.control import ControlRoutes
from hybrid_proxy.node.errors import JSON, detail
from hybrid_proxy.node.health import UpstreamHealth
from hybrid_proxy.node.inbound import SourceGuard
from hybrid_proxy.node.model_map import ModelMap
from hybrid_proxy.node.openai_routes import OpenAIRoutes
from hybrid_proxy.node.openapi import document
from hybrid_proxy.node.record import NodeRecord
from hybrid_proxy.node.registration import Publish, SelfRegistration, desired_registration
from hybrid_proxy.node.upstream import UpstreamClient, UpstreamConfig
from hybrid_proxy.node.validation import ValidationRouter
from hybrid_proxy.settings import ProxySettings

log = logging.getLogger("hybrid.proxy.node")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
_VERSION_PREFIX = re.compile(r"^/v\d+(?:\.\d+)+(?:[-+][0-9A-Za-z.\-]*)?(?=/)")
_SHUTDOWN_GRACE = 10.0  # seconds open requests get to finish on SIGTERM


class InferenceNode:
    """Start with :meth:`start`, stop with :meth:`stop`; ``port`` is the bound node port."""

    def __init__(
        self,
        settings: ProxySettings,
        *,
        redis: Redis | None = None,
        publish: Publish | None = None,
    ) -> None:
        self.settings = settings
        self.redis = redis
        self.publish = publish
        self.keys = RedisKeys(settings.namespace)
        self.model_map = ModelMap(settings.model_map)
        self.upstream = UpstreamClient(
            UpstreamConfig(
                base_url=str(settings.upstream_url),
                api_key=settings.upstream_key(),
                connect_timeout=settings.upstream_connect_timeout,
                read_timeout=settings.upstream_read_timeout,
                retries=settings.upstream_retries,
                retry_backoff=settings.upstream_retry_backoff,
                retry_after_cap=settings.upstream_retry_after_cap,
                pool_size=settings.upstream_pool_size,
                keepalive_seconds=settings.upstream_keepalive_seconds,
            )
        )
        self.health = UpstreamHealth(self.upstream, ttl=settings.health_ttl(), timeout=settings.health_timeout)
        self.record = NodeRecord(redis, self.keys.proxy_node(), settings.node_id)
        self.validation = ValidationRouter(redis, self.keys.front_routes(), timeout=settings.validation_timeout)
        self.guard = SourceGuard(settings.allowed_sources)
        self.openai = OpenAIRoutes(
            upstream=self.upstream,
            model_map=self.model_map,
            validation=self.validation,
            configured_models=settings.models,
            max_request_bytes=settings.max_request_bytes,
            tokenize_url=settings.tokenize_url,
            log_bodies=settings.log_bodies,
        )
        self.control = ControlRoutes(
            record=self.record,
            upstream=self.upstream,
            health=self.health,
            model_map=self.model_map,
            configured_models=settings.models,
            on_change=self.record.save,
            models_timeout=max(settings.health_timeout, 5.0),
        )
        self.registration: SelfRegistration | None = None
        self._table: dict[str, dict[str, Handler]] = {}
        self._runner: web.AppRunner | None = None
        self.port = 0
        self.inference_port: int | None = None
        self._openapi = orjson.dumps(document())

    # --- the application --------------------------------------------------------------------------------------

    def build(self) -> web.Application:
        app = web.Application(client_max_size=self.settings.max_request_bytes)
        routes: list[tuple[str, str, Handler]] = [
            *self.openai.routes(),
            *self.control.routes(),
            ("GET", "/openapi.json", self.openapi),
        ]
        for method, path, handler in routes:
            guarded = self.guard.wrap(handler)
            self._table.setdefault(path, {})[method] = guarded
            app.router.add_route(method, path, guarded)
        app.router.add_route("*", "/{tail:.*}", self.guard.wrap(self.fallback))
        return app

    async def fallback(self, request: web.Request) -> web.StreamResponse:
        """Version-prefixed paths, and the 404/405 answers."""
        path = request.path
        m = _VERSION_PREFIX.match(path)
        if m is not None:
            bare = path[m.end() :]
            methods = self._table.get(bare)
            if methods is not None:
                handler = methods.get(request.method)
                if handler is not None:
                    return await handler(request)
                return self._not_allowed(request, methods)
        methods = self._table.get(path.rstrip("/") or "/")
        if methods is not None:
            handler = methods.get(request.method)
            if handler is not None:  # a trailing slash
                return await handler(request)
            return self._not_allowed(request, methods)
        return detail("Not Found", 404)

    @staticmethod
    def _not_allowed(request: web.Request, methods: dict[str, Handler]) -> web.Response:
        response = detail("Method Not Allowed", 405)
        response.headers["Allow"] = ", ".join(sorted(methods))
        return response

    async def openapi(self, request: web.Request) -> web.Response:
        return web.Response(body=self._openapi, content_type=JSON)

    # --- lifecycle --------------------------------------------------------------------------------------------

    async def start(self) -> None:
        s = self.settings
        if s.restore_state and await self.record.restore():
            log.info("restored state INFERENCE (%s) from %s", self.record.loaded_model, self.record.key)
        await self.upstream.start()
        await self.validation.start()
        self._runner = web.AppRunner(
            self.build(),
            handler_cancellation=True,  # a client that goes away cancels its handler: the upstream call is closed
            access_log=None,
            shutdown_timeout=_SHUTDOWN_GRACE,
        )
        await self._runner.setup()
        site = web.TCPSite(self._runner, s.listen_host, s.node_port, backlog=2048)
        await site.start()
        self.port = _bound_port(site)
        if s.inference_port is not None and s.inference_port != s.node_port:
            extra = web.TCPSite(self._runner, s.listen_host, s.inference_port, backlog=2048)
            await extra.start()
            self.inference_port = _bound_port(extra)
        log.info(
            "inference-only node on %s:%d%s -> upstream %s (models %s%s)",
            s.listen_host,
            self.port,
            f" and :{self.inference_port}" if self.inference_port else "",
            s.upstream_url,
            s.models,
            f", map {self.model_map.dapi_to_upstream}" if self.model_map else "",
        )
        if self.guard.open:
            log.warning(
                "PROXY_ALLOWED_SOURCES is empty: the node accepts requests from anyone who reaches port %d "
                "(the dapi sends no credentials; set it to the dapi's address)",
                self.port,
            )
        else:
            log.info("node accepts requests only from %s", self.guard.describe())
        await self.record.save()
        if s.self_register:
            poc_port, inference_port = s.registered_ports(self.port, self.inference_port)
            self.registration = SelfRegistration(
                admin_url=str(s.dapi_admin_url),
                desired=desired_registration(
                    node_id=s.node_id,
                    host=s.registered_host,
                    poc_port=poc_port,
                    inference_port=inference_port,
                    models=s.models,
                    max_concurrent=s.max_concurrent,
                    hardware_type=s.hardware_type,
                    hardware_count=s.hardware_count,
                ),
                record=self.record,
                interval=s.registration_interval(),
                publish=self.publish,
            )
            self.registration.start()

    async def stop(self) -> None:
        if self.registration is not None:
            await self.registration.stop()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        await self.validation.close()
        await self.upstream.close()

    def status(self) -> dict[str, Any]:
        """The node's view for ``/status`` on the metrics port."""
        known = self.health.known()
        return {
            **self.record.snapshot(),
            "port": self.port,
            "inference_port": self.inference_port,
            "upstream": str(self.settings.upstream_url),
            "upstream_healthy": None if known is None else known.healthy,
            "models": self.settings.models,
            "model_map": self.model_map.dapi_to_upstream,
            "allowed_sources": self.guard.describe(),
        }


def _bound_port(site: web.TCPSite) -> int:
    server = site._server
    sockets = getattr(server, "sockets", None) or []
    for sock in sockets:
        return int(sock.getsockname()[1])
    return 0
