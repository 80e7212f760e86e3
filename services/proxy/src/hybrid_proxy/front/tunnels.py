"""SSH tunnels to rented GPUs: one asyncssh connection per instance, kept open while the instance lives.

vastai-api.md: an instance of an ssh runtype is reachable at ``ssh_host:ssh_port`` as ``root`` with a key attached to
it (the provisioner attaches ``settings.ssh_key_path`` + ``.pub``); ``args`` instances refuse SSH. A tunnel holds
local forwards (``127.0.0.1:<local>`` → the container's ``localhost:<port>``) and, for PoC callbacks, one remote
forward (the GPU's ``localhost:<remote>`` → the relay on this side).

Health: asyncssh keepalives (``FRONT_SSH_KEEPALIVE``; three unanswered = dead) and a watcher on the connection's
close. A dead tunnel is re-opened with capped backoff, binding the same local and remote ports again when they are
free, so routes and the callback URLs already handed to the MLNode keep working. The server's host key is pinned on
first contact (Vast publishes no host keys): a re-opened tunnel must meet the same key.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import asyncssh

log = logging.getLogger("hybrid.proxy.front.tunnels")

TunnelState = Literal["opening", "open", "reconnecting", "closed"]
# What a tunnel tells its owner: opened (all forwards bound), lost (connection died), failed (an open attempt
# failed), closed (closed on purpose), forward (a forward was added while open).
Notice = Literal["opened", "lost", "failed", "closed", "forward"]


@dataclass(frozen=True)
class SshEndpoint:
    host: str
    port: int


@dataclass(frozen=True)
class CallbackForward:
    """The GPU's ``localhost:<listen_port>`` → ``relay_host:relay_port`` on this side."""

    preferred_port: int
    relay_host: str
    relay_port: int


