"""`make run`: the whole system as local processes on the simulated world, until Ctrl-C.

Starts the simulators and the four services (those that are built), prints where each listens, and on Ctrl-C stops
them in reverse order. ``MODE=live`` starts no simulator.
"""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass

from hybrid_common import port


@dataclass(frozen=True)
class Part:
    name: str
    module: str
    args: tuple[str, ...] = ()
    sim: bool = False
    listens: int | None = None


PARTS = (
    Part("sim vast", "sim", ("vast", "--port", str(port("sim.vast"))), sim=True, listens=port("sim.vast")),
    Part("sim dapi", "sim", ("dapi",), sim=True, listens=port("sim.dapi.public")),
    Part(
        "sim upstream", "sim", ("upstream", "--port", str(port("sim.upstream"))), sim=True, listens=port("sim.upstream")
    ),
    Part("callback-relay", "hybrid_relay", listens=port("relay.public")),
    Part("proxy", "hybrid_proxy", listens=port("proxy.node")),
    Part("provisioner", "hybrid_provisioner"),
    Part("scheduler", "hybrid_scheduler"),
)

SIM_WORLDS = {"vast": "sim.vast.cli", "dapi": "sim.network.cli", "upstream": "sim.upstream.cli"}


def _built(part: Part) -> bool:
    target = SIM_WORLDS[part.args[0]] if part.sim else f"{part.module}.__main__"
    try:
        return importlib.util.find_spec(target) is not None
    except ModuleNotFoundError:
        return False


def main() -> int:
    live = os.environ.get("MODE", "sim") == "live"
    env = {**os.environ, "HYBRID_TIME_PROFILE": os.environ.get("HYBRID_TIME_PROFILE", "demo"), "PYTHONUNBUFFERED": "1"}
    procs: list[tuple[Part, subprocess.Popen[bytes]]] = []
    print(f"gonka-hybrid: MODE={'live' if live else 'sim'} time profile={env['HYBRID_TIME_PROFILE']}")
    for part in PARTS:
        if part.sim and live:
            continue
        if not _built(part):
            print(f"  - {part.name:<15} not built yet (skipped)")
            continue
        procs.append((part, subprocess.Popen([sys.executable, "-m", part.module, *part.args], env=env)))
        where = f"127.0.0.1:{part.listens}" if part.listens else ""
        print(f"  + {part.name:<15} pid {procs[-1][1].pid} {where}")
    if not procs:
        print("nothing to run yet")
        return 0
    print("Ctrl-C stops everything. Watch with: hybridctl status --watch")
    stopping = False

    def stop(*_: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    while not stopping:
        for part, p in procs:
            if p.poll() is not None:
                print(f"{part.name} exited with {p.returncode}; stopping the rest")
                stopping = True
        time.sleep(0.5)
    for _, p in reversed(procs):
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    for part, p in reversed(procs):
        try:
            p.wait(timeout=30)
        except subprocess.TimeoutExpired:
            p.kill()
        print(f"  stopped {part.name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
