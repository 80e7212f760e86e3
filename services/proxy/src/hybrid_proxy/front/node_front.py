"""The node front: gateway listeners per GPU slot, routes from the provisioner's events, tunnels, and their commands."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import orjson
from aio_pika.abc import AbstractRobustConnection
from redis.asyncio import Redis

from hybrid_common.bus import Consumer, Delivery, Publisher, reply
from hybrid_common.messages import Payload
from hybrid_common.messages.commands import ErrorReply, TunnelClose, TunnelListQuery, TunnelListReply, TunnelOpen
from hybrid_common.messages.events import (
    InstanceDestroyed,
    InstanceFailed,
    InstanceReachable,
    TunnelClosed,
    TunnelFailed,
    TunnelOpened,
)
from hybrid_common.metrics import counter, gauge
from hybrid_common.redis_keys import RedisKeys
from hybrid_common.settings import CommonSettings
from hybrid_common.topology import OWNER_QUEUES, SUBSCRIPTIONS, QueueSpec, Topology
from hybrid_proxy.front.forwarding import Forwarder, GatewayListener, PortKind, Upstream
from hybrid_proxy.front.routes import Route
from hybrid_proxy.front.settings import FrontSettings
from hybrid_proxy.front.tunnels import CallbackForward, InstanceTunnel, Notice, SshEndpoint

log = logging.getLogger("hybrid.proxy.front")

SOURCE = "proxy.front"
ROUTES_UP = gauge("front_routes_up", "GPU slots whose GPU answers through the front")
TUNNEL_EVENTS = counter("front_tunnel_events_total", "SSH tunnel lifecycle", ("what",))


def _spec(specs: tuple[QueueSpec, ...], name: str) -> QueueSpec:
    return next(s for s in specs if s.name == name)


class _SlotGateway:
    """A slot's pair of listeners (PoC/API port, inference port)."""

    def __init__(self, poc: GatewayListener, inference: GatewayListener) -> None:
        self.poc = poc
        self.inference = inference

    @property
    def ports(self) -> tuple[int, int]:
        return self.poc.port, self.inference.port

    @property
    def listening(self) -> bool:
        return self.poc.listening and self.inference.listening

    @property
    def error(self) -> str | None:
        return self.poc.error or self.inference.error

    async def start(self) -> bool:
        a = await self.poc.start()
        b = await self.inference.start()
        return a and b

    async def close(self) -> None:
        await self.poc.close()
        await self.inference.close()


