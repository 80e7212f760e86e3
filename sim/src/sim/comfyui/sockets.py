"""ComfyUI's WebSocket side: one socket per ``clientId`` and an ordered outbox.

ComfyUI's ``send_sync`` puts messages on a queue that one loop sends in order; ``sid=None`` means every
socket. Per-prompt messages go to the prompt's ``client_id`` only (comfyui.md) — but a prompt queued
without ``client_id`` has its ``executing``/``progress`` messages broadcast to everyone, as in ComfyUI.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from typing import Any

from aiohttp import web


class SocketHub:
    def __init__(self) -> None:
        self.sockets: dict[str, web.WebSocketResponse] = {}
        self._outbox: asyncio.Queue[tuple[str, Any, str | None]] = asyncio.Queue()

    def send_sync(self, event: str, data: Any, sid: str | None = None) -> None:
        self._outbox.put_nowait((event, data, sid))

    async def publish_loop(self) -> None:
        while True:
            event, data, sid = await self._outbox.get()
            message = json.dumps({"type": event, "data": data})
            targets = list(self.sockets.values()) if sid is None else [self.sockets[sid]] if sid in self.sockets else []
            for ws in targets:
                # A socket closing under us only loses its own messages (ComfyUI logs and carries on).
                with contextlib.suppress(ConnectionError, RuntimeError):
                    await ws.send_str(message)

    async def close_all(self) -> None:
        for ws in list(self.sockets.values()):
            with contextlib.suppress(Exception):
                await ws.close()
        self.sockets.clear()
