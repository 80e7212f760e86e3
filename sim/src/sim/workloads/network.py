"""A simulated container's ports: every container port is a random port on the host's 127.0.0.1.

Real containers each have their own ``localhost``; simulated ones share this machine's, so each container
port the instance uses is bound on a fresh loopback port and the mapping is kept here. ``-p`` ports show up
in the Vast API's ``ports``; the others (ComfyUI's 18188, ...) are reachable only through the instance's
SSH server, which resolves ``localhost:<container port>`` through this map.
"""

from __future__ import annotations

import socket

LOOPBACK = "127.0.0.1"


def allocate_port(host: str = LOOPBACK) -> int:
    """A port nothing listens on right now (the kernel's pick, released at once)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class ContainerNetwork:
    """Container port → host port, for one container incarnation."""

    def __init__(self) -> None:
        self._ports: dict[int, int] = {}

    def host_port(self, container_port: int) -> int:
        """The host port for ``container_port``, allocated on first use."""
        if container_port not in self._ports:
            self._ports[container_port] = allocate_port()
        return self._ports[container_port]

    def bind(self, container_port: int, host_port: int) -> None:
        self._ports[container_port] = host_port

    def release(self, container_port: int) -> None:
        self._ports.pop(container_port, None)

    def lookup(self, container_port: int) -> int | None:
        return self._ports.get(container_port)

    def as_dict(self) -> dict[int, int]:
        return dict(self._ports)
