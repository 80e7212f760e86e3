"""Issue #7 acceptance: a full PoC driven by the network simulator through the node front.

The test plays the provisioner (rent on the Vast simulator, publish ``instance.reachable``, probe through the front,
register the slot in the dapi admin API with the front's address and the slot's gateway ports) so that only the front
is under test. The MLNodes are the Vast simulator's MLNode workloads; the dapi simulator calls every node with its
``/{version}`` prefix, as the real one does.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp

from hybrid_common import TEST
from hybrid_common.messages.events import InstanceDestroyed
from sim.network import start_dapi
from sim.vast import start_vast
from tests.integration.test_node_front import (
    VERSION,
    FrontHarness,
    VastClient,
    eventually,
    get_json,
    make_ssh_key,
    reachable,
)
from tests.integration.test_node_front import harness_factory as harness_factory  # the fixture, shared
from tests.support.net import free_port
from tests.support.tcpproxy import TcpProxy

EPOCH_MODEL = "Qwen/Qwen2.5-7B-Instruct"
POC_LEAD_BLOCKS = 16  # registration happens with the clock paused; this many blocks then run before poc_start


async def admin_upsert(admin_url: str, node_id: str, host: str, poc_port: int, inference_port: int) -> dict[str, Any]:
    body = {
        "id": node_id,
        "host": host,
        "inference_port": inference_port,
        "inference_segment": "",
        "poc_port": poc_port,
        "poc_segment": "",
        "max_concurrent": 500,
        "models": {EPOCH_MODEL: {"args": []}},
        "hardware": [{"type": "H100", "count": 1}],
    }
    async with aiohttp.ClientSession() as s, s.post(f"{admin_url}/admin/v1/nodes", json=body) as r:
        data = await r.json(content_type=None)
        assert r.status == 200, data
        return dict(data)


async def admin_nodes(admin_url: str) -> dict[str, dict[str, Any]]:
    async with aiohttp.ClientSession() as s, s.get(f"{admin_url}/admin/v1/nodes") as r:
        rows = await r.json(content_type=None)
    return {row["node"]["id"]: row for row in rows}


async def sim_post(public_url: str, path: str, body: Any = None) -> Any:
    async with aiohttp.ClientSession() as s, s.post(f"{public_url}{path}", json=body or {}) as r:
        data = await r.json(content_type=None)
        assert r.status == 200, data
        return data


async def report(public_url: str) -> dict[str, Any]:
    _, data = await get_json(f"{public_url}/_sim/report", timeout=10)
    assert isinstance(data, dict)
    return data


async def weights_fixed(public_url: str, poc_start: int, timeout: float = 90.0) -> dict[str, Any]:
    """The report's epoch whose PoC started at ``poc_start``, once its weights are fixed."""

    async def check() -> dict[str, Any] | None:
        for epoch in (await report(public_url))["epochs"]:
            if epoch["poc_start"] == poc_start and epoch["weights_fixed_at"] is not None:
                return dict(epoch)
        return None

    result: dict[str, Any] = await eventually(check, timeout=timeout, what=f"weights of the PoC at {poc_start}")
    return result


