"""One incarnation of a simulated container: what runs in it, on which host ports, and its log.

vastai-api.md "runtype": ``args`` keeps the image's entrypoint (its service starts, no SSH); the ssh and
jupyter runtypes replace the entrypoint, so the image's service starts only if ``onstart`` runs its start
command; jupyter runtypes also put Jupyter on container port 8080. With ``args``, a non-empty ``onstart`` is
the entrypoint override the official CLI sends (``--entrypoint``): the service starts only if it is the
image's own start command.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any, Literal

from hybrid_common import TimeProfile
from sim.workloads.comfyui import portal_names_comfyui, start_comfyui_service, web_password
from sim.workloads.images import (
    COMFY_INTERNAL_PORT,
    COMFY_PROXY_PORT,
    JUPYTER_PORT,
    MLNODE_API_PORT,
    MLNODE_INFERENCE_PORT,
    ImageSpec,
)
from sim.workloads.jupyter import start_jupyter
from sim.workloads.mlnode import start_mlnode_service
from sim.workloads.network import ContainerNetwork
from sim.workloads.service import Service

ServiceState = Literal["not started", "starting", "running", "failed", "absent"]


def runtype_tokens(runtype: str) -> set[str]:
    return set(runtype.split())


def has_ssh(runtype: str) -> bool:
    return any(t.startswith("ssh") for t in runtype_tokens(runtype))


def has_jupyter(runtype: str) -> bool:
    return any(t.startswith("jupyter") for t in runtype_tokens(runtype))


@dataclass(frozen=True)
class ContainerSpec:
    instance_id: int
    image: ImageSpec
    runtype: str
    env: dict[str, str]
    onstart: str | None
    gpu_name: str
    gpu_count: int
    vram_mb: int
    profile: TimeProfile
    service_delay: float  # wall seconds from container start to the image's service listening
    seed: int
    model_download_delay: float = 0.0  # wall seconds the MLNode takes to fetch its model weights

    def image_service_runs(self) -> bool:
        if self.image.start_command is None:
            return False
        if self.runtype == "args":
            return not (self.onstart or "").strip() or self.image.starts_from(self.onstart)
        return self.image.starts_from(self.onstart)


async def _owned(starting: Coroutine[Any, Any, tuple[Service, str]]) -> tuple[Service, str]:
    """Start a service; if we are cancelled meanwhile (the instance was destroyed), let the start
    finish and close what it opened, so no listener outlives its container."""
    task = asyncio.ensure_future(starting)
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        with contextlib.suppress(Exception):
            service, _ = await task
            await service.close()
        raise


class RunningContainer:
    """The processes of a running container; ``close()`` is ``docker stop``."""

    def __init__(self, spec: ContainerSpec, network: ContainerNetwork, log: Callable[[str], None]) -> None:
        self.spec = spec
        self.network = network
        self._log = log
        self._services: list[Service] = []
        self._task: asyncio.Task[None] | None = None
        self.service_state: ServiceState = "absent"
        self.implementation: str | None = None

    async def start(self) -> None:
        spec = self.spec
        if has_jupyter(spec.runtype):
            self._services.append(await start_jupyter(self.network.host_port(JUPYTER_PORT)))
            self._log("jupyter: Jupyter Server is running at http://localhost:8080/")
        if has_ssh(spec.runtype) or has_jupyter(spec.runtype):
            self._log(f"onstart: {'running /root/onstart.sh' if spec.onstart else 'no onstart script'}")
        if spec.image_service_runs():
            if spec.image.kind == "mlnode":
                # Reserve the ports now: `ports` shows them from `running` on, before anything listens.
                self.network.host_port(MLNODE_API_PORT)
                self.network.host_port(MLNODE_INFERENCE_PORT)
            elif spec.image.kind == "comfyui":
                self.network.host_port(COMFY_PROXY_PORT)
                self.network.host_port(COMFY_INTERNAL_PORT)
            self.service_state = "not started"
            self._task = asyncio.create_task(self._run_service(), name=f"container-{spec.instance_id}")
        elif spec.image.start_command is not None:
            self._log(f"{spec.image.reference}: entrypoint replaced by runtype {spec.runtype!r}; service not started")

    async def _run_service(self) -> None:
        spec = self.spec
        self.service_state = "starting"
        try:
            if spec.image.kind == "mlnode":
                await self._run_mlnode()
            elif spec.image.kind == "comfyui":
                await self._run_comfyui()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self.service_state = "failed"
            self._log(f"ERROR: {type(exc).__name__}: {exc}")

    async def _run_mlnode(self) -> None:
        spec = self.spec
        await asyncio.sleep(spec.service_delay)
        if has_jupyter(spec.runtype):
            # Jupyter holds 8080 (vastai-api.md): uvicorn cannot bind the MLNode API.
            self.service_state = "failed"
            self._log(
                "ERROR:    [Errno 98] error while attempting to bind on address "
                "('0.0.0.0', 8080): address already in use"
            )
            return
        service, impl = await _owned(
            start_mlnode_service(
                api_port=self.network.host_port(MLNODE_API_PORT),
                inference_port=self.network.host_port(MLNODE_INFERENCE_PORT),
                generation=spec.image.generation,
                profile=spec.profile,
                gpu_name=spec.gpu_name,
                gpu_count=spec.gpu_count,
                vram_mb=spec.vram_mb,
                seed=spec.seed,
                model_download_seconds=spec.model_download_delay,
            )
        )
        self._services.append(service)
        self.implementation = impl
        self.service_state = "running"
        self._log("INFO:     Started server process [1]")
        self._log("INFO:     Uvicorn running on http://0.0.0.0:8080 (Press CTRL+C to quit)")
        self._log(f"Downloading model weights to {spec.env.get('HF_HOME', '/root/.cache/huggingface')} ...")

    async def _run_comfyui(self) -> None:
        spec = self.spec
        if not portal_names_comfyui(spec.env):
            self.service_state = "absent"
            self._log("Instance Portal: PORTAL_CONFIG does not name ComfyUI; not starting it")
            return
        self._log("Provisioning: /.provisioning")
        await asyncio.sleep(spec.service_delay)
        service, impl = await _owned(
            start_comfyui_service(
                port=self.network.host_port(COMFY_PROXY_PORT),
                internal_port=self.network.host_port(COMFY_INTERNAL_PORT),
                password=web_password(spec.env),
                profile=spec.profile,
                seed=spec.seed,
            )
        )
        self._services.append(service)
        self.implementation = impl
        self.service_state = "running"
        self._log("Provisioning complete: /.provisioning_complete")
        self._log(f"ComfyUI: To see the GUI go to: http://127.0.0.1:{COMFY_INTERNAL_PORT}")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        services, self._services = self._services, []
        for service in reversed(services):
            with contextlib.suppress(Exception):
                await service.close()
        if self.service_state in {"starting", "running", "not started"}:
            self.service_state = "absent"
