"""Issue #7: the node front — gateway ports, version prefixes, routes from events, restore, tunnel commands.

Real RabbitMQ and Redis, a real MLNode simulator behind the front. The PoC acceptance runs (dapi simulator, Vast
simulator, SSH) are in test_node_front_poc.py.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson
import pytest
from redis.asyncio import Redis

from hybrid_common import TEST
from hybrid_common.bus import Publisher, Requester, connect
from hybrid_common.messages import Payload
from hybrid_common.messages.commands import TunnelListQuery, TunnelListReply
from hybrid_common.messages.domain import PortMap
from hybrid_common.messages.events import InstanceDestroyed, InstanceReachable
from hybrid_common.redis_keys import RedisKeys
from hybrid_common.topology import Topology
from hybrid_proxy.front import FrontSettings, NodeFront, strip_version
from sim.mlnode import start_mlnode
from tests.support.net import free_port

VERSION = "v3.0.8"


async def eventually(check: Callable[[], Awaitable[Any]], *, timeout: float = 20.0, what: str = "condition") -> Any:
    """Poll ``check`` until it returns a truthy value (generous deadline: the machine is shared)."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = await check()
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            last = exc
        if last:
            return last
        await asyncio.sleep(0.05)
    raise AssertionError(f"{what} not reached within {timeout}s (last: {last!r})")


@dataclass
class FrontHarness:
    """A node front started in-process against the real broker and Redis, plus what a test needs around it."""

    settings: FrontSettings
    redis: Redis
    publisher: Publisher
    keys: RedisKeys
    connection: Any
    topology: Topology
    front: NodeFront | None = None

    async def start(self) -> NodeFront:
        self.front = NodeFront(self.settings, self.redis, self.connection, self.topology)
        await self.front.start()
        return self.front

    async def stop(self) -> None:
        if self.front is not None:
            await self.front.stop()
            self.front = None

    async def publish(self, payload: Payload) -> None:
        await self.publisher.publish(payload)

    async def route(self, slot_id: str) -> dict[str, Any] | None:
        raw = await self.redis.hget(self.keys.front_routes(), slot_id)
        return orjson.loads(raw) if raw else None

    async def tunnel(self, instance_id: int) -> dict[str, Any]:
        raw = await self.redis.hget(self.keys.tunnels(), str(instance_id))
        assert raw is not None, f"no tunnel record for instance {instance_id}"
        view: dict[str, Any] = orjson.loads(raw)
        return view

    async def wait_state(self, slot_id: str, state: str, timeout: float = 30.0) -> dict[str, Any]:
        async def check() -> dict[str, Any] | None:
            route = await self.route(slot_id)
            return route if route and route["state"] == state else None

        result: dict[str, Any] = await eventually(check, timeout=timeout, what=f"slot {slot_id} {state}")
        return result


@pytest.fixture
async def harness_factory(
    amqp_url: str, redis_url: str, namespace: str, tmp_path: Any
) -> AsyncIterator[Callable[..., Awaitable[FrontHarness]]]:
    made: list[FrontHarness] = []
    conn = await connect(amqp_url, name="test-front")
    redis = Redis.from_url(redis_url)
    topology = Topology(namespace)

    async def make(**overrides: Any) -> FrontHarness:
        fields: dict[str, Any] = {
            "namespace": namespace,
            "amqp_url": amqp_url,
            "redis_url": redis_url,
            "node_front_host": "127.0.0.1",
            "ssh_key_path": str(tmp_path / "id_ed25519"),
            "front_probe_interval": 0.2,
            "front_probe_timeout": 2.0,
            "front_scan_interval": 0.2,
            "front_ssh_keepalive": 1.0,
            "front_tunnel_retry_max": 0.5,
        }
        fields.update(overrides)
        h = FrontHarness(
            settings=FrontSettings(**fields),
            redis=redis,
            publisher=Publisher(conn, topology, "test"),
            keys=RedisKeys(namespace),
            connection=conn,
            topology=topology,
        )
        made.append(h)
        return h

    yield make
    for h in made:
        await h.stop()
    await conn.close()
    await redis.aclose()


