"""The vastai/comfy image's front door: a Caddy proxy with auth on 8188 in front of ComfyUI on 18188.

comfyui.md: unauthenticated requests get 401; accepted credentials are ``Authorization: Bearer
<WEB_PASSWORD or OPEN_BUTTON_TOKEN>``, Basic ``vastai:<WEB_PASSWORD>``, or ``?token=``. ``ENABLE_AUTH=false``
(or ``AUTH_EXCLUDE=8188``) turns the check off. When ComfyUI is not listening (still starting, or
restarting) the proxy answers 502 with an empty body, as Caddy does — so readiness must require JSON
from ``/system_stats``. WebSockets are proxied too. ``/_sim/...`` (simulator controls) is answered by the
proxy itself, without auth, and never forwarded.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
from collections.abc import Callable

import aiohttp
from aiohttp import web

# Hop-by-hop headers (RFC 9110 §7.6.1) plus the ones aiohttp recomputes.
_HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "host",
        "content-length",
    }
)

_WebSocket = web.WebSocketResponse | aiohttp.ClientWebSocketResponse


class AuthProxy:
    def __init__(
        self,
        *,
        target_port: Callable[[], int],
        web_password: str | None,
        open_button_token: str | None,
        enable_auth: bool,
        control_routes: list[web.RouteDef],
    ) -> None:
        self._target_port = target_port
        self.web_password = web_password
        self.tokens = {t for t in (web_password, open_button_token) if t}
        self.enable_auth = enable_auth
        self._control_routes = control_routes
        self._session: aiohttp.ClientSession | None = None
        self.unauthorized = 0  # requests refused with 401 (observable in /_sim/state)

    def build(self) -> web.Application:
        app = web.Application(client_max_size=200 * 1024 * 1024)
        app.add_routes(self._control_routes)
        app.router.add_route("*", "/{tail:.*}", self.handle)
        app.on_cleanup.append(self._close_session)
        return app

    def _session_for_upstream(self) -> aiohttp.ClientSession:
        if self._session is None:
            # No keep-alive towards ComfyUI: a restarted backend must not meet stale pooled connections.
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(force_close=True, limit=0),
                auto_decompress=False,
                timeout=aiohttp.ClientTimeout(total=None, connect=5),
            )
        return self._session

    async def _close_session(self, app: web.Application) -> None:
        if self._session is not None:
            await self._session.close()

    def authorized(self, request: web.Request) -> bool:
        if not self.enable_auth:
            return True
        header = request.headers.get("Authorization", "")
        scheme, _, credentials = header.partition(" ")
        if scheme.lower() == "bearer" and credentials.strip() in self.tokens:
            return True
        if scheme.lower() == "basic":
            try:
                user, _, password = base64.b64decode(credentials.strip()).decode().partition(":")
            except (binascii.Error, UnicodeDecodeError):
                return False
            if user == "vastai" and password in self.tokens:
                return True
        token = request.query.get("token")
        return token is not None and token in self.tokens

    async def handle(self, request: web.Request) -> web.StreamResponse:
        if not self.authorized(request):
            self.unauthorized += 1
            return web.Response(status=401, headers={"WWW-Authenticate": 'Basic realm="restricted"'})
        if request.headers.get("Upgrade", "").lower() == "websocket":
            return await self._websocket(request)
        return await self._http(request)

    def _target(self, request: web.Request, scheme: str = "http") -> str:
        return f"{scheme}://127.0.0.1:{self._target_port()}{request.rel_url}"

    async def _http(self, request: web.Request) -> web.StreamResponse:
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _HOP_BY_HOP}
        body = await request.read()
        session = self._session_for_upstream()
        try:
            upstream = await session.request(
                request.method, self._target(request), headers=headers, data=body or None, allow_redirects=False
            )
        except (aiohttp.ClientConnectionError, TimeoutError):
            return web.Response(status=502)
        try:
            response = web.StreamResponse(
                status=upstream.status,
                headers={k: v for k, v in upstream.headers.items() if k.lower() not in _HOP_BY_HOP},
            )
            if upstream.content_length is not None:
                response.content_length = upstream.content_length
            await response.prepare(request)
            try:
                async for chunk in upstream.content.iter_any():
                    await response.write(chunk)
            except aiohttp.ClientError:
                _abort(request)  # the backend died mid-response: so does the client's response
                return response
            await response.write_eof()
            return response
        finally:
            upstream.release()

    async def _websocket(self, request: web.Request) -> web.StreamResponse:
        session = self._session_for_upstream()
        try:
            backend = await session.ws_connect(self._target(request, "ws"), autoping=True)
        except (aiohttp.ClientError, TimeoutError):
            return web.Response(status=502)
        client = web.WebSocketResponse(autoping=True)
        await client.prepare(request)

        async def pump(source: _WebSocket, sink: _WebSocket) -> None:
            async for msg in source:
                if msg.type == aiohttp.WSMsgType.TEXT:
                    await sink.send_str(msg.data)
                elif msg.type == aiohttp.WSMsgType.BINARY:
                    await sink.send_bytes(msg.data)

        tasks = [asyncio.create_task(pump(client, backend)), asyncio.create_task(pump(backend, client))]
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in tasks:
                task.cancel()
            for task in tasks:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
            await backend.close()
            await client.close()
        return client


def _abort(request: web.Request) -> None:
    if request.transport is not None:
        request.transport.abort()
