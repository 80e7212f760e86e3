"""Proxy speed, side by side with LiteLLM (issue #10): the same upstream simulator reached directly, through the
proxy node, and through LiteLLM, at concurrency 1 and 32, streaming and not, the targets interleaved over rounds.

What runs (each its own process, one worker each):

- the upstream simulator, ``python -m sim upstream`` (cached answers: it is never the bottleneck);
- the proxy exactly as the operator runs it, ``python -m hybrid_proxy`` (uvloop, the service with its node), with
  no broker or Redis reachable — inference needs neither (the service starts the node first and retries the bus in
  the background), self-registration off;
- LiteLLM ``litellm[proxy]==1.102.4`` (``litellm --config cfg.yaml --num_workers 1``), installed on first use into a
  throwaway venv outside the repository (``~/.cache/gonka-hybrid/litellm-1.102.4``), never a project dependency; its
  cost-map download and telemetry are switched off (no internet here).

Placement on a small machine (see ``Placement``): at concurrency 32 the target under test (proxy or LiteLLM) has a
CPU of its own and the upstream plus the load generator share the other; at concurrency 1 every process may run on
every CPU (``--no-pin``: never pinned). Load: Debian's ``wrk`` (C, epoll) for the proxy and the upstream at
concurrency 32; ``bench/_load.py``'s keep-alive asyncio client for concurrency 1 (it also measures time to first
byte) and for LiteLLM; without ``wrk`` the asyncio client does everything and the output says so. CPU per request
is read from ``/proc/<pid>/stat`` of the target's process tree: the figure least distorted by other work on a
shared machine.

Request bodies (``--body``): ``dapi`` (default) is what the dapi sends — logprobs with top_logprobs 5, ~29 KB
answers; ``plain`` has no logprobs (~2 KB answers), the setting of the issue's LiteLLM figures.

"Added" figures are paired per round (target minus the upstream measured right beside it), then the median over
rounds is reported.

Usage: ``.venv/bin/python bench/proxy.py [--quick] [--rounds 3] [--duration 5] [--body dapi|plain] [--no-litellm]
[--no-wrk] [--no-pin]``; a full run takes about 4 minutes (plus LiteLLM's install the first time), ``--quick``
about one. The last line printed is a JSON object (``added_p50_ms_c1``, ``rps_c32``, ``stream_rps_c32``,
``rps_ratio_vs_litellm``, ``litellm_version``, ...).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _load import LoadSpec, run_load, run_wrk

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable
LITELLM_VERSION = "1.102.4"  # later releases need a certifi this index lacks; 1.82.7 and 1.82.8 were compromised
LITELLM_HOME = Path(
    os.environ.get("LITELLM_BENCH_VENV", Path.home() / ".cache/gonka-hybrid" / f"litellm-{LITELLM_VERSION}")
)
API_KEY = "sim-upstream-key"  # MODE=sim: the proxy always sends the simulator's key (hybrid_common.settings)
MODEL = "Qwen/Qwen2.5-7B-Instruct"
MESSAGES = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "Explain proof of work in one paragraph."},
]
BODIES: dict[str, dict[str, Any]] = {
    # What the dapi sends (gonka-protocol.md §4): logprobs with top_logprobs 5, a seed; ~50 tokens and ~29 KB back.
    "dapi": {"model": MODEL, "messages": MESSAGES, "logprobs": True, "top_logprobs": 5, "max_tokens": 5000, "seed": 42},
    # No logprobs (~2 KB back): the setting of the LiteLLM figures (~105 req/s), whose cost grows with the
    # answer's size because it re-parses every answer.
    "plain": {"model": MODEL, "messages": MESSAGES, "max_tokens": 5000, "seed": 42},
}
STREAM_OPTIONS = {"stream": True, "stream_options": {"include_usage": True}}
# Every target gets the same bytes; only the upstream checks the key (the proxy never forwards it, LiteLLM has no
# master key here).
HEADERS = {"Authorization": f"Bearer {API_KEY}"}
TARGETS = ("upstream", "proxy", "litellm")
SCENARIOS = (("json", 1), ("stream", 1), ("json", 32), ("stream", 32))


# --- processes ------------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_port(port: int, proc: subprocess.Popen[bytes], log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"exited with {proc.returncode} before listening on {port}:\n{_tail(log)}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.1)
    raise TimeoutError(f"nothing listens on {port} after {timeout:g}s:\n{_tail(log)}")


def _tail(path: Path, chars: int = 2000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError:
        return ""


def _loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "n/a"


def _tree(pid: int) -> list[int]:
    """``pid`` and its descendants (LiteLLM may run its server in a child)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += children.get(p, [])
    return out


