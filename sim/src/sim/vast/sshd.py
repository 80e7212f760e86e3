"""The SSH server of an ssh/jupyter-runtype instance (vastai-api.md "runtype"): real SSH via asyncssh.

- User ``root``, public-key auth against the keys attached to the instance (``POST /instances/{id}/ssh/``)
  plus the account's keys at creation time.
- Local forwards (``direct-tcpip``) to ``localhost:<container port>`` reach that container port, wherever the
  simulator bound it on this machine; anything else is refused (a simulated container has no internet).
- Remote forwards (``tcpip-forward``) listen on the container's ``localhost``, which for a simulated
  container is this machine's 127.0.0.1: a process in the instance calling ``localhost:<port>`` reaches
  the client's side. A port already taken here is refused; port 0 gets a free one.
- A tiny exec surface: ``env``/``printenv [VAR]``, ``echo``, ``hostname``, ``true``; anything else exits 127.
"""

from __future__ import annotations

import asyncio
import contextlib
import shlex
from collections.abc import Awaitable, Callable
from typing import Any

import asyncssh

from sim.workloads.network import LOOPBACK, ContainerNetwork

_LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1", "0.0.0.0", "", "ip6-localhost"})


class InstanceSshd:
    """One instance's SSH endpoint (what Vast's ``ssh_host:ssh_port`` leads to)."""

    def __init__(
        self,
        *,
        instance_id: int,
        host_key: asyncssh.SSHKey,
        authorized_keys: Callable[[], list[str]],
        network: Callable[[], ContainerNetwork | None],
        environment: Callable[[], dict[str, str]],
    ) -> None:
        self.instance_id = instance_id
        self._host_key = host_key
        self._authorized_keys = authorized_keys
        self._network = network
        self._environment = environment
        self._acceptor: asyncssh.SSHAcceptor | None = None
        self._connections: set[asyncssh.SSHServerConnection] = set()
        self._key_cache: dict[str, bytes | None] = {}

    async def start(self, port: int) -> None:
        self._acceptor = await asyncssh.create_server(
            lambda: _Session(self),
            LOOPBACK,
            port,
            server_host_keys=[self._host_key],
            process_factory=self._run_command,
            allow_scp=False,
            x11_forwarding=False,
            agent_forwarding=False,
            login_timeout=30,
        )

    async def close(self) -> None:
        acceptor, self._acceptor = self._acceptor, None
        if acceptor is not None:
            acceptor.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(acceptor.wait_closed(), 5)
        for conn in list(self._connections):
            conn.close()
        for conn in list(self._connections):
            with contextlib.suppress(Exception):
                await asyncio.wait_for(conn.wait_closed(), 5)
        self._connections.clear()

    # -- what sessions ask of the instance

    def key_allowed(self, key: asyncssh.SSHKey) -> bool:
        wanted = key.public_data
        for text in self._authorized_keys():
            if text not in self._key_cache:
                try:
                    self._key_cache[text] = asyncssh.import_public_key(text).public_data
                except (asyncssh.KeyImportError, ValueError):
                    self._key_cache[text] = None
            if self._key_cache[text] == wanted:
                return True
        return False

    def host_port_for(self, dest_host: str, dest_port: int) -> int | None:
        if dest_host.lower() not in _LOOPBACK_NAMES:
            return None
        network = self._network()
        return network.lookup(dest_port) if network is not None else None

    def remote_forward_bound(self, container_port: int, host_port: int) -> None:
        network = self._network()
        if network is not None:
            network.bind(container_port, host_port)

    async def _run_command(self, process: asyncssh.SSHServerProcess[str]) -> None:
        env = self._environment()
        command = process.command
        status = 0
        if command is None:
            process.stdout.write(f"Welcome to vast.ai (simulated). Container C.{self.instance_id}\n")
        else:
            try:
                argv = shlex.split(command)
            except ValueError:
                argv = command.split()
            name = argv[0] if argv else ""
            if name in {"env", "printenv"} and len(argv) == 1:
                process.stdout.write("".join(f"{k}={v}\n" for k, v in sorted(env.items())))
            elif name == "printenv":
                values = [env[a] for a in argv[1:] if a in env]
                process.stdout.write("".join(f"{v}\n" for v in values))
                status = 0 if len(values) == len(argv) - 1 else 1
            elif name == "echo":
                process.stdout.write(" ".join(argv[1:]) + "\n")
            elif name == "hostname":
                process.stdout.write(f"C.{self.instance_id}\n")
            elif name in {"true", ":"}:
                pass
            else:
                process.stderr.write(f"bash: {name}: command not found\n")
                status = 127
        process.exit(status)


class _Session(asyncssh.SSHServer):
    def __init__(self, sshd: InstanceSshd) -> None:
        self._sshd = sshd
        self._conn: asyncssh.SSHServerConnection | None = None

    def connection_made(self, conn: asyncssh.SSHServerConnection) -> None:
        self._conn = conn
        self._sshd._connections.add(conn)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._conn is not None:
            self._sshd._connections.discard(self._conn)

    def begin_auth(self, username: str) -> bool:
        return True

    def password_auth_supported(self) -> bool:
        return False

    def public_key_auth_supported(self) -> bool:
        return True

    def validate_public_key(self, username: str, key: asyncssh.SSHKey) -> bool:
        return username == "root" and self._sshd.key_allowed(key)

    def connection_requested(self, dest_host: str, dest_port: int, orig_host: str, orig_port: int) -> Any:
        host_port = self._sshd.host_port_for(dest_host, dest_port)
        if host_port is None or self._conn is None:
            raise asyncssh.ChannelOpenError(asyncssh.OPEN_CONNECT_FAILED, "Connection refused")
        return self._conn.forward_connection(LOOPBACK, host_port)

    def server_requested(self, listen_host: str, listen_port: int) -> Any:
        if listen_host.lower() not in _LOOPBACK_NAMES or self._conn is None:
            return False
        return self._listen(self._conn, listen_host, listen_port)

    async def _listen(
        self, conn: asyncssh.SSHServerConnection, listen_host: str, listen_port: int
    ) -> asyncssh.SSHListener:
        # Bind on this machine's loopback only; report the address the client asked for, so its
        # forwarded-tcpip channels match the listener it registered.
        opening: Awaitable[asyncssh.SSHListener] = conn.forward_local_port(
            LOOPBACK, listen_port, listen_host, listen_port
        )
        listener = await opening
        bound = listener.get_port()
        self._sshd.remote_forward_bound(listen_port or bound, bound)
        return listener
