"""``python -m sim upstream --port P [...]`` — the upstream simulator as a process.

``--workers N`` starts N processes sharing the port with SO_REUSEPORT (for benchmarks on several cores);
each worker keeps its own counters, faults and rate-limit windows, so tests that use ``/_sim`` controls
should run a single worker.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import subprocess
import sys

from hybrid_common import port as default_port
from sim.upstream.server import DEFAULT_API_KEY, start_upstream


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m sim upstream", description="OpenAI-compatible upstream simulator")
    p.add_argument("--port", type=int, default=default_port("sim.upstream"))
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--api-key", default=DEFAULT_API_KEY)
    p.add_argument("--model", action="append", dest="models", help="served model id (repeatable)")
    p.add_argument("--latency-ms", type=float, default=0.0)
    p.add_argument("--ttft-ms", type=float, default=0.0)
    p.add_argument("--tokens-per-s", type=float, default=0.0, help="0 = as fast as possible")
    p.add_argument("--rate-limit-per-min", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--reuse-port", action="store_true", help=argparse.SUPPRESS)
    return p


def _child_argv(args: argparse.Namespace) -> list[str]:
    argv = [
        "--port", str(args.port), "--host", args.host, "--api-key", args.api_key,
        "--latency-ms", str(args.latency_ms), "--ttft-ms", str(args.ttft_ms),
        "--tokens-per-s", str(args.tokens_per_s), "--seed", str(args.seed), "--reuse-port",
    ]  # fmt: skip
    if args.rate_limit_per_min is not None:
        argv += ["--rate-limit-per-min", str(args.rate_limit_per_min)]
    for m in args.models or []:
        argv += ["--model", m]
    return argv


async def _serve(args: argparse.Namespace, reuse_port: bool) -> None:
    upstream = await start_upstream(
        port=args.port,
        host=args.host,
        api_key=args.api_key,
        models=args.models,
        latency_ms=args.latency_ms,
        ttft_ms=args.ttft_ms,
        tokens_per_s=args.tokens_per_s,
        rate_limit_per_min=args.rate_limit_per_min,
        seed=args.seed,
        reuse_port=reuse_port,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"sim upstream listening on {upstream.url}", flush=True)
    try:
        await stop.wait()
    finally:
        await upstream.close()


def _run(coro_args: argparse.Namespace, reuse_port: bool) -> None:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a declared dependency
        asyncio.run(_serve(coro_args, reuse_port))
    else:
        uvloop.run(_serve(coro_args, reuse_port))


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    if args.workers > 1 and args.port == 0:
        print("--workers needs an explicit --port (the workers share it)", file=sys.stderr)
        return 2
    children: list[subprocess.Popen[bytes]] = []
    try:
        for _ in range(max(args.workers, 1) - 1):
            children.append(subprocess.Popen([sys.executable, "-m", "sim", "upstream", *_child_argv(args)]))
        _run(args, reuse_port=args.reuse_port or args.workers > 1)
    finally:
        for child in children:
            child.terminate()
        for child in children:
            with contextlib.suppress(subprocess.TimeoutExpired):
                child.wait(timeout=10)
            if child.poll() is None:
                child.kill()
    return 0