def _cpu_seconds(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError, IndexError, ValueError):
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime + stime, in clock ticks
    return total / os.sysconf("SC_CLK_TCK")


@dataclass
class Service:
    name: str
    port: int
    path: str  # the chat completions path on this target
    proc: subprocess.Popen[bytes]
    log: Path
    pids: list[int] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}{self.path}"

    def cpu(self) -> float:
        return _cpu_seconds(self.pids)

    def stop(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)


def _spawn(
    name: str,
    argv: list[str],
    env: dict[str, str],
    port: int,
    path: str,
    workdir: Path,
    timeout: float = 60.0,
) -> Service:
    log = workdir / f"{name}.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(argv, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    service = Service(name, port, path, proc, log)
    try:
        _wait_port(port, proc, log, timeout)
    except BaseException:
        service.stop()
        raise
    service.pids = _tree(proc.pid)
    return service


def _base_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PROXY_", "HYBRID_", "LITELLM_"))}
    env["PYTHONUNBUFFERED"] = "1"
    env["NO_PROXY"] = env["no_proxy"] = "127.0.0.1,localhost"
    return env


def start_upstream(workdir: Path, workers: int) -> Service:
    port = _free_port()
    argv = [PY, "-m", "sim", "upstream", "--port", str(port), "--api-key", API_KEY, "--workers", str(workers)]
    return _spawn("upstream", argv, _base_env(), port, "/v1/chat/completions", workdir)


def start_proxy(workdir: Path, upstream: Service) -> Service:
    port = _free_port()
    dead = _free_port()  # nothing listens there: the bus and Redis stay unreachable, inference does not care
    env = _base_env() | {
        "MODE": "sim",
        "HYBRID_NAMESPACE": f"bench-{os.getpid()}",
        "UPSTREAM_URL": f"http://127.0.0.1:{upstream.port}/v1",
        "AMQP_URL": f"amqp://guest:guest@127.0.0.1:{dead}/",
        "REDIS_URL": f"redis://127.0.0.1:{dead}/0",
        "PROXY_LISTEN_HOST": "127.0.0.1",
        "PROXY_NODE_PORT": str(port),
        "PROXY_METRICS_PORT": "0",
        "PROXY_REGISTER": "false",
        "PROXY_RESTORE_STATE": "false",
        "PROXY_MODELS": MODEL,
        "LOG_LEVEL": "WARNING",
    }
    return _spawn("proxy", [PY, "-m", "hybrid_proxy"], env, port, "/v1/chat/completions", workdir)


def litellm_version() -> str | None:
    python = LITELLM_HOME / "bin" / "python"
    if not python.exists():
        return None
    probe = "import importlib.metadata as m; print(m.version('litellm'))"
    done = subprocess.run([str(python), "-c", probe], capture_output=True, text=True, timeout=60)
    return done.stdout.strip() or None if done.returncode == 0 else None


def ensure_litellm() -> str:
    """The LiteLLM venv (created and installed on first use); returns its version or raises why not."""
    version = litellm_version()
    if version == LITELLM_VERSION:
        return version
    print(f"# installing litellm[proxy]=={LITELLM_VERSION} into {LITELLM_HOME} (once; outside the project)", flush=True)
    base = getattr(sys, "_base_executable", None) or shutil.which("python3.11") or "python3"
    LITELLM_HOME.parent.mkdir(parents=True, exist_ok=True)
    if not (LITELLM_HOME / "bin" / "pip").exists():
        subprocess.run([base, "-m", "venv", str(LITELLM_HOME)], check=True, timeout=300)
    pip = [str(LITELLM_HOME / "bin" / "pip"), "install", "-q", f"litellm[proxy]=={LITELLM_VERSION}"]
    done = subprocess.run(pip, capture_output=True, text=True, timeout=900)
    if done.returncode != 0:
        raise RuntimeError(f"pip install failed: {(done.stderr or done.stdout)[-800:]}")
    version = litellm_version()
    if version != LITELLM_VERSION:
        raise RuntimeError(f"installed litellm reports version {version!r}")
    return version


