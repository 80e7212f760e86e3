"""A listening port that can be shut and reopened without giving its number away.

Two simulated servers must look *closed* for a while and then come back on the same port: the MLNode's
inference port (gonka-protocol.md §10: "while an MLNode runs inference/up ... its inference port is
closed") and the dapi's callback server (other engineers need "the dapi is down for a stretch").
Unbinding and rebinding risks losing the port to another process (an outgoing connection can take an
ephemeral port number meanwhile), and the Vast simulator maps container ports to our numbers once.
So the socket stays bound and, while the gate is shut, every new connection is reset on arrival and
existing keep-alive connections are closed: a client sees a connection error, never an HTTP answer.
"""

from __future__ import annotations

import asyncio
import socket
import struct
from typing import Any

from aiohttp import web


class _ResetOnConnect(asyncio.Protocol):
    """Accepts a TCP connection and resets it at once (RST, not FIN): "connection reset by peer"."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        sock = transport.get_extra_info("socket")
        if sock is not None:
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            except OSError:
                pass
        if isinstance(transport, asyncio.Transport):
            transport.abort()
        else:
            transport.close()


class GatedListener:
    """An aiohttp application on a loopback port whose gate can be shut and opened at run time."""

    def __init__(self, app: web.Application, *, host: str = "127.0.0.1", port: int = 0, open_: bool = True):
        self._app = app
        self._host = host
        self._requested_port = port
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        self._server: asyncio.Server | None = None
        self._open = open_
        self.port = 0

    @property
    def is_open(self) -> bool:
        return self._open

    async def start(self) -> int:
        await self._runner.setup()
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            self._protocol_for_new_connection, self._host, self._requested_port, reuse_address=True
        )
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self.port

    def _protocol_for_new_connection(self) -> Any:
        if self._open and self._runner.server is not None:
            return self._runner.server()
        return _ResetOnConnect()

    def open(self) -> None:
        self._open = True

    def shut(self) -> None:
        """Reset new connections and drop the established ones (in-flight requests included)."""
        self._open = False
        server = self._runner.server
        if server is not None:
            for handler in server.connections:
                handler.force_close()

    async def close(self) -> None:
        self.shut()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        await self._runner.cleanup()