async def test_poc_through_the_front_earns_weight_a_bare_registration_does_not_and_a_replacement_keeps_node_num(
    harness_factory: Callable[..., Awaitable[FrontHarness]],
) -> None:
    vast = await start_vast(profile=TEST, boot_scale=0.05, rate_limits=False)
    dapi = await start_dapi(profile=TEST, mlnode_version=VERSION, inference_interval_seconds=0)
    h = await harness_factory()
    try:
        await sim_post(dapi.public_url, "/_sim/clock/pause")
        client = VastClient(vast.url)
        fronted, bare = await asyncio.gather(
            client.rent(runtype="args", label="ghm-gpu-1-0"), client.rent(runtype="args", label="ghm-bare-0")
        )
        gw = (free_port(), free_port())
        await h.redis.hset(h.keys.gateway_ports(), "gpu-1", f"{gw[0]},{gw[1]}")  # the provisioner's allocation
        await h.start()
        await h.publish(
            reachable(
                "gpu-1", fronted.instance_id, gw, api_port=fronted.api_port, inference_port=fronted.inference_port
            )
        )
        # The provisioner's readiness probe goes through the front: "ready" = the dapi can reach it.
        await eventually(
            lambda: _state_ok(f"http://127.0.0.1:{gw[0]}/{VERSION}/api/v1/state"),
            timeout=60,
            what="MLNode ready through the front",
        )

        registered = await admin_upsert(dapi.admin_url, "gpu-1", "127.0.0.1", *gw)
        assert registered["poc_port"] == gw[0]
        # The negative control: the same kind of GPU registered at its own address, no front.
        await admin_upsert(dapi.admin_url, "bare-1", "127.0.0.1", bare.api_port, bare.inference_port)
        height, poc_start = await _next_poc(dapi.public_url)
        await sim_post(dapi.public_url, "/_sim/clock/jump", {"height": max(height, poc_start - POC_LEAD_BLOCKS)})
        await sim_post(dapi.public_url, "/_sim/clock/resume")

        epoch = await weights_fixed(dapi.public_url, poc_start)
        nodes = epoch["nodes"]
        assert nodes["gpu-1"]["registered_at_height"] < poc_start
        assert nodes["gpu-1"]["batches"]["generated"]["accepted"] > 0
        assert nodes["gpu-1"]["weight"] > 0, nodes["gpu-1"]
        assert nodes["bare-1"]["weight"] == 0, nodes["bare-1"]
        assert nodes["bare-1"]["batches"]["generated"]["accepted"] == 0

        # Replace the slot's GPU: destroy + a new instance on the same slot keeps its gateway ports and node_num.
        node_num = (await admin_nodes(dapi.admin_url))["gpu-1"]["node"]["node_num"]
        replacement = await client.rent(runtype="args", label="ghm-gpu-1-1")
        await client.destroy(fronted.instance_id)
        await h.publish(InstanceDestroyed(slot_id="gpu-1", instance_id=fronted.instance_id, reason="host offline"))
        await h.publish(
            reachable(
                "gpu-1",
                replacement.instance_id,
                gw,
                api_port=replacement.api_port,
                inference_port=replacement.inference_port,
            )
        )

        async def moved() -> dict[str, Any] | None:
            route = await h.route("gpu-1")
            return (
                route if route and route["instance_id"] == replacement.instance_id and route["state"] == "up" else None
            )

        route = await eventually(moved, timeout=60, what="route moved to the replacement")
        assert (route["gateway_poc_port"], route["gateway_inference_port"]) == gw
        await admin_upsert(dapi.admin_url, "gpu-1", "127.0.0.1", *gw)  # the provisioner's upsert: same id and ports
        after = (await admin_nodes(dapi.admin_url))["gpu-1"]["node"]
        assert after["node_num"] == node_num and (after["poc_port"], after["inference_port"]) == gw
        status, body = await get_json(f"http://127.0.0.1:{gw[0]}/{VERSION}/api/v1/state")
        assert status == 200 and "state" in body
    finally:
        await h.stop()
        await dapi.close()
        await vast.close()


