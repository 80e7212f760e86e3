"""ComfyUI's PromptQueue: a heap of pending prompts, the running ones, and the history of finished ones.

Items are ``[number, prompt_id, prompt, extra_data, outputs_to_execute]`` — the shape ``/queue`` and
``/history`` show (comfyui.md). History holds at most 10,000 prompts and lives in memory only: a restart
loses it, and ``/history/{id}`` then answers ``{}`` forever.
"""

from __future__ import annotations

import asyncio
import copy
import heapq
from collections.abc import Callable
from typing import Any

QueueItem = tuple[float, str, dict[str, Any], dict[str, Any], list[str]]
MAXIMUM_HISTORY_SIZE = 10000


class PromptQueue:
    def __init__(self, on_change: Callable[[], None]) -> None:
        self._heap: list[QueueItem] = []
        self.running: dict[int, QueueItem] = {}
        self.history: dict[str, dict[str, Any]] = {}
        self._task_counter = 0
        self._wakeup = asyncio.Event()
        self._on_change = on_change

    def put(self, item: QueueItem) -> None:
        heapq.heappush(self._heap, item)
        self._wakeup.set()
        self._on_change()

    async def get(self) -> tuple[QueueItem, int]:
        while not self._heap:
            self._wakeup.clear()
            await self._wakeup.wait()
        item = heapq.heappop(self._heap)
        item_id = self._task_counter
        self.running[item_id] = item
        self._task_counter += 1
        self._on_change()
        return item, item_id

    def task_done(self, item_id: int, outputs: dict[str, Any], meta: dict[str, Any], status: dict[str, Any]) -> None:
        item = self.running.pop(item_id)
        if len(self.history) > MAXIMUM_HISTORY_SIZE:
            self.history.pop(next(iter(self.history)))
        self.history[item[1]] = {"prompt": list(item), "outputs": outputs, "status": status, "meta": meta}
        self._on_change()

    def remaining(self) -> int:
        return len(self._heap) + len(self.running)

    def current(self) -> tuple[list[list[Any]], list[list[Any]]]:
        running = [list(x) for x in self.running.values()]
        pending = [list(x) for x in copy.deepcopy(self._heap)]
        return running, pending

    def running_ids(self) -> list[str]:
        return [x[1] for x in self.running.values()]

    def wipe(self) -> None:
        self._heap.clear()
        self._on_change()

    def delete(self, prompt_id: str) -> bool:
        for i, item in enumerate(self._heap):
            if item[1] == prompt_id:
                self._heap.pop(i)
                heapq.heapify(self._heap)
                self._on_change()
                return True
        return False

    def get_history(
        self, prompt_id: str | None = None, max_items: int | None = None, offset: int = -1
    ) -> dict[str, Any]:
        if prompt_id is not None:
            return {prompt_id: copy.deepcopy(self.history[prompt_id])} if prompt_id in self.history else {}
        out: dict[str, Any] = {}
        if offset < 0 and max_items is not None:
            offset = len(self.history) - max_items
        for i, key in enumerate(self.history):
            if i >= offset:
                out[key] = self.history[key]
                if max_items is not None and len(out) >= max_items:
                    break
        return copy.deepcopy(out)

    def wipe_history(self) -> None:
        self.history.clear()

    def delete_history(self, prompt_id: str) -> None:
        self.history.pop(prompt_id, None)
