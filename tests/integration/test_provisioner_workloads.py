"""Issue #6 acceptance: the workload profiles' readiness.

- ``comfyui`` becomes ready only when ``/system_stats`` answers JSON with a CUDA device through the image's auth
  proxy (our own ``WEB_PASSWORD``); one whose ComfyUI never starts (``PORTAL_CONFIG`` not naming it) never does.
- ``mlnode-v2`` becomes ready only once the PoC model is loaded and served (``inference/up`` issued, vLLM healthy),
  on a multi-GPU offer sized by the model's VRAM, and is registered with that model.
"""

from __future__ import annotations

from pathlib import Path

import aiohttp

from hybrid_common.messages.commands import Provision, Release, StartStandby
from hybrid_common.messages.domain import FailureCause, Purpose
from hybrid_common.messages.events import (
    InstanceCreated,
    InstanceFailed,
    InstanceReachable,
    InstanceReady,
    JobCompleted,
    NodeRegistered,
)
from hybrid_provisioner.profiles import POC_V2_MODEL
from tests.integration.test_provisioner_kit import ProvisionerWorld


async def test_comfyui_ready_only_through_its_auth_proxy_with_a_cuda_device(
    amqp_url: str, redis_url: str, namespace: str, tmp_path: Path
) -> None:
    async with ProvisionerWorld(amqp_url, redis_url, namespace, tmp_path, boot_scale=0.2) as w:
        w.start_replica(PROVISIONER_SERVICE_TIMEOUT="6")
        password = "pw-" + namespace
        await w.publish(
            Provision(
                idempotency_key=f"{namespace}-c",
                profile="comfyui",
                slot_ids=["comfy-1"],
                purpose=Purpose.COMFYUI,
                register_node=False,
                env={"WEB_PASSWORD": password},
            )
        )
        await w.publish(
            Provision(
                idempotency_key=f"{namespace}-dark",
                profile="comfyui",
                slot_ids=["comfy-dark"],
                purpose=Purpose.COMFYUI,
                register_node=False,
                env={"WEB_PASSWORD": password, "PORTAL_CONFIG": "localhost:1111:11111:/:Instance Portal"},
            )
        )
        await w.wait(lambda: w.events.of(InstanceReady, slot_id="comfy-1"), 120, "comfyui ready")
        reach = w.events.of(InstanceReachable, slot_id="comfy-1")[-1]
        assert reach.gateway_poc_port is None and reach.ssh_host and reach.ssh_port, "comfyui: no front, SSH details"
        port = next(m.host_port for m in reach.ports if m.container_port == 8188)
        url = f"http://{reach.public_ip}:{port}/system_stats"
        async with aiohttp.ClientSession() as s:
            async with s.get(url) as r:
                assert r.status == 401, "the proxy wants credentials"
            async with s.get(url, headers={"Authorization": f"Bearer {password}"}) as r:
                assert r.status == 200
                stats = await r.json()
        assert any(d.get("type") == "cuda" for d in stats["devices"])
        created = w.events.of(InstanceCreated, slot_id="comfy-1")[0]
        internals = w.vast.world.instances[created.instance_id]
        assert internals.runtype == "ssh" and "/opt/instance-tools/bin/entrypoint.sh" in (internals.onstart or "")
        assert internals.env.get("WEB_PASSWORD") == password and "-p 8188:8188" in internals.env

        # ComfyUI never starts on the other one: never ready, a clear failure at the service timeout.
        await w.wait(
            lambda: [
                f
                for f in w.events.of(InstanceFailed, slot_id="comfy-dark")
                if f.cause == FailureCause.SERVICE_NOT_READY
            ],
            60,
            "comfy-dark failed as not ready",
        )
        assert not w.events.of(InstanceReady, slot_id="comfy-dark")
        await w.publish(Release(idempotency_key=f"{namespace}-r", slot_ids=["comfy-1", "comfy-dark"]))
        await w.wait(lambda: w.events.of(JobCompleted, slot_id="comfy-1"), 60, "released")
        await w.wait(lambda: w.vast.ledger()["instances_live"] == 0, 60, "nothing left running")


