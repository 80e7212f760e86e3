"""The proxy service: the inference-only node, the node front, the bus, the metrics/status port, the heartbeat.

Order matters for a 24/7 inference path: the node starts first and serves even while RabbitMQ or Redis are down
(the bus is connected in the background with retries; the Redis view is best effort). The node front — rented GPU
gateways, fed by events — starts once the bus is up. ``NodeFront`` is imported at start, before the node serves (the
import takes about a second of CPU, which must not stall the node's answers), and only if its module exists: without
it the service runs the inference node alone and says so.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import logging
import os
import socket
import time
from typing import Any, Protocol, cast

import aio_pika
import orjson
from aio_pika.abc import AbstractRobustConnection
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from redis.asyncio import Redis

from hybrid_common.bus import Publisher
from hybrid_common.messages import Event
from hybrid_common.metrics import REGISTRY
from hybrid_common.redis_keys import RedisKeys
from hybrid_common.topology import OWNER_QUEUES, SUBSCRIPTIONS, Topology
from hybrid_proxy.node import InferenceNode
from hybrid_proxy.settings import ProxySettings

log = logging.getLogger("hybrid.proxy")

SOURCE = "proxy"
HEARTBEAT_SECONDS = 10.0
HEARTBEAT_TTL = 30
_UNPUBLISHED_KEPT = 16
_CONNECT_TIMEOUT = 20.0  # a broker that accepts TCP but never speaks AMQP must not stall the retry loop


class Front(Protocol):
    async def start(self) -> None: ...
    async def stop(self) -> None: ...
    def status(self) -> dict[str, Any]: ...


class ProxyService:
    def __init__(self, settings: ProxySettings) -> None:
        self.settings = settings
        self.topology = Topology(settings.namespace)
        self.keys = RedisKeys(settings.namespace)
        self.redis: Redis = Redis.from_url(settings.redis_url, socket_timeout=3.0, socket_connect_timeout=3.0)
        self.node = InferenceNode(settings, redis=self.redis, publish=self._publish)
        self.connection: AbstractRobustConnection | None = None
        self._connecting: aio_pika.RobustConnection | None = None
        self._unpublished: list[Event] = []
        self.publisher: Publisher | None = None
        self.front: Front | None = None
        self._front_class: Any = None
        self.front_state = "not started"
        self.instance = f"{socket.gethostname()}-{os.getpid()}"
        self._tasks: list[asyncio.Task[None]] = []
        self._status_runner: web.AppRunner | None = None
        self.metrics_port = 0

    # --- lifecycle ----------------------------------------------------------------------------------------------

    async def start(self) -> None:
        # The front's module (asyncssh, cryptography, ...) takes about a second of CPU to import. Imported on the
        # running loop once the node is registered, it stalls the node's answers; the dapi's state poll then times
        # out and marks the node FAILED (gonka-protocol.md §9). So it is imported before the node serves.
        self._front_class = self._load_front()
        await self.node.start()
        await self._serve_status()
        self._tasks.append(asyncio.create_task(self._bus(), name="proxy-bus"))
        self._tasks.append(asyncio.create_task(self._heartbeat(), name="proxy-heartbeat"))

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if self.front is not None:
            try:
                await self.front.stop()
            except Exception:
                log.exception("node front did not stop cleanly")
        await self.node.stop()
        if self._status_runner is not None:
            await self._status_runner.cleanup()
        for connection in {c for c in (self.connection, self._connecting) if c is not None}:
            with contextlib.suppress(Exception):
                await connection.close()
        with contextlib.suppress(Exception):
            await self.redis.delete(self.keys.status(SOURCE, self.instance))
        with contextlib.suppress(Exception):
            await self.redis.aclose()

    # --- the bus and the node front -------------------------------------------------------------------------------

    async def _connect(self) -> AbstractRobustConnection:
        """``hybrid_common.bus.connect``'s robust connection, with a per-attempt timeout and a handle on it.

        aio-pika's reconnection task swallows a cancellation while it is still connecting: wrapping the connect in
        ``wait_for`` (or cancelling it at shutdown) would leave it reconnecting forever and block the process exit
        on SIGTERM. So each attempt is bounded from inside (``timeout``), and the attempt object is kept so that
        :meth:`stop` can ``close()`` it, which does end that task.
        """

        def tracked(*args: Any, **kwargs: Any) -> aio_pika.RobustConnection:
            self._connecting = aio_pika.RobustConnection(*args, **kwargs)
            return self._connecting

        connection: AbstractRobustConnection = await aio_pika.connect_robust(
            self.settings.amqp_url,
            client_properties={"connection_name": f"proxy-{self.instance}"},
            reconnect_interval=0.5,
            fail_fast=True,
            timeout=_CONNECT_TIMEOUT,
            connection_class=cast(Any, tracked),
        )
        return connection

    async def _bus(self) -> None:
        delay = 0.5
        while self.connection is None:
            try:
                self.connection = await self._connect()
            except Exception as exc:
                if self._connecting is not None:
                    with contextlib.suppress(Exception):
                        await self._connecting.close()
                    self._connecting = None
                log.warning(
                    "RabbitMQ at %s unreachable (%r); the node serves meanwhile, retrying in %.0fs",
                    _safe_url(self.settings.amqp_url),
                    exc,
                    delay,
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, 15.0)
        self.publisher = Publisher(self.connection, self.topology, SOURCE, deadline=15.0)
        await self._flush_unpublished()
        try:
            channel = await self.connection.channel()
            for spec in (*OWNER_QUEUES, *SUBSCRIPTIONS):
                if spec.name.startswith("proxy."):
                    await self.topology.declare_queue(channel, spec)
            await channel.close()
        except Exception:
            log.exception("declaring the proxy's queues failed")
        await self._start_front(self.connection)

    def _load_front(self) -> Any:
        try:
            return importlib.import_module("hybrid_proxy.front").NodeFront
        except (ImportError, AttributeError) as exc:
            self.front_state = f"not available ({exc})"
            log.info("node front not available yet (%s): serving the inference node only", exc)
            return None

    async def _start_front(self, connection: AbstractRobustConnection) -> None:
        front_class = self._front_class
        if front_class is None:
            return
        try:
            front: Front = front_class(self.settings, self.redis, connection, self.topology)
            await front.start()
        except Exception as exc:
            self.front_state = f"failed to start: {exc!r}"
            log.exception("node front failed to start; the inference node keeps serving")
            return
        self.front = front
        self.front_state = "running"

    async def _publish(self, event: Event) -> None:
        if self.publisher is None:
            # Kept (the latest few) and published once the bus is up: a late fact beats a lost one.
            log.info("bus not connected yet: %s will be published when it is", event.TYPE)
            self._unpublished = [*self._unpublished[-(_UNPUBLISHED_KEPT - 1) :], event]
            return
        await self.publisher.publish(event)

    async def _flush_unpublished(self) -> None:
        pending, self._unpublished = self._unpublished, []
        for event in pending:
            try:
                await self._publish(event)
            except Exception as exc:
                log.warning("could not publish %s: %r", event.TYPE, exc)

    # --- status, metrics, heartbeat ---------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        front: Any = self.front_state
        if self.front is not None:
            try:
                front = self.front.status()
            except Exception as exc:
                front = f"status failed: {exc!r}"
        return {
            "service": SOURCE,
            "instance": self.instance,
            "bus": "connected" if self.publisher is not None else "connecting",
            "node": self.node.status(),
            "front": front,
            "at": time.time(),
        }

    async def _serve_status(self) -> None:
        s = self.settings
        if not s.metrics_port:
            return

        async def metrics(request: web.Request) -> web.Response:
            return web.Response(body=generate_latest(REGISTRY), headers={"Content-Type": CONTENT_TYPE_LATEST})

        async def status(request: web.Request) -> web.Response:
            return web.Response(body=orjson.dumps(self.status(), default=str), content_type="application/json")

        app = web.Application()
        app.router.add_get("/metrics", metrics)
        app.router.add_get("/status", status)
        self._status_runner = web.AppRunner(app, access_log=None)
        await self._status_runner.setup()
        site = web.TCPSite(self._status_runner, s.metrics_addr, s.metrics_port)
        await site.start()
        sockets = getattr(site._server, "sockets", None) or []
        self.metrics_port = int(sockets[0].getsockname()[1]) if sockets else s.metrics_port
        log.info("metrics and status on %s:%d (/metrics, /status)", s.metrics_addr, self.metrics_port)

    async def _heartbeat(self) -> None:
        key = self.keys.status(SOURCE, self.instance)
        while True:
            try:
                await self.redis.set(key, orjson.dumps(self.status(), default=str), ex=HEARTBEAT_TTL)
            except Exception as exc:
                log.debug("heartbeat not written: %r", exc)
            await asyncio.sleep(HEARTBEAT_SECONDS)


def _safe_url(url: str) -> str:
    """The broker URL without its password, for logs."""
    if "@" in url and "://" in url:
        scheme, rest = url.split("://", 1)
        return f"{scheme}://***@{rest.split('@', 1)[1]}"
    return url