def reachable(
    slot_id: str,
    instance_id: int,
    gateway: tuple[int, int],
    *,
    api_port: int,
    inference_port: int,
    connectivity: str = "direct",
    ssh_host: str | None = None,
    ssh_port: int | None = None,
    public_ip: str = "127.0.0.1",
) -> InstanceReachable:
    return InstanceReachable(
        job_id=f"job-{slot_id}",
        slot_id=slot_id,
        instance_id=instance_id,
        connectivity=connectivity,
        public_ip=public_ip,
        ports=[
            PortMap(container_port=8080, host_port=api_port),
            PortMap(container_port=5000, host_port=inference_port),
        ],
        ssh_host=ssh_host,
        ssh_port=ssh_port,
        gateway_poc_port=gateway[0],
        gateway_inference_port=gateway[1],
    )


async def get_json(url: str, timeout: float = 5.0) -> tuple[int, Any]:
    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout)) as s,
        s.get(url) as r,
    ):
        body = await r.read()
        try:
            return r.status, orjson.loads(body)
        except orjson.JSONDecodeError:
            return r.status, body.decode(errors="replace")


def test_version_prefix_is_stripped_and_real_paths_are_not() -> None:
    assert strip_version("/v3.0.8/api/v1/state") == "/api/v1/state"
    assert strip_version("/v3.0.12-post1/api/v1/inference/pow/status?x=1") == "/api/v1/inference/pow/status?x=1"
    assert strip_version("/v3.0.8") == "/"
    assert strip_version("/v1/chat/completions") == "/v1/chat/completions"
    assert strip_version("/v3.0.8/v1/chat/completions") == "/v1/chat/completions"
    assert strip_version("/v2/poc-batches/generated") == "/v2/poc-batches/generated"
    assert strip_version("/health") == "/health"


