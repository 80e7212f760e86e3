"""``python -m sim vast --port P [--seed N] [--api-key K] [--boot-scale X] ...``"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal

from hybrid_common import PROFILES, current_profile, port
from sim.vast.server import start_vast


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m sim vast", description="Simulated Vast.ai REST API")
    p.add_argument("--port", type=int, default=port("sim.vast"))
    p.add_argument("--host", default="127.0.0.1", help="bind address (loopback only)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--api-key", default="test")
    p.add_argument("--credit", type=float, default=1000.0, help="account credit in $")
    p.add_argument("--boot-scale", type=float, default=1.0, help="multiplies every boot delay")
    p.add_argument("--profile", choices=sorted(PROFILES), default=None, help="default: $HYBRID_TIME_PROFILE")
    p.add_argument("--no-rate-limits", action="store_true")
    p.add_argument("--gpu-taken-probability", type=float, default=0.0, help="a stopped instance's start fails")
    p.add_argument("--ssh-host", default="localhost")
    return p


async def _serve(args: argparse.Namespace) -> None:
    profile = PROFILES[args.profile] if args.profile else current_profile()
    vast = await start_vast(
        port=args.port,
        host=args.host,
        api_key=args.api_key,
        seed=args.seed,
        profile=profile,
        credit=args.credit,
        boot_scale=args.boot_scale,
        rate_limits=not args.no_rate_limits,
        start_gpu_taken_probability=args.gpu_taken_probability,
        ssh_host=args.ssh_host,
    )
    print(f"vast simulator listening on {vast.url} (profile {profile.name}, seed {args.seed})", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await vast.close()


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.host not in {"127.0.0.1", "localhost"}:
        raise SystemExit("the simulator binds to loopback only")
    asyncio.run(_serve(args))
    return 0