def start_litellm(workdir: Path, upstream: Service) -> Service:
    port = _free_port()
    config = workdir / "litellm.yaml"
    # The documented shape (inference-proxy.md), the model named as the dapi names it so every target gets the
    # same request bytes.
    config.write_text(
        "model_list:\n"
        f"  - model_name: {MODEL}\n"
        "    litellm_params:\n"
        f"      model: openai/{MODEL}\n"
        f"      api_key: {API_KEY}\n"
        f"      api_base: http://127.0.0.1:{upstream.port}/v1\n"
    )
    env = _base_env() | {
        # No internet here: the bundled cost map instead of a download, and no telemetry.
        "LITELLM_LOCAL_MODEL_COST_MAP": "True",
        "LITELLM_TELEMETRY": "False",
        "LITELLM_MODE": "PRODUCTION",
        "DISABLE_ADMIN_UI": "True",
    }
    argv = [
        str(LITELLM_HOME / "bin" / "litellm"),
        "--config", str(config), "--host", "127.0.0.1", "--port", str(port),
        "--num_workers", "1", "--telemetry", "False",
    ]  # fmt: skip
    return _spawn("litellm", argv, env, port, "/v1/chat/completions", workdir, timeout=180.0)


# --- measuring ------------------------------------------------------------------------------------------------


@dataclass
class Run:
    target: str
    kind: str  # json | stream
    concurrency: int
    tool: str
    rps: float
    p50_ms: float | None
    p99_ms: float | None
    ttfb_p50_ms: float | None
    ttfb_p99_ms: float | None
    requests: int
    errors: int
    cpu_ms_per_request: float | None


def _spec(service: Service, body: bytes, concurrency: int, duration: float) -> LoadSpec:
    return LoadSpec(
        url=service.url, body=body, headers=HEADERS, concurrency=concurrency, duration_s=duration, warmup_s=0.0
    )


def warm(service: Service, bodies: dict[str, bytes]) -> None:
    """A few requests of each kind first: LiteLLM builds its clients on first use."""
    for body in bodies.values():
        spec = LoadSpec(url=service.url, body=body, headers=HEADERS, concurrency=4, requests=40, duration_s=None)
        result = run_load(spec)
        bad = {k: v for k, v in result.status.items() if k != 200}
        if result.errors or bad:
            raise RuntimeError(f"{service.name} is not answering 200: errors {result.errors}, statuses {dict(bad)}")


def measure(service: Service, kind: str, body: bytes, concurrency: int, duration: float, use_wrk: bool) -> Run:
    spec = _spec(service, body, concurrency, duration)
    cpu_before = service.cpu()
    # wrk where the client could be the bottleneck; not for LiteLLM, whose c=32 latencies pass wrk's fixed 2 s
    # timeout (run_wrk does not take one), and which is slow enough for the asyncio client to measure exactly.
    if use_wrk and concurrency > 1 and service.name != "litellm":
        started = time.monotonic()
        wrk = run_wrk(spec)
        elapsed = time.monotonic() - started
        cpu = service.cpu() - cpu_before
        if wrk is None or "rps" not in wrk:
            raise RuntimeError(f"wrk failed: {wrk}")
        # wrk's own run length (run_wrk rounds it to whole seconds); the request count is rps times that.
        requests = round(float(wrk["rps"]) * min(elapsed, max(1, round(duration))))
        lat = {k: _number(v) for k, v in wrk["latency_ms"].items()}
        errors = int(wrk["non_2xx"]) + (1 if wrk["socket_errors"] else 0)
        return Run(
            service.name, kind, concurrency, "wrk", float(wrk["rps"]), lat.get("p50"), lat.get("p99"), None, None,
            requests, errors,
            round(1000.0 * cpu / requests, 4) if requests else None,
        )  # fmt: skip
    result = run_load(spec)
    cpu = service.cpu() - cpu_before
    d = result.as_dict()
    lat, ttfb = d["latency_ms"], d["ttfb_ms"]
    errors = result.errors + sum(v for k, v in result.status.items() if k != 200)
    return Run(
        service.name, kind, concurrency, "bench/_load.py", float(d["rps"]), lat.get("p50"), lat.get("p99"),
        ttfb.get("p50"), ttfb.get("p99"), result.requests, errors,
        round(1000.0 * cpu / result.requests, 4) if result.requests else None,
    )  # fmt: skip


