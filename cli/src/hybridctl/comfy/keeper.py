"""The tunnel keeper: holds every tunnel in the state file, re-opens dead ones, exits when none is left."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from pathlib import Path

import asyncssh

from hybridctl.comfy.tunnels import Tunnel, TunnelStore, home

log = logging.getLogger("hybridctl.keeper")
CHECK_INTERVAL = 0.5


class Held:
    def __init__(self, tunnel: Tunnel, conn: asyncssh.SSHClientConnection, listener: asyncssh.SSHListener) -> None:
        self.tunnel = tunnel
        self.conn = conn
        self.listener = listener

    def alive(self) -> bool:
        transport = getattr(self.conn, "_transport", None)
        return transport is not None and not transport.is_closing()

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


async def keep(store: TunnelStore, idle_exit: float = 5.0) -> None:
    held: dict[int, Held] = {}
    idle_since: float | None = None
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    while not stop.is_set():
        wanted = {t.instance_id: t for t in store.all()}
        for iid in list(held):
            h = held[iid]
            if iid not in wanted or wanted[iid].local_port != h.tunnel.local_port or not h.alive():
                if iid in wanted and wanted[iid].local_port == h.tunnel.local_port:
                    log.warning("tunnel %s died; re-opening", iid)
                    store.set_status(iid, "reopening", "SSH connection lost")
                h.close()
                del held[iid]
        for iid, t in wanted.items():
            if iid in held:
                continue
            try:
                held[iid] = await _open(t)
                store.set_status(iid, "up")
                log.info(
                    "tunnel %s: 127.0.0.1:%s -> %s:%s via %s:%s",
                    iid,
                    t.local_port,
                    t.remote_host,
                    t.remote_port,
                    t.ssh_host,
                    t.ssh_port,
                )
            except (OSError, asyncssh.Error) as exc:
                reason = str(exc) or type(exc).__name__
                if isinstance(exc, asyncssh.PermissionDenied):
                    reason = f"SSH refused the key ({reason}): is the instance on an ssh runtype with the key attached?"
                store.set_status(iid, "error", reason)
        if not wanted:
            idle_since = idle_since or loop.time()
            if loop.time() - idle_since > idle_exit:
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
    pidfile = root / "keeper.pid"
    pidfile.write_text(str(os.getpid()))
    try:
        asyncio.run(keep(TunnelStore(root)))
    finally:
        with contextlib.suppress(OSError):
            if Path(pidfile).read_text() == str(os.getpid()):
                pidfile.unlink()


if __name__ == "__main__":
    main()