async def test_gateway_routes_a_slot_to_its_gpu_and_back_to_503(
    harness_factory: Callable[..., Awaitable[FrontHarness]],
) -> None:
    """Prefixed and bare calls reach the unprefixed MLNode, bodies stream both ways, and a slot without a GPU
    answers 503 at once; the route survives a front restart; tunnel.list answers over the queue."""
    h = await harness_factory()
    gw = (free_port(), free_port())
    await h.redis.hset(h.keys.gateway_ports(), "slot-a", f"{gw[0]},{gw[1]}")
    node = await start_mlnode(generation="v1", profile=TEST, model_download_seconds=0.2, vllm_load_seconds=0.2)
    try:
        await h.start()
        base = f"http://127.0.0.1:{gw[0]}/{VERSION}"

        # Ports allocated, no GPU yet: a clear 503, fast — never a hang.
        t0 = time.monotonic()
        status, body = await eventually(lambda: _answer(f"{base}/api/v1/state"), what="listener for an allocated slot")
        assert status == 503 and body["slot_id"] == "slot-a" and "no reachable GPU" in body["message"]
        assert time.monotonic() - t0 < 10

        # The trap the front exists for: the MLNode itself 404s a prefixed path.
        status, _ = await get_json(f"{node.api_url}/{VERSION}/api/v1/state")
        assert status == 404

        await h.publish(reachable("slot-a", 101, gw, api_port=node.api_port, inference_port=node.inference_port))
        route = await h.wait_state("slot-a", "up")
        assert route["instance_id"] == 101 and route["connectivity"] == "direct"
        assert (route["gateway_poc_port"], route["gateway_inference_port"], route["host"]) == (*gw, "127.0.0.1")
        status, body = await get_json(f"{base}/api/v1/state")
        assert status == 200 and body["state"] in {"STOPPED", "INFERENCE"}
        status, body = await get_json(f"http://127.0.0.1:{gw[0]}/api/v1/state")  # bare paths too
        assert status == 200

        # The inference port: vLLM up through the PoC port, then a streamed completion through the inference port.
        async with aiohttp.ClientSession() as s:
            async with s.post(
                f"{base}/api/v1/inference/up",
                json={"model": "Qwen/Qwen2.5-7B-Instruct", "dtype": "float16", "additional_args": []},
            ) as r:
                assert r.status == 200, await r.text()
            inf = f"http://127.0.0.1:{gw[1]}/{VERSION}"
            await eventually(lambda: _ok(f"{inf}/health"), what="vLLM up behind the inference gateway")
            chunks: list[bytes] = []
            async with s.post(
                f"{inf}/v1/chat/completions",
                json={
                    "model": "Qwen/Qwen2.5-7B-Instruct",
                    "messages": [{"role": "user", "content": "count to twenty please"}],
                    "stream": True,
                    "max_tokens": 40,
                    "logprobs": True,
                    "top_logprobs": 5,
                },
            ) as r:
                assert r.status == 200 and r.headers["Content-Type"].startswith("text/event-stream")
                async for chunk in r.content.iter_any():
                    chunks.append(chunk)
            text = b"".join(chunks)
            assert text.rstrip().endswith(b"data: [DONE]") and text.count(b"data: ") > 3
            assert len(chunks) > 1  # arrived as a stream, not one buffered body

        # Restart: the new front restores the route from Redis without any event.
        await h.stop()
        await h.start()
        await h.wait_state("slot-a", "up")
        status, _ = await get_json(f"{base}/api/v1/state")
        assert status == 200

        requester = Requester(h.connection, Publisher(h.connection, h.topology, "cli"))
        await requester.start()
        listed = await requester.ask(TunnelListQuery(), TunnelListReply, timeout=10)
        assert listed.tunnels == []  # direct routes hold no tunnel

        # The instance goes: the route closes, the ports stay and answer 503 again.
        await h.publish(InstanceDestroyed(slot_id="slot-a", instance_id=101, reason="released"))
        route = await h.wait_state("slot-a", "down")
        assert route["instance_id"] is None and "destroyed" in route["reason"]
        status, body = await get_json(f"{base}/api/v1/state")
        assert status == 503 and body["state"] == "down"
        assert h.front is not None and h.front.status()["slots"]["slot-a"]["listening"]

        # A late duplicate of the old instance's reachable does not resurrect it.
        await h.publish(reachable("slot-a", 101, gw, api_port=node.api_port, inference_port=node.inference_port))
        await asyncio.sleep(0.5)  # give a wrong resurrection time to show; the assertion is the state below
        late = await h.route("slot-a")
        assert late is not None and late["instance_id"] is None

        # A hedge: two instances race for one slot; the loser's destruction leaves the winner routed, and when the
        # routed one goes first the survivor takes over.
        hg = (free_port(), free_port())
        for iid in (201, 202):
            await h.publish(reachable("slot-h", iid, hg, api_port=node.api_port, inference_port=node.inference_port))
        await eventually(lambda: _routed(h, "slot-h", 202, "up"), what="latest hedge routed")
        await h.publish(InstanceDestroyed(slot_id="slot-h", instance_id=202, reason="hedge lost"))
        await eventually(lambda: _routed(h, "slot-h", 201, "up"), what="survivor routed")
        await h.publish(InstanceDestroyed(slot_id="slot-h", instance_id=201, reason="released"))
        await eventually(lambda: _routed(h, "slot-h", None, "down"), what="hedged slot closed")

        # The provisioner releases the slot's ports: the front frees them.
        await h.redis.hdel(h.keys.gateway_ports(), "slot-a")
        await eventually(lambda: _none(h.route("slot-a")), what="route removed")
        await eventually(lambda: _refused(f"{base}/api/v1/state"), what="gateway port closed")
    finally:
        await node.close()


async def _routed(h: FrontHarness, slot_id: str, instance_id: int | None, state: str) -> bool:
    route = await h.route(slot_id)
    return bool(route and route["instance_id"] == instance_id and route["state"] == state)


async def _answer(url: str) -> tuple[int, Any] | None:
    try:
        return await get_json(url, timeout=3)
    except (aiohttp.ClientConnectionError, OSError):
        return None


async def _ok(url: str) -> bool:
    status, _ = await get_json(url, timeout=3)
    return status == 200


async def _none(value: Awaitable[Any]) -> bool:
    return (await value) is None


async def _refused(url: str) -> bool:
    try:
        await get_json(url, timeout=3)
    except (aiohttp.ClientConnectionError, OSError):
        return True
    return False


