"""`make run`: the whole system as local processes on the simulated world, until Ctrl-C.

Starts the simulated world (Vast.ai, the network node + chain, the upstream provider) and the four services on the
``demo`` time profile (an epoch in about two minutes; ``MODE=live``: ``real``, and an accelerated one is refused),
prints where each listens, and on Ctrl-C stops them in order:
the scheduler first (no new rentals), then the provisioner, then every labelled instance is destroyed through the
provisioner's emergency path, then the rest; the Vast simulator's ledger is read last, so the operator sees that no
instance was left running.

``MODE=live`` starts no simulator. On Ctrl-C it stops the scheduler and keeps the provisioner running until no job
holds an instance (a release in progress finishes); a second Ctrl-C stops at once and prints what is still rented.

``HYBRID_RUN_FREE_PORTS=1`` puts every listener on a free port (tests run the same process set beside other work).
Where everything listens is also written to ``<state>/operator.env`` (``KEY=value`` lines: the endpoints, the
namespace, the instance SSH key), so ``hybridctl`` in another shell talks to this world:
``set -a; . .run/operator.env; set +a``.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from hybrid_common import port

REPO = Path(__file__).resolve().parents[3]


@dataclass
class Part:
    name: str
    args: list[str]
    sim: bool = False
    listens: int | None = None
    # A part that listens on no port is ready once it writes its heartbeat (``status:<service>:*`` in Redis): the
    # provisioner writes it only after its command consumers are on the queue, so a command sent after the
    # "Ctrl-C stops everything" line is never unroutable.
    heartbeat: str | None = None
    env: dict[str, str] = field(default_factory=dict)
    proc: subprocess.Popen[bytes] | None = None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _ports(free: bool) -> dict[str, int]:
    names = [
        "sim.vast",
        "sim.dapi.public",
        "sim.dapi.admin",
        "sim.dapi.callback",
        "sim.upstream",
        "relay.public",
        "proxy.node",
    ]
    return {n: (_free_port() if free else port(n)) for n in names}


def _ssh_key(state: Path) -> Path:
    """A key for instance SSH (tunnel mode); generated once per state dir."""
    key = state / "ssh" / "id_ed25519"
    if not key.exists():
        import asyncssh

        key.parent.mkdir(parents=True, exist_ok=True)
        k = asyncssh.generate_private_key("ssh-ed25519")
        key.write_bytes(k.export_private_key())
        key.chmod(0o600)
        key.with_suffix(".pub").write_bytes(k.export_public_key())
    return key


def time_profile(live: bool) -> str:
    """``demo`` on the simulated world (an epoch in about two minutes), ``real`` with ``MODE=live``; an explicit
    ``HYBRID_TIME_PROFILE`` wins, except that ``MODE=live`` refuses an accelerated one (the services would too)."""
    chosen = os.environ.get("HYBRID_TIME_PROFILE") or ("real" if live else "demo")
    if live and chosen != "real":
        raise ValueError(
            f"MODE=live runs on the real clock: HYBRID_TIME_PROFILE={chosen} would shrink every timeout and poll "
            "against real, paid endpoints; unset it (or set it to real)"
        )
    acceleration = os.environ.get("HYBRID_ACCELERATION")
    if live and acceleration and float(acceleration) != 1.0:
        raise ValueError(f"MODE=live runs on the real clock: HYBRID_ACCELERATION={acceleration} is refused")
    return chosen


def plan(live: bool, state: Path, free_ports: bool = False) -> tuple[list[Part], dict[str, str]]:
    profile = time_profile(live)
    p = _ports(free_ports)
    first_gateway = 15000 if not free_ports else 20000 + (os.getpid() % 200) * 100
    env = {
        "HYBRID_TIME_PROFILE": profile,
        "PYTHONUNBUFFERED": "1",
        "LOG_JSON": os.environ.get("LOG_JSON", "false"),
        "SSH_KEY_PATH": str(_ssh_key(state)),
        "GATEWAY_PORT_FIRST": str(first_gateway),
        "GATEWAY_PORT_LAST": str(first_gateway + 63),
        "RELAY_PUBLIC_PORT": str(p["relay.public"]),
        "RELAY_PUBLIC_URL": f"http://127.0.0.1:{p['relay.public']}",
        "PROXY_NODE_PORT": str(p["proxy.node"]),
        "PROXY_LISTEN_HOST": "127.0.0.1",
        "PROXY_METRICS_PORT": "0",
        "RELAY_METRICS_PORT": "0",
        "PROVISIONER_METRICS_PORT": "0",
        "SCHEDULER_METRICS_PORT": "0",
    }
    if not live:
        env.update(
            {
                "VAST_URL": f"http://127.0.0.1:{p['sim.vast']}",
                "UPSTREAM_URL": f"http://127.0.0.1:{p['sim.upstream']}/v1",
                "GONKA_ADMIN_API_URL": f"http://127.0.0.1:{p['sim.dapi.admin']}",
                "GONKA_PUBLIC_API_URL": f"http://127.0.0.1:{p['sim.dapi.public']}",
                "DAPI_CALLBACK_URL": f"http://127.0.0.1:{p['sim.dapi.callback']}",
            }
        )
    parts = [
        Part(
            "sim vast",
            [
                "-m",
                "sim",
                "vast",
                "--port",
                str(p["sim.vast"]),
                "--boot-scale",
                os.environ.get("HYBRID_RUN_BOOT_SCALE", "0.5"),
            ],
            sim=True,
            listens=p["sim.vast"],
        ),
        Part(
            "sim dapi",
            [
                "-m",
                "sim",
                "dapi",
                "--public-port",
                str(p["sim.dapi.public"]),
                "--admin-port",
                str(p["sim.dapi.admin"]),
                "--callback-port",
                str(p["sim.dapi.callback"]),
                "--callback-base",
                f"http://127.0.0.1:{p['relay.public']}",
            ],
            sim=True,
            listens=p["sim.dapi.public"],
        ),
        Part(
            "sim upstream",
            ["-m", "sim", "upstream", "--port", str(p["sim.upstream"])],
            sim=True,
            listens=p["sim.upstream"],
        ),
        Part("callback-relay", ["-m", "hybrid_relay"], listens=p["relay.public"]),
        Part("proxy", ["-m", "hybrid_proxy"], listens=p["proxy.node"]),
        Part("provisioner", ["-m", "hybrid_provisioner"], heartbeat="provisioner"),
        Part("scheduler", ["-m", "hybrid_scheduler"]),
    ]
    return [x for x in parts if not (x.sim and live)], env


def _built(part: Part) -> bool:
    import importlib.util

    module = part.args[1]
    target = {"vast": "sim.vast.cli", "dapi": "sim.network.cli", "upstream": "sim.upstream.cli"}.get(
        part.args[2] if part.sim else "", f"{module}.__main__"
    )
    try:
        return importlib.util.find_spec(target) is not None
    except ModuleNotFoundError:
        return False


def _wait_port(p: int, timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", p), timeout=0.3):
                return True
        except OSError:
            time.sleep(0.1)
    return False


def _wait_heartbeat(env: dict[str, str], part: Part, timeout: float = 60.0) -> bool:
    import redis

    from hybrid_common.redis_keys import RedisKeys

    pattern = RedisKeys(env.get("HYBRID_NAMESPACE", "")).status(part.heartbeat or "", "*")
    started = time.time() - 1  # a killed earlier run's heartbeat (still within its TTL) does not count
    deadline = time.monotonic() + timeout
    with redis.Redis.from_url(env.get("REDIS_URL", "redis://127.0.0.1:6379/0"), socket_timeout=5) as r:
        while time.monotonic() < deadline and part.proc is not None and part.proc.poll() is None:
            try:
                for key in r.scan_iter(match=pattern, count=1000):
                    if float(json.loads(r.get(key) or b"{}").get("at", 0)) >= started:
                        return True
            except (redis.RedisError, ValueError, TypeError):
                pass
            time.sleep(0.2)
    return False


def ledger_live(vast_url: str) -> int | None:
    """Instances the Vast simulator still bills (``instances_live`` of its ledger)."""
    try:
        with urllib.request.urlopen(f"{vast_url}/_sim/ledger", timeout=5) as r:
            return int(json.load(r)["instances_live"])
    except (OSError, KeyError, ValueError):
        return None


def main() -> int:
    live = os.environ.get("MODE", "sim") == "live"
    state = Path(os.environ.get("HYBRID_RUN_STATE", REPO / ".run"))
    state.mkdir(parents=True, exist_ok=True)
    try:
        parts, extra = plan(live, state, free_ports=os.environ.get("HYBRID_RUN_FREE_PORTS") == "1")
    except ValueError as exc:
        print(f"gonka-hybrid: {exc}", file=sys.stderr, flush=True)
        return 2
    env = {**os.environ, **extra}
    print(
        f"gonka-hybrid: MODE={'live' if live else 'sim'}  time profile={env['HYBRID_TIME_PROFILE']}  "
        f"namespace={env.get('HYBRID_NAMESPACE') or '(none)'}",
        flush=True,
    )
    logs = state / "logs"
    logs.mkdir(exist_ok=True)
    running: list[Part] = []
    for part in parts:
        if not _built(part):
            print(f"  - {part.name:<15} not built yet (skipped)", flush=True)
            continue
        log = (logs / f"{part.name.replace(' ', '-')}.log").open("ab")
        part.proc = subprocess.Popen(
            [sys.executable, *part.args],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=REPO,
            start_new_session=True,
        )
        if part.listens and not _wait_port(part.listens):
            print(f"  ! {part.name} did not listen on {part.listens}; see {logs}", flush=True)
        if part.heartbeat and not _wait_heartbeat(env, part):
            print(f"  ! {part.name} did not report ready within 60 s; see {logs}", flush=True)
        running.append(part)
        where = f"127.0.0.1:{part.listens}" if part.listens else ""
        print(f"  + {part.name:<15} pid {part.proc.pid:<7} {where}", flush=True)
    if not running:
        print("nothing to run yet")
        return 0
    operator_env = _write_operator_env(state, env)
    print(f"hybridctl settings for this world in {operator_env}", flush=True)
    print(f"logs in {logs}; watch with: .venv/bin/hybridctl status --watch; Ctrl-C stops everything", flush=True)
    stopping = {"count": 0}

    def on_signal(*_: object) -> None:
        stopping["count"] += 1

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    while not stopping["count"]:
        for part in running:
            if part.proc is not None and part.proc.poll() is not None:
                print(f"{part.name} exited with {part.proc.returncode}; stopping the rest (see {logs})", flush=True)
                stopping["count"] = 1
        time.sleep(0.3)
    _shutdown(running, env, live, stopping)
    return 0


OPERATOR_ENV = (
    "MODE",
    "HYBRID_NAMESPACE",
    "HYBRID_TIME_PROFILE",
    "VAST_URL",
    "GONKA_ADMIN_API_URL",
    "GONKA_PUBLIC_API_URL",
    "DAPI_CALLBACK_URL",
    "RELAY_PUBLIC_URL",
    "SSH_KEY_PATH",
)


def _write_operator_env(state: Path, env: dict[str, str]) -> Path:
    """What ``hybridctl`` needs to reach this world (no secrets, no broker or Redis credentials: the CLI takes
    ``AMQP_URL`` / ``REDIS_URL`` from its own environment)."""
    path = state / "operator.env"
    lines = [f"{k}={env[k]}" for k in OPERATOR_ENV if env.get(k)]
    path.write_text("\n".join(lines) + "\n")
    return path


def _stop(part: Part, timeout: float = 20.0) -> None:
    if part.proc is None or part.proc.poll() is not None:
        return
    os.killpg(part.proc.pid, signal.SIGTERM)
    try:
        part.proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(part.proc.pid, signal.SIGKILL)
        part.proc.wait(timeout=5)
    print(f"  stopped {part.name}", flush=True)


def _shutdown(running: list[Part], env: dict[str, str], live: bool, stopping: dict[str, int]) -> None:
    by_name = {p.name: p for p in running}
    print("stopping: scheduler first (no new rentals)", flush=True)
    if "scheduler" in by_name:
        _stop(by_name["scheduler"])
    if live and "provisioner" in by_name:
        print(
            "MODE=live: waiting for the provisioner's jobs to release what they rented (Ctrl-C again to skip)",
            flush=True,
        )
        while stopping["count"] < 2 and _active_jobs(env) > 0:
            time.sleep(1)
    if "provisioner" in by_name:
        _stop(by_name["provisioner"])
    if not live:
        # The simulated world goes away with us: destroy every labelled instance first, so the ledger ends at 0.
        subprocess.run(
            [sys.executable, "-m", "hybrid_provisioner", "destroy", "--all-labelled"],
            env=env,
            cwd=REPO,
            capture_output=True,
            timeout=120,
        )
    else:
        out = subprocess.run(
            [sys.executable, "-m", "hybrid_provisioner", "list"],
            env=env,
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=120,
        ).stdout.strip()
        if out:
            print("still rented (destroy with: hybridctl destroy --all-labelled):\n" + out, flush=True)
    for name in ("proxy", "callback-relay"):
        if name in by_name:
            _stop(by_name[name])
    vast_url = env.get("VAST_URL", "")
    if not live and vast_url:
        print(f"Vast simulator ledger: {ledger_live(vast_url)} instance(s) not destroyed", flush=True)
    for part in reversed(running):
        _stop(part)


def _active_jobs(env: dict[str, str]) -> int:
    try:
        import redis

        from hybrid_common.redis_keys import RedisKeys

        r = redis.Redis.from_url(env.get("REDIS_URL", "redis://127.0.0.1:6379/0"))
        jobs = r.hgetall(RedisKeys(env.get("HYBRID_NAMESPACE", "")).jobs())
        return sum(1 for raw in jobs.values() if b'"instance_id": null' not in raw and b'"done"' not in raw)
    except Exception:
        return 0


if __name__ == "__main__":
    sys.exit(main())
