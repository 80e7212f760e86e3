"""``python -m hybrid_proxy.front``: the node front alone (the proxy service normally starts it beside its node)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal

from redis.asyncio import Redis

from hybrid_common.bus import connect
from hybrid_common.logs import setup_logging
from hybrid_common.metrics import serve_metrics
from hybrid_common.topology import OWNER_QUEUES, SUBSCRIPTIONS, Topology
from hybrid_proxy.front.node_front import NodeFront
from hybrid_proxy.front.settings import FrontSettings

log = logging.getLogger("hybrid.proxy.front")


async def run(settings: FrontSettings) -> None:
    topology = Topology(settings.namespace)
    connection = await connect(settings.amqp_url, name="proxy-front")
    redis = Redis.from_url(settings.redis_url)
    channel = await connection.channel()
    for spec in (*OWNER_QUEUES, *SUBSCRIPTIONS):
        if spec.name in {"proxy.front", "proxy.commands"}:
            await topology.declare_queue(channel, spec)
    await channel.close()
    front = NodeFront(settings, redis, connection, topology)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await front.start()
    serve_metrics(settings.front_metrics_port)
    print(f"node front ready: {len(front.routes)} slot(s)", flush=True)
    try:
        await stop.wait()
    finally:
        log.info("node front stopping")
        await front.stop()
        with contextlib.suppress(Exception):
            await connection.close()
        await redis.aclose()


def main() -> None:
    settings = FrontSettings()
    setup_logging("proxy-front", level=settings.log_level, json=settings.log_json, secrets=settings.secret_values())
    asyncio.run(run(settings))


if __name__ == "__main__":
    main()
