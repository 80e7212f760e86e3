"""Jupyter, which Vast starts on container port 8080 for the jupyter runtypes (vastai-api.md "runtype").

It matters because 8080 is also the MLNode API's port: an MLNode launched on a jupyter runtype cannot bind.
"""

from __future__ import annotations

import secrets

from aiohttp import web

from sim.workloads.http_service import HttpService


async def start_jupyter(port: int) -> HttpService:
    token = secrets.token_hex(24)

    async def root(request: web.Request) -> web.Response:
        if request.query.get("token") == token:
            return web.Response(text="<html><title>Jupyter Server</title></html>", content_type="text/html")
        raise web.HTTPFound("/login?next=%2Ftree%3F")

    async def login(_: web.Request) -> web.Response:
        return web.Response(text="<html><title>Jupyter Server</title>login</html>", content_type="text/html")

    app = web.Application()
    app.router.add_get("/", root)
    app.router.add_get("/tree", root)
    app.router.add_get("/login", login)
    return await HttpService.serve(app, port)
