"""``python -m sim comfyui --port P [--internal-port Q] [--web-password W]`` — the ComfyUI simulator as a process."""

from __future__ import annotations

import argparse
import asyncio
import signal
from pathlib import Path

from hybrid_common import port as default_port
from sim.comfyui.server import start_comfyui


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m sim comfyui", description="ComfyUI (vastai/comfy image) simulator")
    p.add_argument("--port", type=int, default=default_port("sim.comfyui"), help="auth proxy (the image's 8188)")
    p.add_argument("--internal-port", type=int, default=0, help="ComfyUI itself (the image's 18188); 0 = any")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--web-password", default=None, help="WEB_PASSWORD (the proxy's bearer token); none = no auth")
    p.add_argument("--open-button-token", default=None)
    p.add_argument("--auth", action="store_true", help="auth even without --web-password (a token is generated)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--gpu-name", default="NVIDIA GeForce RTX 4090")
    p.add_argument("--startup-s", type=float, default=0.0, help="real seconds before ComfyUI listens")
    p.add_argument("--workspace", type=Path, default=None)
    p.add_argument(
        "--model",
        action="append",
        default=[],
        metavar="FOLDER/NAME",
        help="extra model, e.g. checkpoints/x.safetensors",
    )
    return p


async def _serve(args: argparse.Namespace) -> None:
    comfy = await start_comfyui(
        port=args.port,
        internal_port=args.internal_port,
        host=args.host,
        web_password=args.web_password,
        open_button_token=args.open_button_token,
        enable_auth=True if args.auth else None,
        seed=args.seed,
        gpu_name=args.gpu_name,
        startup_s=args.startup_s,
        workspace=args.workspace,
    )
    for spec in args.model:
        folder, _, name = spec.partition("/")
        comfy.add_model(folder, name)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    auth = comfy.auth_headers.get("Authorization", "none")
    print(f"sim comfyui: proxy {comfy.url} (auth: {auth}), comfyui {comfy.internal_url}", flush=True)
    try:
        await stop.wait()
    finally:
        await comfy.close()


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a declared dependency
        asyncio.run(_serve(args))
    else:
        uvloop.run(_serve(args))
    return 0
