"""A local stand-in for the operator's Slack/Discord alert webhook: keeps every alert body it is posted."""

from __future__ import annotations

from typing import Any

from aiohttp import web


class Webhook:
    """Listens on a free port at ``path``; answers 500 to the first ``fail_first`` posts (a notifier must retry them),
    200 after. ``async with Webhook() as hook:`` starts and stops it."""

    def __init__(self, path: str = "/hook", fail_first: int = 0) -> None:
        self.path = path
        self.fail_first = fail_first
        self.bodies: list[dict[str, Any]] = []
        self.posts = 0
        self.url = ""
        self._runner: web.AppRunner | None = None

    async def __aenter__(self) -> Webhook:
        app = web.Application()
        app.router.add_post(self.path, self._hook)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", 0).start()
        self.url = f"http://127.0.0.1:{self._runner.addresses[0][1]}{self.path}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _hook(self, request: web.Request) -> web.Response:
        self.posts += 1
        if self.posts <= self.fail_first:
            return web.Response(status=500)
        self.bodies.append(await request.json())
        return web.Response(text="ok")

    def of(self, event_type: str) -> list[dict[str, Any]]:
        return [b for b in self.bodies if b["event_type"] == event_type]
