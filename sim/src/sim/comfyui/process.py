"""One boot of ComfyUI on the simulated machine: its API server, prompt queue, executor and sockets.

A restart replaces the process: the queue, the history, the node cache and every WebSocket are gone
(comfyui.md: "a restarted server losing queue and history"); the machine's files and models stay.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from aiohttp import web

from sim.comfyui.app import ComfyApi
from sim.comfyui.execution import ExecutionResult, PromptExecutor
from sim.comfyui.machine import ComfyMachine
from sim.comfyui.prompt_queue import PromptQueue
from sim.comfyui.sockets import SocketHub

log = logging.getLogger(__name__)


class ComfyProcess:
    def __init__(self, machine: ComfyMachine, boot: int) -> None:
        self.machine = machine
        self.boot = boot
        self.number = 0
        self.hub = SocketHub()
        self.queue = PromptQueue(on_change=self._queue_updated)
        self.executor = PromptExecutor(machine, self.hub)
        self._runner: web.AppRunner | None = None
        self._tasks: list[asyncio.Task[None]] = []

    def queue_info(self) -> dict[str, Any]:
        return {"exec_info": {"queue_remaining": self.queue.remaining()}}

    def _queue_updated(self) -> None:
        self.hub.send_sync("status", {"status": self.queue_info()})

    async def start(self, host: str, port: int, extra_routes: list[web.RouteDef]) -> int:
        # ComfyUI empties its temp folder at start-up.
        self.machine.files.clear_temp()
        app = ComfyApi(self).build(extra_routes)
        self._runner = web.AppRunner(app, access_log=None, handler_cancellation=True, shutdown_timeout=0.5)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port)
        try:
            await site.start()
        except BaseException:
            await self._runner.cleanup()
            raise
        self._tasks = [
            asyncio.create_task(self.hub.publish_loop(), name=f"comfy-publish-{self.boot}"),
            asyncio.create_task(self._prompt_worker(), name=f"comfy-worker-{self.boot}"),
        ]
        return int(self._runner.addresses[0][1])

    async def stop(self) -> None:
        """The process dies: the running job stops mid-step, nothing more is sent."""
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []
        await self.hub.close_all()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _prompt_worker(self) -> None:
        while True:
            item, item_id = await self.queue.get()
            _, prompt_id, prompt, extra_data, outputs = item
            try:
                result = await self.executor.execute(prompt, prompt_id, extra_data, outputs)
            except Exception as e:  # a simulator bug must not kill the queue: record it as a failed prompt
                log.exception("prompt %s crashed the simulated executor", prompt_id)
                message = ["execution_error", {"prompt_id": prompt_id, "exception_message": str(e)}]
                result = ExecutionResult(False, [message])
            status = {
                "status_str": "success" if result.success else "error",
                "completed": result.success,
                "messages": result.status_messages,
            }
            self.queue.task_done(item_id, result.outputs, result.meta, status)
            # comfyui.md: "done" is this message, sent only once the history is stored.
            if self.executor.client_id is not None:
                self.hub.send_sync("executing", {"node": None, "prompt_id": prompt_id}, self.executor.client_id)
            self.executor.last_node_id = None
