"""``python -m sim mlnode --port P [--inference-port Q] --generation v1|v2`` — one MLNode as a process."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal

from hybrid_common import current_profile, port
from sim.mlnode.node import start_mlnode


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m sim mlnode", description="Simulated Gonka MLNode (API + inference)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=port("sim.mlnode"), help="control API port (the image's 8080)")
    p.add_argument("--inference-port", type=int, default=None, help="inference port (the image's 5000); default port+1")
    p.add_argument("--generation", choices=("v1", "v2"), default="v1", help="v1 = image 3.0.11, v2 = 3.0.12+")
    p.add_argument("--gpu-name", default="H100 SXM")
    p.add_argument("--gpu-count", type=int, default=1)
    p.add_argument("--vram-mb", type=int, default=81920)
    p.add_argument("--model-download-seconds", type=float, default=None, help="wall seconds (default: profile-scaled)")
    p.add_argument("--preload", action="append", default=None, help="model to download at boot (repeatable)")
    p.add_argument("--seed", type=int, default=0)
    return p


async def _serve(args: argparse.Namespace) -> None:
    node = await start_mlnode(
        generation=args.generation,
        api_port=args.port,
        inference_port=args.inference_port if args.inference_port is not None else (args.port + 1 if args.port else 0),
        host=args.host,
        profile=current_profile(),
        gpu_name=args.gpu_name,
        gpu_count=args.gpu_count,
        vram_mb=args.vram_mb,
        model_download_seconds=args.model_download_seconds,
        preload_models=args.preload,
        seed=args.seed,
    )
    print(
        f"mlnode {args.generation} api=http://{args.host}:{node.api_port} inference=http://{args.host}:{node.inference_port}",
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
        await node.close()


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    asyncio.run(_serve(args))
    return 0
