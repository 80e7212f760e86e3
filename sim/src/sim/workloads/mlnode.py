"""The MLNode image's service inside a simulated instance.

When the MLNode simulator (``sim.mlnode.start_mlnode``) is importable it runs on the container's mapped
ports; until then a stand-in answers readiness only: ``GET /api/v1/state`` → ``{"state":"STOPPED"}``
(gonka-protocol.md §1), with or without the dapi's version prefix.
"""

from __future__ import annotations

import importlib
from typing import Any

from aiohttp import web

from hybrid_common import TimeProfile
from sim.workloads.http_service import HttpService, json_body
from sim.workloads.service import Service


async def start_mlnode_service(
    *,
    api_port: int,
    inference_port: int,
    generation: str,
    profile: TimeProfile,
    gpu_name: str,
    gpu_count: int,
    vram_mb: int,
    seed: int,
    model_download_seconds: float,
) -> tuple[Service, str]:
    """Start the MLNode on the given host ports; returns the service and which implementation runs.

    ``model_download_seconds`` (wall) is how long the node's model cache takes to fill; the simulator
    models it (its ``/api/v1/state`` answers at once, ``inference/up`` waits for the weights)."""
    start = _simulator()
    if start is not None:
        node = await start(
            generation=generation,
            api_port=api_port,
            inference_port=inference_port,
            host="127.0.0.1",
            profile=profile,
            gpu_name=gpu_name,
            gpu_count=gpu_count,
            vram_mb=vram_mb,
            seed=seed,
            model_download_seconds=model_download_seconds,
        )
        return node, "sim.mlnode"
    standin = await HttpService.serve(_standin_app(gpu_name, gpu_count, vram_mb), api_port)
    return standin, "stand-in"


def _simulator() -> Any:
    """``sim.mlnode.start_mlnode`` if that module exists yet (imported at call time, not at import)."""
    try:
        module = importlib.import_module("sim.mlnode")
    except ImportError:
        return None
    return getattr(module, "start_mlnode", None)


def _standin_app(gpu_name: str, gpu_count: int, vram_mb: int) -> web.Application:
    devices = [
        {"index": i, "name": f"NVIDIA {gpu_name}", "total_memory_mb": vram_mb, "free_memory_mb": vram_mb}
        for i in range(gpu_count)
    ]

    async def state(_: web.Request) -> web.Response:
        return json_body({"state": "STOPPED"})

    async def health(_: web.Request) -> web.Response:
        return json_body(
            {
                "status": "healthy",
                "service_state": "STOPPED",
                "gpu": {"available": True, "count": gpu_count, "devices": devices},
                "managers": {},
            }
        )

    async def gpu_devices(_: web.Request) -> web.Response:
        return json_body({"devices": devices, "count": gpu_count})

    app = web.Application()
    # The dapi prefixes every path with its mlnode version (gonka-protocol.md §1); accept both forms.
    for prefix in ("", "/{version}"):
        app.router.add_get(f"{prefix}/api/v1/state", state)
        app.router.add_get(f"{prefix}/health", health)
        app.router.add_get(f"{prefix}/api/v1/gpu/devices", gpu_devices)
    return app