@dataclass
class InstanceTunnel:
    instance_id: int
    slot_id: str | None
    endpoint: SshEndpoint
    key_path: str
    keepalive: float
    connect_timeout: float
    retry_max: float
    notify: Callable[[InstanceTunnel, Notice, str], Awaitable[None]]
    wanted: dict[int, int] = field(default_factory=dict)  # container port → preferred local port (0 = any)
    callback: CallbackForward | None = None
    host_key: str | None = None  # OpenSSH public host key, pinned on first contact
    state: TunnelState = "opening"
    local: dict[int, int] = field(default_factory=dict)  # container port → bound local port (while open)
    remote_port: int | None = None  # the callback forward's port on the GPU (while open)
    reopen_count: int = 0
    last_error: str = ""
    opened_at: float | None = None
    _conn: asyncssh.SSHClientConnection | None = None
    _task: asyncio.Task[None] | None = None
    _closing: bool = False
    _attempted: asyncio.Event = field(default_factory=asyncio.Event)

    # -- life

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._keep(), name=f"tunnel-{self.instance_id}")

    async def wait_open(self, timeout: float) -> bool:
        """True once open; False when the first attempt failed or ``timeout`` passed."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._attempted.wait(), timeout)
        return self.state == "open"

    @property
    def is_open(self) -> bool:
        return self.state == "open"

    async def close(self, reason: str) -> None:
        self._closing = True
        task, self._task = self._task, None
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if conn is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(conn.wait_closed(), 2.0)
        was = self.state
        self.state = "closed"
        self.local.clear()
        self.remote_port = None
        if was != "closed":
            await self.notify(self, "closed", reason)

    async def add_forward(self, container_port: int) -> int | None:
        """Forward ``container_port`` too; its local port now if the tunnel is open, else once it opens."""
        self.wanted.setdefault(container_port, 0)
        if container_port in self.local:
            return self.local[container_port]
        if self._conn is None or self.state != "open":
            return None
        await self._bind_local(self._conn, container_port)
        await self.notify(self, "forward", f"localhost:{container_port}")
        return self.local[container_port]

    # -- the keeper

    async def _keep(self) -> None:
        backoff = 0.1
        while not self._closing:
            try:
                conn = await self._open()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.last_error = f"{type(exc).__name__}: {exc}"
                self.state = "reconnecting" if self.opened_at is not None else "opening"
                self._attempted.set()
                await self.notify(self, "failed", self.last_error)
                await asyncio.sleep(backoff * (0.5 + random.random()))
                backoff = min(backoff * 2, self.retry_max)
                continue
            backoff = 0.1
            self._conn = conn
            self.state = "open"
            self.opened_at = time.time()
            self._attempted.set()
            await self.notify(self, "opened", "")
            await conn.wait_closed()
            if self._closing:
                return
            self._conn = None
            self.local.clear()
            self.remote_port = None
            self.state = "reconnecting"
            self.reopen_count += 1
            self.last_error = "SSH connection lost"
            await self.notify(self, "lost", self.last_error)

    async def _open(self) -> asyncssh.SSHClientConnection:
        key = asyncssh.read_private_key(str(Path(self.key_path).expanduser()))
        known_hosts: Any = None
        if self.host_key is not None:
            known_hosts = ([asyncssh.import_public_key(self.host_key)], [], [])
        conn = await asyncio.wait_for(
            asyncssh.connect(
                self.endpoint.host,
                self.endpoint.port,
                username="root",
                client_keys=[key],
                known_hosts=known_hosts,
                agent_path=None,
                keepalive_interval=self.keepalive,
                keepalive_count_max=3,
                login_timeout=self.connect_timeout,
            ),
            self.connect_timeout,
        )
        try:
            if self.host_key is None:
                server_key = conn.get_server_host_key()
                if server_key is not None:
                    self.host_key = server_key.export_public_key().decode().strip()
            for container_port in list(self.wanted):
                await self._bind_local(conn, container_port)
            if self.callback is not None:
                await self._bind_callback(conn, self.callback)
        except BaseException:
            conn.close()
            raise
        return conn

    async def _bind_local(self, conn: asyncssh.SSHClientConnection, container_port: int) -> None:
        preferred = self.wanted.get(container_port, 0)
        try:
            listener = await conn.forward_local_port("127.0.0.1", preferred, "localhost", container_port)
        except OSError:
            if not preferred:
                raise
            # The old local port was taken meanwhile: any port will do, the route follows the tunnel's view.
            listener = await conn.forward_local_port("127.0.0.1", 0, "localhost", container_port)
        bound = listener.get_port()
        self.local[container_port] = bound
        self.wanted[container_port] = bound

    async def _bind_callback(self, conn: asyncssh.SSHClientConnection, cb: CallbackForward) -> None:
        """Listen on the GPU's localhost for the MLNode's callbacks; same port as before when it is free.

        Ports are chosen here rather than asked as port 0: the URL handed to the MLNode names the port, and a
        re-opened tunnel must listen on that same port again.
        """
        candidates = [cb.preferred_port, *(random.randint(20000, 60000) for _ in range(8))]
        last: Exception | None = None
        for port in candidates:
            try:
                await conn.forward_remote_port("localhost", port, cb.relay_host, cb.relay_port)
            except (asyncssh.ChannelListenError, OSError) as exc:
                last = exc
                continue
            self.remote_port = port
            if port != cb.preferred_port:
                log.warning(
                    "instance %s: callback port %s taken on the GPU, now %s: batches of a PoC already started may not "
                    "reach the relay",
                    self.instance_id,
                    cb.preferred_port,
                    port,
                )
                self.callback = CallbackForward(port, cb.relay_host, cb.relay_port)
            return
        # Callbacks are not the route: keep the tunnel and report the gap.
        log.warning("instance %s: no remote forward for callbacks: %r", self.instance_id, last)
        self.last_error = f"callback forward refused: {last!r}"

    # -- what the status and Redis show

    def view(self) -> dict[str, Any]:
        return {
            "instance_id": self.instance_id,
            "slot_id": self.slot_id,
            "ssh_host": self.endpoint.host,
            "ssh_port": self.endpoint.port,
            "state": self.state,
            "forwards": [
                {"local_port": self.local.get(cp, lp or None), "remote_port": cp, "bound": cp in self.local}
                for cp, lp in sorted(self.wanted.items())
            ],
            "callback_forward": (
                {
                    "remote_port": self.remote_port or self.callback.preferred_port,
                    "relay": f"{self.callback.relay_host}:{self.callback.relay_port}",
                    "bound": self.remote_port is not None,
                }
                if self.callback is not None
                else None
            ),
            "host_key": self.host_key,
            "opened_at": self.opened_at,
            "reopen_count": self.reopen_count,
            "last_error": self.last_error,
        }
