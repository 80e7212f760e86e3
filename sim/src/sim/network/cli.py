"""``python -m sim dapi [--public-port P] [--admin-port A] [--callback-port C] [--callback-base URL] [--poc-v2]``."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal

from hybrid_common import current_profile, port
from sim.network.dapi import start_dapi


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m sim dapi", description="Simulated Gonka network node and chain")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--public-port", type=int, default=port("sim.dapi.public"))
    p.add_argument("--admin-port", type=int, default=port("sim.dapi.admin"))
    p.add_argument("--callback-port", type=int, default=port("sim.dapi.callback"))
    p.add_argument("--callback-base", default=None, help="DAPI_API__POC_CALLBACK_URL handed to MLNodes")
    p.add_argument("--poc-v2", action="store_true", help="chain flag poc_v2_enabled")
    p.add_argument("--mlnode-version", default="v3.0.8", help="chain mlnode_version (URL prefix for node calls)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--start-height", type=int, default=1)
    p.add_argument("--first-poc-start", type=int, default=None)
    p.add_argument("--confirmation-poc", action="store_true", help="random confirmation PoC events (seeded)")
    p.add_argument("--inference-interval", type=float, default=None, help="real seconds between inferences; 0 = off")
    return p


async def _serve(args: argparse.Namespace) -> None:
    running = await start_dapi(
        public_port=args.public_port,
        admin_port=args.admin_port,
        callback_port=args.callback_port,
        host=args.host,
        profile=current_profile(),
        callback_base=args.callback_base,
        poc_v2_enabled=args.poc_v2,
        mlnode_version=args.mlnode_version,
        seed=args.seed,
        start_height=args.start_height,
        first_poc_start=args.first_poc_start,
        confirmation_poc_enabled=args.confirmation_poc,
        inference_interval_seconds=args.inference_interval,
    )
    print(
        f"dapi public={running.public_url} admin={running.admin_url} callback={running.callback_url} "
        f"callback_base={running.callback_base}",
        flush=True,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await running.close()


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    asyncio.run(_serve(args))
    return 0