class NodeFront:
    """``NodeFront(settings, redis, connection, topology)``; ``await start()``, ``await stop()``, ``status()``."""

    def __init__(
        self,
        settings: CommonSettings,
        redis: Redis,
        connection: AbstractRobustConnection,
        topology: Topology,
    ) -> None:
        self.settings = FrontSettings.from_common(settings)
        self.redis = redis
        self.connection = connection
        self.topology = topology
        self.keys = RedisKeys(topology.namespace)
        self.publisher = Publisher(connection, topology, SOURCE)
        self.forwarder = Forwarder(connect_timeout=self.settings.front_connect_timeout)
        self.routes: dict[str, Route] = {}
        self.gateways: dict[str, _SlotGateway] = {}
        self.tunnels: dict[int, InstanceTunnel] = {}
        self._endpoints: dict[int, tuple[str | None, SshEndpoint]] = {}  # instance → (slot, SSH endpoint)
        self._gone: set[int] = set()  # instances destroyed or failed: a late instance.reachable is stale
        self._fallback_due: dict[str, float] = {}
        self._fallback_tries: dict[str, int] = {}
        self._failing_since: dict[str, float] = {}
        self._lock = asyncio.Lock()
        self._wake = asyncio.Event()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._loop_task: asyncio.Task[None] | None = None
        self._consumers: list[Consumer] = []
        self._probe_session: aiohttp.ClientSession | None = None
        self._started = False
        self._last_scan = 0.0
        bind = self.settings.bind_host
        self._reach_host = "127.0.0.1" if bind in {"0.0.0.0", "::", ""} else bind
        self._relay_origin = self.settings.relay_origin()
        self._relay_local = self.settings.relay_local_address()

    # ------------------------------------------------------------------------------------------------ life

    async def start(self) -> None:
        await self.forwarder.start()
        self._probe_session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=self.settings.front_probe_timeout),
            connector=aiohttp.TCPConnector(limit=0, force_close=True),
        )
        await self._restore()
        await self._scan_port_table()
        self._loop_task = asyncio.create_task(self._maintain(), name="node-front-maintain")
        events = Consumer(
            self.connection, self.topology, self.redis, _spec(SUBSCRIPTIONS, "proxy.front"), self._on_event, prefetch=16
        )
        commands = Consumer(
            self.connection,
            self.topology,
            self.redis,
            _spec(OWNER_QUEUES, "proxy.commands"),
            self._on_command,
            prefetch=8,
        )
        for consumer in (events, commands):
            await consumer.start()
            self._consumers.append(consumer)
        self._started = True
        log.info("node front started: %d slot(s), %d tunnel(s)", len(self.routes), len(self.tunnels))

    async def stop(self) -> None:
        """Stop serving; routes and tunnels stay recorded in Redis so the next start restores them."""
        self._started = False
        for consumer in self._consumers:
            await consumer.stop()
        self._consumers.clear()
        if self._loop_task is not None:
            self._loop_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._loop_task
            self._loop_task = None
        for gateway in self.gateways.values():
            await gateway.close()
        self.gateways.clear()
        for route in self.routes.values():
            # Nothing answers on the gateway ports now: readers (validation routing, status) must not pick them.
            if route.set_state("down" if route.has_gpu() else route.state, "node front stopped"):
                with contextlib.suppress(Exception):
                    await self._save_route(route)
        for tunnel in list(self.tunnels.values()):
            tunnel.notify = _silent
            await tunnel.close("front stopping")
            with contextlib.suppress(Exception):  # kept (state "closed") so the next start re-opens it
                await self.redis.hset(self.keys.tunnels(), str(tunnel.instance_id), orjson.dumps(tunnel.view()))
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        await self.forwarder.close()
        if self._probe_session is not None:
            await self._probe_session.close()
            self._probe_session = None

    def status(self) -> dict[str, Any]:
        slots = {}
        for slot_id, route in sorted(self.routes.items()):
            gateway = self.gateways.get(slot_id)
            slots[slot_id] = {
                **route.model_dump(mode="json", exclude={"ports", "reachable", "standby"}),
                "standby_instances": [e.get("instance_id") for e in route.standby],
                "listening": bool(gateway and gateway.listening),
            }
        listen_errors = [r.listen_error for r in self.routes.values() if r.listen_error]
        return {
            "healthy": self._started and not listen_errors,
            "slots": slots,
            "slots_up": sum(1 for r in self.routes.values() if r.state == "up"),
            "tunnels": [t.view() for t in self.tunnels.values()],
            "listen_errors": listen_errors,
        }

    # ------------------------------------------------------------------------------------------------ restore

    async def _restore(self) -> None:
        for raw in (await self.redis.hgetall(self.keys.front_routes())).values():
            try:
                route = Route.model_validate_json(raw)
            except ValueError as exc:
                log.error("unreadable route record skipped: %s", exc)
                continue
            if route.state == "up":
                route.set_state("connecting", "front restarted: checking the GPU again")
            self.routes[route.slot_id] = route
            if route.instance_id is not None and route.ssh_host and route.ssh_port:
                self._endpoints[route.instance_id] = (route.slot_id, SshEndpoint(route.ssh_host, route.ssh_port))
            await self._ensure_gateway(route)
        for raw in (await self.redis.hgetall(self.keys.tunnels())).values():
            try:
                view = orjson.loads(raw)
                self._restore_tunnel(view)
            except (ValueError, KeyError, TypeError) as exc:
                log.error("unreadable tunnel record skipped: %r", exc)
        for route in self.routes.values():
            if (
                route.connectivity == "tunnel"
                and route.instance_id is not None
                and route.instance_id not in self.tunnels
            ):
                self._open_route_tunnel(route)
            await self._save_route(route)

    def _restore_tunnel(self, view: dict[str, Any]) -> None:
        instance_id = int(view["instance_id"])
        endpoint = SshEndpoint(str(view["ssh_host"]), int(view["ssh_port"]))
        slot_id = view.get("slot_id")
        self._endpoints.setdefault(instance_id, (slot_id, endpoint))
        cb = view.get("callback_forward")
        callback = None
        if cb and self._relay_local is not None:
            callback = CallbackForward(int(cb["remote_port"]), *self._relay_local)
        tunnel = self._new_tunnel(instance_id, slot_id, endpoint, callback)
        tunnel.host_key = view.get("host_key")
        tunnel.reopen_count = int(view.get("reopen_count") or 0)
        for fwd in view.get("forwards", []):
            tunnel.wanted[int(fwd["remote_port"])] = int(fwd.get("local_port") or 0)
        tunnel.start()

    # ------------------------------------------------------------------------------------------------ gateways

    async def _ensure_gateway(self, route: Route) -> None:
        gateway = self.gateways.get(route.slot_id)
        wanted = (route.gateway_poc_port, route.gateway_inference_port)
        if gateway is not None and gateway.ports != wanted:
            log.warning("slot %s: gateway ports moved %s → %s", route.slot_id, gateway.ports, wanted)
            await gateway.close()
            gateway = None
        if gateway is None:
            slot_id = route.slot_id

            def resolve(kind: PortKind) -> Upstream | str:
                return self._resolve(slot_id, kind)

            def on_failure(kind: PortKind, reason: str) -> None:
                self._wake.set()  # re-probe now rather than at the next tick

            bind = self.settings.bind_host
            gateway = _SlotGateway(
                GatewayListener(slot_id, "poc", bind, wanted[0], resolve, self.forwarder, on_failure),
                GatewayListener(slot_id, "inference", bind, wanted[1], resolve, self.forwarder, on_failure),
            )
            self.gateways[slot_id] = gateway
        if not gateway.listening:
            await self._evict_stale_holders(route.slot_id, wanted)
            await gateway.start()
            if gateway.error:
                log.error("slot %s: %s", route.slot_id, gateway.error)
        route.listen_error = gateway.error

    async def _evict_stale_holders(self, slot_id: str, ports: tuple[int, int]) -> None:
        """Close another slot's listeners on ``ports`` when the provisioner has since given them to ``slot_id``.

        A slot's pair returns to the pool when its last job ends and can be handed to a new slot before our next
        scan drops the old one; the new slot must not be left unable to listen. A slot the table still lists on
        those ports is a real conflict: left alone, it shows as a listen error."""
        for other, gateway in list(self.gateways.items()):
            if other == slot_id or not set(gateway.ports) & set(ports):
                continue
            raw = await self.redis.hget(self.keys.gateway_ports(), other)
            if raw is not None and _parse_pair(raw) == gateway.ports:
                continue
            log.info("slot %s: its ports %s/%s now belong to slot %s", other, *gateway.ports, slot_id)
            await self._drop_slot(other)

    def _resolve(self, slot_id: str, kind: PortKind) -> Upstream | str:
        route = self.routes.get(slot_id)
        if route is None or route.instance_id is None:
            why = route.reason if route is not None else "unknown slot"
            return f"slot {slot_id} has no reachable GPU ({why}); the MLNode is not up"
        container_port = route.api_container_port if kind == "poc" else route.inference_container_port
        if route.connectivity == "direct":
            host_port = route.ports.get(container_port)
            if host_port is None or not route.public_ip:
                return f"instance {route.instance_id} maps no public port for container port {container_port}"
            return Upstream(route.public_ip, host_port, route.instance_id)
        tunnel = self.tunnels.get(route.instance_id)
        if tunnel is None or not tunnel.is_open:
            state = tunnel.state if tunnel is not None else "absent"
            return f"the SSH tunnel to instance {route.instance_id} is {state}; re-opening"
        local = tunnel.local.get(container_port)
        if local is None:
            return f"the SSH tunnel to instance {route.instance_id} has no forward for port {container_port} yet"
        rewrite = None
        if kind == "poc" and tunnel.remote_port is not None and self._relay_origin is not None:
            rewrite = (self._relay_origin.encode(), f"http://127.0.0.1:{tunnel.remote_port}".encode())
        return Upstream("127.0.0.1", local, route.instance_id, rewrite)

    async def _scan_port_table(self) -> None:
        """Open listeners for every slot the provisioner allocated ports to, GPU or not (answering 503 until one),
        and close those of slots whose pair the provisioner returned to the pool."""
        self._last_scan = time.monotonic()
        table: dict[str, tuple[int, int]] = {}
        for raw_slot, raw_ports in (await self.redis.hgetall(self.keys.gateway_ports())).items():
            slot_id = raw_slot.decode() if isinstance(raw_slot, bytes) else str(raw_slot)
            try:
                table[slot_id] = _parse_pair(raw_ports)
            except ValueError:
                log.error("gateway:ports[%s] = %r is not 'poc_port,inference_port'", slot_id, raw_ports)
        # A slot whose ports the provisioner released and that has no GPU is over: free its ports (first, so a pair
        # handed on to a new slot is free to listen on below).
        for slot_id, route in list(self.routes.items()):
            if route.from_port_table and slot_id not in table and route.instance_id is None:
                await self._drop_slot(slot_id)
        for slot_id, (poc, inference) in table.items():
            known = self.routes.get(slot_id)
            if known is None:
                fresh = Route(
                    slot_id=slot_id,
                    gateway_poc_port=poc,
                    gateway_inference_port=inference,
                    host=self._reach_host,
                    from_port_table=True,
                )
                self.routes[slot_id] = fresh
                await self._ensure_gateway(fresh)
                await self._save_route(fresh)
            elif not known.from_port_table:
                known.from_port_table = True
                await self._save_route(known)

    async def _drop_slot(self, slot_id: str) -> None:
        route = self.routes.pop(slot_id, None)
        gateway = self.gateways.pop(slot_id, None)
        if gateway is not None:
            await gateway.close()
        if route is not None and route.instance_id is not None:
            await self._close_tunnel(route.instance_id, f"slot {slot_id} released")
        for per_slot in (self._failing_since, self._fallback_due, self._fallback_tries):
            per_slot.pop(slot_id, None)
        await self.redis.hdel(self.keys.front_routes(), slot_id)
        ROUTES_UP.set(sum(1 for r in self.routes.values() if r.state == "up"))
        log.info("slot %s released: gateway ports closed", slot_id)

    async def _save_route(self, route: Route) -> None:
        await self.redis.hset(self.keys.front_routes(), route.slot_id, route.model_dump_json())
        ROUTES_UP.set(sum(1 for r in self.routes.values() if r.state == "up"))

    # ------------------------------------------------------------------------------------------------ events

    async def _on_event(self, d: Delivery) -> None:
        p = d.payload
        async with self._lock:
            if isinstance(p, InstanceReachable):
                await self._on_reachable(p)
            elif isinstance(p, InstanceDestroyed):
                await self._on_gone(p.instance_id, f"instance {p.instance_id} destroyed ({p.reason})")
            elif isinstance(p, InstanceFailed) and p.instance_id is not None:
                await self._on_gone(p.instance_id, f"instance {p.instance_id} failed: {p.cause}: {p.message}")

    async def _gateway_ports_for(self, p: InstanceReachable) -> tuple[int, int] | None:
        if p.gateway_poc_port and p.gateway_inference_port:
            return p.gateway_poc_port, p.gateway_inference_port
        raw = await self.redis.hget(self.keys.gateway_ports(), p.slot_id)
        return None if raw is None else _parse_pair(raw)

    async def _on_reachable(self, p: InstanceReachable) -> None:
        if p.instance_id in self._gone:
            log.info("slot %s: instance.reachable for instance %s, already gone: ignored", p.slot_id, p.instance_id)
            return
        ports = await self._gateway_ports_for(p)
        if ports is None:
            # Profiles without a front (ComfyUI) carry no gateway ports: not a slot of ours.
            log.info("slot %s: instance.reachable without gateway ports (none allocated): no route", p.slot_id)
            return
        ports_map = {m.container_port: m.host_port for m in p.ports}
        route = self.routes.get(p.slot_id)
        if (
            route is not None
            and route.instance_id == p.instance_id
            and (route.connectivity == p.connectivity or route.fell_back_to_tunnel)
            and route.ports == ports_map
            and (route.gateway_poc_port, route.gateway_inference_port) == ports
        ):
            return  # a repeat of what we already route
        previous = route.instance_id if route is not None else None
        fresh = Route(
            slot_id=p.slot_id,
            gateway_poc_port=ports[0],
            gateway_inference_port=ports[1],
            host=self._reach_host,
            instance_id=p.instance_id,
            connectivity=p.connectivity,
            public_ip=(p.public_ip or "").strip() or None,  # vastai-api.md: public_ipaddr may carry whitespace
            ports=ports_map,
            ssh_host=p.ssh_host,
            ssh_port=p.ssh_port,
            api_container_port=p.api_container_port,
            inference_container_port=p.inference_container_port,
            from_port_table=route.from_port_table if route is not None else False,
            reachable=p.model_dump(mode="json"),
            standby=_standby_after(route, p.instance_id, self._gone),
        )
        fresh.set_state("connecting", "waiting for the GPU to answer through the front")
        self.routes[p.slot_id] = fresh
        self._failing_since.pop(p.slot_id, None)
        self._fallback_due.pop(p.slot_id, None)
        self._fallback_tries.pop(p.slot_id, None)
        if p.ssh_host and p.ssh_port:
            self._endpoints[p.instance_id] = (p.slot_id, SshEndpoint(p.ssh_host, p.ssh_port))
        if previous is not None and previous != p.instance_id:
            # A replaced GPU: same slot, same gateway ports (so the dapi's node and node_num stay), new target.
            log.info("slot %s: instance %s replaces %s", p.slot_id, p.instance_id, previous)
            await self._close_tunnel(previous, f"replaced by instance {p.instance_id}")
        await self._ensure_gateway(fresh)
        if p.connectivity == "tunnel":
            if not (p.ssh_host and p.ssh_port):
                fresh.set_state("down", "tunnel mode but the event carries no ssh_host/ssh_port")
            else:
                self._open_route_tunnel(fresh)
        await self._save_route(fresh)
        log.info(
            "slot %s → instance %s (%s) on gateway ports %s/%s",
            p.slot_id,
            p.instance_id,
            p.connectivity,
            *ports,
        )
        self._wake.set()

    async def _on_gone(self, instance_id: int, reason: str) -> None:
        self._gone.add(instance_id)
        await self._close_tunnel(instance_id, reason)
        self._endpoints.pop(instance_id, None)
        for route in list(self.routes.values()):
            before = len(route.standby)
            route.standby = [e for e in route.standby if e.get("instance_id") != instance_id]
            if route.instance_id != instance_id:
                if len(route.standby) != before:
                    await self._save_route(route)
                continue
            if route.standby:
                # A hedge's other instance is still alive: route to it rather than leave the slot without a GPU.
                survivor = InstanceReachable.model_validate(route.standby[-1])
                log.info("slot %s: %s; switching to instance %s", route.slot_id, reason, survivor.instance_id)
                await self._on_reachable(survivor)
                continue
            route.clear_gpu(reason)
            self._failing_since.pop(route.slot_id, None)
            await self._save_route(route)
            log.info("slot %s: route closed: %s", route.slot_id, reason)

    # ------------------------------------------------------------------------------------------------ tunnels

    def _new_tunnel(
        self, instance_id: int, slot_id: str | None, endpoint: SshEndpoint, callback: CallbackForward | None
    ) -> InstanceTunnel:
        tunnel = InstanceTunnel(
            instance_id=instance_id,
            slot_id=slot_id,
            endpoint=endpoint,
            key_path=self.settings.ssh_key_path,
            keepalive=self.settings.front_ssh_keepalive,
            connect_timeout=self.settings.front_ssh_connect_timeout,
            retry_max=self.settings.front_tunnel_retry_max,
            notify=self._tunnel_notice,
            callback=callback,
        )
        self.tunnels[instance_id] = tunnel
        return tunnel

    def _callback_forward(self) -> CallbackForward | None:
        """A remote forward for PoC callbacks when the GPU is reached through SSH (see the package docstring)."""
        if not self.settings.front_callback_tunnel or self._relay_local is None or self._relay_origin is None:
            return None
        public_port = self.settings.relay_public_url and _port_of(self.settings.relay_public_url)
        return CallbackForward(public_port or self._relay_local[1], *self._relay_local)

    def _open_route_tunnel(self, route: Route) -> InstanceTunnel:
        assert route.instance_id is not None and route.ssh_host and route.ssh_port
        tunnel = self.tunnels.get(route.instance_id)
        if tunnel is None:
            tunnel = self._new_tunnel(
                route.instance_id, route.slot_id, SshEndpoint(route.ssh_host, route.ssh_port), self._callback_forward()
            )
        for port in (route.api_container_port, route.inference_container_port):
            tunnel.wanted.setdefault(port, 0)
        tunnel.start()
        return tunnel

    async def _close_tunnel(self, instance_id: int, reason: str) -> None:
        tunnel = self.tunnels.pop(instance_id, None)
        if tunnel is not None:
            await tunnel.close(reason)

    async def _tunnel_notice(self, tunnel: InstanceTunnel, what: Notice, detail: str) -> None:
        TUNNEL_EVENTS.labels(what).inc()
        ssh = tunnel.endpoint
        if what == "closed":
            with contextlib.suppress(Exception):
                await self.redis.hdel(self.keys.tunnels(), str(tunnel.instance_id))
            for container_port, local_port in (tunnel.wanted or {}).items():
                self._emit(
                    TunnelClosed(
                        slot_id=tunnel.slot_id,
                        instance_id=tunnel.instance_id,
                        local_port=local_port or 0,
                        reason=f"{detail} (localhost:{container_port})",
                    )
                )
            log.info("tunnel to instance %s closed: %s", tunnel.instance_id, detail)
        else:
            with contextlib.suppress(Exception):
                await self.redis.hset(self.keys.tunnels(), str(tunnel.instance_id), orjson.dumps(tunnel.view()))
        if what in {"opened", "forward"}:
            for container_port, local_port in tunnel.local.items():
                self._emit(
                    TunnelOpened(
                        slot_id=tunnel.slot_id,
                        instance_id=tunnel.instance_id,
                        local_port=local_port,
                        remote_port=container_port,
                        ssh_host=ssh.host,
                        ssh_port=ssh.port,
                    )
                )
            log.info("tunnel to instance %s open: %s", tunnel.instance_id, tunnel.local)
        elif what in {"lost", "failed"}:
            self._emit(
                TunnelFailed(slot_id=tunnel.slot_id, instance_id=tunnel.instance_id, error=detail, will_retry=True)
            )
            log.warning("tunnel to instance %s %s: %s (re-opening)", tunnel.instance_id, what, detail)
        self._wake.set()

    def _emit(self, payload: Payload) -> None:
        """Publish in the background: a broker outage must not stall a tunnel or a route."""

        async def send() -> None:
            try:
                await self.publisher.publish(payload)
            except Exception as exc:
                log.error("could not publish %s: %r", payload.TYPE, exc)

        task = asyncio.create_task(send(), name=f"emit-{payload.TYPE}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # ------------------------------------------------------------------------------------------------ commands

    async def _on_command(self, d: Delivery) -> None:
        p = d.payload
        if isinstance(p, TunnelListQuery):
            await reply(self.publisher, d.envelope, d.reply_to, TunnelListReply(tunnels=self.tunnel_views()))
        elif isinstance(p, TunnelOpen):
            async with self._lock:
                await self._command_open(p)
        elif isinstance(p, TunnelClose):
            async with self._lock:
                targets = list(self.tunnels) if p.all else [p.instance_id] if p.instance_id is not None else []
                for instance_id in targets:
                    await self._close_tunnel(instance_id, "closed by command")
                    for route in self.routes.values():
                        if route.instance_id == instance_id and route.connectivity == "tunnel":
                            route.set_state("down", "tunnel closed by command")
                            await self._save_route(route)
        elif d.reply_to:
            await reply(
                self.publisher, d.envelope, d.reply_to, ErrorReply(error="unsupported", message=f"{d.envelope.type}")
            )

    async def _command_open(self, p: TunnelOpen) -> None:
        tunnel = self.tunnels.get(p.instance_id)
        route = next((r for r in self.routes.values() if r.instance_id == p.instance_id), None)
        if tunnel is None and route is not None and route.connectivity == "tunnel":
            tunnel = self._open_route_tunnel(route)  # re-open a route's tunnel an operator had closed
        if tunnel is None:
            known = self._endpoints.get(p.instance_id)
            if known is None:
                self._emit(
                    TunnelFailed(
                        slot_id=p.slot_id,
                        instance_id=p.instance_id,
                        error="no instance.reachable with SSH details seen for this instance",
                        will_retry=False,
                    )
                )
                return
            tunnel = self._new_tunnel(p.instance_id, p.slot_id or known[0], known[1], None)
            tunnel.wanted[p.remote_port] = 0
            tunnel.start()
            return
        await tunnel.add_forward(p.remote_port)

    def tunnel_views(self) -> list[dict[str, Any]]:
        return [t.view() for t in self.tunnels.values()]

    # ------------------------------------------------------------------------------------------------ health

    async def _maintain(self) -> None:
        interval = self.settings.front_probe_interval
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), interval)
            self._wake.clear()
            try:
                async with self._lock:
                    if time.monotonic() - self._last_scan >= self.settings.front_scan_interval:
                        await self._scan_port_table()
                    for route in self.routes.values():
                        gateway = self.gateways.get(route.slot_id)
                        if gateway is not None and not gateway.listening:
                            await self._ensure_gateway(route)
                            await self._save_route(route)
                routes = [r for r in self.routes.values() if r.instance_id is not None]
                await asyncio.gather(*(self._probe(r) for r in routes))
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # Redis blip: the next tick tries again
                log.warning("node front maintenance failed: %r", exc)
                await asyncio.sleep(interval)

    async def _probe(self, route: Route) -> None:
        """``GET /api/v1/state`` through the route's current target: "up" means the dapi's calls would get through."""
        instance_id = route.instance_id
        target = self._resolve(route.slot_id, "poc")
        ok, why = False, target if isinstance(target, str) else ""
        if not isinstance(target, str):
            ok, why = await self._get_state(target.host, target.port)
        if route.instance_id != instance_id or self.routes.get(route.slot_id) is not route:
            return  # the route changed while we probed
        if ok:
            self._failing_since.pop(route.slot_id, None)
            if route.set_state("up", "the GPU answers GET /api/v1/state"):
                log.info("slot %s up (instance %s, %s)", route.slot_id, instance_id, route.connectivity)
                await self._save_route(route)
            return
        changed = route.set_state("down" if route.state == "up" else route.state, why)
        if route.state == "down" and changed:
            log.warning("slot %s down: %s", route.slot_id, why)
        if changed:
            await self._save_route(route)
        now = time.monotonic()
        since = self._failing_since.setdefault(route.slot_id, now)
        if (
            route.connectivity == "direct"
            and route.ssh_host
            and route.ssh_port
            and now - since >= self.settings.front_direct_fallback_after
            and now >= self._fallback_due.get(route.slot_id, 0.0)
        ):
            # A GPU still loading its model answers neither way: try again later, less often each time (cap 10 min).
            tries = self._fallback_tries.get(route.slot_id, 0) + 1
            self._fallback_tries[route.slot_id] = tries
            pause = max(self.settings.front_direct_fallback_after, 5.0) * 2 ** (tries - 1)
            self._fallback_due[route.slot_id] = now + min(pause, 600.0)
            task = asyncio.create_task(self._try_tunnel_instead(route), name=f"fallback-{route.slot_id}")
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _get_state(self, host: str, port: int) -> tuple[bool, str]:
        assert self._probe_session is not None
        try:
            async with self._probe_session.get(f"http://{host}:{port}/api/v1/state") as resp:
                await resp.read()
                if resp.status == 200:
                    return True, ""
                return False, f"GET /api/v1/state answered {resp.status}"
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            return False, f"GET /api/v1/state failed: {type(exc).__name__}: {exc}"

    async def _try_tunnel_instead(self, route: Route) -> None:
        """The event said direct but the GPU does not answer there: try it through SSH (a firewall, a NAT)."""
        instance_id = route.instance_id
        if instance_id is None or instance_id in self.tunnels or not (route.ssh_host and route.ssh_port):
            return
        log.info("slot %s: direct address silent; trying instance %s through SSH", route.slot_id, instance_id)
        tunnel = self._open_route_tunnel(route)
        opened = await tunnel.wait_open(self.settings.front_ssh_connect_timeout + 1)
        ok = False
        if opened:
            local = tunnel.local.get(route.api_container_port)
            if local is not None:
                ok, _ = await self._get_state("127.0.0.1", local)
        async with self._lock:
            if self.routes.get(route.slot_id) is not route or route.instance_id != instance_id:
                await self._close_tunnel(instance_id, "route changed during the SSH fallback")
                return
            if ok:
                route.connectivity = "tunnel"
                route.fell_back_to_tunnel = True
                route.set_state("connecting", "switched to the SSH tunnel: the direct address did not answer")
                await self._save_route(route)
                log.warning("slot %s: instance %s now reached through SSH", route.slot_id, instance_id)
                self._wake.set()
            else:
                await self._close_tunnel(instance_id, "SSH fallback did not reach the GPU either")


def _standby_after(route: Route | None, new_instance: int, gone: set[int]) -> list[dict[str, Any]]:
    """The slot's other live instances once ``new_instance`` is routed: the one routed until now joins them."""
    if route is None:
        return []
    entries = [*route.standby, *([route.reachable] if route.reachable else [])]
    return [e for e in entries if e.get("instance_id") != new_instance and e.get("instance_id") not in gone]


def _parse_pair(raw: bytes | str) -> tuple[int, int]:
    """A ``gateway:ports`` value, ``'poc_port,inference_port'`` (ValueError otherwise)."""
    text = raw.decode() if isinstance(raw, bytes) else str(raw)
    poc, inference = (int(x) for x in text.split(","))
    return poc, inference


def _port_of(url: str) -> int | None:
    parts = urlsplit(url)
    return parts.port or (443 if parts.scheme == "https" else 80)


async def _silent(tunnel: InstanceTunnel, what: Notice, detail: str) -> None:
    """Stopping the front is not the tunnel ending: keep its Redis record and publish nothing."""