async def test_tunnel_mode_poc_survives_a_killed_ssh_connection_with_callbacks_through_the_tunnel(
    harness_factory: Callable[..., Awaitable[FrontHarness]], tmp_path: Any
) -> None:
    """ssh runtype, reached only over SSH, its callbacks only through the tunnel's remote forward (the relay's
    public URL is unreachable from the GPU): the PoC counts although the SSH connection is killed mid-generation;
    destroying the instance then closes the route and frees its tunnel."""
    unreachable_relay = "http://relay.unreachable.invalid:9300"
    vast = await start_vast(profile=TEST, boot_scale=0.05, rate_limits=False)
    # The dapi hands MLNodes the relay's public URL; the dapi's own callback server stands in for the relay here.
    dapi = await start_dapi(
        profile=TEST, mlnode_version=VERSION, inference_interval_seconds=0, callback_base=unreachable_relay
    )
    public = make_ssh_key(tmp_path / "id_ed25519")
    h = await harness_factory(relay_public_url=unreachable_relay, front_relay_local_url=dapi.callback_url)
    ssh_proxy: TcpProxy | None = None
    try:
        await sim_post(dapi.public_url, "/_sim/clock/pause")
        client = VastClient(vast.url)
        gpu = await client.rent(runtype="ssh_direc ssh_proxy", ssh_public_key=public, label="ghm-gpu-t-0")
        ssh_proxy = await TcpProxy("127.0.0.1", gpu.ssh_port).start()
        gw = (free_port(), free_port())
        await h.redis.hset(h.keys.gateway_ports(), "gpu-t", f"{gw[0]},{gw[1]}")
        await h.start()
        await h.publish(
            reachable(
                "gpu-t",
                gpu.instance_id,
                gw,
                api_port=gpu.api_port,
                inference_port=gpu.inference_port,
                connectivity="tunnel",
                ssh_host="127.0.0.1",
                ssh_port=ssh_proxy.port,
            )
        )
        await eventually(
            lambda: _state_ok(f"http://127.0.0.1:{gw[0]}/{VERSION}/api/v1/state"),
            timeout=60,
            what="MLNode ready through the tunnel",
        )
        await admin_upsert(dapi.admin_url, "gpu-t", "127.0.0.1", *gw)
        height, poc_start = await _next_poc(dapi.public_url)
        await sim_post(dapi.public_url, "/_sim/clock/jump", {"height": max(height, poc_start - POC_LEAD_BLOCKS)})
        await sim_post(dapi.public_url, "/_sim/clock/resume")

        # Mid-generation, once batches flow: kill the SSH connection (the proxy drops it; new connections pass).
        async def generating() -> bool:
            _, batches = await get_json(f"{dapi.public_url}/_sim/batches?node_id=gpu-t&kind=generated")
            return isinstance(batches, list) and len(batches) > 0

        await eventually(generating, timeout=60, what="first generated batches through the tunnel")
        cut_height = dapi.height
        ssh_proxy.cut()
        ssh_proxy.restore()

        epoch = await weights_fixed(dapi.public_url, poc_start)
        node = epoch["nodes"]["gpu-t"]
        assert node["weight"] > 0, node
        _, batches = await get_json(f"{dapi.public_url}/_sim/batches?node_id=gpu-t")
        accepted = [b for b in batches if b["status"] == "accepted"]
        assert any(b["arrival_height"] > cut_height for b in accepted), "batches kept arriving after the cut"
        assert any(b["kind"] == "validated" for b in accepted)
        view = await h.tunnel(gpu.instance_id)
        assert view["reopen_count"] >= 1 and view["state"] == "open"

        # The instance goes: the route closes and the tunnel is freed.
        await client.destroy(gpu.instance_id)
        await h.publish(InstanceDestroyed(slot_id="gpu-t", instance_id=gpu.instance_id, reason="released"))

        async def freed() -> bool:
            route = await h.route("gpu-t")
            gone = await h.redis.hget(h.keys.tunnels(), str(gpu.instance_id)) is None
            return bool(route and route["instance_id"] is None and gone)

        await eventually(freed, what="route closed and tunnel freed")
        assert h.front is not None and gpu.instance_id not in h.front.tunnels
        status, _ = await get_json(f"http://127.0.0.1:{gw[0]}/{VERSION}/api/v1/state")
        assert status == 503
    finally:
        await h.stop()
        if ssh_proxy is not None:
            await ssh_proxy.close()
        await dapi.close()
        await vast.close()


async def _next_poc(public_url: str) -> tuple[int, int]:
    """(height now, the next PoC start height) from the dapi's public API."""
    _, latest = await get_json(f"{public_url}/v1/epochs/latest")
    return int(latest["block_height"]), int(latest["epoch_stages"]["next_poc_start"])


async def _state_ok(url: str) -> bool:
    try:
        status, _ = await get_json(url, timeout=3)
    except (aiohttp.ClientError, OSError):
        return False
    return status == 200
