"""The MLNode's model cache: downloads take time, and their progress can be asked for.

Routes as the MLNode API names them (``/api/v1/models/status|download|list|space``); statuses
``DOWNLOADED | DOWNLOADING | NOT_FOUND | PARTIAL``, progress ``{start_time, elapsed_seconds}``.
``inference/up`` of a model that is not in the cache waits for its download first: that is the delay
before a freshly booted node answers with a serving model.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass
from typing import Any


@dataclass
class _Entry:
    repo: str
    commit: str | None
    started_at: float
    task: asyncio.Task[None] | None
    done: bool = False
    cancelled: bool = False


class ModelCache:
    def __init__(self, download_seconds: float, *, max_concurrent: int = 3) -> None:
        self.download_seconds = download_seconds
        self.max_concurrent = max_concurrent
        self._entries: dict[str, _Entry] = {}

    def _downloading(self) -> int:
        return sum(1 for e in self._entries.values() if not e.done and not e.cancelled)

    def status(self, repo: str, commit: str | None = None) -> dict[str, Any]:
        entry = self._entries.get(repo)
        model = {"hf_repo": repo, "hf_commit": commit}
        if entry is None:
            return {"model": model, "status": "NOT_FOUND", "progress": None, "error_message": None}
        if entry.done:
            return {"model": model, "status": "DOWNLOADED", "progress": None, "error_message": None}
        if entry.cancelled:
            return {"model": model, "status": "PARTIAL", "progress": None, "error_message": "download cancelled"}
        return {
            "model": model,
            "status": "DOWNLOADING",
            "progress": {"start_time": entry.started_at, "elapsed_seconds": round(time.time() - entry.started_at, 3)},
            "error_message": None,
        }

    def start(self, repo: str, commit: str | None = None) -> str:
        """Begin a download; raise ValueError with the real API's wording on conflicts."""
        entry = self._entries.get(repo)
        if entry is not None and entry.done:
            return f"{repo}:{commit or 'latest'}"
        if entry is not None and not entry.cancelled:
            raise ValueError(f"Model {repo} is already downloading")
        if self._downloading() >= self.max_concurrent:
            raise ValueError(f"Maximum concurrent downloads ({self.max_concurrent}) reached")
        new = _Entry(repo=repo, commit=commit, started_at=time.time(), task=None)
        new.task = asyncio.create_task(self._download(new), name=f"download:{repo}")
        self._entries[repo] = new
        return f"{repo}:{commit or 'latest'}"

    async def _download(self, entry: _Entry) -> None:
        await asyncio.sleep(self.download_seconds)
        entry.done = True

    async def ensure(self, repo: str) -> None:
        """Wait until ``repo`` is downloaded, starting the download when needed."""
        entry = self._entries.get(repo)
        if entry is None or entry.cancelled:
            with contextlib.suppress(ValueError):
                self.start(repo)
            entry = self._entries.get(repo)
        if entry is None:  # the concurrency cap refused it: wait for a slot
            while entry is None:
                await asyncio.sleep(0.05)
                with contextlib.suppress(ValueError):
                    self.start(repo)
                entry = self._entries.get(repo)
        if not entry.done and entry.task is not None:
            await asyncio.shield(entry.task)

    def is_downloaded(self, repo: str) -> bool:
        entry = self._entries.get(repo)
        return bool(entry and entry.done)

    def list(self) -> list[dict[str, Any]]:
        out = []
        for entry in self._entries.values():
            if entry.done or entry.cancelled:
                out.append(
                    {
                        "model": {"hf_repo": entry.repo, "hf_commit": entry.commit},
                        "status": "DOWNLOADED" if entry.done else "PARTIAL",
                    }
                )
        return out

    def delete(self, repo: str) -> str:
        entry = self._entries.get(repo)
        if entry is None:
            raise ValueError(f"Model {repo} not found")
        if not entry.done and not entry.cancelled and entry.task is not None:
            entry.task.cancel()
            entry.cancelled = True
            del self._entries[repo]
            return "cancelled"
        del self._entries[repo]
        return "deleted"

    async def close(self) -> None:
        for entry in self._entries.values():
            if entry.task is not None and not entry.task.done():
                entry.task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await entry.task
