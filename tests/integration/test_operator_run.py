"""Issue #12 acceptance: ``make run``'s process set, every ``hybridctl`` command against it, and Ctrl-C.

One world for the whole module: ``python -m hybridctl.run`` exactly as ``make run`` starts it (``HYBRID_RUN_FREE_PORTS``
so it runs beside other work, the ``test`` time profile: an epoch a minute), its output read as an operator reads it.
The CLI runs as a real process in "another shell" configured from the world's ``operator.env``. The tests run in file
order: commands that leave the schedule alone while the first epochs earn weight, then the weight itself, then the
commands that stop renting, and last Ctrl-C, after which every child process is gone and the Vast ledger is at 0.

Effects are read where the owners keep them: the Redis views (what ``hybridctl status --json`` prints, polled through
the same ``gather`` in this process), the Vast simulator's ledger, the dapi's public
``/v1/epochs/{epoch}/participants``, the provisioner's log.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pytest

from hybrid_common.redis_keys import RedisKeys
from tests.support.infra import delete_broker_objects, namespace_objects
from tests.support.procs import REPO, CliRun, default_sigint

pytestmark = [pytest.mark.broker, pytest.mark.redis, pytest.mark.slow, pytest.mark.timeout(300)]

T = TypeVar("T")
WEIGHT_WITHIN = 300.0  # the bound: an epoch shows weight earned within 5 minutes of `make run`
PHASES = {"PoCGenerate", "PoCGenerateWindDown", "PoCValidate", "PoCValidateWindDown", "Inference"}
PART = re.compile(r"^\s+\+ (?P<name>.+?)\s+pid (?P<pid>\d+)\s*(?:127\.0\.0\.1:(?P<port>\d+))?\s*$")


@dataclass
class World:
    proc: subprocess.Popen[str]
    state: Path
    started: float
    redis_url: str
    namespace: str
    lines: list[str] = field(default_factory=list)
    parts: dict[str, int] = field(default_factory=dict)  # part name -> pid
    cli_env: dict[str, str] = field(default_factory=dict)
    operator: dict[str, str] = field(default_factory=dict)

    def output(self) -> str:
        return "\n".join(self.lines)

    def log(self, part: str) -> str:
        path = self.state / "logs" / f"{part}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def ledger(self) -> dict[str, Any]:
        with urllib.request.urlopen(f"{self.operator['VAST_URL']}/_sim/ledger", timeout=10) as r:
            data: dict[str, Any] = json.load(r)
            return data

    def public(self, path: str) -> tuple[int, Any]:
        try:
            with urllib.request.urlopen(f"{self.operator['GONKA_PUBLIC_API_URL']}{path}", timeout=10) as r:
                return r.status, json.load(r)
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read() or b"null")


def until(check: Callable[[], T | None], timeout: float, what: str, every: float = 1.0) -> T:
    deadline = time.monotonic() + timeout
    last: T | None = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}; last: {str(last)[-2000:]}")


def cli(world: World, *args: str, timeout: float = 90) -> CliRun:
    r = subprocess.run(
        [sys.executable, "-m", "hybridctl", *args],
        env=world.cli_env,
        cwd=REPO,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    return CliRun(r.returncode, r.stdout, r.stderr, args)


def ok(world: World, *args: str) -> CliRun:
    run = cli(world, *args)
    assert run.code == 0, f"{run}\n--- make run ---\n{world.output()[-2000:]}"
    return run


def parallel(world: World, *commands: tuple[str, ...]) -> list[CliRun]:
    """Independent invocations at once (each is a process start: the slow part on a loaded machine)."""
    with ThreadPoolExecutor(len(commands)) as pool:
        return list(pool.map(lambda args: cli(world, *args), commands))


def status(world: World) -> dict[str, Any]:
    """What ``hybridctl status --json`` prints — the same ``gather`` over the same Redis views — read in this process,
    so polling does not start a process each time (the CLI itself is asserted where the output matters)."""
    from redis.asyncio import Redis

    from hybridctl.status import gather

    async def go() -> dict[str, Any]:
        redis = Redis.from_url(world.redis_url)
        try:
            return await gather(redis, RedisKeys(world.namespace))
        finally:
            await redis.aclose()

    return asyncio.run(go())


def live_instances(world: World, slot: str) -> list[dict[str, Any]]:
    return [i for i in status(world)["instances"] if i.get("slot_id") == slot and i.get("state") != "destroyed"]


def ledger_row(world: World, instance_id: int) -> dict[str, Any]:
    return next(i for i in world.ledger()["instances"] if i["id"] == instance_id)


def rent_directly(world: World, label: str) -> int | None:
    """Rent an instance on the Vast simulator with our API key, as no job of ours would; ``None`` when Vast refuses
    (its rate limits are shared with the provisioner, which rents at the same time)."""
    vast = world.operator["VAST_URL"]
    try:
        req = urllib.request.Request(f"{vast}/api/v0/bundles/", data=b"{}", method="POST")
        req.add_header("Content-Type", "application/json")
        with urllib.request.urlopen(req, timeout=10) as r:
            offer = json.load(r)["offers"][0]["id"]
        body = {"image": "ghcr.io/product-science/mlnode:3.0.11-post1", "label": label, "disk": 10, "runtype": "args"}
        req = urllib.request.Request(f"{vast}/api/v0/asks/{offer}/", data=json.dumps(body).encode(), method="PUT")
        req.add_header("Content-Type", "application/json")
        req.add_header("Authorization", "Bearer test")
        with urllib.request.urlopen(req, timeout=10) as r:
            return int(json.load(r)["new_contract"])
    except urllib.error.HTTPError as exc:
        if exc.code in {410, 429}:  # rate limited, or the offer was taken meanwhile: try again
            return None
        raise


@pytest.fixture(scope="module")
def run_namespace(amqp_url: str, redis_url: str) -> Iterator[str]:
    """The ``namespace`` fixture's isolation for a module-scoped world (same name shape, same broker cleanup)."""
    import redis

    ns = f"t{uuid.uuid4().hex[:10]}"
    yield ns
    queues, exchanges = namespace_objects(ns)
    delete_broker_objects(amqp_url, queues, exchanges)
    r = redis.Redis.from_url(redis_url)
    try:
        keys = list(r.scan_iter(match=f"{RedisKeys(ns).prefix}*", count=500))
        if keys:
            r.delete(*keys)
    finally:
        r.close()


