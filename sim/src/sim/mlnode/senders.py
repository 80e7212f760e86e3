"""How MLNodes deliver PoC callbacks — the habits a relay in front of the dapi has to survive.

v1 (MLNode 3.0.11, gonka-protocol.md §2): every 5 s the sender walks all unsent batches in order and
posts each one, with no limit, no backoff and **no timeout** — a slow or dead URL stalls it. Generated
batches still unsent when the phase turns to validate are dropped.

v2 (vLLM inside MLNode 3.0.12+, §7): one pending payload at a time, a 10 s timeout, anything below 400
counts as delivered, exponential backoff 1 s → 30 s, and after 10 retries the payload is dropped
(400s are retried too).

Every real-world delay is scaled by the time profile; the v2 timeout keeps a 1 s floor so a loaded
test machine does not turn a healthy callback server into timeouts.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from yarl import URL

from hybrid_common import TimeProfile

log = logging.getLogger(__name__)

V1_RETRY_SECONDS = 5.0
V2_TIMEOUT_SECONDS = 10.0
V2_BACKOFF_FIRST_SECONDS = 1.0
V2_BACKOFF_CAP_SECONDS = 30.0
V2_MAX_RETRIES = 10


@dataclass
class PendingCallback:
    url: str
    payload: dict[str, Any]
    kind: str  # "generated" | "validated"
    attempts: int = 0


@dataclass
class SenderStats:
    delivered: int = 0
    failed_attempts: int = 0
    dropped: int = 0
    dropped_at_phase_switch: int = 0
    last_error: str = ""
    delivered_by_kind: dict[str, int] = field(default_factory=lambda: {"generated": 0, "validated": 0})

    def as_dict(self) -> dict[str, Any]:
        return {
            "delivered": self.delivered,
            "delivered_by_kind": dict(self.delivered_by_kind),
            "failed_attempts": self.failed_attempts,
            "dropped": self.dropped,
            "dropped_at_phase_switch": self.dropped_at_phase_switch,
            "last_error": self.last_error,
        }


def _url(raw: str) -> URL:
    # The dapi escapes the v2 model id twice (gonka-protocol.md §7); post the path exactly as given.
    return URL(raw, encoded=True)


class V1CallbackSender:
    """MLNode 3.0.11's sender loop."""

    def __init__(self, session: aiohttp.ClientSession, profile: TimeProfile) -> None:
        self._session = session
        self._interval = profile.scale(V1_RETRY_SECONDS)
        self._pending: list[PendingCallback] = []
        self._task: asyncio.Task[None] | None = None
        self.stats = SenderStats()

    @property
    def pending(self) -> int:
        return len(self._pending)

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="mlnode-v1-sender")

    def enqueue(self, url: str, payload: dict[str, Any], kind: str) -> None:
        self._pending.append(PendingCallback(url=url, payload=payload, kind=kind))

    def drop_generated(self) -> None:
        """Phase switch to validate: unsent generated batches are lost (gonka-protocol.md §2)."""
        kept = [p for p in self._pending if p.kind != "generated"]
        self.stats.dropped_at_phase_switch += len(self._pending) - len(kept)
        self._pending = kept

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            for item in list(self._pending):
                if item not in self._pending:
                    continue  # dropped by a phase switch while we were posting
                item.attempts += 1
                try:
                    # No timeout at all, as the real sender: a hanging callback URL stalls this loop.
                    async with self._session.post(
                        _url(item.url), json=item.payload, timeout=aiohttp.ClientTimeout(total=None)
                    ) as resp:
                        await resp.read()
                        ok = resp.status == 200
                        err = f"HTTP {resp.status}"
                except (TimeoutError, aiohttp.ClientError, OSError) as exc:
                    ok, err = False, f"{type(exc).__name__}: {exc}"
                if ok:
                    with contextlib.suppress(ValueError):
                        self._pending.remove(item)
                    self.stats.delivered += 1
                    self.stats.delivered_by_kind[item.kind] = self.stats.delivered_by_kind.get(item.kind, 0) + 1
                else:
                    self.stats.failed_attempts += 1
                    self.stats.last_error = err

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None


class V2CallbackSender:
    """vLLM's PoC v2 sender: one payload in flight, bounded retries."""

    def __init__(self, session: aiohttp.ClientSession, profile: TimeProfile) -> None:
        self._session = session
        self._profile = profile
        self._timeout = max(1.0, profile.scale(V2_TIMEOUT_SECONDS))
        self._queue: asyncio.Queue[PendingCallback] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None
        self.stats = SenderStats()

    @property
    def pending(self) -> int:
        return self._queue.qsize()

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="mlnode-v2-sender")

    def enqueue(self, url: str, payload: dict[str, Any], kind: str) -> None:
        self._queue.put_nowait(PendingCallback(url=url, payload=payload, kind=kind))

    async def _attempt(self, item: PendingCallback) -> tuple[bool, str]:
        try:
            async with self._session.post(
                _url(item.url), json=item.payload, timeout=aiohttp.ClientTimeout(total=self._timeout)
            ) as resp:
                await resp.read()
                # Anything below 400 is success; a 400 is retried like any other failure (§7).
                return resp.status < 400, f"HTTP {resp.status}"
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            return False, f"{type(exc).__name__}: {exc}"

    async def _run(self) -> None:
        while True:
            item = await self._queue.get()
            backoff = V2_BACKOFF_FIRST_SECONDS
            while True:
                item.attempts += 1
                ok, err = await self._attempt(item)
                if ok:
                    self.stats.delivered += 1
                    self.stats.delivered_by_kind[item.kind] = self.stats.delivered_by_kind.get(item.kind, 0) + 1
                    break
                self.stats.failed_attempts += 1
                self.stats.last_error = err
                if item.attempts > V2_MAX_RETRIES:
                    self.stats.dropped += 1
                    log.info("v2 sender dropped a %s payload after %d attempts: %s", item.kind, item.attempts, err)
                    break
                await asyncio.sleep(self._profile.scale(backoff))
                backoff = min(backoff * 2, V2_BACKOFF_CAP_SECONDS)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
