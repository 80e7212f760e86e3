"""Issue #14 acceptance: `hybridctl comfy` and `hybridctl tunnel` as real processes against the real provisioner, the
Vast simulator (ssh runtype, real SSH) and the ComfyUI simulator inside its instances.

One world per module (Vast simulator, provisioner, keys); each test has its own ``HYBRIDCTL_HOME`` (its own keeper)
and ends with 0 live instances in the Vast ledger. Rentals run concurrently to keep the file quick.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncssh
import pytest

from hybridctl.comfy.tunnels import TunnelStore, port_free, stop_keeper
from tests.support.infra import delete_broker_objects, namespace_objects
from tests.support.net import free_port
from tests.support.procs import CliRun, ManagedProcess, default_sigint

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "comfy"
GPUS = ["RTX 4090", "RTX 3090", "RTX A6000", "A100 PCIE", "H100 SXM", "L40S"]
pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


@dataclass
class World:
    env: dict[str, str]
    vast_url: str
    tmp: Path
    provisioner: ManagedProcess

    def config(self, name: str, **extra: Any) -> Path:
        """A create config (JSON is YAML); ``ssh_key`` defaults to the key the provisioner attaches."""
        path = self.tmp / f"{name}.yaml"
        path.write_text(json.dumps({"gpu_names": GPUS, "max_dph": 5, "ssh_key": str(self.tmp / "id_ed25519"), **extra}))
        return path

    def spawn(self, home: Path, *args: str) -> subprocess.Popen[str]:
        return subprocess.Popen(
            [sys.executable, "-m", "hybridctl", *args],
            env={**self.env, "HYBRIDCTL_HOME": str(home)},
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            preexec_fn=default_sigint,  # the tests press Ctrl-C
        )

    def finish(self, proc: subprocess.Popen[str], timeout: float = 180) -> CliRun:
        out, err = proc.communicate(timeout=timeout)
        return CliRun(proc.returncode, out, err)

    def cli(self, home: Path, *args: str, timeout: float = 180) -> CliRun:
        return self.finish(self.spawn(home, *args), timeout)

    def ledger(self) -> dict[str, Any]:
        ledger: dict[str, Any] = _get_json(f"{self.vast_url}/_sim/ledger")
        return ledger

    def live(self) -> int:
        return int(self.ledger()["instances_live"])

    def wait_live(self, n: int, timeout: float = 30) -> int:
        deadline = time.monotonic() + timeout
        while self.live() != n and time.monotonic() < deadline:
            time.sleep(0.2)
        return self.live()

    def sweep(self) -> None:
        """With the provisioner stopped: destroy every instance carrying our label (what a failed run left)."""
        subprocess.run(
            [sys.executable, "-m", "hybrid_provisioner", "destroy", "--all-labelled"],
            env=self.env,
            capture_output=True,
            timeout=60,
            check=False,
        )

    def log(self) -> str:
        return "\n--- provisioner ---\n" + self.provisioner.output()[-3000:]


def _until(condition: Callable[[], bool], timeout: float = 20) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def _get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.loads(r.read())


def _post_json(url: str, body: dict[str, Any]) -> Any:
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.loads(r.read())


def _long_job(txt2img: dict[str, Any]) -> dict[str, Any]:
    """A job that samples for well over a minute under the test profile (10,000 steps of a 2048x2048 latent, which
    still fits a 16 GB card), so a Ctrl-C sent once it runs always lands mid-run, however loaded the machine is.
    (10,000 steps at 512x512 take only ~11 s: a loaded CI machine sent its Ctrl-C after the job had finished.)"""
    latent = {**txt2img["5"], "inputs": {**txt2img["5"]["inputs"], "width": 2048, "height": 2048}}
    return {**txt2img, "3": {**txt2img["3"], "inputs": {**txt2img["3"]["inputs"], "steps": 10000}}, "5": latent}


def _keypair(path: Path) -> Path:
    key = asyncssh.generate_private_key("ssh-ed25519")
    key.write_private_key(str(path))
    key.write_public_key(str(path) + ".pub")
    return path


@pytest.fixture(scope="module")
def world(amqp_url: str, redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    tmp = tmp_path_factory.mktemp("comfy")
    namespace = f"t{uuid.uuid4().hex[:10]}"
    key = _keypair(tmp / "id_ed25519")
    # A second ComfyUI profile on the `args` runtype: the image's entrypoint runs, but the instance has no SSH.
    profiles = tmp / "profiles.json"
    profiles.write_text(
        json.dumps(
            {
                "comfyui-args": {
                    "image": "vastai/comfy:v0.3.66-cuda-12.9-py312",
                    "runtype": "args",
                    "ports": [8188],
                    "env": {"PORTAL_CONFIG": "localhost:1111:11111:/:Instance Portal|localhost:8188:18188:/:ComfyUI"},
                    "disk_gb": 60,
                    "readiness": {"kind": "comfyui", "container_port": 8188},
                    "password_env": "WEB_PASSWORD",
                    "policy": {"min_vram_gb": 16},
                }
            }
        )
    )
    vast_port = free_port()
    vast = ManagedProcess(
        ["-m", "sim", "vast", "--port", str(vast_port), "--boot-scale", "0.1", "--seed", "14"],
        env={"HYBRID_TIME_PROFILE": "test"},
        wait_for_port=vast_port,
        name="vast simulator",
    ).start()
    env = {
        **os.environ,
        "AMQP_URL": amqp_url,
        "REDIS_URL": redis_url,
        "HYBRID_NAMESPACE": namespace,
        "HYBRID_TIME_PROFILE": "test",
        "VAST_URL": f"http://127.0.0.1:{vast_port}",
        "SSH_KEY_PATH": str(key),
        "LOG_JSON": "false",
        "PROVISIONER_METRICS_PORT": "0",
        "PROVISIONER_PROBE_VIA": "direct",
        "PROVISIONER_PROFILES_FILE": str(profiles),
        "COLUMNS": "200",
        "NO_COLOR": "1",
    }
    provisioner = ManagedProcess(["-m", "hybrid_provisioner"], env=env, name="provisioner").start()
    w = World(env, f"http://127.0.0.1:{vast_port}", tmp, provisioner)
    try:
        provisioner.wait_for_output(" up: profiles")  # a create sent before its consumer is on the queue is unroutable
        yield w
    finally:
        provisioner.stop()
        w.sweep()
        vast.stop()
        delete_broker_objects(amqp_url, *namespace_objects(namespace))


@pytest.fixture
def home(tmp_path: Path, world: World) -> Iterator[Path]:
    root = tmp_path / "home"
    yield root
    stop_keeper(root)
    if world.wait_live(0) != 0:
        # The next test starts from an empty ledger: the provisioner's emergency command stops its jobs, destroys.
        world.cli(root, "destroy", "--all-labelled")
        world.wait_live(0, timeout=60)
        pytest.fail("a test left an instance billing" + world.log())


def test_parallel_creates_get_their_own_ports_and_a_freed_port_is_reused(world: World, home: Path) -> None:
    config = world.config("plain", disk_gb=77)
    creates = [world.spawn(home, "comfy", "create", str(config), "--name", f"par-{i}", "--json") for i in range(3)]
    made = [world.finish(p) for p in creates]
    for m in made:
        assert m.code == 0, m.err + world.log()
    infos = sorted((m.json() for m in made), key=lambda i: i["local_port"])
    ports = [i["local_port"] for i in infos]
    assert len(set(ports)) == 3 and min(ports) >= 8188, ports
    assert len({i["instance_id"] for i in infos}) == 3 and world.live() == 3
    for info in infos:  # the creates have exited: the keeper holds the tunnels
        assert _get_json(f"{info['url']}/system_stats")["devices"][0]["type"] == "cuda"
        # The config's disk reached the create body (the profile says 60).
        assert _get_json(f"{world.vast_url}/_sim/instances/{info['instance_id']}")["disk"] == 77

    # The keeper dies (a reboot, a kill): the next `tunnel list` starts one, which re-opens every tunnel.
    os.kill(int((home / "keeper.pid").read_text()), signal.SIGKILL)
    assert _until(lambda: all(port_free(p) for p in ports)), "the dead keeper's listeners are gone"
    listing = [
        world.spawn(home, "tunnel", "list", "--json"),
        world.spawn(home, "tunnel", "close", "1"),
        world.spawn(home, "tunnel", "close", "x8188"),
    ]
    listed, missing, invalid = (world.finish(p) for p in listing)
    assert [t["local_port"] for t in listed.json()] == ports, listed.err
    assert {t["remote_port"] for t in listed.json()} == {18188}, "tunnels reach ComfyUI itself, not the auth proxy"
    assert missing.code == 1 and "no local tunnel on port or for instance '1'" in missing.err, missing.err
    assert invalid.code == 2 and "'x8188'" in invalid.err, invalid.err
    assert _until(lambda: all(t.status == "up" for t in TunnelStore(home).all())), TunnelStore(home).all()
    for info in infos:
        assert _get_json(f"{info['url']}/system_stats")["devices"][0]["type"] == "cuda"
    table = world.cli(home, "tunnel", "list")
    assert all(str(p) in table.out for p in ports) and "localhost:18188 via root@" in table.out, table.out
    assert table.out.count(" yes ") == 3, "every tunnel alive"

    middle = infos[1]
    gone = world.cli(home, "comfy", "destroy", str(middle["instance_id"]))
    assert gone.code == 0, gone.err
    assert f"instance {middle['instance_id']} destroyed" in gone.out
    assert f"local port {middle['local_port']} freed" in gone.out
    assert port_free(middle["local_port"]) and world.live() == 2
    again = world.cli(home, "comfy", "create", str(config), "--name", "par-3", "--json")
    assert again.code == 0, again.err + world.log()
    assert again.json()["local_port"] == middle["local_port"], "the next create takes the lowest free port"

    # Closing a tunnel frees its port and leaves the instance running; `comfy destroy` still finds its slot.
    first, last = infos[0], infos[2]
    closed = world.cli(home, "tunnel", "close", str(first["local_port"]))
    assert closed.code == 0, closed.err
    assert f"closed 127.0.0.1:{first['local_port']} → instance {first['instance_id']}" in closed.out
    assert port_free(first["local_port"]) and world.live() == 3
    rest = world.cli(home, "tunnel", "close-all", "--json")
    assert rest.code == 0, rest.err
    assert sorted(c["local_port"] for c in rest.json()["closed"]) == sorted([last["local_port"], middle["local_port"]])
    assert port_free(last["local_port"]) and port_free(middle["local_port"]) and TunnelStore(home).all() == []

    # The slot's job ended without `comfy destroy` (here the operator's `hybridctl release`; an instance that failed
    # ends it the same way): destroy finds it over from the slot record at once, instead of waiting for an event
    # that was published before it listened.
    released = world.cli(home, "release", first["slot_id"])
    assert released.code == 0, released.err
    assert world.wait_live(2) == 2, world.log()
    started = time.monotonic()
    late = world.cli(home, "comfy", "destroy", str(first["instance_id"]))
    assert late.code == 0 and f"instance {first['instance_id']} destroyed" in late.out, late.err
    assert time.monotonic() - started < 20, "the ended job was not recognised: the destroy waited for its event"

    ids = [last["instance_id"], again.json()["instance_id"]]
    destroys = [world.spawn(home, "comfy", "destroy", str(i)) for i in ids]
    for i, p in zip(ids, destroys, strict=True):
        done = world.finish(p)
        assert done.code == 0 and f"instance {i} destroyed" in done.out, done.err
    assert world.wait_live(0) == 0


def test_usual_failures_each_give_a_clear_error(world: World, home: Path, tmp_path: Path) -> None:
    # Rentals that cannot give a tunnel run beside the good one: each must say why and give its GPU back.
    wrong_key = _keypair(tmp_path / "other_key")
    refused = world.spawn(home, "comfy", "create", str(world.config("wrong-key", ssh_key=str(wrong_key))))
    no_ssh = world.spawn(home, "comfy", "create", str(world.config("args-runtype", profile="comfyui-args")))
    no_key = world.spawn(home, "comfy", "create", str(world.config("no-key", ssh_key=str(tmp_path / "absent"))))
    made = world.cli(home, "comfy", "create", str(world.config("good")), "--name", "good", "--json")
    assert made.code == 0, made.err + world.log()
    instance, url = str(made.json()["instance_id"]), made.json()["url"]

    def run(workflow: Path, *extra: str) -> subprocess.Popen[str]:
        return world.spawn(home, "comfy", "exec", instance, str(workflow), "--out", str(tmp_path / "out"), *extra)

    ui = tmp_path / "ui.json"
    ui.write_text(json.dumps({"nodes": [{"id": 1, "type": "KSampler"}], "links": [], "version": 0.4}))
    txt2img = json.loads((EXAMPLES / "txt2img.api.json").read_text())
    no_model = tmp_path / "missing-model.json"
    no_model.write_text(json.dumps({**txt2img, "4": {**txt2img["4"], "inputs": {"ckpt_name": "missing.safetensors"}}}))
    # Only the OOM job executes (the others are refused before or at validation), so one armed OOM is its own.
    _post_json(f"{url}/_sim/oom", {"count": 1})
    jobs = [
        run(ui),
        run(no_model),
        run(EXAMPLES / "img2img.api.json"),
        run(EXAMPLES / "img2img.api.json", "--input", str(tmp_path / "nope.png")),
        run(EXAMPLES / "txt2img.api.json"),
    ]
    ui_format, missing_model, missing_image, missing_file, oom = (world.finish(p) for p in jobs)
    assert ui_format.code == 2 and "UI format" in ui_format.err and "Save (API Format)" in ui_format.err, ui_format.err
    assert missing_model.code == 1, missing_model.err
    assert "node 4 (CheckpointLoaderSimple): input 'ckpt_name': 'missing.safetensors'" in missing_model.err
    assert "installed: sd_xl_base_1.0.safetensors" in missing_model.err
    assert missing_image.code == 1 and "missing input image" in missing_image.err, missing_image.err
    assert "input.png" in missing_image.err
    nope = tmp_path / "nope.png"
    assert missing_file.code == 2 and f"input file '{nope}' does not exist (missing input image)" in missing_file.err
    assert oom.code == 1 and "node 3 (KSampler) ran out of GPU memory (OOM)" in oom.err, oom.err

    long = tmp_path / "long.json"
    long.write_text(json.dumps({**txt2img, "3": {**txt2img["3"], "inputs": {**txt2img["3"]["inputs"], "steps": 400}}}))
    _post_json(f"{url}/_sim/restart", {"when": "mid_job", "after_progress": 1, "downtime_s": 30})
    restarted = world.finish(run(long, "--deadline", "60"))
    assert restarted.code == 1 and "restarted mid-job and lost it" in restarted.err, restarted.err

    # Ctrl-C during exec stops the job on the GPU too, and says the instance keeps running.
    endless = tmp_path / "endless.json"
    endless.write_text(json.dumps(_long_job(txt2img)))
    stopped = run(endless)
    assert _until(lambda: bool(_get_json(f"{url}/queue")["queue_running"]), 60), world.finish(stopped).err
    stopped.send_signal(signal.SIGINT)
    done = world.finish(stopped)
    assert done.code == 130 and f"interrupted: the job on instance {instance} was interrupted" in done.err, done.err
    assert "the instance keeps running" in done.err
    assert _until(lambda: not _get_json(f"{url}/queue")["queue_running"], 5), "the job still runs on the GPU"

    done = world.finish(no_key)
    assert done.code == 2 and f"SSH key '{tmp_path / 'absent'}' does not exist" in done.err, done.err
    done = world.finish(refused)
    assert done.code == 1 and "SSH refused the key" in done.err and "(auth rejected)" in done.err, done.err
    assert "nothing left billing" in done.err
    done = world.finish(no_ssh)
    assert done.code == 1 and "SSH unavailable" in done.err and "'args' runtype" in done.err, done.err
    assert "nothing left billing" in done.err

    gone = world.cli(home, "comfy", "destroy", instance)
    assert gone.code == 0, gone.err
    assert world.wait_live(0) == 0


def test_oneshot_leaves_nothing_billing_on_success_failure_and_interrupt(
    world: World, home: Path, tmp_path: Path
) -> None:
    config = str(world.config("oneshot"))
    txt2img = json.loads((EXAMPLES / "txt2img.api.json").read_text())
    failing, long = tmp_path / "failing.json", tmp_path / "long.json"
    failing.write_text(json.dumps({**txt2img, "4": {**txt2img["4"], "inputs": {"ckpt_name": "missing.safetensors"}}}))
    long.write_text(json.dumps(_long_job(txt2img)))

    def oneshot(workflow: Path, name: str) -> subprocess.Popen[str]:
        out = str(tmp_path / name)
        return world.spawn(home, "comfy", "oneshot", config, str(workflow), "--out", out, "--name", name)

    ok = oneshot(EXAMPLES / "txt2img.api.json", "shot-ok")
    bad = oneshot(failing, "shot-fail")
    stopped = oneshot(long, "shot-int")

    deadline = time.monotonic() + 120
    running = False
    while not running and time.monotonic() < deadline and stopped.poll() is None:
        tunnel = next((t for t in TunnelStore(home).all() if t.label == "shot-int" and t.status == "up"), None)
        if tunnel is not None:
            try:
                running = bool(_get_json(f"{tunnel.url}/queue")["queue_running"])
            except OSError:
                pass
        time.sleep(0.1)
    assert running, "the long job never started: " + world.finish(stopped).err + world.log()
    stopped.send_signal(signal.SIGINT)  # Ctrl-C while exec runs
    r = world.finish(stopped)
    assert r.code == 130, r.err
    assert "interrupted: instance" in r.err and "destroyed (slot shot-int released): nothing left billing" in r.err

    r = world.finish(ok)
    assert r.code == 0, r.err + world.log()
    outputs = list((tmp_path / "shot-ok").glob("*.png"))
    assert outputs and outputs[0].read_bytes().startswith(b"\x89PNG")
    assert "destroyed (slot shot-ok released): nothing left billing" in r.out
    r = world.finish(bad)
    assert r.code == 1 and "missing.safetensors" in r.err, r.err
    assert "destroyed (slot shot-fail released): nothing left billing" in r.out
    assert world.wait_live(0) == 0, "oneshot left an instance billing"