# --------------------------------------------------------------------------------------------- Vast + SSH helpers

MLNODE_IMAGE = "ghcr.io/product-science/mlnode:3.0.11-post1"


def make_ssh_key(path: Any) -> str:
    """A throwaway ed25519 key at ``path`` (the front's SSH_KEY_PATH); returns the public key to attach."""
    import asyncssh

    key = asyncssh.generate_private_key("ssh-ed25519")
    key.write_private_key(str(path))
    public = key.export_public_key().decode().strip()
    (path.parent / (path.name + ".pub")).write_text(public + "\n")
    return public


@dataclass
class Rented:
    instance_id: int
    api_port: int
    inference_port: int
    ssh_host: str
    ssh_port: int


class VastClient:
    """The few Vast.ai calls a provisioner makes to rent an MLNode (vastai-api.md), for the tests to act it out."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.headers = {"Authorization": "Bearer test"}

    async def call(self, method: str, path: str, body: Any = None, *, ok: tuple[int, ...] = (200,)) -> Any:
        async with (
            aiohttp.ClientSession(headers=self.headers) as s,
            s.request(method, f"{self.url}{path}", json=body) as r,
        ):
            data = await r.json(content_type=None)
            assert r.status in ok, (method, path, r.status, data)
            return data

    async def rent(self, *, runtype: str, ssh_public_key: str | None = None, label: str = "ghm-test") -> Rented:
        from sim.workloads import MLNODE_START_COMMAND

        offers = (
            await self.call(
                "POST",
                "/api/v0/bundles/",
                {
                    "rentable": {"eq": True},
                    "rented": {"eq": False},
                    "direct_port_count": {"gte": 2},
                    "gpu_ram": {"gte": 40000},
                    "order": [["dph_total", "asc"]],
                    "type": "on-demand",
                    "limit": 5,
                },
            )
        )["offers"]
        body: dict[str, Any] = {
            "client_id": "me",
            "image": MLNODE_IMAGE,
            "env": {"-p 8080:8080": "1", "-p 5000:5000": "1"},
            "disk": 40,
            "label": label,
            "runtype": runtype,
        }
        if runtype != "args":
            # vastai-api.md: ssh runtypes replace the entrypoint; the MLNode must be started from onstart.
            body["onstart"] = MLNODE_START_COMMAND
        for offer in offers:  # another rental may have taken an offer meanwhile (vastai-api.md: 404/410 no_such_ask)
            created = await self.call("PUT", f"/api/v0/asks/{offer['id']}/", body, ok=(200, 404, 410))
            if created.get("success"):
                break
        instance_id = int(created["new_contract"])
        if ssh_public_key is not None:
            await self.call("POST", f"/api/v0/instances/{instance_id}/ssh/", {"ssh_key": ssh_public_key})

        async def running() -> dict[str, Any] | None:
            inst = (await self.call("GET", f"/api/v0/instances/{instance_id}/"))["instances"]
            return inst if inst and inst.get("actual_status") == "running" and inst.get("ports") else None

        inst = await eventually(running, timeout=60, what=f"instance {instance_id} running")
        ports = inst["ports"]
        return Rented(
            instance_id=instance_id,
            api_port=int(ports["8080/tcp"][0]["HostPort"]),
            inference_port=int(ports["5000/tcp"][0]["HostPort"]),
            ssh_host=str(inst["ssh_host"]),
            ssh_port=int(inst["ssh_port"]),
        )

    async def destroy(self, instance_id: int) -> None:
        await self.call("DELETE", f"/api/v0/instances/{instance_id}/", {})


class EventTap:
    """Collects the events a test cares about from its own queue on the events exchange."""

    def __init__(self, h: FrontHarness, *bindings: str) -> None:
        self.h = h
        self.bindings = bindings
        self.seen: list[Any] = []
        self._consumer: Any = None

    async def start(self) -> EventTap:
        from hybrid_common.bus import Consumer, Delivery
        from hybrid_common.topology import QueueSpec

        async def on(d: Delivery) -> None:
            self.seen.append(d.payload)

        self._consumer = Consumer(
            self.h.connection, self.h.topology, self.h.redis, QueueSpec("test.tap", "events", self.bindings), on
        )
        await self._consumer.start()
        return self

    def of(self, kind: type) -> list[Any]:
        return [p for p in self.seen if isinstance(p, kind)]

    async def stop(self) -> None:
        if self._consumer is not None:
            await self._consumer.stop()


async def test_tunnel_mode_reopens_after_a_cut_carries_callbacks_and_closes_with_the_instance(
    harness_factory: Callable[..., Awaitable[FrontHarness]], tmp_path: Any
) -> None:
    """An ssh-runtype GPU reached only through SSH: the route comes up over the tunnel, a killed SSH connection is
    re-opened on the same ports, the remote forward carries callbacks to the relay, tunnel commands work, and
    destroying the instance closes the route and frees the tunnel."""
    from aiohttp import web

    from hybrid_common.messages.commands import TunnelOpen
    from hybrid_common.messages.events import TunnelClosed, TunnelFailed, TunnelOpened
    from sim.vast import start_vast
    from tests.support.tcpproxy import TcpProxy

    # A stand-in for the relay: counts what reaches it.
    received: list[bytes] = []

    async def relay(request: web.Request) -> web.Response:
        received.append(await request.read())
        return web.Response(status=200)

    relay_app = web.Application()
    relay_app.router.add_post("/v1/poc-batches/{kind}", relay)
    relay_runner = web.AppRunner(relay_app)
    await relay_runner.setup()
    relay_port = free_port()
    await web.TCPSite(relay_runner, "127.0.0.1", relay_port).start()

    public = make_ssh_key(tmp_path / "id_ed25519")
    vast = await start_vast(profile=TEST, boot_scale=0.05, rate_limits=False)
    h = await harness_factory(
        relay_public_url="http://relay.unreachable.invalid:9300", front_relay_local_url=f"http://127.0.0.1:{relay_port}"
    )
    tap: EventTap | None = None
    ssh_proxy: TcpProxy | None = None
    try:
        client = VastClient(vast.url)
        gpu = await client.rent(runtype="ssh_direc ssh_proxy", ssh_public_key=public)
        ssh_proxy = await TcpProxy("127.0.0.1", gpu.ssh_port).start()  # lets the test kill the SSH connection
        await h.start()
        tap = await EventTap(h, "tunnel.*").start()
        gw = (free_port(), free_port())
        await h.publish(
            reachable(
                "slot-t",
                gpu.instance_id,
                gw,
                api_port=gpu.api_port,
                inference_port=gpu.inference_port,
                connectivity="tunnel",
                ssh_host="127.0.0.1",
                ssh_port=ssh_proxy.port,
            )
        )
        route = await h.wait_state("slot-t", "up", timeout=60)
        assert route["connectivity"] == "tunnel"
        status, body = await get_json(f"http://127.0.0.1:{gw[0]}/{VERSION}/api/v1/state")
        assert status == 200 and "state" in body

        tunnels = await h.tunnel(gpu.instance_id)
        assert tunnels["state"] == "open"
        local_before = {f["remote_port"]: f["local_port"] for f in tunnels["forwards"]}
        assert set(local_before) == {8080, 5000}
        remote = tunnels["callback_forward"]["remote_port"]
        assert tunnels["callback_forward"]["bound"]

        # The GPU's localhost:R is the relay (in the simulator a container's localhost is this machine's).
        async with (
            aiohttp.ClientSession() as s,
            s.post(f"http://127.0.0.1:{remote}/v1/poc-batches/generated", data=b"{}") as r,
        ):
            assert r.status == 200
        assert received == [b"{}"]
        opened_before = len(tap.of(TunnelOpened))

        # Kill the SSH connection: the tunnel is re-opened on the same local ports and the same GPU-side port.
        ssh_proxy.cut()
        ssh_proxy.restore()

        async def reopened() -> dict[str, Any] | None:
            view = await h.tunnel(gpu.instance_id)
            return view if view["reopen_count"] >= 1 and view["state"] == "open" else None

        view = await eventually(reopened, timeout=30, what="tunnel re-opened")
        assert {f["remote_port"]: f["local_port"] for f in view["forwards"]} == local_before
        assert view["callback_forward"]["remote_port"] == remote and view["callback_forward"]["bound"]
        await eventually(lambda: _ok(f"http://127.0.0.1:{gw[0]}/{VERSION}/api/v1/state"), what="route back")
        async with (
            aiohttp.ClientSession() as s,
            s.post(f"http://127.0.0.1:{remote}/v1/poc-batches/validated", data=b"[]") as r,
        ):
            assert r.status == 200
        assert received[-1] == b"[]"
        await eventually(lambda: _true(len(tap.of(TunnelOpened)) > opened_before), what="tunnel.opened again")
        assert tap.of(TunnelFailed), "the lost connection is reported"

        # Commands: an extra forward to a container port, then the list query.
        await h.publisher.publish(TunnelOpen(slot_id="slot-t", instance_id=gpu.instance_id, remote_port=22))
        requester = Requester(h.connection, Publisher(h.connection, h.topology, "cli"))
        await requester.start()

        async def listed_with_22() -> list[dict[str, Any]] | None:
            reply = await requester.ask(TunnelListQuery(), TunnelListReply, timeout=10)
            fwd = [f for t in reply.tunnels for f in t["forwards"] if f["remote_port"] == 22 and f["bound"]]
            return reply.tunnels if fwd else None

        await eventually(listed_with_22, what="tunnel.open forward listed")

        # The instance goes: route closed, tunnel freed (no record, local ports closed, tunnel.closed published).
        await client.destroy(gpu.instance_id)
        await h.publish(InstanceDestroyed(slot_id="slot-t", instance_id=gpu.instance_id, reason="released"))

        async def closed() -> dict[str, Any] | None:
            route = await h.route("slot-t")
            return route if route and route["instance_id"] is None else None

        route = await eventually(closed, what="route closed")
        assert route["state"] == "down" and "destroyed" in route["reason"]
        await eventually(
            lambda: _none(h.redis.hget(h.keys.tunnels(), str(gpu.instance_id))), what="tunnel record removed"
        )
        assert h.front is not None and h.front.tunnels == {}
        await eventually(lambda: _refused(f"http://127.0.0.1:{local_before[8080]}/api/v1/state"), what="forward freed")
        await eventually(lambda: _true(len(tap.of(TunnelClosed)) >= 2), what="tunnel.closed published")
        status, body = await get_json(f"http://127.0.0.1:{gw[0]}/{VERSION}/api/v1/state")
        assert status == 503
    finally:
        if tap is not None:
            await tap.stop()
        await h.stop()
        if ssh_proxy is not None:
            await ssh_proxy.close()
        await vast.close()
        await relay_runner.cleanup()


async def _true(value: bool) -> bool:
    return value


async def test_a_silent_direct_address_falls_back_to_the_ssh_tunnel(
    harness_factory: Callable[..., Awaitable[FrontHarness]], tmp_path: Any
) -> None:
    """The event says direct, but the mapped port does not answer (a firewall): after FRONT_DIRECT_FALLBACK_AFTER the
    front tries SSH, finds the GPU there, and switches the route to the tunnel."""
    from sim.vast import start_vast

    public = make_ssh_key(tmp_path / "id_ed25519")
    vast = await start_vast(profile=TEST, boot_scale=0.05, rate_limits=False)
    h = await harness_factory(front_direct_fallback_after=0.5)
    try:
        gpu = await VastClient(vast.url).rent(runtype="ssh_direc ssh_proxy", ssh_public_key=public)
        await h.start()
        gw = (free_port(), free_port())
        silent = free_port()  # nothing listens there: what a blocked direct port looks like from here
        await h.publish(
            reachable(
                "slot-f",
                gpu.instance_id,
                gw,
                api_port=silent,
                inference_port=silent,
                ssh_host="127.0.0.1",
                ssh_port=gpu.ssh_port,
            )
        )
        route = await h.wait_state("slot-f", "up", timeout=60)
        assert route["connectivity"] == "tunnel" and route["fell_back_to_tunnel"] is True
        status, _ = await get_json(f"http://127.0.0.1:{gw[0]}/{VERSION}/api/v1/state")
        assert status == 200
    finally:
        await h.stop()
        await vast.close()
