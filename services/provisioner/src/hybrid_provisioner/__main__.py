"""``python -m hybrid_provisioner`` — run one provisioner replica until SIGTERM/SIGINT.

Emergency commands that talk to Vast.ai directly (no broker, no running service needed):

    python -m hybrid_provisioner destroy --all-labelled   # destroy every instance carrying HYBRID_LABEL_PREFIX
    python -m hybrid_provisioner list                      # our labelled instances, one JSON line each
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import sys

import orjson

from hybrid_common.logs import setup_logging
from hybrid_common.metrics import serve_metrics
from hybrid_provisioner.settings import ProvisionerSettings
from hybrid_provisioner.vast import VastClient
from hybrid_provisioner.worker import ProvisionerWorker

log = logging.getLogger("hybrid.provisioner")


async def serve(settings: ProvisionerSettings) -> None:
    worker = ProvisionerWorker(settings)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await worker.start()
    serve_metrics(settings.metrics_port, settings.metrics_addr)
    await stop.wait()
    log.info("stopping: releasing job leases for the other replicas")
    await worker.stop()


async def labelled(settings: ProvisionerSettings, destroy: bool) -> int:
    vast = VastClient(settings.vast_url or "", settings.vast_key())
    prefix = f"{settings.label_prefix}-"
    try:
        for inst in await vast.list_instances():
            label = inst.get("label")
            if not (isinstance(label, str) and label.startswith(prefix)):
                continue
            row = {k: inst.get(k) for k in ("id", "label", "actual_status", "gpu_name", "dph_total", "machine_id")}
            if destroy:
                row["destroyed"] = await vast.destroy_instance(int(inst["id"]))
            print(orjson.dumps(row).decode())
    finally:
        await vast.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hybrid_provisioner")
    sub = parser.add_subparsers(dest="command")
    sub.add_parser("run", help="run a replica (default)")
    d = sub.add_parser("destroy", help="emergency: destroy every instance carrying our label prefix")
    d.add_argument("--all-labelled", action="store_true", required=True)
    sub.add_parser("list", help="our labelled instances")
    args = parser.parse_args(argv)
    settings = ProvisionerSettings()
    setup_logging("provisioner", level=settings.log_level, json=settings.log_json, secrets=settings.secret_values())
    with contextlib.suppress(ImportError):
        import uvloop

        uvloop.install()
    if args.command == "destroy":
        return asyncio.run(labelled(settings, destroy=True))
    if args.command == "list":
        return asyncio.run(labelled(settings, destroy=False))
    asyncio.run(serve(settings))
    return 0


if __name__ == "__main__":
    sys.exit(main())
