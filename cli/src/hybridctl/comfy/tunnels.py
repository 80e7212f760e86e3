"""Local SSH tunnels that outlive the command that opened them (like the seeds' ``~/.vai_tunnels.json``).

The state lives in ``$HYBRIDCTL_HOME/tunnels.json`` (default ``~/.hybridctl``), changed under an exclusive file lock.
A background keeper (``python -m hybridctl.comfy.keeper``) holds the SSH connections and their local forwards,
re-opens dead ones, and writes each tunnel's status back; it exits when no tunnel is left.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

FIRST_LOCAL_PORT = 8188


def home() -> Path:
    return Path(os.environ.get("HYBRIDCTL_HOME", Path.home() / ".hybridctl")).expanduser()


@dataclass
class Tunnel:
    instance_id: int
    local_port: int
    ssh_host: str
    ssh_port: int
    key_path: str
    remote_host: str = "localhost"
    remote_port: int = 18188  # ComfyUI itself, not the auth proxy on 8188 (comfyui.md)
    user: str = "root"
    label: str = ""
    status: str = "opening"
    error: str = ""
    updated_at: float = field(default_factory=time.time)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.local_port}"


class TunnelStore:
    def __init__(self, root: Path | None = None) -> None:
        self.root = root or home()
        self.path = self.root / "tunnels.json"
        self.lock_path = self.root / "tunnels.lock"

    @contextlib.contextmanager
    def _locked(self) -> Iterator[dict[str, Any]]:
        self.root.mkdir(parents=True, exist_ok=True)
        with self.lock_path.open("a+") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                data = json.loads(self.path.read_text()) if self.path.exists() else {}
            except json.JSONDecodeError:
                data = {}
            data.setdefault("tunnels", {})
            yield data
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text(json.dumps(data, indent=2, sort_keys=True))
            tmp.replace(self.path)

    def all(self) -> list[Tunnel]:
        with self._locked() as data:
            return [Tunnel(**t) for t in data["tunnels"].values()]

    def get(self, instance_id: int) -> Tunnel | None:
        return next((t for t in self.all() if t.instance_id == instance_id), None)

    def add(self, tunnel: Tunnel) -> None:
        with self._locked() as data:
            data["tunnels"][str(tunnel.instance_id)] = asdict(tunnel)

    def remove(self, instance_id: int) -> Tunnel | None:
        with self._locked() as data:
            raw = data["tunnels"].pop(str(instance_id), None)
        return Tunnel(**raw) if raw else None

    def set_status(self, instance_id: int, status: str, error: str = "") -> None:
        with self._locked() as data:
            t = data["tunnels"].get(str(instance_id))
            if t is not None:
                t.update(status=status, error=error, updated_at=time.time())

    def allocate(self, tunnel: Tunnel) -> Tunnel:
        """Give ``tunnel`` the next free local port from 8188 (skipping ports in use or already assigned) and save it."""
        with self._locked() as data:
            taken = {t["local_port"] for t in data["tunnels"].values()}
            port = FIRST_LOCAL_PORT
            while port in taken or not port_free(port):
                port += 1
            tunnel.local_port = port
            data["tunnels"][str(tunnel.instance_id)] = asdict(tunnel)
        return tunnel


def port_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def keeper_pid(root: Path | None = None) -> int | None:
    pidfile = (root or home()) / "keeper.pid"
    try:
        pid = int(pidfile.read_text())
        os.kill(pid, 0)
        return pid
    except (OSError, ValueError):
        return None


def ensure_keeper(root: Path | None = None) -> int:
    """Start the keeper unless one runs; returns its pid."""
    root = root or home()
    pid = keeper_pid(root)
    if pid:
        return pid
    root.mkdir(parents=True, exist_ok=True)
    log = (root / "keeper.log").open("ab")
    proc = subprocess.Popen(
        [sys.executable, "-m", "hybridctl.comfy.keeper"],
        env={**os.environ, "HYBRIDCTL_HOME": str(root)},
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and keeper_pid(root) != proc.pid:
        time.sleep(0.05)
    return proc.pid


def stop_keeper(root: Path | None = None) -> None:
    pid = keeper_pid(root)
    if pid:
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGTERM)


def wait_up(store: TunnelStore, instance_id: int, timeout: float = 30.0) -> Tunnel:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        t = store.get(instance_id)
        if t is None:
            raise RuntimeError(f"tunnel for instance {instance_id} was removed")
        if t.status == "up":
            return t
        time.sleep(0.1)
    t = store.get(instance_id)
    raise RuntimeError(f"tunnel for instance {instance_id} not up after {timeout:.0f} s: {t.error if t else 'gone'}")