def _stop_leftovers(world: World) -> None:
    """Only after a failure: SIGKILL whatever ``make run`` left (each part is its own process group)."""
    if world.proc.poll() is None:
        world.proc.send_signal(signal.SIGINT)
        try:
            world.proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            world.proc.kill()
            world.proc.wait(timeout=10)
    for pid in world.parts.values():
        try:
            os.killpg(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.fixture(scope="module")
def world(
    amqp_url: str, redis_url: str, run_namespace: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[World]:
    state = tmp_path_factory.mktemp("make-run")
    env = {
        **os.environ,
        "AMQP_URL": amqp_url,
        "REDIS_URL": redis_url,
        "HYBRID_NAMESPACE": run_namespace,
        "HYBRID_RUN_FREE_PORTS": "1",
        "HYBRID_RUN_STATE": str(state),
        "HYBRID_TIME_PROFILE": "test",
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "hybridctl.run"],
        env=env,
        cwd=REPO,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # a terminal's Ctrl-C reaches run.py alone; the test sends it by pid
        preexec_fn=default_sigint,
    )
    w = World(proc=proc, state=state, started=time.monotonic(), redis_url=redis_url, namespace=run_namespace)

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            w.lines.append(line.rstrip("\n"))
            m = PART.match(line.rstrip("\n"))
            if m:
                w.parts[m["name"]] = int(m["pid"])

    threading.Thread(target=read, daemon=True).start()
    try:
        until(lambda: any("Ctrl-C stops everything" in x for x in w.lines), 120, "make run to start every part")
        assert set(w.parts) == {
            "sim vast",
            "sim dapi",
            "sim upstream",
            "callback-relay",
            "proxy",
            "provisioner",
            "scheduler",
        }, w.output()
        operator_env = state / "operator.env"
        assert f"hybridctl settings for this world in {operator_env}" in w.output()
        for line in operator_env.read_text().splitlines():
            key, _, value = line.partition("=")
            w.operator[key] = value
        w.cli_env = {
            **os.environ,
            "AMQP_URL": amqp_url,
            "REDIS_URL": redis_url,
            **w.operator,
            "HOME": str(tmp_path_factory.mktemp("operator-home")),  # the CLI's own state (~/.hybridctl) stays here
            "COLUMNS": "200",
            "NO_COLOR": "1",
        }
        assert w.cli_env["HYBRID_NAMESPACE"] == run_namespace
        yield w
    except BaseException:
        print(w.output())
        raise
    finally:
        _stop_leftovers(w)


# --------------------------------------------------------------------------- while the first epochs earn weight


def test_check_and_offers(world: World) -> None:
    check, check_text, offers_json, offers_text = parallel(
        world,
        ("check", "--json"),
        ("check",),
        ("offers", "mlnode-v1", "--limit", "3", "--estimated-minutes", "30", "--json"),
        ("offers", "mlnode-v1", "--limit", "3"),
    )
    for run in (check, check_text, offers_json, offers_text):
        assert run.code == 0, run
    report = check.json()
    assert report["ok"] is True and report["mode"] == "sim"
    checks = {c["name"]: c for c in report["checks"]}
    for name in (
        "broker",
        "redis",
        "ssh key",
        "vast credit",
        "dapi admin API",
        "relay public URL",
        "dapi callback URL",
    ):
        assert checks[name]["ok"], checks[name]
    assert world.operator["RELAY_PUBLIC_URL"] in checks["relay public URL"]["detail"]
    assert "all checks passed" in check_text.out and "dapi callback URL" in check_text.out

    offers = offers_json.json()
    assert offers["profile"] == "mlnode-v1" and 1 <= len(offers["offers"]) <= 3
    for o in offers["offers"]:
        assert o["dph_total"] > 0 and o["estimated_cost_usd"] == pytest.approx(o["dph_total"] / 2, rel=0.01)
        assert o["gpu_ram_mb"] >= 40 * 1000  # VASTAI_MIN_VRAM
    assert "offers for mlnode-v1 (60 min)" in offers_text.out and "$/h" in offers_text.out


def test_provision_logs_release_and_destroy(world: World) -> None:
    one, two = parallel(
        world,
        ("provision", "mlnode-v1", "--slots", "op-1", "--no-register", "--json"),
        ("provision", "mlnode-v1", "--slots", "op-2", "--no-register"),
    )
    assert one.code == 0 and two.code == 0, (one, two)
    printed = one.json()
    assert printed["published"] == "provision"
    assert printed["payload"]["slot_ids"] == ["op-1"] and printed["payload"]["register_node"] is False
    assert "published provision id=" in two.out and "mlnode-v1 for op-2" in two.out
    [inst] = until(lambda: live_instances(world, "op-1"), 60, "the op-1 instance")
    [first] = until(lambda: live_instances(world, "op-2"), 60, "the op-2 instance")
    iid, doomed = int(inst["instance_id"]), int(first["instance_id"])
    assert ledger_row(world, iid)["label"].startswith("ghm-op-1") and not ledger_row(world, iid)["destroyed"]

    def logs(*flags: str) -> Callable[[], CliRun | None]:
        def fetch() -> CliRun | None:  # the provisioner asks Vast, which rate-limits: a refusal is retried
            run = cli(world, "logs", str(iid), *flags)
            return run if run.code == 0 and run.out else None

        return fetch

    text = until(logs("--tail", "50"), 60, f"the logs of instance {iid}")
    assert f"Contract {iid} placed" in text.out  # the container log the provisioner fetched from Vast
    as_json = until(logs("--json"), 60, f"the logs of instance {iid} as JSON").json()
    assert as_json["instance_id"] == iid and f"Contract {iid}" in as_json["text"]

    # `release` ends a slot; `destroy` takes one instance away (the slot's job would rent a replacement: released next).
    released, destroyed = parallel(world, ("release", "op-1"), ("destroy", str(doomed), "--json"))
    assert released.code == destroyed.code == 0, (released, destroyed)
    assert "published release id=" in released.out and "op-1" in released.out
    assert destroyed.json()["published"] == "destroy" and destroyed.json()["payload"]["instance_id"] == doomed
    until(lambda: ledger_row(world, iid)["destroyed"], 60, "op-1's instance destroyed")
    until(lambda: ledger_row(world, doomed)["destroyed"], 60, f"instance {doomed} destroyed")
    until(lambda: not live_instances(world, "op-1"), 30, "status showing op-1 destroyed")

    printed = ok(world, "release", "op-2", "--json").json()
    assert printed["published"] == "release" and printed["payload"]["slot_ids"] == ["op-2"]
    until(
        lambda: (
            not [i for i in world.ledger()["instances"] if i["label"].startswith("ghm-op-2") and not i["destroyed"]]
        ),
        90,
        "every op-2 instance destroyed after its release",
    )


def test_publish_tunnels_and_bad_arguments(world: World) -> None:
    run = ok(world, "publish", "scheduler.confirmation_policy", '{"policy": "burst"}')
    assert run.out.startswith("published scheduler.confirmation_policy id=")

    def policy() -> Any:
        conf = status(world)["confirmation"] or {}
        p = conf.get("policy")
        return (p.get("mode") if isinstance(p, dict) else p) == "burst"

    until(policy, 30, "the scheduler to take the burst policy")  # status text: in the weight test below

    # The tunnel commands as they stand (no instance here runs in tunnel mode: nothing to list or close), and bad
    # arguments, each refused naming the value (more cases against stand-ins in test_operator_cli.py).
    bad = [
        (("offers", "Bad/Profile"), "'Bad/Profile'"),
        (("logs", "x1"), "'x1'"),
        (("rehearse", "--profile", "BAD!"), "'BAD!'"),
        (("status", "--interval", "0.1"), "--interval 0.1"),
        (("publish", "no.such.command", "{}"), "'no.such.command'"),
    ]
    listed, closed, *refused = parallel(
        world, ("tunnel", "list", "--json"), ("tunnel", "close-all", "--json"), *(args for args, _ in bad)
    )
    assert listed.code == 0 and isinstance(listed.json(), list), listed
    assert closed.code == 0 and isinstance(closed.json(), dict), closed
    for run, (_, named) in zip(refused, bad, strict=True):
        assert run.code != 0, run
        assert named in run.err, run


def test_rehearse_and_reconcile(world: World) -> None:
    printed = ok(world, "rehearse", "--json").json()
    assert printed["published"] == "scheduler.rehearse"
    key = f"pocr-{printed['id'][:8]}"  # the scheduler names the rehearsal after the command's id

    def rehearsal() -> Any:
        data = status(world)
        campaign = next((c for c in data["campaigns"] if c.get("key") == key), None)
        rented = [i for i in data["instances"] if str(i.get("slot_id", "")).startswith(f"{key}-")]
        return campaign is not None and campaign["purpose"] == "rehearsal" and rented

    until(rehearsal, 60, f"the rehearsal {key} renting its GPU")

    # An instance with our label that no job owns (what a crash between create and record leaves): reconciled away.
    orphan = until(lambda: rent_directly(world, "ghm-orphan-h1"), 30, "an orphan rented behind the provisioner's back")
    run = ok(world, "reconcile")
    assert "published reconcile id=" in run.out and "orphan reconciliation requested" in run.out
    until(lambda: ledger_row(world, orphan)["destroyed"], 60, "the orphan destroyed")
    until(lambda: "reconcile (operator)" in world.log("provisioner"), 30, "the operator's reconcile pass")


# --------------------------------------------------------------------------- the weight


def test_an_epoch_shows_weight_earned(world: World) -> None:
    left = WEIGHT_WITHIN - (time.monotonic() - world.started)

    def weighted() -> dict[str, Any] | None:
        data = status(world)
        return data if any((e["weight"] or 0) > 0 for e in data["epochs"]) else None

    until(weighted, left, "an epoch with weight earned", every=2.0)
    as_json, as_text = parallel(world, ("status", "--json"), ("status",))
    assert as_json.code == 0 and as_text.code == 0, (as_json, as_text)
    data = as_json.json()
    assert isinstance(data["chain"]["height"], int) and data["chain"]["height"] > 0
    assert data["chain"]["phase"] in PHASES
    for e in data["epochs"]:
        assert {"index", "weight", "gpu_minutes", "batches_relayed"} <= set(e), e
    for i in data["instances"]:
        assert isinstance(i["instance_id"], int) and i["state"], i
    epoch = next(e for e in data["epochs"] if (e["weight"] or 0) > 0)
    # Weight comes with what it took: billed GPU minutes and the PoC batches the relay forwarded.
    assert epoch["gpu_minutes"] > 0 and epoch["batches_relayed"] > 0, epoch
    assert any(c["purpose"] == "poc" and c["state"] == "released" for c in epoch["campaigns"]), epoch

    # The same number the chain publishes for our participant (the simulated dapi's account).
    from hybrid_scheduler.settings import SIM_PARTICIPANT_ADDRESS

    code, body = world.public(f"/v1/epochs/{epoch['index']}/participants")
    assert code == 200, body
    ours = {p["index"]: p.get("weight", 0) for p in body["active_participants"]["participants"]}
    assert ours[SIM_PARTICIPANT_ADDRESS] == epoch["weight"]

    text = as_text.out
    assert "chain: height " in text and "epochs" in text
    assert "confirmation PoC: policy burst" in text  # published as a raw command earlier
    row = next(line for line in text.splitlines() if re.match(rf"^\W*{epoch['index']}\s*│", line))
    assert f"{epoch['weight']:g}" in row, row


# --------------------------------------------------------------------------- commands that stop the renting


def test_pause_and_resume(world: World) -> None:
    run = ok(world, "pause")
    assert "published scheduler.pause" in run.out and "scheduling paused" in run.out
    until(lambda: status(world)["paused"], 30, "paused")
    printed = ok(world, "resume", "--json").json()
    assert printed["published"] == "scheduler.resume"
    until(lambda: not status(world)["paused"], 30, "resumed")


def test_destroy_all_labelled_then_ctrl_c_stops_everything(world: World) -> None:
    printed = ok(world, "pause", "--json").json()  # nothing new is rented while everything is destroyed
    assert printed["published"] == "scheduler.pause"
    until(lambda: status(world)["paused"], 30, "paused")
    paused, run = parallel(world, ("status",), ("destroy", "--all-labelled"))
    assert "scheduling PAUSED" in paused.out, paused
    assert run.code == 0 and "published destroy id=" in run.out and "all 'ghm-' instances" in run.out, run
    until(lambda: world.ledger()["instances_live"] == 0, 90, "0 live instances in the Vast ledger")
    assert world.ledger()["instances_total"] > 0  # it did rent along the way

    world.proc.send_signal(signal.SIGINT)  # Ctrl-C
    assert world.proc.wait(timeout=150) == 0, world.output()
    out = world.output()
    assert "stopping: scheduler first (no new rentals)" in out
    for name in world.parts:
        assert f"stopped {name}" in out, out
    assert "Vast simulator ledger: 0 instance(s) not destroyed" in out, out
    left = []
    for name, pid in world.parts.items():
        try:
            os.killpg(pid, 0)  # the part's process group: the part and anything it started
        except ProcessLookupError:
            continue
        left.append(name)
    assert not left, f"still running after Ctrl-C: {left}"
