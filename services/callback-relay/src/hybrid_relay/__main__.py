"""``python -m hybrid_relay`` runs the relay; ``python -m hybrid_relay status`` prints what it has relayed per epoch.

Environment: ``AMQP_URL``, ``REDIS_URL``, ``HYBRID_NAMESPACE``, ``DAPI_CALLBACK_URL`` and the ``RELAY_*`` settings
(settings.py). SIGTERM/SIGINT stop it gracefully; after a SIGKILL the broker redelivers what was in flight and the
ledger recognises it.
"""

from __future__ import annotations

import asyncio
import gc
import signal
import sys

import orjson
from redis.asyncio import Redis

from hybrid_common.logs import setup_logging
from hybrid_common.metrics import serve_metrics
from hybrid_common.redis_keys import RedisKeys
from hybrid_relay.ledger import read_stats
from hybrid_relay.service import RelayService
from hybrid_relay.settings import RelaySettings
from hybrid_relay.windows import PocWindows


async def _run(settings: RelaySettings) -> None:
    service = RelayService(settings)
    await service.start()
    if settings.gc_freeze:
        # Everything built at start-up (settings, pydantic schemas, connections) lives for the whole run: moved out of
        # the collector's reach, a full collection no longer walks it — those walks were the door's latency spikes.
        gc.collect()
        gc.freeze()
        gc.set_threshold(20_000, 20, 10)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await service.stop()


async def _status(settings: RelaySettings) -> None:
    redis = Redis.from_url(settings.redis_url)
    keys = RedisKeys(settings.namespace)
    windows = PocWindows()
    await windows.load(redis, keys)
    epoch_of = {start: w.epoch_index for start, w in windows.windows.items()}
    stats = await read_stats(redis, keys, epoch_of)
    await redis.aclose()
    print(orjson.dumps(stats, option=orjson.OPT_INDENT_2).decode())


def main() -> None:
    settings = RelaySettings()
    if sys.argv[1:2] == ["status"]:
        asyncio.run(_status(settings))
        return
    setup_logging("callback-relay", level=settings.log_level, json=settings.log_json, secrets=settings.secrets())
    serve_metrics(settings.metrics_port)
    try:
        import uvloop

        uvloop.run(_run(settings))
    except ImportError:
        asyncio.run(_run(settings))


if __name__ == "__main__":
    main()