def _number(value: Any) -> float | None:
    """A finite float, else None (wrk prints no percentile when nothing completed; JSON has no NaN)."""
    try:
        f = float(value)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def _diff(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a - b


def _median(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return round(statistics.median(present), 3) if present else None


def summarize(runs: list[Run], targets: list[str]) -> dict[str, Any]:
    """Medians over rounds per (target, scenario); added figures paired with the upstream of the same round."""
    out: dict[str, Any] = {}
    for kind, conc in SCENARIOS:
        key = f"{kind}_c{conc}"
        by_target: dict[str, list[Run]] = {
            t: [r for r in runs if (r.target, r.kind, r.concurrency) == (t, kind, conc)] for t in targets
        }
        direct = by_target.get("upstream", [])
        scenario: dict[str, Any] = {}
        for target, rs in by_target.items():
            if not rs:
                continue
            fig: dict[str, Any] = {
                "rps": _median([r.rps for r in rs]),
                "p50_ms": _median([r.p50_ms for r in rs]),
                "p99_ms": _median([r.p99_ms for r in rs]),
                "ttfb_p50_ms": _median([r.ttfb_p50_ms for r in rs]),
                "cpu_ms_per_request": _median([r.cpu_ms_per_request for r in rs]),
                "errors": sum(r.errors for r in rs),
                "rounds": len(rs),
                "tool": rs[0].tool,
            }
            if target != "upstream" and len(direct) == len(rs):
                pairs = list(zip(rs, direct, strict=True))
                fig["added_p50_ms"] = _median([_diff(r.p50_ms, d.p50_ms) for r, d in pairs])
                fig["added_p99_ms"] = _median([_diff(r.p99_ms, d.p99_ms) for r, d in pairs])
                if rs[0].ttfb_p50_ms is not None:
                    fig["added_ttfb_p50_ms"] = _median([_diff(r.ttfb_p50_ms, d.ttfb_p50_ms) for r, d in pairs])
            scenario[target] = fig
        out[key] = scenario
    return out


def _fmt(v: Any, width: int = 8) -> str:
    if v is None:
        return "—".rjust(width)
    if isinstance(v, float):
        return f"{v:{width}.{3 if abs(v) < 10 else 1}f}"
    return str(v).rjust(width)


def print_table(summary: dict[str, Any]) -> None:
    print()
    header = (
        f"{'scenario':<10} {'target':<9} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'+p50 ms':>8} {'+p99 ms':>8}"
        f" {'ttfb p50':>8} {'+ttfb':>8} {'cpu ms/req':>10} {'errors':>6}  load generator"
    )
    print(header)
    print("-" * len(header))
    for key, scenario in summary.items():
        for target, f in scenario.items():
            print(
                f"{key:<10} {target:<9} {_fmt(f['rps'])} {_fmt(f['p50_ms'])} {_fmt(f['p99_ms'])}"
                f" {_fmt(f.get('added_p50_ms'))} {_fmt(f.get('added_p99_ms'))} {_fmt(f['ttfb_p50_ms'])}"
                f" {_fmt(f.get('added_ttfb_p50_ms'))} {_fmt(f['cpu_ms_per_request'], 10)} {f['errors']:>6}  {f['tool']}"
            )
    print()


@dataclass(frozen=True)
class Placement:
    """Which CPUs the processes may use, per scenario.

    Concurrency 32 measures throughput: the target under test gets a CPU of its own, the upstream and the load
    generator share the other, so the target's figure is not its neighbours'. Concurrency 1 measures latency: nothing
    runs in parallel, and splitting the request's chain (client → target → upstream → target → client) over two CPUs
    only adds a cross-CPU wake-up to each hop (measured here: added p99 ~6 ms pinned vs < 1 ms not), so there every
    process may run anywhere."""

    every: set[int]
    target: set[int] | None  # None: no pinning at all (--no-pin, or a single CPU)
    rest: set[int] | None

    def describe(self, concurrency: int) -> str:
        if self.target is None or concurrency == 1:
            return f"CPUs {sorted(self.every)} shared"
        return f"target CPU {sorted(self.target)}; upstream + load generator CPU {sorted(self.rest or ())}"

    def apply(self, services: dict[str, Service], concurrency: int) -> None:
        spread = self.target is not None and concurrency > 1
        for service in services.values():
            service.pids = _tree(service.proc.pid)
            cpus = (self.rest if service.name == "upstream" else self.target) if spread else self.every
            _set_affinity(service.pids, cpus or self.every)
        os.sched_setaffinity(0, (self.rest if spread else self.every) or self.every)  # the load generator, and wrk


def _set_affinity(pids: list[int], cpus: set[int]) -> None:
    for pid in pids:
        with contextlib.suppress(OSError):
            for task in Path(f"/proc/{pid}/task").iterdir():  # every thread: LiteLLM's workers too
                with contextlib.suppress(OSError):
                    os.sched_setaffinity(int(task.name), cpus)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="1 round of 2 s per measurement (a smoke run)")
    ap.add_argument("--rounds", type=int, help="each round measures every target once per scenario (default 3)")
    ap.add_argument("--duration", type=float, help="seconds per measurement (default 5)")
    ap.add_argument("--no-litellm", action="store_true", help="skip LiteLLM (no ratio)")
    ap.add_argument("--no-wrk", action="store_true", help="the asyncio client for concurrency 32 too")
    ap.add_argument("--no-pin", action="store_true", help="do not pin processes to CPUs")
    ap.add_argument("--upstream-workers", type=int, default=1)
    ap.add_argument(
        "--body",
        choices=sorted(BODIES),
        default="dapi",
        help="dapi: what the dapi sends (logprobs, ~29 KB answers); plain: no logprobs (~2 KB answers)",
    )
    args = ap.parse_args()
    args.rounds = args.rounds or (1 if args.quick else 3)
    args.duration = args.duration or (2.0 if args.quick else 5.0)

    cpus = sorted(os.sched_getaffinity(0))
    pin = not args.no_pin and len(cpus) >= 2
    place = Placement(set(cpus), {cpus[0]} if pin else None, set(cpus[1:]) if pin else None)
    use_wrk = not args.no_wrk and shutil.which("wrk") is not None
    wrk_note = (
        "wrk" if use_wrk else ("asyncio client (--no-wrk)" if args.no_wrk else "asyncio client (wrk not installed)")
    )
    print(f"# machine: {os.cpu_count()} CPUs, Python {platform.python_version()}, load average {_loadavg()} at start")
    print(f"# c=1: {place.describe(1)}; load from bench/_load.py's asyncio client (it measures time to first byte)")
    print(f"# c=32: {place.describe(32)}; load from {wrk_note}")
    print(f"# {args.rounds} round(s) x {args.duration:g} s per measurement, targets interleaved", flush=True)

    version: str | None = None
    litellm_note = "skipped (--no-litellm)"
    if not args.no_litellm:
        try:
            version = ensure_litellm()
            litellm_note = f"litellm[proxy]=={version} in {LITELLM_HOME}"
        except Exception as exc:  # the proxy's figures are still worth having
            litellm_note = f"unavailable: {exc}"
    print(f"# LiteLLM: {litellm_note}", flush=True)

    chat = BODIES[args.body]
    bodies = {"json": json.dumps(chat).encode(), "stream": json.dumps({**chat, **STREAM_OPTIONS}).encode()}
    services: dict[str, Service] = {}
    runs: list[Run] = []
    started = time.monotonic()
    loads: list[str] = [_loadavg()]
    with tempfile.TemporaryDirectory(prefix="bench-proxy-") as tmp:
        workdir = Path(tmp)
        try:
            services["upstream"] = start_upstream(workdir, args.upstream_workers)
            services["proxy"] = start_proxy(workdir, services["upstream"])
            if version is not None:
                services["litellm"] = start_litellm(workdir, services["upstream"])
            targets = list(services)
            place.apply(services, 1)
            for service in services.values():
                warm(service, bodies)
            for round_no in range(args.rounds):
                for kind, conc in SCENARIOS:
                    place.apply(services, conc)
                    k = (round_no + SCENARIOS.index((kind, conc))) % len(targets)
                    for name in targets[k:] + targets[:k]:  # rotate who goes first
                        run = measure(services[name], kind, bodies[kind], conc, args.duration, use_wrk)
                        runs.append(run)
                        print(
                            f"  round {round_no + 1} {kind:<6} c={conc:<2} {name:<8} {run.rps:9.1f} req/s"
                            f"  p50 {_fmt(run.p50_ms, 7)} ms  p99 {_fmt(run.p99_ms, 7)} ms"
                            f"  cpu {run.cpu_ms_per_request} ms/req  errors {run.errors}  [{run.tool}]",
                            flush=True,
                        )
                loads.append(_loadavg())
        finally:
            for service in reversed(services.values()):
                service.stop()

    summary = summarize(runs, list(services))
    print_table(summary)
    print(f"# load average (1, 5, 15 min) at start and after each round: {' | '.join(loads)}")

    def fig(key: str, target: str, name: str) -> Any:
        return summary.get(key, {}).get(target, {}).get(name)

    rps_c32 = fig("json_c32", "proxy", "rps")
    stream_rps_c32 = fig("stream_c32", "proxy", "rps")
    litellm_rps = fig("json_c32", "litellm", "rps")
    ratio = round(rps_c32 / litellm_rps, 1) if rps_c32 and litellm_rps else None
    added = fig("json_c1", "proxy", "added_p50_ms")
    proxy_errors = sum(r.errors for r in runs if r.target == "proxy")
    checks = {
        "added_p50_ms_c1 <= 0.5": added is not None and added <= 0.5,
        "rps_c32 >= 5000": bool(rps_c32 and rps_c32 >= 5000),
        "stream_rps_c32 >= 2000": bool(stream_rps_c32 and stream_rps_c32 >= 2000),
        "rps_ratio_vs_litellm >= 40": bool(ratio and ratio >= 40),
        "proxy answered every request 200": proxy_errors == 0,
    }
    for name, ok in checks.items():
        print(f"{'OK   ' if ok else 'BELOW'} {name}")
    result = {
        "bench": "proxy",
        "added_p50_ms_c1": added,
        "added_p99_ms_c1": fig("json_c1", "proxy", "added_p99_ms"),
        "stream_added_ttfb_p50_ms_c1": fig("stream_c1", "proxy", "added_ttfb_p50_ms"),
        "rps_c32": rps_c32,
        "stream_rps_c32": stream_rps_c32,
        "cpu_ms_per_request_c32": fig("json_c32", "proxy", "cpu_ms_per_request"),
        "stream_cpu_ms_per_request_c32": fig("stream_c32", "proxy", "cpu_ms_per_request"),
        "litellm_rps_c32": litellm_rps,
        "litellm_stream_rps_c32": fig("stream_c32", "litellm", "rps"),
        "litellm_cpu_ms_per_request_c32": fig("json_c32", "litellm", "cpu_ms_per_request"),
        "rps_ratio_vs_litellm": ratio,
        "litellm_version": version,
        "litellm": litellm_note,
        "checks": checks,
        "ok": all(checks.values()),
        "summary": summary,
        "rounds": args.rounds,
        "duration_s": args.duration,
        "body": args.body,
        "load_generator": {
            "c1": "bench/_load.py",
            "c32": ("wrk -t1 (LiteLLM: bench/_load.py)" if use_wrk else "bench/_load.py"),
        },
        "placement": {"c1": place.describe(1), "c32": place.describe(32)},
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "loadavg_during": loads,
        },
        "elapsed_s": round(time.monotonic() - started, 1),
    }
    print(json.dumps(result))
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
