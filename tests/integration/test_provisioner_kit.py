"""Test support for the provisioner's acceptance tests (issue #6) — no tests of its own.

- :class:`FrontStandIn`: a minimal, test-only node front (the real one is ``hybrid_proxy.front``): it consumes
  ``instance.reachable`` / ``instance.destroyed`` / ``instance.failed`` from a ``proxy.front`` queue, listens on
  each slot's gateway ports, strips the dapi's ``/vX.Y.Z`` prefix and forwards to the GPU directly; 503 without a route.
- :class:`ProvisionerWorld`: the simulated Vast.ai and network node in this event loop, a front, an SSH key, a free
  gateway port range, an event recorder on the events exchange, a command publisher, and provisioner replicas as
  real processes (``python -m hybrid_provisioner``) so SIGKILL is real.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import re
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import asyncssh
import orjson
from aiohttp import web
from redis.asyncio import Redis

from hybrid_common import TEST, TimeProfile
from hybrid_common.bus import Consumer, Delivery, Publisher, connect
from hybrid_common.messages import Envelope, Payload
from hybrid_common.messages.events import InstanceDestroyed, InstanceFailed, InstanceReachable
from hybrid_common.topology import OWNER_QUEUES, SUBSCRIPTIONS, QueueSpec, Topology
from tests.support.net import port_open
from tests.support.procs import ManagedProcess

_VERSION = re.compile(r"^/v\d+(?:\.\d+)*(?=/)")


@dataclass
class _Route:
    instance_id: int
    host: str
    poc_port: int
    inference_port: int


class FrontStandIn:
    """Test-only node front: gateway port pairs per slot, version prefix stripped, direct forwarding."""

    def __init__(self, conn: Any, redis: Redis, topology: Topology) -> None:
        self.topology = topology
        self.consumer = Consumer(
            conn,
            topology,
            redis,
            QueueSpec("proxy.front", "events", ("instance.reachable", "instance.destroyed", "instance.failed")),
            self._on_event,
        )
        self.routes: dict[str, _Route] = {}
        self.ports: dict[int, tuple[str, str]] = {}
        self._runners: list[web.AppRunner] = []
        self._session: aiohttp.ClientSession | None = None
        self.forwarded = 0

    async def start(self) -> FrontStandIn:
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=900))
        await self.consumer.start()
        return self

    async def close(self) -> None:
        await self.consumer.stop()
        for r in self._runners:
            await r.cleanup()
        if self._session is not None:
            await self._session.close()

    async def _on_event(self, d: Delivery) -> None:
        p = d.payload
        if isinstance(p, InstanceReachable) and p.gateway_poc_port and p.gateway_inference_port:
            mapped = {m.container_port: m.host_port for m in p.ports}
            if p.connectivity != "direct" or p.public_ip is None:
                return
            for port, kind in ((p.gateway_poc_port, "poc"), (p.gateway_inference_port, "inference")):
                if port not in self.ports:
                    await self._listen(port, p.slot_id, kind)
            self.routes[p.slot_id] = _Route(
                p.instance_id,
                p.public_ip,
                mapped[p.api_container_port],
                mapped[p.inference_container_port],
            )
        elif isinstance(p, (InstanceDestroyed, InstanceFailed)) and p.slot_id is not None:
            route = self.routes.get(p.slot_id)
            if route is not None and route.instance_id == p.instance_id:
                del self.routes[p.slot_id]

    async def _listen(self, port: int, slot: str, kind: str) -> None:
        async def forward(request: web.Request) -> web.StreamResponse:
            route = self.routes.get(slot)
            if route is None:
                return web.json_response({"error": f"no GPU for slot {slot}"}, status=503)
            path = _VERSION.sub("", request.rel_url.path) + (
                f"?{request.rel_url.query_string}" if request.rel_url.query_string else ""
            )
            target = route.poc_port if kind == "poc" else route.inference_port
            assert self._session is not None
            try:
                async with self._session.request(
                    request.method,
                    f"http://{route.host}:{target}{path}",
                    data=await request.read(),
                    headers={
                        k: v for k, v in request.headers.items() if k.lower() in ("content-type", "authorization")
                    },
                ) as upstream:
                    body = await upstream.read()
                    self.forwarded += 1
                    return web.Response(
                        status=upstream.status,
                        body=body,
                        headers={"Content-Type": upstream.headers.get("Content-Type", "application/octet-stream")},
                    )
            except aiohttp.ClientError as exc:
                return web.json_response({"error": f"GPU unreachable: {exc}"}, status=503)

        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", forward)
        runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        self._runners.append(runner)
        self.ports[port] = (slot, kind)


class _RealFront:
    def __init__(self, front: Any) -> None:
        self.front = front

    async def close(self) -> None:
        await self.front.stop()


class EventLog:
    """Every event of the namespace, in arrival order."""

    def __init__(self, conn: Any, redis: Redis, topology: Topology) -> None:
        self.items: list[Envelope[Payload]] = []
        self.consumer = Consumer(
            conn, topology, redis, QueueSpec(f"test.events.{uuid.uuid4().hex[:6]}", "events", ("#",)), self._on
        )

    async def _on(self, d: Delivery) -> None:
        self.items.append(d.envelope)

    def of(self, kind: type[Payload], **match: Any) -> list[Any]:
        return [
            e.payload
            for e in self.items
            if isinstance(e.payload, kind) and all(getattr(e.payload, k) == v for k, v in match.items())
        ]

    def types(self) -> list[str]:
        return [e.type for e in self.items]


def free_range(pairs: int) -> tuple[int, int]:
    """A run of 2×pairs free ports (an even start) for the gateway listeners, below the kernel's ephemeral range
    (its outgoing connections and every ``port 0`` listener on the machine take ports from there)."""
    low = 32768
    with contextlib.suppress(OSError, ValueError):
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    for _ in range(200):
        first = random.randrange(20000, max(20002, low - 2 * pairs)) & ~1
        ports = range(first, first + 2 * pairs)
        if not any(port_open(p) for p in ports):
            return first, first + 2 * pairs - 1
    raise RuntimeError("no free gateway port range")


async def wait_for(cond: Callable[[], Any], timeout: float, what: str, *, every: float = 0.1) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = cond()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        await asyncio.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


class ProvisionerWorld:
    """Everything a provisioner acceptance test needs, in one async context."""

    def __init__(
        self,
        amqp_url: str,
        redis_url: str,
        namespace: str,
        tmp: Path,
        *,
        boot_scale: float = 0.3,
        profile: TimeProfile = TEST,
        first_poc_blocks: int = 200,
        gateway_pairs: int = 8,
        vast_rate_limits: bool = True,
        dapi_kwargs: dict[str, Any] | None = None,
    ) -> None:
        self.amqp_url = amqp_url
        self.redis_url = redis_url
        self.namespace = namespace
        self.tmp = tmp
        self.boot_scale = boot_scale
        self.profile = profile
        self.first_poc_blocks = first_poc_blocks
        self.gateway_pairs = gateway_pairs
        self.vast_rate_limits = vast_rate_limits
        self.dapi_kwargs = dapi_kwargs or {}
        self.topology = Topology(namespace)
        self.replicas: list[ManagedProcess] = []
        self.label_prefix = f"ghm{namespace[-6:]}"

    async def __aenter__(self) -> ProvisionerWorld:
        from sim.network import start_dapi
        from sim.vast import start_vast

        self.vast = await start_vast(
            port=0, profile=self.profile, boot_scale=self.boot_scale, rate_limits=self.vast_rate_limits
        )
        self.dapi = await start_dapi(profile=self.profile, first_poc_start=self.first_poc_blocks, **self.dapi_kwargs)
        self.redis = Redis.from_url(self.redis_url)
        self.conn = await connect(self.amqp_url, name="provisioner-test")
        self.publisher = Publisher(self.conn, self.topology, "test")
        ch = await self.conn.channel()
        await self.topology.declare_all(ch)
        self.events = EventLog(self.conn, self.redis, self.topology)
        await self.events.consumer.start()
        key = asyncssh.generate_private_key("ssh-ed25519")
        self.key_path = self.tmp / "id_ed25519"
        key.write_private_key(str(self.key_path))
        key.write_public_key(str(self.key_path) + ".pub")
        self.gateway = free_range(self.gateway_pairs)
        self.front = await self._start_front()
        self.die_dir = self.tmp / "die"
        self.die_dir.mkdir()
        self.started = time.time()
        return self

    async def _start_front(self) -> Any:
        """The proxy's node front (``hybrid_proxy.front``) when it is in the tree, else the stand-in above;
        ``PROVISIONER_TEST_FRONT=standin`` forces the stand-in."""
        if os.environ.get("PROVISIONER_TEST_FRONT", "real") == "real":
            try:
                from hybrid_proxy.front import FrontSettings, NodeFront
            except ImportError:
                pass
            else:
                first, last = self.gateway
                settings = FrontSettings(
                    _env_file=None,
                    HYBRID_NAMESPACE=self.namespace,
                    AMQP_URL=self.amqp_url,
                    REDIS_URL=self.redis_url,
                    NODE_FRONT_HOST="127.0.0.1",
                    GATEWAY_PORT_FIRST=first,
                    GATEWAY_PORT_LAST=last,
                    SSH_KEY_PATH=str(self.key_path),
                    FRONT_PROBE_INTERVAL=0.2,
                    FRONT_SCAN_INTERVAL=0.2,
                    FRONT_DIRECT_FALLBACK_AFTER=5,
                )
                front = NodeFront(settings, self.redis, self.conn, self.topology)
                await front.start()
                self.front_kind = "real"
                return _RealFront(front)
        self.front_kind = "standin"
        return await FrontStandIn(self.conn, self.redis, self.topology).start()

    async def __aexit__(self, *exc: object) -> None:
        for r in self.replicas:
            r.kill()
        if exc and exc[0] is not None:
            for i, r in enumerate(self.replicas):
                print(f"----- replica {i} ({r.pid if r.proc else '-'}) -----\n{r.output()}")
        # Teardown never hangs the suite: each step is bounded, and a stuck one is named.
        steps: list[tuple[str, Callable[[], Any]]] = [
            ("front", self.front.close),
            ("event log", self.events.consumer.stop),
            ("topology", self._delete_topology),
            ("broker connection", self.conn.close),
            ("dapi simulator", self.dapi.close),
            ("vast simulator", self.vast.close),
            ("redis keys", self._delete_keys),
            ("redis", self.redis.aclose),
        ]
        for name, step in steps:
            try:
                await asyncio.wait_for(step(), 30)
            except TimeoutError:
                print(f"teardown: {name} did not stop within 30 s")
            except Exception as exc:
                print(f"teardown: {name}: {exc!r}")

    async def _delete_keys(self) -> None:
        keys = [k async for k in self.redis.scan_iter(match=f"{self.namespace}:*", count=500)]
        if keys:
            await self.redis.delete(*keys)

    async def _delete_topology(self) -> None:
        """Quorum queues outlive the test; a broker shared by many test runs should not collect them."""
        ch = await self.conn.channel()
        names = [spec.name for spec in (*OWNER_QUEUES, *SUBSCRIPTIONS)] + [self.events.consumer.spec.name]
        for base in names:
            for name in (self.topology.name(base), self.topology.name(base) + ".dead"):
                await ch.queue_delete(name)
        for exchange in (self.topology.events, self.topology.commands, self.topology.dlx):
            await ch.exchange_delete(exchange)
        await ch.close()

    def env(self, **extra: str) -> dict[str, str]:
        first, last = self.gateway
        env = {
            "MODE": "sim",
            "AMQP_URL": self.amqp_url,
            "REDIS_URL": self.redis_url,
            "HYBRID_NAMESPACE": self.namespace,
            "HYBRID_LABEL_PREFIX": self.label_prefix,
            "HYBRID_TIME_PROFILE": self.profile.name,
            "VAST_URL": self.vast.url,
            "GONKA_ADMIN_API_URL": self.dapi.admin_url,
            "GATEWAY_PORT_FIRST": str(first),
            "GATEWAY_PORT_LAST": str(last),
            "NODE_FRONT_HOST": "127.0.0.1",
            "NODE_FRONT_PROBE_HOST": "127.0.0.1",
            "SSH_KEY_PATH": str(self.key_path),
            "LOG_JSON": "false",
            "LOG_LEVEL": "INFO",
            "PROVISIONER_METRICS_PORT": "0",
            "PROVISIONER_LEASE_TTL": "2",
            "PROVISIONER_SCAN_INTERVAL": "0.3",
            "PROVISIONER_TICK": "0.1",
            "PROVISIONER_STATUS_POLL": "0.25",
            "PROVISIONER_HOLD_POLL": "0.5",
            "PROVISIONER_STALL_TIMEOUT": "5",
            "PROVISIONER_BOOT_TIMEOUT": "40",
            "PROVISIONER_SERVICE_TIMEOUT": "40",
            "PROVISIONER_RECONCILE_INTERVAL": "3",
            "PROVISIONER_HEDGE_LEAD": "0",
            "PROVISIONER_TEST_DIE_DIR": str(self.die_dir),
        }
        env.update(extra)
        return env

    def start_replica(self, **extra: str) -> ManagedProcess:
        proc = ManagedProcess(["-m", "hybrid_provisioner"], env=self.env(**extra), name="provisioner")
        proc.start()
        self.replicas.append(proc)
        return proc

    async def publish(self, payload: Payload) -> None:
        await self.publisher.publish(payload)

    async def ledger(self) -> dict[str, Any]:
        return self.vast.ledger()

    def live_instances(self) -> list[dict[str, Any]]:
        return [r for r in self.vast.ledger()["instances"] if not r["destroyed"]]

    def instances_of(self, slot: str) -> list[dict[str, Any]]:
        prefix = f"{self.label_prefix}-{slot}-"
        return [r for r in self.vast.ledger()["instances"] if (r["label"] or "").startswith(prefix)]

    async def admin_nodes(self) -> dict[str, dict[str, Any]]:
        async with aiohttp.ClientSession() as s, s.get(f"{self.dapi.admin_url}/admin/v1/nodes") as r:
            body = await r.json()
        return {n["node"]["id"]: n for n in body}

    async def jobs(self) -> dict[str, dict[str, Any]]:
        raw = await self.redis.hgetall(f"{self.namespace}:jobs")
        return {(k.decode() if isinstance(k, bytes) else k): orjson.loads(v) for k, v in raw.items()}

    async def wait(self, cond: Callable[[], Any], timeout: float, what: str) -> Any:
        try:
            return await wait_for(cond, timeout, what)
        except AssertionError:
            print("events:", self.events.types())
            raise
