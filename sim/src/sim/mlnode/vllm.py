"""The vLLM process an MLNode starts with ``inference/up``: down, loading, or up with one model.

``inference/up`` blocks until vLLM answers (gonka-protocol.md §1); while it loads, the MLNode already
reports INFERENCE but the inference port does not answer yet (§10) — a status poll then sees the node
as failed. The port itself belongs to :mod:`sim.mlnode.openai_api`; this module only says whether it
should answer.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Any

from sim.mlnode.models import ModelCache


class VllmStartInterrupted(Exception):
    pass


class VllmRunner:
    def __init__(
        self,
        cache: ModelCache,
        *,
        load_seconds: float,
        on_change: Callable[[], None] = lambda: None,
    ) -> None:
        self._cache = cache
        self._load_seconds = load_seconds
        self._on_change = on_change
        self.state = "down"  # down | loading | up
        self.model: str | None = None
        self.dtype: str | None = None
        self.args: list[str] = []
        self._starting: asyncio.Task[None] | None = None

    @property
    def is_running(self) -> bool:
        return self.state in ("loading", "up")

    @property
    def is_up(self) -> bool:
        return self.state == "up"

    async def up(self, model: str, dtype: str, args: list[str]) -> None:
        """Start vLLM with ``model`` and return once it serves; raise if stopped meanwhile."""
        self.down()
        self.model, self.dtype, self.args = model, dtype, list(args)
        self.state = "loading"
        self._on_change()
        task = asyncio.create_task(self._start(), name=f"vllm-up:{model}")
        self._starting = task
        try:
            await asyncio.shield(task)
        except asyncio.CancelledError:
            if task.cancelled():
                raise VllmStartInterrupted("vLLM start was interrupted by a stop") from None
            raise

    async def _start(self) -> None:
        assert self.model is not None
        await self._cache.ensure(self.model)
        await asyncio.sleep(self._load_seconds)
        self.state = "up"
        self._starting = None
        self._on_change()

    def down(self) -> None:
        if self._starting is not None and not self._starting.done():
            self._starting.cancel()
        self._starting = None
        if self.state != "down":
            self.state = "down"
            self._on_change()

    def describe(self) -> dict[str, Any]:
        return {"state": self.state, "model": self.model, "dtype": self.dtype, "args": self.args}

    async def close(self) -> None:
        task = self._starting
        self.down()
        if task is not None:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
