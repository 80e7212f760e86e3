"""``python -m hybrid_proxy``: settings from the environment, JSON logs without secrets, the service until SIGTERM.

SIGTERM/SIGINT stop it gracefully: the node stops accepting, open requests get a grace period, the node front closes
its gateways, the bus and Redis connections close.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sys
from collections.abc import Callable

from pydantic import ValidationError

from hybrid_common.logs import setup_logging
from hybrid_proxy.service import ProxyService
from hybrid_proxy.settings import ProxySettings

log = logging.getLogger("hybrid.proxy")


async def _run(settings: ProxySettings) -> None:
    service = ProxyService(settings)
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    await service.start()
    log.info("proxy running (MODE=%s, node %s)", settings.mode, settings.node_id)
    await stopping.wait()
    log.info("stopping")
    await service.stop()
    log.info("stopped")


def main() -> int:
    try:
        settings = ProxySettings()
    except ValidationError as exc:
        print(f"hybrid_proxy: invalid configuration:\n{exc}", file=sys.stderr)
        return 2
    setup_logging(
        "proxy",
        level=settings.log_level,
        json=settings.log_json,
        secrets=[*settings.secret_values(), settings.upstream_key()],
    )
    loop_factory: Callable[[], asyncio.AbstractEventLoop] | None = None
    with contextlib.suppress(ImportError):
        import uvloop  # inference-proxy.md: uvloop + httptools (aiohttp's C parser is its httptools)

        loop_factory = uvloop.new_event_loop
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        runner.run(_run(settings))
    return 0


if __name__ == "__main__":
    sys.exit(main())
