"""The whole system on the simulated world, as `make run` starts it, for end-to-end tests (issue #13).

:class:`World` takes its process set and environment from ``hybridctl.run.plan(live=False, state, free_ports=True)``
(the simulators of Vast.ai, the network node and the upstream, then the four services) and runs each part as a
:class:`tests.support.procs.ManagedProcess`, so a test can SIGKILL or restart one part, run several provisioner
replicas, give the simulators extra flags (``--poc-v2``, ``--confirmation-poc``, ``--seed``), point everything at a
private broker or Redis, and read the simulators' test-only views: Vast ``/_sim/ledger`` and ``/_sim/faults``; the
dapi's ``/_sim/report``, ``/_sim/batches``, ``/_sim/callback/stop|start``, ``/_sim/confirmation-poc``; the upstream's
``/_sim/faults`` and ``/_sim/stats``; the MLNode's ``/_sim/stats`` (what its callback senders delivered).

:meth:`World.stop` stops in ``make run``'s order (cli/src/hybridctl/run.py ``_shutdown``): the scheduler first (no new
rentals), then the provisioner replicas, then every labelled instance is destroyed through the provisioner's emergency
path, then the rest; it keeps the Vast ledger read after that, so a test can assert that nothing is left billing.

An :class:`AlertReceiver` (a local webhook, ``ALERT_WEBHOOK_URL``) keeps every alert the system posts.

:func:`run_worlds` runs worlds side by side, each with its scenario in a thread (everything here is synchronous: the
parts are processes, polled with generous deadlines), and returns each world's :class:`Evidence`; the ``assert_*``
checks below are the issue's acceptance criteria, shared by the whole-epoch run and the fault runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import os
import random
import subprocess
import sys
import threading
import time
import traceback
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, TypeVar

import redis

from hybridctl.run import plan
from tests.support.infra import delete_broker_objects, namespace_objects
from tests.support.net import port_open
from tests.support.procs import REPO, ManagedProcess

T = TypeVar("T")

# Heights are the test profile's (hybrid_common._time.TEST): blocks of 0.25 s, 240-block epochs.
GATEWAY_PAIRS = 32  # as make run (GATEWAY_PORT_FIRST..+63): pre-pulled standbys hold a pair each
# The chain resumes at height ~1 once every part is up (World.start), so the first PoC need not wait the dapi's default
# half epoch: 90 blocks (22 s) leave the scheduler its measured rental lead (~60 blocks) plus the pre-pulls.
FIRST_POC_START = 90
STATE_TIMEOUT_REAL_SECONDS = 180.0  # the dapi's state-poll timeout: 3 wall seconds at 60x (see World.start)
START_ATTEMPTS = 3  # a port picked free can be taken before its process binds it: start again on fresh ports


def new_namespace() -> str:
    """A namespace like the ``namespace`` fixture's (``t`` + 10 hex: the CI sweep recognises it)."""
    return f"t{uuid.uuid4().hex[:10]}"


class AlertReceiver:
    """A Slack/Discord-compatible webhook on a free loopback port, served from a thread: every post is kept."""

    def __init__(self) -> None:
        self.bodies: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                with contextlib.suppress(ValueError), receiver._lock:
                    receiver.bodies.append(json.loads(raw))
                self.send_response(200)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, *args: Any) -> None:
                return

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook/e2e"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def texts(self) -> list[str]:
        with self._lock:
            return [str(b.get("text", "")) for b in self.bodies]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@dataclass
class Part:
    name: str
    args: list[str]
    listens: int | None
    proc: ManagedProcess | None = None


def gateway_range(pairs: int) -> tuple[int, int]:
    """A run of 2×pairs free ports below the kernel's ephemeral range (outgoing connections and every ``port 0``
    listener take ports from there), chosen at random so worlds and other tests on the machine do not collide.
    (plan()'s own range derives from the pid: two worlds in one test process would share it.)"""
    low = 32768
    with contextlib.suppress(OSError, ValueError, IndexError):
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    rng = random.Random()
    for _ in range(200):
        first = rng.randrange(20000, max(20002, low - 2 * pairs)) & ~1
        if not any(port_open(p) for p in range(first, first + 2 * pairs)):
            return first, first + 2 * pairs - 1
    raise RuntimeError("no free gateway port range")


def http(method: str, url: str, body: Any = None, timeout: float = 15.0) -> tuple[int, Any]:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            raw, status = r.read(), r.status
    except urllib.error.HTTPError as exc:
        raw, status = exc.read(), exc.code
    try:
        return status, json.loads(raw) if raw else None
    except ValueError:
        return status, raw.decode(errors="replace")


