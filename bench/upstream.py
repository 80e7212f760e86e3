"""Benchmark of the upstream simulator (issue #5): it must never be a proxy benchmark's bottleneck.

Runs ``python -m sim upstream`` as its own process and loads it from other processes:

1. non-streaming chat completions at concurrency 32 with ``wrk`` (the headline ``rps``; acceptance ≥ 5,000) —
   when wrk is not installed, the Python generator's figure is the headline instead;
2. the same with ``bench/_load.py`` (the keep-alive generator the proxy/relay benchmarks reuse);
3. streaming chat completions (SSE with logprobs and usage) with ``bench/_load.py``: rps and time to first byte;
4. the cost of rendering a never-seen request (cache miss), in-process.

The request is what the dapi sends (logprobs, top_logprobs 5, seed, max_tokens). Responses are ~50 tokens.
Usage: ``.venv/bin/python bench/upstream.py [--duration 10] [--concurrency 32] [--workers 1] [--no-wrk]``.
The last line printed is a JSON object with every figure.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _load import LoadSpec, run_load, run_wrk

REPO = Path(__file__).resolve().parents[1]
API_KEY = "bench-key"
MODEL = "Qwen/Qwen2.5-7B-Instruct"
# What the dapi sends (gonka-protocol.md §4): logprobs with top_logprobs ≥ 5, a seed, max_tokens.
CHAT = {
    "model": MODEL,
    "messages": [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "Explain proof of work in one paragraph."},
    ],
    "logprobs": True,
    "top_logprobs": 5,
    "max_tokens": 5000,
    "seed": 42,
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_port(port: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"upstream simulator did not listen on {port}")


def _render_cost_ms(samples: int = 200) -> dict[str, float]:
    """Milliseconds to parse + generate + serialize one never-seen request (the cache-miss path)."""
    from sim.upstream.rendering import render
    from sim.upstream.validation import parse_generation

    models = frozenset([MODEL])
    out = {}
    for label, extra in (("json", {}), ("stream", {"stream": True, "stream_options": {"include_usage": True}})):
        bodies = [json.dumps({**CHAT, **extra, "seed": i}).encode() for i in range(samples)]
        started = time.perf_counter()
        for body in bodies:
            render(parse_generation("chat", body, models, 0))
        out[label] = round((time.perf_counter() - started) / samples * 1000.0, 3)
    return out


def _loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "n/a"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=float, default=10.0, help="seconds per measured run")
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--workers", type=int, default=1, help="simulator processes (SO_REUSEPORT)")
    ap.add_argument("--client-processes", type=int, default=1)
    ap.add_argument("--no-wrk", action="store_true", help="use only the Python load generator")
    args = ap.parse_args()

    port = _free_port()
    cmd = [sys.executable, "-m", "sim", "upstream", "--port", str(port), "--api-key", API_KEY]
    cmd += ["--workers", str(args.workers)]
    server = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        _wait_port(port)
        url = f"http://127.0.0.1:{port}/v1/chat/completions"
        headers = {"Authorization": f"Bearer {API_KEY}"}

        def spec(body: bytes, duration: float) -> LoadSpec:
            return LoadSpec(
                url=url,
                body=body,
                headers=headers,
                concurrency=args.concurrency,
                duration_s=duration,
                processes=args.client_processes,
            )

        print(f"# upstream simulator: python -m sim upstream, 127.0.0.1:{port}, {args.workers} worker(s)")
        print(f"# machine: {os.cpu_count()} CPUs, Python {platform.python_version()}; load average {_loadavg()}")
        json_body = json.dumps(CHAT).encode()
        stream_body = json.dumps({**CHAT, "stream": True, "stream_options": {"include_usage": True}}).encode()

        # 1. Headline, non-streaming: wrk (C, epoll) when installed — on 2 shared cores a Python client
        #    competes with the server for CPU and would understate it; else the Python generator.
        wrk = None if args.no_wrk else run_wrk(spec(json_body, args.duration))
        if wrk is not None and "rps" in wrk:
            print(
                f"non-streaming  c={args.concurrency} [wrk -t1, {args.duration:g} s]: {wrk['rps']:>9.1f} req/s"
                f"  latency p50 {wrk['latency_ms'].get('p50')} ms  p99 {wrk['latency_ms'].get('p99')} ms"
                f"  non-2xx {wrk['non_2xx']}  socket errors {wrk['socket_errors'] or 'none'}"
            )
        else:
            print(f"wrk: {'skipped (--no-wrk)' if args.no_wrk else wrk or 'not installed'}")

        # 2. The same with the Python keep-alive generator (also what the proxy benchmarks use), and
        # 3. streaming (SSE with logprobs + usage), where time to first byte matters.
        secondary = max(3.0, args.duration * 0.6)
        label = f"bench/_load.py, {args.client_processes} process(es), {secondary:g} s"
        pd = run_load(spec(json_body, secondary)).as_dict()
        print(
            f"non-streaming  c={args.concurrency} [{label}]: {pd['rps']:>9.1f} req/s"
            f"  latency p50 {pd['latency_ms']['p50']} ms  p99 {pd['latency_ms']['p99']} ms"
            f"  errors {pd['errors']}  body {pd['mean_body_bytes']} B"
        )
        sd = run_load(spec(stream_body, secondary)).as_dict()
        print(
            f"streaming      c={args.concurrency} [{label}]: {sd['rps']:>9.1f} req/s"
            f"  latency p50 {sd['latency_ms']['p50']} ms  ttfb p50 {sd['ttfb_ms']['p50']} ms"
            f"  events/req {sd['sse_events_per_request']}  errors {sd['errors']}"
        )

        render_ms = _render_cost_ms()
        print(f"cache-miss render cost (in-process): json {render_ms['json']} ms, stream {render_ms['stream']} ms")

        wrk_clean = wrk is not None and "rps" in wrk and wrk["non_2xx"] == 0 and not wrk["socket_errors"]
        rps, source = (float(wrk["rps"]), "wrk") if wrk_clean and wrk is not None else (pd["rps"], "bench/_load.py")
        clean = pd["errors"] == 0 and set(pd["status"]) == {"200"} and sd["errors"] == 0
        ok = rps >= 5000 and clean
        print(
            f"headline rps (non-streaming, c={args.concurrency}, {source}): {rps:.1f} — {'OK' if ok else 'BELOW'} ≥ 5000"
        )
        result = {
            "bench": "upstream",
            "rps": rps,
            "rps_source": source,
            "acceptance_rps_min": 5000,
            "ok": ok,
            "concurrency": args.concurrency,
            "duration_s": args.duration,
            "server_workers": args.workers,
            "wrk": wrk,
            "python_client": {"processes": args.client_processes, "non_streaming": pd, "streaming": sd},
            "render_cost_ms": render_ms,
            "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "loadavg": _loadavg()},
        }
    finally:
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
    print(json.dumps(result))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
