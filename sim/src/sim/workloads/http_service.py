"""Serving a small aiohttp app on one loopback port: the stand-ins' common plumbing."""

from __future__ import annotations

from typing import Any

import orjson
from aiohttp import web

from sim.workloads.network import LOOPBACK


def json_body(data: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(data), status=status, content_type="application/json")


class HttpService:
    """An aiohttp application listening on ``127.0.0.1:port``."""

    def __init__(self, runner: web.AppRunner, port: int) -> None:
        self._runner = runner
        self.port = port

    @classmethod
    async def serve(cls, app: web.Application, port: int) -> HttpService:
        runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await runner.setup()
        site = web.TCPSite(runner, LOOPBACK, port, reuse_address=True)
        try:
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        return cls(runner, port)

    async def close(self) -> None:
        await self._runner.cleanup()