def wait_for(cond: Callable[[], T | None], timeout: float, what: str, *, every: float = 0.25) -> T:
    """Poll ``cond`` until it returns something truthy (an exception counts as "not yet"); fail naming ``what``."""
    deadline = time.monotonic() + timeout
    last: BaseException | None = None
    while True:
        try:
            value = cond()
            if value:
                return value
        except Exception as exc:
            last = exc
        if time.monotonic() >= deadline:
            raise AssertionError(
                f"timed out after {timeout:.0f}s waiting for {what}" + (f" (last error: {last!r})" if last else "")
            )
        time.sleep(every)


class World:
    """`make run`'s process set on the simulated world, on free ports, in one namespace."""

    def __init__(
        self,
        *,
        amqp_url: str,
        redis_url: str,
        namespace: str,
        state: Path,
        profile: str = "test",
        boot_scale: float = 0.3,
        seed: int = 7,
        poc_v2: bool = False,
        confirmation_poc: bool = False,
        first_poc_start: int | None = FIRST_POC_START,
        dapi_args: Iterable[str] = (),
        vast_args: Iterable[str] = (),
        upstream_args: Iterable[str] = (),
        env: dict[str, str] | None = None,
        provisioner_env: dict[str, str] | None = None,
        alerts: bool = True,
        provisioners: int = 1,
        name: str = "world",
    ) -> None:
        self.name = name
        self.amqp_url = amqp_url
        self.redis_url = redis_url
        self.namespace = namespace
        self.state = state
        state.mkdir(parents=True, exist_ok=True)
        self.alerts = AlertReceiver() if alerts else None
        self.profile, self.boot_scale, self.extra_env = profile, boot_scale, dict(env or {})
        self.sim_flags = {
            "sim vast": ["--seed", str(seed), *vast_args],
            "sim dapi": [
                "--seed",
                str(seed),
                *(["--poc-v2"] if poc_v2 else []),
                *(["--confirmation-poc"] if confirmation_poc else []),
                *(["--first-poc-start", str(first_poc_start)] if first_poc_start is not None else []),
                *dapi_args,
            ],
            "sim upstream": ["--seed", str(seed), *upstream_args],
        }
        self.provisioner_env = dict(provisioner_env or {})
        self.replicas: list[ManagedProcess] = []  # provisioner replicas beyond the first
        self.provisioner_count = provisioners
        self.ledger_at_stop: dict[str, Any] | None = None
        self._redis: redis.Redis | None = None
        self._plan()

    def _plan(self) -> None:
        """make run's parts and environment (``hybridctl.run.plan``), on ports free right now."""
        # plan() reads the profile and the boot scale from the environment: the world states its own.
        saved = {k: os.environ.get(k) for k in ("HYBRID_TIME_PROFILE", "HYBRID_RUN_BOOT_SCALE")}
        os.environ["HYBRID_TIME_PROFILE"] = self.profile
        os.environ["HYBRID_RUN_BOOT_SCALE"] = str(self.boot_scale)
        try:
            parts, extra = plan(live=False, state=self.state, free_ports=True)
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
        first, last = gateway_range(GATEWAY_PAIRS)
        self.parts: dict[str, Part] = {
            p.name: Part(p.name, [*p.args, *self.sim_flags.get(p.name, [])], p.listens) for p in parts
        }
        self.env: dict[str, str] = {
            **extra,
            "MODE": "sim",
            "AMQP_URL": self.amqp_url,
            "REDIS_URL": self.redis_url,
            "HYBRID_NAMESPACE": self.namespace,
            "HYBRID_LABEL_PREFIX": f"e2e{self.namespace[-6:]}",
            "GATEWAY_PORT_FIRST": str(first),
            "GATEWAY_PORT_LAST": str(last),
            "LOG_JSON": "false",
            **({"ALERT_WEBHOOK_URL": self.alerts.url} if self.alerts else {}),
            **self.extra_env,
        }
        self.vast_url = self.env["VAST_URL"]
        self.dapi_url = self.env["GONKA_PUBLIC_API_URL"]
        self.upstream_url = self.env["UPSTREAM_URL"].removesuffix("/v1")
        self.relay_url = self.env["RELAY_PUBLIC_URL"]

    # ------------------------------------------------------------------ processes

    def _process(self, part: Part, env: dict[str, str] | None = None) -> ManagedProcess:
        extra = {**(self.provisioner_env if part.name == "provisioner" else {}), **(env or {})}
        return ManagedProcess(
            part.args, env={**self.env, **extra}, wait_for_port=part.listens, timeout=90, name=part.name
        )

    def start(self) -> World:
        """Start every part, the epoch timeline beginning once the system is up.

        A cold start of a dozen Python processes on a shared 2-core machine takes seconds of CPU, so the dapi's chain
        is paused while the others start, and resumed once all are up: the scheduler, started last, watches the chain
        stand still and resume, as after a real chain halt (its deadlines follow the heights still to come). The
        proxy starts after the provisioner: it registers its node at once and the dapi polls it from then on.

        The dapi's state-poll timeout is the test profile's scaled 5 s, floored at one wall second: a process starved
        of CPU by its neighbours misses that and is marked FAILED. The processes here are not accelerated, so the
        world gives them three wall seconds (still under the real dapi's 5 s, gonka-protocol.md §9)."""
        for attempt in range(START_ATTEMPTS):
            # Ports free right now: one picked earlier can be taken by another process before its own binds it.
            self._plan()
            try:
                self._start_parts()
                return self
            except RuntimeError as exc:  # a part did not listen (its output is in the message)
                self._stop_parts()
                if attempt == START_ATTEMPTS - 1:
                    raise
                print(f"[{self.name}] start attempt {attempt + 1} failed, again on fresh ports: {str(exc)[-600:]}")
        return self

    def _start_parts(self) -> None:
        order = [n for n in self.parts if n not in ("proxy", "scheduler")] + ["proxy", "scheduler"]
        for name in order:
            part = self.parts[name]
            part.proc = self._process(part).start()
            if name == "sim dapi":
                self._post(f"{self.dapi_url}/_sim/clock/pause")
                self._post(f"{self.dapi_url}/_sim/params", {"state_timeout_seconds": STATE_TIMEOUT_REAL_SECONDS})
            if name == "provisioner":
                for _ in range(self.provisioner_count - 1):
                    self.add_provisioner()
        # The scheduler has no port: its first chain view in Redis says it is watching the stopped chain.
        wait_for(lambda: self.redis().exists(f"{self.namespace}:chain:view"), 90, f"[{self.name}] the scheduler's view")
        self._post(f"{self.dapi_url}/_sim/clock/resume")

    def _stop_parts(self) -> None:
        for proc in [*self.replicas, *(p.proc for p in reversed(self.parts.values()) if p.proc is not None)]:
            proc.kill()
        self.replicas = []
        for part in self.parts.values():
            part.proc = None

    def proc(self, name: str) -> ManagedProcess:
        part = self.parts[name]
        assert part.proc is not None, f"{name} not started"
        return part.proc

    def kill(self, name: str) -> None:
        """SIGKILL one part (its whole process group)."""
        self.proc(name).kill()

    def restart(self, name: str, **env: str) -> ManagedProcess:
        """Stop (if alive) and start one part again, as compose's restart policy would."""
        part = self.parts[name]
        if part.proc is not None:
            part.proc.stop()
        part.proc = self._process(part, env).start()
        return part.proc

    def restart_replica(self, dead: ManagedProcess) -> ManagedProcess:
        """Start a provisioner replica in place of a dead one (compose's ``restart: unless-stopped``)."""
        fresh = self._process(self.parts["provisioner"]).start()
        if self.parts["provisioner"].proc is dead:
            self.parts["provisioner"].proc = fresh
            self.replicas.append(dead)  # keeps its log for the report
        else:
            self.replicas[self.replicas.index(dead)] = fresh
            self.replicas.append(dead)
        return fresh

    def add_provisioner(self, **env: str) -> ManagedProcess:
        """Another provisioner replica on the same command queue (compose's ``--scale provisioner=N``)."""
        proc = self._process(self.parts["provisioner"], env).start()
        self.replicas.append(proc)
        return proc

    def provisioners(self) -> list[ManagedProcess]:
        first = self.parts["provisioner"].proc
        return [p for p in ([first] if first is not None else []) + self.replicas]

    def cli(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        """``python <args>`` with the world's environment (``-m hybridctl ...``, ``-m hybrid_provisioner ...``)."""
        return subprocess.run(
            [sys.executable, *args],
            env={**os.environ, **self.env},
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def publish(self, command: str, payload: dict[str, Any]) -> None:
        """An operator's command through the CLI (``hybridctl publish``)."""
        done = self.cli("-m", "hybridctl", "publish", command, json.dumps(payload), timeout=60)
        assert done.returncode == 0, (command, done.stdout, done.stderr)

    def stop(self) -> dict[str, Any] | None:
        """make run's shutdown; keeps (and returns) the Vast ledger read after every labelled instance was destroyed."""
        procs = {name: part.proc for name, part in self.parts.items() if part.proc is not None}
        if "scheduler" in procs:
            procs["scheduler"].stop(timeout=20)
        for replica in self.replicas:
            replica.stop(timeout=20)
        if "provisioner" in procs:
            procs["provisioner"].stop(timeout=20)
        vast = procs.get("sim vast")
        if vast is not None and vast.alive():
            with contextlib.suppress(subprocess.TimeoutExpired):
                done = self.cli("-m", "hybrid_provisioner", "destroy", "--all-labelled")
                if done.returncode != 0:
                    print(f"[{self.name}] destroy --all-labelled exited {done.returncode}:\n{done.stdout}{done.stderr}")
            with contextlib.suppress(Exception):
                self.ledger_at_stop = self.ledger()
        for name in ("proxy", "callback-relay"):
            if name in procs:
                procs[name].stop(timeout=20)
        for name in reversed(list(procs)):
            procs[name].stop(timeout=20)
        if self.alerts is not None:
            self.alerts.close()
        return self.ledger_at_stop

    def cleanup(self) -> None:
        """The namespace's queues, exchanges and Redis keys (quorum queues left behind stall a small broker)."""
        with contextlib.suppress(Exception):
            queues, exchanges = namespace_objects(self.namespace)
            delete_broker_objects(self.amqp_url, queues, exchanges)
        with contextlib.suppress(Exception):
            r = self.redis()
            keys = list(r.scan_iter(match=f"{self.namespace}:*", count=500))
            if keys:
                r.delete(*keys)
            r.close()

    def logs(self, tail: int = 6000) -> str:
        out = []
        for name, part in self.parts.items():
            if part.proc is not None:
                out.append(f"----- [{self.name}] {name} -----\n{part.proc.output()[-tail:]}")
        for i, p in enumerate(self.replicas):
            out.append(f"----- [{self.name}] provisioner replica {i + 2} -----\n{p.output()[-tail:]}")
        return "\n".join(out)

    # ------------------------------------------------------------------ the simulators' views

    def _get(self, url: str) -> Any:
        status, body = http("GET", url)
        assert status == 200, (url, status, body)
        return body

    def _post(self, url: str, body: Any = None) -> Any:
        status, out = http("POST", url, body if body is not None else {})
        assert status == 200, (url, status, out)
        return out

    def ledger(self) -> dict[str, Any]:
        """Vast ``/_sim/ledger``: every instance ever created, its status history and billing."""
        return self._get(f"{self.vast_url}/_sim/ledger")  # type: ignore[no-any-return]

    def vast_fault(self, spec: dict[str, Any]) -> dict[str, Any]:
        return self._post(f"{self.vast_url}/_sim/faults", spec)  # type: ignore[no-any-return]

    def report(self) -> dict[str, Any]:
        """The dapi's ``/_sim/report``: per epoch, nodes, weights, batches, inference, confirmation PoCs."""
        return self._get(f"{self.dapi_url}/_sim/report")  # type: ignore[no-any-return]

    def epoch(self, index: int, report: dict[str, Any] | None = None) -> dict[str, Any] | None:
        return next((e for e in (report or self.report())["epochs"] if int(e["index"]) == index), None)

    def weights_fixed(self, index: int) -> dict[str, Any] | None:
        """The epoch's record once its weights are fixed (end of PoC validation), else None."""
        e = self.epoch(index)
        return e if e is not None and e["weights_fixed_at"] is not None else None

    def batches(self, **query: Any) -> list[dict[str, Any]]:
        """Every callback the dapi received (``/_sim/batches?epoch=&node_id=&kind=``): arrival height, status."""
        qs = "&".join(f"{k}={v}" for k, v in query.items())
        return self._get(f"{self.dapi_url}/_sim/batches" + (f"?{qs}" if qs else ""))  # type: ignore[no-any-return]

    def clock(self) -> dict[str, Any]:
        return self._get(f"{self.dapi_url}/_sim/clock")  # type: ignore[no-any-return]

    def height(self) -> int:
        return int(self.clock()["height"])

    def wait_height(self, height: int, timeout: float = 120) -> int:
        return wait_for(lambda: self.height() >= height and self.height(), timeout, f"[{self.name}] height {height}")

    def callback_stop(self) -> None:
        """The dapi's callback server goes dark (connections reset): "the dapi is down"."""
        self._post(f"{self.dapi_url}/_sim/callback/stop")

    def callback_start(self) -> None:
        self._post(f"{self.dapi_url}/_sim/callback/start")

    def confirmation_poc(self) -> dict[str, Any]:
        """Fire a confirmation PoC at the next Inference-phase block."""
        return self._post(f"{self.dapi_url}/_sim/confirmation-poc")  # type: ignore[no-any-return]

    def upstream_fault(self, spec: dict[str, Any]) -> Any:
        return self._post(f"{self.upstream_url}/_sim/faults", spec)

    def upstream_stats(self) -> dict[str, Any]:
        return self._get(f"{self.upstream_url}/_sim/stats")  # type: ignore[no-any-return]

    def serving_instance(self, index: int) -> dict[str, Any] | None:
        """The running instance rented for epoch ``index``'s PoC that serves the registered node (the ledger row of
        the live ``-poc-e<index>-`` instance that is running), or None."""
        rows = [
            i
            for i in self.ledger()["instances"]
            if f"-poc-e{index}-" in (i["label"] or "") and not i["destroyed"] and i["actual_status"] == "running"
        ]
        return rows[0] if len(rows) == 1 else None

    def mlnode_stats(self, instance: dict[str, Any]) -> dict[str, Any]:
        """The MLNode simulator's own counters (``/_sim/stats`` on its API port, 8080 in the container): among them
        what its callback senders delivered, retried and dropped (gonka-protocol.md §2, §7)."""
        port = instance["container"]["ports"]["8080"]
        return self._get(f"http://127.0.0.1:{port}/_sim/stats")  # type: ignore[no-any-return]

    def delivered(self, index: int) -> dict[str, int] | None:
        """What epoch ``index``'s serving MLNode has handed to the relay so far (its senders' counters, summed over
        the v1 and v2 senders), or None when no single instance serves it."""
        inst = self.serving_instance(index)
        if inst is None:
            return None
        senders = self.mlnode_stats(inst)["senders"]
        out = {"delivered": 0, "dropped": 0, "dropped_at_phase_switch": 0, "pending": 0}
        for gen in ("v1", "v2"):
            stats = senders.get(gen) or {}
            for key in ("delivered", "dropped", "dropped_at_phase_switch"):
                out[key] += int(stats.get(key, 0))
            out["pending"] += int(senders.get(f"{gen}_pending", 0))
        return out

    # ------------------------------------------------------------------ the system's own views (Redis, read-only)

    def redis(self) -> redis.Redis:
        if self._redis is None:
            self._redis = redis.Redis.from_url(self.redis_url, socket_timeout=10)
        return self._redis

    def _hash(self, key: str) -> dict[str, Any]:
        raw = self.redis().hgetall(f"{self.namespace}:{key}")
        return {k.decode(): json.loads(v) for k, v in raw.items()}  # type: ignore[union-attr]

    def campaigns(self) -> dict[str, dict[str, Any]]:
        """The scheduler's per-window records (``scheduler:epochs``)."""
        return self._hash("scheduler:epochs")

    def jobs(self) -> dict[str, dict[str, Any]]:
        """The provisioner's durable job records (``jobs``)."""
        return self._hash("jobs")

    def confirmation(self) -> dict[str, Any]:
        raw: Any = self.redis().get(f"{self.namespace}:scheduler:confirmation")
        return dict(json.loads(raw)) if raw else {}

    def status(self) -> dict[str, Any]:
        """What ``hybridctl status --json`` shows (hybridctl.status.gather over the owners' Redis views)."""
        from redis.asyncio import Redis as AsyncRedis

        from hybrid_common.redis_keys import RedisKeys
        from hybridctl.status import gather

        async def read() -> dict[str, Any]:
            r = AsyncRedis.from_url(self.redis_url)
            try:
                return await gather(r, RedisKeys(self.namespace))
            finally:
                await r.aclose()

        return asyncio.run(read())

    # ------------------------------------------------------------------ heights and wall time

    def time_of(self, height: int, clock: dict[str, Any] | None = None) -> float:
        """Wall (unix) time at which ``height`` began, from the dapi's clock (paused only before the run began)."""
        c = clock or self.clock()
        return float(c["latest_block_time"]) + (height - int(c["height"])) * float(c["block_seconds"])


# ---------------------------------------------------------------------- evidence and the acceptance checks


@dataclass
class Evidence:
    """What a run leaves to assert on: the views read at the end of the scenario (before the shutdown's emergency
    destroy), the ledger after the shutdown, the alerts, the scenario's own notes, and its error if it failed."""

    name: str
    report: dict[str, Any] = field(default_factory=dict)
    ledger: dict[str, Any] = field(default_factory=dict)
    status: dict[str, Any] = field(default_factory=dict)
    clock: dict[str, Any] = field(default_factory=dict)
    campaigns: dict[str, Any] = field(default_factory=dict)
    confirmation: dict[str, Any] = field(default_factory=dict)
    jobs: dict[str, Any] = field(default_factory=dict)
    batches: list[dict[str, Any]] = field(default_factory=list)
    upstream: dict[str, Any] = field(default_factory=dict)
    alerts: list[str] = field(default_factory=list)
    notes: dict[str, Any] = field(default_factory=dict)
    ledger_at_stop: dict[str, Any] | None = None
    seconds: float = 0.0
    error: str | None = None
    logs: str = ""

    def epoch(self, index: int) -> dict[str, Any]:
        e: dict[str, Any] | None = next((e for e in self.report["epochs"] if int(e["index"]) == index), None)
        assert e is not None, (self.name, f"no epoch {index} in the dapi's report")
        return e

    def time_of(self, height: int) -> float:
        c = self.clock
        return float(c["latest_block_time"]) + (height - int(c["height"])) * float(c["block_seconds"])

    def alerted(self, *needles: str) -> list[str]:
        return [t for t in self.alerts if all(n in t for n in needles)]

    @contextlib.contextmanager
    def explained(self) -> Iterator[None]:
        """Assertions inside print the run's logs when they fail (the world is long gone by then)."""
        try:
            if self.error:
                raise AssertionError(f"[{self.name}] the scenario failed:\n{self.error}")
            yield
        except AssertionError:
            print(self.logs)
            raise


def collect(world: World, notes: dict[str, Any]) -> Evidence:
    ev = Evidence(name=world.name, notes=notes)
    ev.report = world.report()
    ev.ledger = world.ledger()
    ev.clock = world.clock()
    ev.status = world.status()
    ev.campaigns = world.campaigns()
    ev.confirmation = world.confirmation()
    ev.jobs = world.jobs()
    ev.batches = world.batches()
    ev.upstream = world.upstream_stats()
    return ev


Scenario = Callable[[World, dict[str, Any]], None]


def run_worlds(
    runs: list[tuple[World, Scenario]], *, before_start: dict[str, Callable[[], Any]] | None = None
) -> dict[str, Evidence]:
    """Run each world's scenario in its own thread, side by side; collect the evidence; stop every world (make run's
    order) and clean its namespace. Never raises for a scenario: its failure is kept in its evidence.
    ``before_start[name]`` runs in that world's thread before it starts (e.g. waiting for its private broker)."""
    out: dict[str, Evidence] = {}
    starting = threading.Lock()
    hooks = before_start or {}

    def one(world: World, scenario: Scenario) -> None:
        notes: dict[str, Any] = {}
        ev = Evidence(name=world.name, notes=notes)
        began = time.monotonic()
        try:
            if world.name in hooks:
                hooks[world.name]()
            with starting:  # one cold start at a time (see World.start)
                world.start()
            scenario(world, notes)
        except BaseException:
            ev.error = traceback.format_exc()
        try:
            collected = collect(world, notes)
            collected.error = ev.error
            ev = collected
        except Exception:
            ev.error = ev.error or f"collecting the evidence:\n{traceback.format_exc()}"
        try:
            ev.ledger_at_stop = world.stop()
        finally:
            ev.alerts = world.alerts.texts() if world.alerts else []
            ev.logs = world.logs()
            ev.seconds = round(time.monotonic() - began, 1)
            world.cleanup()
            out[world.name] = ev

    threads = [threading.Thread(target=one, args=r, name=f"world-{r[0].name}") for r in runs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out


def our_nodes(epoch: dict[str, Any], prefix: str = "poc-e") -> dict[str, dict[str, Any]]:
    """The GPU slots the scheduler registered for this epoch's PoC (slot ids ``poc-e<N>-...``)."""
    return {k: n for k, n in epoch["nodes"].items() if k.startswith(f"{prefix}{epoch['index']}-")}


def weighed(world: World, notes: dict[str, Any], index: int, timeout: float = 180) -> dict[str, Any]:
    """Wait until epoch ``index``'s weights are fixed (the end of PoC validation), then read what its MLNode handed
    to the relay before the GPU goes (it is kept a few blocks longer, for the dapi's node sync):
    ``notes["delivered"][index]``, None when no single instance served the window."""
    e: dict[str, Any] = wait_for(
        functools.partial(world.weights_fixed, index), timeout, f"[{world.name}] epoch {index} weighed"
    )
    try:
        notes.setdefault("delivered", {})[index] = world.delivered(index)
    except (AssertionError, OSError, KeyError):
        notes.setdefault("delivered", {})[index] = None
    return e


def released(world: World, index: int, timeout: float = 60) -> None:
    """Wait until epoch ``index``'s GPU slots are deleted from the dapi and their instances destroyed."""

    def deleted() -> bool:
        e = world.weights_fixed(index)
        nodes = our_nodes(e) if e is not None else {}
        return bool(nodes) and all(n["deleted_at_height"] is not None for n in nodes.values())

    def destroyed() -> bool:
        return not [
            i for i in world.ledger()["instances"] if not i["destroyed"] and f"-poc-e{index}-" in (i["label"] or "")
        ]

    wait_for(deleted, timeout, f"[{world.name}] epoch {index}'s GPU released")
    wait_for(destroyed, timeout, f"[{world.name}] epoch {index}'s instances destroyed")


def follow_epochs(world: World, notes: dict[str, Any], epochs: Iterable[int] = (1, 2)) -> None:
    """Each epoch in turn: :func:`weighed`, then :func:`released`."""
    for index in epochs:
        weighed(world, notes, index)
        released(world, index)


def assert_weight_earned(ev: Evidence, index: int) -> int:
    """The participant earned PoC weight in epoch ``index``: a GPU slot of ours, registered before ``poc_start``
    (a node registered later does not join that PoC, gonka-protocol.md §3), holds weight fixed at the end of PoC
    validation. Returns that weight."""
    e = ev.epoch(index)
    assert e["weights_fixed_at"] is not None, (ev.name, index, "weights not fixed")
    earning = {k: n for k, n in our_nodes(e).items() if n["weight"] > 0}
    assert earning, (ev.name, index, {k: (n["weight"], n["weight_note"]) for k, n in e["nodes"].items()})
    for slot, node in earning.items():
        assert node["registered_at_height"] < e["poc_start"], (ev.name, index, slot, node)
    return sum(n["weight"] for n in earning.values())


def dapi_batches(ev: Evidence, stage_height: int) -> dict[str, int]:
    """What the dapi made of the batches for one PoC (its start height) or one confirmation PoC (its trigger
    height), by status: accepted, duplicate, out_of_window, rejected."""
    out: dict[str, int] = {}
    for b in ev.batches:
        if b["block_height"] == stage_height:
            out[b["status"]] = out.get(b["status"], 0) + 1
    return out


def dapi_accepted(ev: Evidence, stage_height: int) -> int:
    return dapi_batches(ev, stage_height).get("accepted", 0)


def assert_callbacks_relayed(ev: Evidence, indexes: Iterable[int], *, from_mlnode: Iterable[int] = ()) -> None:
    """Every PoC batch reached the dapi inside its window, once: per PoC the relay's ledger says ``forwarded`` for
    each batch it accepted (no dead letter, no duplicate), and the dapi accepted exactly as many for that PoC, none
    out of window or rejected. For the epochs in ``from_mlnode``, the MLNode's own senders agree: every batch it
    generated was handed to the relay (none dropped after retries, none pending), as many as the relay accepted."""
    per_poc = ev.status["relay"]["per_poc"]
    mlnode = set(from_mlnode)
    for index in indexes:
        e = ev.epoch(index)
        relayed = per_poc.get(str(e["poc_start"]), {})
        assert relayed.get("accepted", 0) > 0, (ev.name, index, per_poc)
        assert relayed.get("forwarded", 0) == relayed["accepted"], (ev.name, index, relayed)
        got_here = dapi_batches(ev, e["poc_start"])
        assert got_here.get("accepted", 0) == relayed["forwarded"], (ev.name, index, got_here, relayed)
        # This PoC's own batches, generated and validated: none out of window, rejected or duplicate. (The epoch's
        # totals in the report also hold a confirmation PoC's batches, whose last ones may land after its one-second
        # window: test_e2e_faults judges those against their own stage.)
        assert set(got_here) == {"accepted"}, (ev.name, index, got_here, e["batches"])
        if index in mlnode:
            sent = ev.notes.get("delivered", {}).get(index)
            assert sent is not None, (ev.name, index, "the MLNode's counters were not read before the release")
            assert sent["dropped"] == sent["pending"] == 0, (ev.name, index, sent)
            # gonka-protocol.md §2: a v1 sender drops what it has not sent when the phase turns to validate. It walks
            # its batches every 5 s, 83 ms here, while the relay's answer takes the same wall milliseconds as live:
            # the last few batches of a compressed 5-second generation can miss the switch before any relay sees
            # them. A relay slow enough to lose a real share of the PoC fails this.
            assert sent["dropped_at_phase_switch"] <= max(2, sent["delivered"] // 10), (ev.name, index, sent)
            assert sent["delivered"] == relayed["accepted"], (ev.name, index, sent, relayed)
    assert not ev.alerted("callback dead-lettered"), ev.alerts


def assert_inference_served(ev: Evidence, indexes: Iterable[int], proxy_id: str = "hyperbolic-proxy-1") -> None:
    """The proxy node served the dapi's inference in every epoch, and the dapi never saw it FAILED
    (gonka-protocol.md §9: a FAILED node gets no inference; §10: downtime cuts the epoch's rewards)."""
    for index in indexes:
        e = ev.epoch(index)
        assert e["inference"]["ok"] > 0, (ev.name, index, e["inference"])
        node = e["nodes"].get(proxy_id)
        assert node is not None, (ev.name, index, list(e["nodes"]))
        assert all(h["status"] != "FAILED" for h in node["status_history"]), (ev.name, index, node)
    assert ev.report["nodes"][proxy_id]["current_status"] != "FAILED", (ev.name, ev.report["nodes"][proxy_id])
    assert not ev.alerted(proxy_id, "FAILED"), ev.alerts


def gpu_runs(instance: dict[str, Any]) -> list[tuple[float, float]]:
    """Wall-time intervals an instance held its GPU (billed at the GPU price): from each ``running`` entry of its
    status history to the next entry that is not running (the Vast simulator's meter follows the same edges)."""
    runs: list[tuple[float, float]] = []
    start: float | None = None
    for h in instance["history"]:
        if h["actual_status"] == "running" and start is None:
            start = h["at"]
        elif h["actual_status"] != "running" and start is not None:
            runs.append((start, h["at"]))
            start = None
    if start is not None:
        runs.append((start, instance["destroyed_at"] or time.time()))
    return runs


def assert_gpu_billed_only_around_windows(
    ev: Evidence, indexes: Iterable[int], *, lead_blocks: int = 100, tail_blocks: int = 60
) -> float:
    """From the Vast ledger: every second any of our instances held a GPU lies around a PoC window — after
    ``poc_start − lead_blocks`` (the rental lead: boot + registration before ``poc_start``) and before
    ``poc_validation_end + tail_blocks`` (the release margin for the dapi's node sync, then the destroy) — so nothing
    is billed at the GPU price through the inference phase between windows (pre-pulled standbys are stopped: storage
    only). ``extra_windows`` in the notes (wall intervals) admit deliberate rentals such as a confirmation PoC's.
    Returns the GPU wall seconds."""
    windows = []
    for index in indexes:
        stages = ev.epoch(index)["stages"]
        windows.append(
            (ev.time_of(stages["poc_start"] - lead_blocks), ev.time_of(stages["poc_validation_end"] + tail_blocks))
        )
    windows += [tuple(w) for w in ev.notes.get("extra_windows", [])]
    total = 0.0
    for inst in ev.ledger["instances"]:
        for a, b in gpu_runs(inst):
            total += b - a
            assert any(lo <= a and b <= hi for lo, hi in windows), (
                ev.name,
                inst["label"],
                "GPU held outside the PoC windows",
                (round(a, 1), round(b, 1)),
                [(round(lo, 1), round(hi, 1)) for lo, hi in windows],
            )
    metered = sum(i["wall_gpu_seconds"] for i in ev.ledger["instances"])
    assert abs(total - metered) < 1.0 + 0.05 * metered, (ev.name, total, metered)
    return total


def assert_no_orphans(ev: Evidence, label_parts: Iterable[str]) -> None:
    """Every instance rented for the given windows (label contains one of ``label_parts``) was destroyed by the
    system itself before the shutdown, and after make run's shutdown nothing at all is left billing."""
    parts = list(label_parts)
    for inst in ev.ledger["instances"]:
        label = inst["label"] or ""
        if any(p in label for p in parts):
            assert inst["destroyed"], (ev.name, "left running by the system", label, inst["actual_status"])
    assert ev.ledger_at_stop is not None, (ev.name, "no ledger after the shutdown")
    assert ev.ledger_at_stop["instances_live"] == 0, (
        ev.name,
        [(i["label"], i["actual_status"]) for i in ev.ledger_at_stop["instances"] if not i["destroyed"]],
    )