async def test_mlnode_v2_ready_only_with_the_poc_model_served(
    amqp_url: str, redis_url: str, namespace: str, tmp_path: Path
) -> None:
    async with ProvisionerWorld(amqp_url, redis_url, namespace, tmp_path, boot_scale=0.2) as w:
        w.start_replica()
        # Not registered: the dapi would reconcile the node (stop → inference/up) and hide what readiness saw.
        await w.publish(
            Provision(
                idempotency_key=f"{namespace}-v2",
                profile="mlnode-v2",
                slot_ids=["v2-a"],
                epoch_index=1,
                register_node=False,
            )
        )
        await w.wait(lambda: w.events.of(InstanceReady, slot_id="v2-a"), 120, "v2 slot ready")
        created = w.events.of(InstanceCreated, slot_id="v2-a")[-1]
        assert created.num_gpus >= 2 and created.gpu_name in {"H100 SXM", "H100 PCIE", "H200", "B200", "A100 SXM4"}
        offer = w.vast.world.instances[created.instance_id].offer
        assert offer.gpu.vram_mb * offer.num_gpus >= 300_000, "sized by the PoC model's VRAM"
        ready = w.events.of(InstanceReady, slot_id="v2-a")[-1]
        reach = w.events.of(InstanceReachable, slot_id="v2-a")[-1]
        # Through the front, as the dapi calls it: vLLM serves the PoC model.
        url = f"http://127.0.0.1:{reach.gateway_poc_port}/v3.0.14/api/v1/state"
        async with aiohttp.ClientSession() as s, s.get(url) as r:
            state = await r.json()
        assert state["loaded_model"] == POC_V2_MODEL and state["inference_healthy"] is True, state
        assert ready.instance_id == created.instance_id
        assert not w.events.of(NodeRegistered), "register_node=false"
        await w.publish(Release(idempotency_key=f"{namespace}-r", slot_ids=["v2-a"], epoch_index=1))
        await w.wait(lambda: w.events.of(JobCompleted, slot_id="v2-a"), 60, "released")
        assert w.vast.ledger()["instances_live"] == 0


async def test_standby_prepulled_stopped_then_started_on_command(
    amqp_url: str, redis_url: str, namespace: str, tmp_path: Path
) -> None:
    async with ProvisionerWorld(amqp_url, redis_url, namespace, tmp_path, boot_scale=0.2) as w:
        w.start_replica()
        await w.publish(
            Provision(idempotency_key=f"{namespace}-s", profile="mlnode-v1", slot_ids=["standby"], start_stopped=True)
        )
        await w.wait(lambda: w.events.of(InstanceCreated, slot_id="standby"), 60, "created stopped")
        created = w.events.of(InstanceCreated, slot_id="standby")[0]
        assert created.stopped

        async def in_standby() -> bool:
            return any(j["state"] == "standby" for j in (await w.jobs()).values())

        await w.wait(in_standby, 60, "the job in standby (image pulled, instance stopped)")
        row = w.instances_of("standby")[0]
        assert row["actual_status"] == "stopped" and row["billed_gpu_seconds"] == 0, "stopped: no GPU billing"
        assert not w.events.of(InstanceReady)
        await w.publish(StartStandby(slot_ids=["standby"]))
        await w.wait(lambda: w.events.of(NodeRegistered, slot_id="standby"), 60, "started and registered")
        assert w.events.of(InstanceReady, slot_id="standby")[0].instance_id == created.instance_id
        assert len(w.instances_of("standby")) == 1
        await w.publish(Release(idempotency_key=f"{namespace}-r", slot_ids=["standby"]))
        await w.wait(lambda: w.vast.ledger()["instances_live"] == 0, 60, "released")
