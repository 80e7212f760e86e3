"""Starting the simulated ComfyUI container in-process: the auth proxy (container port 8188) and ComfyUI
itself (container port 18188, no auth), with restart and fault controls.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import shutil
import socket
import tempfile
from pathlib import Path
from typing import Any

from aiohttp import web

from hybrid_common import TimeProfile, current_profile
from sim.comfyui.auth_proxy import AuthProxy
from sim.comfyui.controls import control_routes
from sim.comfyui.machine import DEFAULT_MODELS, ComfyMachine, GpuInfo
from sim.comfyui.process import ComfyProcess

# Real seconds ComfyUI takes to come back after a crash (imports, custom nodes, model scan).
RESTART_DOWNTIME_S = 20.0


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class RunningComfy:
    """One simulated ComfyUI container. ``port`` is the auth proxy, ``internal_port`` ComfyUI itself."""

    def __init__(
        self,
        *,
        host: str,
        machine: ComfyMachine,
        web_password: str | None,
        open_button_token: str | None,
        enable_auth: bool,
        owned_workspace: Path | None,
    ) -> None:
        self.host = host
        self.machine = machine
        self.web_password = web_password
        self.open_button_token = open_button_token
        self.enable_auth = enable_auth
        self.port = 0
        self.internal_port = 0
        self.process: ComfyProcess | None = None
        self.boots = 0
        self._proxy: AuthProxy | None = None
        self._proxy_runner: web.AppRunner | None = None
        self._owned_workspace = owned_workspace
        self._lifecycle = asyncio.Lock()
        self._background: set[asyncio.Task[None]] = set()
        self._closed = False
        machine.restart_hook = self._restart_from_job

    # -- addresses --------------------------------------------------------------------------------

    @property
    def url(self) -> str:
        """Base URL of the auth proxy (what the Vast instance exposes as 8188)."""
        return f"http://{self.host}:{self.port}"

    @property
    def internal_url(self) -> str:
        """Base URL of ComfyUI itself (what an SSH tunnel to 18188 reaches; no auth)."""
        return f"http://{self.host}:{self.internal_port}"

    @property
    def auth_headers(self) -> dict[str, str]:
        """What a client sends through the proxy ({} when auth is off)."""
        token = self.web_password or self.open_button_token
        return {"Authorization": f"Bearer {token}"} if self.enable_auth and token else {}

    @property
    def ready(self) -> bool:
        return self.process is not None

    # -- lifecycle --------------------------------------------------------------------------------

    async def _boot(self) -> None:
        self.boots += 1
        process = ComfyProcess(self.machine, self.boots)
        await process.start(self.host, self.internal_port, control_routes(self))
        self.process = process

    async def _kill(self) -> None:
        process, self.process = self.process, None
        if process is not None:
            await process.stop()

    async def start(self, port: int, internal_port: int, startup_s: float) -> None:
        self.internal_port = internal_port or _free_port(self.host)
        self._proxy = AuthProxy(
            target_port=lambda: self.internal_port,
            web_password=self.web_password,
            open_button_token=self.open_button_token,
            enable_auth=self.enable_auth,
            control_routes=control_routes(self),
        )
        self._proxy_runner = web.AppRunner(
            self._proxy.build(), access_log=None, handler_cancellation=True, shutdown_timeout=0.5
        )
        await self._proxy_runner.setup()
        site = web.TCPSite(self._proxy_runner, self.host, port)
        try:
            await site.start()
        except BaseException:
            await self._proxy_runner.cleanup()
            raise
        self.port = int(self._proxy_runner.addresses[0][1])
        if startup_s > 0:
            self._spawn(self._delayed_boot(self.machine.profile.scale(startup_s)))
        else:
            await self._boot()

    async def _delayed_boot(self, delay: float) -> None:
        await asyncio.sleep(delay)
        async with self._lifecycle:
            if not self._closed and self.process is None:
                await self._boot()

    def _spawn(self, coro: Any) -> None:
        task: asyncio.Task[None] = asyncio.create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def restart(self, downtime_s: float | None = None) -> None:
        """ComfyUI dies and comes back after ``downtime_s`` real seconds (profile-scaled)."""
        async with self._lifecycle:
            if self._closed:
                return
            await self._kill()
            await asyncio.sleep(self.machine.profile.scale(RESTART_DOWNTIME_S if downtime_s is None else downtime_s))
            if not self._closed:
                await self._boot()

    def restart_soon(self, downtime_s: float | None = None) -> None:
        self._spawn(self.restart(downtime_s))

    def _restart_from_job(self) -> None:
        self.restart_soon(self.machine.faults.restart_downtime_s)

    def restart_mid_job(self, after_progress: int = 1, downtime_s: float | None = None) -> bool:
        """Restart while a job runs: at once if one is running now (True), else armed for the next job."""
        self.machine.faults.restart_downtime_s = downtime_s
        if self.process is not None and self.process.queue.running:
            self.restart_soon(downtime_s)
            return True
        self.machine.faults.restart_after_progress = max(1, after_progress)
        return False

    def inject_oom(self, count: int = 1) -> None:
        self.machine.faults.oom_remaining += count

    def add_model(self, folder: str, name: str) -> None:
        self.machine.add_model(folder, name)

    def remove_model(self, folder: str, name: str) -> None:
        self.machine.remove_model(folder, name)

    async def wait_ready(self, timeout: float = 30.0) -> None:
        deadline = asyncio.get_running_loop().time() + timeout
        while self.process is None:
            if asyncio.get_running_loop().time() > deadline:
                raise TimeoutError("ComfyUI did not come up")
            await asyncio.sleep(0.01)

    def describe(self) -> dict[str, Any]:
        p = self.process
        faults = self.machine.faults
        return {
            "ready": p is not None,
            "boots": self.boots,
            "port": self.port,
            "internal_port": self.internal_port,
            "auth": self.enable_auth,
            "queue_remaining": p.queue.remaining() if p else None,
            "history": len(p.queue.history) if p else None,
            "prompts_executed": self.machine.prompts_executed,
            "unauthorized": self._proxy.unauthorized if self._proxy else 0,
            "faults": {
                "oom_remaining": faults.oom_remaining,
                "restart_after_progress": faults.restart_after_progress,
            },
            "models": self.machine.models,
            "workspace": str(self.machine.root),
        }

    async def close(self) -> None:
        self._closed = True
        for task in list(self._background):
            task.cancel()
        for task in list(self._background):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        await self._kill()
        if self._proxy_runner is not None:
            await self._proxy_runner.cleanup()
        if self._owned_workspace is not None:
            shutil.rmtree(self._owned_workspace, ignore_errors=True)


async def start_comfyui(
    *,
    port: int = 0,
    internal_port: int = 0,
    web_password: str | None = None,
    host: str = "127.0.0.1",
    profile: TimeProfile | None = None,
    seed: int = 0,
    models: dict[str, list[str]] | None = None,
    open_button_token: str | None = None,
    enable_auth: bool | None = None,
    gpu_name: str = GpuInfo.name,
    vram_total: int = GpuInfo.vram_total,
    startup_s: float = 0.0,
    workspace: Path | None = None,
) -> RunningComfy:
    """Start a simulated vastai/comfy container: auth proxy on ``port``, ComfyUI on ``internal_port``.

    Auth on the proxy: on when a ``web_password`` or ``open_button_token`` is given (a client needs one of them
    as a bearer token), off when neither is (like ``ENABLE_AUTH=false``) — unless ``enable_auth`` says otherwise;
    ``enable_auth=True`` without a password generates one, as the image does (read it from ``.web_password``).
    ``models`` maps ComfyUI model folders to file names and replaces the
    default folders it names. ``startup_s`` (real seconds, profile-scaled) keeps ComfyUI down after start
    while the proxy already answers (502). ``workspace`` holds ComfyUI/{input,output,temp}; default: a
    temporary directory removed on close.
    """
    owned = None
    if workspace is None:
        owned = workspace = Path(tempfile.mkdtemp(prefix="sim-comfyui-"))
    machine = ComfyMachine(
        workspace,
        models={**DEFAULT_MODELS, **(models or {})},
        gpu=GpuInfo(name=gpu_name, vram_total=vram_total),
        profile=profile or current_profile(),
        seed=seed,
    )
    auth = enable_auth if enable_auth is not None else bool(web_password or open_button_token)
    password = web_password
    if auth and not (web_password or open_button_token):
        password = secrets.token_urlsafe(18)
    comfy = RunningComfy(
        host=host,
        machine=machine,
        web_password=password,
        open_button_token=open_button_token,
        enable_auth=auth,
        owned_workspace=owned,
    )
    try:
        await comfy.start(port, internal_port, startup_s)
    except BaseException:
        await comfy.close()
        raise
    return comfy
