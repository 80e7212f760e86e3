"""The tunnel keeper: holds every tunnel in the state file, re-opens dead ones, exits when none is left."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import signal
import time
from pathlib import Path

import asyncssh

from hybridctl.comfy.tunnels import Tunnel, TunnelStore, home

log = logging.getLogger("hybridctl.keeper")
CHECK_INTERVAL = 0.5
RETRY_FIRST = 0.5  # seconds before the first retry of a tunnel that failed to open; doubles up to RETRY_MAX
RETRY_MAX = 10.0


class Held:
    def __init__(self, tunnel: Tunnel, conn: asyncssh.SSHClientConnection, listener: asyncssh.SSHListener) -> None:
        self.tunnel = tunnel
        self.conn = conn
        self.listener = listener

    def alive(self) -> bool:
        return not self.conn.is_closed()

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.listener.close()
        with contextlib.suppress(Exception):
            self.conn.close()


async def _open(t: Tunnel) -> Held:
    conn = await asyncssh.connect(
        t.ssh_host,
        t.ssh_port,
        username=t.user,
        client_keys=[os.path.expanduser(t.key_path)],
        known_hosts=None,
        keepalive_interval=5,
        keepalive_count_max=3,
        connect_timeout=10,
    )
    try:
        listener = await conn.forward_local_port("127.0.0.1", t.local_port, t.remote_host, t.remote_port)
    except Exception:
        conn.close()
        raise
    return Held(t, conn, listener)


def _why(exc: BaseException, t: Tunnel) -> tuple[str, str]:
    """(status, reason) for a tunnel that did not open, worded for the operator."""
    reason = str(exc) or type(exc).__name__
    where = f"{t.ssh_host}:{t.ssh_port}"
    if isinstance(exc, asyncssh.PermissionDenied):
        return "refused", (
            f"SSH refused the key {t.key_path} (auth rejected) at {where}: attach its .pub to the instance (the "
            "provisioner attaches SSH_KEY_PATH's .pub), or set ssh_key in the config to that key"
        )
    if isinstance(exc, ConnectionRefusedError | ConnectionResetError | asyncssh.ConnectionLost):
        return "error", (
            f"SSH unavailable at {where} ({reason}): the instance offers no SSH — an 'args' runtype keeps the image's "
            "entrypoint but gives no SSH; ComfyUI needs an ssh runtype with the entrypoint in onstart (vastai-api.md)"
        )
    if isinstance(exc, OSError) and exc.errno == 98:  # EADDRINUSE: someone took the local port meanwhile
        return "error", f"local port {t.local_port} is taken by another program: close it, or close this tunnel"
    return "error", f"SSH to {where} failed: {reason}"


async def keep(store: TunnelStore, pidfile: Path | None = None, idle_exit: float = 5.0) -> None:
    held: dict[int, Held] = {}
    retry_at: dict[int, float] = {}
    failures: dict[int, int] = {}
    idle_since: float | None = None
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)

    async def open_one(t: Tunnel) -> None:
        try:
            held[t.instance_id] = await _open(t)
        except (OSError, asyncssh.Error) as exc:
            n = failures[t.instance_id] = failures.get(t.instance_id, 0) + 1
            retry_at[t.instance_id] = loop.time() + min(RETRY_FIRST * 2 ** (n - 1), RETRY_MAX)
            status, reason = _why(exc, t)
            log.warning("tunnel %s: %s", t.instance_id, reason)
            store.set_status(t.instance_id, status, reason)
            return
        failures.pop(t.instance_id, None)
        retry_at.pop(t.instance_id, None)
        store.set_status(t.instance_id, "up")
        log.info("tunnel %s: 127.0.0.1:%s -> %s", t.instance_id, t.local_port, t.target)

    while not stop.is_set():
        wanted = {t.instance_id: t for t in store.all()}
        for iid in list(held):
            h = held[iid]
            if iid not in wanted or wanted[iid].local_port != h.tunnel.local_port or not h.alive():
                if iid in wanted and wanted[iid].local_port == h.tunnel.local_port:
                    log.warning("tunnel %s died; re-opening", iid)
                    store.set_status(iid, "reopening", "SSH connection lost; re-opening")
                h.close()
                del held[iid]
        for gone in set(retry_at) - set(wanted):
            retry_at.pop(gone, None)
            failures.pop(gone, None)
        due = [t for iid, t in wanted.items() if iid not in held and loop.time() >= retry_at.get(iid, 0.0)]
        if due:  # concurrently: one unreachable host must not hold the others back for its connect timeout
            await asyncio.gather(*(open_one(t) for t in due))
        if not wanted:
            idle_since = idle_since or loop.time()
            if loop.time() - idle_since > idle_exit and (pidfile is None or store.retire_if_idle(pidfile)):
                break
        else:
            idle_since = None
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), CHECK_INTERVAL)
    for h in held.values():
        h.close()


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s keeper %(levelname)s %(message)s")
    root = home()
    root.mkdir(parents=True, exist_ok=True)
    lock = (root / "keeper.lock").open("a+")
    deadline = time.monotonic() + 10
    while True:  # one keeper per directory; a keeper on its way out holds the lock a moment longer
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            if time.monotonic() > deadline:
                log.info("another keeper holds %s; leaving", lock.name)
                return
            time.sleep(0.05)
    store = TunnelStore(root)
    store.reset_statuses()  # before the pidfile: whoever waits for this keeper then sees fresh statuses only
    pidfile = root / "keeper.pid"
    pidfile.write_text(str(os.getpid()))
    try:
        asyncio.run(keep(store, pidfile))
    finally:
        with contextlib.suppress(OSError):
            if pidfile.read_text() == str(os.getpid()):
                pidfile.unlink()


if __name__ == "__main__":
    main()
