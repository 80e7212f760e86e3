"""Local SSH tunnels that outlive the command that opened them (like the seeds' ``~/.vai_tunnels.json``).

The state lives in ``$HYBRIDCTL_HOME/tunnels.json`` (default ``~/.hybridctl``), changed under an exclusive file lock:
``tunnels`` (one per instance: local port → ComfyUI on the instance) and ``rentals`` (instance → the slot it was
rented under, so ``comfy destroy`` can release it even after its tunnel was closed).
A background keeper (``python -m hybridctl.comfy.keeper``) holds the SSH connections and their local forwards,
re-opens dead ones, and writes each tunnel's status back; it exits when no tunnel is left. One keeper per state
directory: it holds ``keeper.lock`` for its whole life, so "is a keeper running" is "is that lock taken".
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
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

FIRST_LOCAL_PORT = 8188
# Keeper statuses: opening → up; up → reopening (connection lost) → up; error (could not connect) and refused (SSH
# rejected the key), both retried with backoff while the tunnel is recorded.
FAILED_STATUSES = frozenset({"error", "refused", "reopening"})


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
    failing_since: float = 0.0  # when the current run of failures began (0: not failing)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.local_port}"

    @property
    def target(self) -> str:
        return f"{self.remote_host}:{self.remote_port} via {self.user}@{self.ssh_host}:{self.ssh_port}"

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> Tunnel:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in raw.items() if k in known})  # older state files lack newer fields


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
            data.setdefault("rentals", {})
            yield data
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text(json.dumps(data, indent=2, sort_keys=True))
            tmp.replace(self.path)

    def all(self) -> list[Tunnel]:
        if not self.path.exists():
            return []  # nothing recorded: do not create the state directory just to look
        with self._locked() as data:
            return sorted((Tunnel.from_dict(t) for t in data["tunnels"].values()), key=lambda t: t.local_port)

    def get(self, instance_id: int) -> Tunnel | None:
        return next((t for t in self.all() if t.instance_id == instance_id), None)

    def find(self, port_or_instance: int) -> Tunnel | None:
        """The tunnel on that local port, else the tunnel of that instance (ports and Vast ids hardly overlap)."""
        tunnels = self.all()
        return next((t for t in tunnels if t.local_port == port_or_instance), None) or next(
            (t for t in tunnels if t.instance_id == port_or_instance), None
        )

    def add(self, tunnel: Tunnel) -> None:
        with self._locked() as data:
            data["tunnels"][str(tunnel.instance_id)] = asdict(tunnel)

    def remove(self, instance_id: int) -> Tunnel | None:
        with self._locked() as data:
            raw = data["tunnels"].pop(str(instance_id), None)
        return Tunnel.from_dict(raw) if raw else None

    def remove_all(self) -> list[Tunnel]:
        with self._locked() as data:
            raw, data["tunnels"] = data["tunnels"], {}
        return [Tunnel.from_dict(t) for t in raw.values()]

    def set_status(self, instance_id: int, status: str, error: str = "") -> None:
        with self._locked() as data:
            t = data["tunnels"].get(str(instance_id))
            if t is not None:
                now = time.time()
                failing_since = 0.0 if status == "up" else (t.get("failing_since") or now)
                t.update(status=status, error=error, updated_at=now, failing_since=failing_since)

    def reset_statuses(self) -> None:
        """For a keeper that starts: what a previous (dead) keeper wrote is stale until it re-opens each tunnel."""
        with self._locked() as data:
            for t in data["tunnels"].values():
                t.update(status="opening", error="", updated_at=time.time(), failing_since=0.0)

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

    def retire_if_idle(self, pidfile: Path) -> bool:
        """For the keeper: under the lock, when no tunnel is recorded, drop ``pidfile`` and say so. A command that adds
        a tunnel takes the same lock first, so it either sees no keeper (and starts one) or the keeper sees its tunnel.
        """
        with self._locked() as data:
            if data["tunnels"]:
                return False
            with contextlib.suppress(OSError):
                if pidfile.read_text() == str(os.getpid()):
                    pidfile.unlink()
            return True

    # -- rentals: which slot an instance was rented under (the provisioner releases by slot)

    def remember_rental(self, instance_id: int, slot_id: str) -> None:
        with self._locked() as data:
            data["rentals"][str(instance_id)] = {"slot_id": slot_id, "since": time.time()}

    def rental_slot(self, instance_id: int) -> str | None:
        with self._locked() as data:
            entry = data["rentals"].get(str(instance_id))
        return str(entry["slot_id"]) if entry else None

    def forget_rental(self, instance_id: int) -> None:
        with self._locked() as data:
            data["rentals"].pop(str(instance_id), None)


def port_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def wait_ports_free(ports: list[int], timeout: float = 10.0) -> bool:
    """Until the keeper has closed the listeners on ``ports`` (it polls the state file)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if all(port_free(p) for p in ports):
            return True
        time.sleep(0.1)
    return all(port_free(p) for p in ports)


def alive(tunnel: Tunnel, keeper: int | None) -> bool:
    """Up as far as this machine can tell: a keeper runs, it says up, and the local port is listening."""
    return keeper is not None and tunnel.status == "up" and not port_free(tunnel.local_port)


def keeper_pid(root: Path | None = None) -> int | None:
    """The running keeper's pid: ``keeper.lock`` is taken and the pidfile names it."""
    root = root or home()
    lock_path = root / "keeper.lock"
    if not lock_path.exists():
        return None
    with lock_path.open("a+") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pass  # held: a keeper lives
        else:
            return None
    try:
        return int((root / "keeper.pid").read_text())
    except (OSError, ValueError):
        return None  # a keeper on its way out (it dropped its pidfile): a new one waits for its lock


def ensure_keeper(root: Path | None = None) -> int:
    """Start the keeper unless one runs; returns its pid. Serialised: parallel commands start one keeper."""
    root = root or home()
    root.mkdir(parents=True, exist_ok=True)
    with (root / "keeper.start.lock").open("a+") as start_lock:
        fcntl.flock(start_lock, fcntl.LOCK_EX)
        pid = keeper_pid(root)
        if pid:
            return pid
        with (root / "keeper.log").open("ab") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "hybridctl.comfy.keeper"],
                env={**os.environ, "HYBRIDCTL_HOME": str(root)},
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,  # Ctrl-C in the terminal that started it must not take the tunnels down
            )
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and keeper_pid(root) != proc.pid:
            if proc.poll() is not None:
                raise RuntimeError(f"the tunnel keeper exited at start (code {proc.returncode}): see {root}/keeper.log")
            time.sleep(0.05)
        return proc.pid


def stop_keeper(root: Path | None = None) -> None:
    pid = keeper_pid(root)
    if pid:
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGTERM)


def wait_up(store: TunnelStore, instance_id: int, timeout: float = 30.0, failing_grace: float = 15.0) -> Tunnel:
    """Until the keeper reports the tunnel up. Gives up after ``failing_grace`` seconds of failed attempts: the instance
    is ready by now, so its SSH should answer (a little slack for a freshly attached key to reach Vast's SSH proxy)."""
    deadline = time.monotonic() + timeout
    while True:
        t = store.get(instance_id)
        if t is None:
            raise RuntimeError(f"tunnel for instance {instance_id} was removed")
        if t.status == "up":
            return t
        if t.status in FAILED_STATUSES and t.failing_since and time.time() - t.failing_since > failing_grace:
            raise RuntimeError(t.error or t.status)
        if time.monotonic() > deadline:
            raise RuntimeError(f"not up after {timeout:.0f} s ({t.status}{': ' + t.error if t.error else ''})")
        time.sleep(0.1)
