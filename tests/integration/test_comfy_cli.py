"""Issue #14: `hybridctl comfy` against the real provisioner, the Vast simulator (ssh runtype, real SSH) and the
ComfyUI simulator: create with a local tunnel, exec, destroy frees the port, oneshot leaves nothing billing."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import asyncssh
import pytest
from redis.asyncio import Redis

from hybridctl.comfy.tunnels import TunnelStore, port_free, stop_keeper
from sim.vast import start_vast
from tests.support.procs import ManagedProcess

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "comfy"
pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


async def _cli(env: dict[str, str], *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "hybridctl", *args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    out, err = await asyncio.wait_for(proc.communicate(), timeout)
    return subprocess.CompletedProcess(args, proc.returncode or 0, out.decode(), err.decode())


async def test_create_exec_destroy_and_oneshot(amqp_url: str, redis_url: str, namespace: str, tmp_path: Path) -> None:
    key = asyncssh.generate_private_key("ssh-ed25519")
    key_path = tmp_path / "id_ed25519"
    key.write_private_key(str(key_path))
    key.write_public_key(str(key_path) + ".pub")
    vast = await start_vast(boot_scale=0.2)
    home = tmp_path / "home"
    env = {
        **os.environ,
        "AMQP_URL": amqp_url,
        "REDIS_URL": redis_url,
        "HYBRID_NAMESPACE": namespace,
        "HYBRID_TIME_PROFILE": "test",
        "VAST_URL": vast.url,
        "SSH_KEY_PATH": str(key_path),
        "HYBRIDCTL_HOME": str(home),
        "LOG_JSON": "false",
        "PROVISIONER_METRICS_PORT": "0",
        "PROVISIONER_PROBE_VIA": "direct",
        "COLUMNS": "200",
    }
    config = tmp_path / "comfy.yaml"
    config.write_text(
        f"gpu_names: ['RTX 4090', 'RTX 3090', 'RTX A6000', 'A100 PCIE', 'H100 SXM', 'L40S']\n"
        f"max_dph: 5\nssh_key: {key_path}\n"
    )
    provisioner = ManagedProcess(["-m", "hybrid_provisioner"], env=env, name="provisioner").start()
    redis = Redis.from_url(redis_url)
    for _ in range(300):  # until the replica's heartbeat says it consumes its queue
        if await redis.keys(f"{namespace}:status:provisioner:*"):
            break
        await asyncio.sleep(0.1)
    await redis.aclose()
    os.environ["HYBRIDCTL_HOME"] = str(home)  # for TunnelStore() in this process
    try:
        made = await _cli(env, "comfy", "create", str(config), "--name", "comfy-a", "--timeout", "120")
        assert made.returncode == 0, made.stderr + provisioner.output()[-3000:]
        assert "ComfyUI at http://127.0.0.1:" in made.stdout
        tunnel = next(t for t in TunnelStore(home).all() if t.label == "comfy-a")
        assert tunnel.status == "up" and tunnel.local_port >= 8188 and not port_free(tunnel.local_port)

        ran = await _cli(
            env,
            "comfy",
            "exec",
            str(tunnel.instance_id),
            str(EXAMPLES / "txt2img.api.json"),
            "--out",
            str(tmp_path / "out"),
            "--deadline",
            "60",
        )
        assert ran.returncode == 0, ran.stderr
        outputs = list((tmp_path / "out").glob("*.png"))
        assert outputs and outputs[0].read_bytes().startswith(b"\x89PNG")

        ui = tmp_path / "ui.json"
        ui.write_text(json.dumps({"nodes": [], "links": []}))
        bad = await _cli(env, "comfy", "exec", str(tunnel.instance_id), str(ui))
        assert bad.returncode != 0 and "UI format" in bad.stderr

        gone = await _cli(env, "comfy", "destroy", str(tunnel.instance_id))
        assert gone.returncode == 0 and f"local port {tunnel.local_port} freed" in gone.stdout
        for _ in range(100):
            if port_free(tunnel.local_port) and vast.ledger()["instances_live"] == 0:
                break
            await asyncio.sleep(0.2)
        assert port_free(tunnel.local_port), "the keeper closed the destroyed instance's tunnel"
        assert vast.ledger()["instances_live"] == 0

        # oneshot: create → exec → outputs → destroy; and when the workflow fails it still destroys.
        shot = await _cli(
            env,
            "comfy",
            "oneshot",
            str(config),
            str(EXAMPLES / "txt2img.api.json"),
            "--out",
            str(tmp_path / "shot"),
            "--timeout",
            "120",
            "--deadline",
            "60",
        )
        assert shot.returncode == 0, shot.stderr
        assert list((tmp_path / "shot").glob("*.png"))
        failing = json.loads((EXAMPLES / "txt2img.api.json").read_text())
        failing["4"]["inputs"]["ckpt_name"] = "missing.safetensors"
        (tmp_path / "failing.json").write_text(json.dumps(failing))
        shot2 = await _cli(
            env,
            "comfy",
            "oneshot",
            str(config),
            str(tmp_path / "failing.json"),
            "--out",
            str(tmp_path / "shot2"),
            "--timeout",
            "120",
            "--deadline",
            "60",
        )
        assert shot2.returncode != 0 and "missing.safetensors" in shot2.stderr
        for _ in range(100):
            if vast.ledger()["instances_live"] == 0:
                break
            await asyncio.sleep(0.2)
        assert vast.ledger()["instances_live"] == 0, "oneshot left an instance billing"
    finally:
        stop_keeper(home)
        provisioner.stop()
        # The emergency path, as a child process: the Vast simulator runs on this test's event loop.
        sweep = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "hybrid_provisioner",
            "destroy",
            "--all-labelled",
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        await asyncio.wait_for(sweep.wait(), 60)
        await vast.close()
