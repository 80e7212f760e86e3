"""``python -m hybrid_scheduler``: settings from the environment, JSON logs, metrics, queues, SIGTERM handled."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sys

from hybrid_common.alerts import start_alert_notifier
from hybrid_common.logs import setup_logging
from hybrid_common.metrics import serve_metrics
from hybrid_scheduler.settings import SchedulerSettings
from hybrid_scheduler.worker import Scheduler


async def _main() -> int:
    settings = SchedulerSettings()
    setup_logging("scheduler", level=settings.log_level, json=settings.log_json, secrets=settings.secret_values())
    log = logging.getLogger("hybrid.scheduler")
    serve_metrics(settings.metrics_port, settings.metrics_addr)
    scheduler = Scheduler(settings)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    await scheduler.start()
    # The alert webhook (ALERT_WEBHOOK_URL) rides along with the scheduler: it is always up and every replica may
    # consume the shared `alerts` queue (each alert is posted once). Does nothing when the URL is unset.
    assert scheduler.conn is not None
    notifier = await start_alert_notifier(
        scheduler.conn, scheduler.topology, scheduler.redis, secrets=settings.secret_values()
    )
    log.info(
        "scheduler up: dapi %s, %d slot(s), policy %s, confirmation %s, metrics :%d",
        settings.dapi_public_url,
        settings.slots,
        settings.policy.strategy,
        settings.confirmation_policy.value,
        settings.metrics_port,
    )
    await stop.wait()
    log.info("SIGTERM: handing the lease back and stopping")
    if notifier is not None:
        await notifier.stop()
    await scheduler.stop()
    return 0


def main() -> int:
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    return asyncio.run(_main())


if __name__ == "__main__":
    sys.exit(main())
