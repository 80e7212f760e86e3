"""One relay process: the door, the forwarder, or both, plus what they share (broker, Redis, the window view).

Start-up order matters for the guarantee "published with a confirm before the 200": the ``relay.callbacks`` queue is
declared before the door opens, so a batch accepted while no forwarder runs still has a queue to wait in.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from collections.abc import Generator

import orjson
import uvicorn
from redis.asyncio import BlockingConnectionPool, Redis

from hybrid_common.bus import Consumer, Delivery, Publisher, connect
from hybrid_common.messages.events import EpochObserved
from hybrid_common.redis_keys import RedisKeys
from hybrid_common.topology import SUBSCRIPTIONS, Topology
from hybrid_relay.announcer import Announcer
from hybrid_relay.door import CallbackDoor
from hybrid_relay.forwarder import CALLBACK_QUEUE, CallbackForwarder
from hybrid_relay.guard import DoorGuard
from hybrid_relay.ledger import RelayLedger
from hybrid_relay.settings import RelaySettings
from hybrid_relay.windows import PocWindows
from hybrid_relay.wire import SOURCE

log = logging.getLogger("hybrid.relay")

EPOCH_QUEUE = next(q for q in SUBSCRIPTIONS if q.name == "relay.epochs")
HEARTBEAT_SECONDS = 10.0
STATUS_TTL_SECONDS = 30


class _DoorServer(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield  # the service owns SIGTERM and closes the door itself (uvicorn would re-raise the signal)


class RelayService:
    def __init__(self, settings: RelaySettings) -> None:
        self.settings = settings
        self.instance = settings.instance or f"{socket.gethostname()}-{os.getpid()}"
        self.keys = RedisKeys(settings.namespace)
        self.topology = Topology(settings.namespace)
        # Bounded and blocking: every batch in the prefetch window claims its digest at once (forwarder.py).
        self.redis = Redis(connection_pool=BlockingConnectionPool.from_url(settings.redis_url, max_connections=64))
        self.windows = PocWindows(settings.window_margin_blocks)
        self.ledger = RelayLedger(self.redis, self.keys, ttl_s=settings.seen_ttl_s, dedupe=settings.dedupe)
        self.guard = DoorGuard(settings, self.redis, self.keys)
        self.forwarder: CallbackForwarder | None = None
        self.server: _DoorServer | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._epochs: Consumer | None = None
        self.started_at = time.time()

    async def start(self) -> None:
        s = self.settings
        self.connection = await connect(s.amqp_url, name=f"{SOURCE}-{self.instance}")
        channel = await self.connection.channel()
        await self.topology.declare_queue(channel, CALLBACK_QUEUE)
        await channel.close()
        self.publisher = Publisher(self.connection, self.topology, SOURCE)
        self.announcer = Announcer(self.publisher)
        with contextlib.suppress(Exception):
            await self.windows.load(self.redis, self.keys)
        self._epochs = Consumer(self.connection, self.topology, self.redis, EPOCH_QUEUE, self._on_epoch, prefetch=8)
        await self._epochs.start()
        self._tasks.append(asyncio.create_task(self._refresh_windows(), name="relay-windows"))
        self._tasks.append(asyncio.create_task(self._heartbeat(), name="relay-heartbeat"))
        if s.role in ("all", "forwarder"):
            self.forwarder = CallbackForwarder(
                s, self.connection, self.publisher, self.announcer, self.ledger, self.windows
            )
            await self.forwarder.start()
        if s.role in ("all", "door"):
            self.guard.start()
            door = CallbackDoor(
                publisher=self.publisher,
                announcer=self.announcer,
                windows=self.windows,
                guard=self.guard,
                max_body_bytes=s.max_body_bytes,
                publish_deadline=s.door_publish_deadline,
                refuse_at_door=s.refuse_at_door,
                accepted_events=s.accepted_events,
            )
            config = uvicorn.Config(
                door,
                host=s.public_host,
                port=s.public_port,
                http="httptools",
                lifespan="off",
                access_log=False,
                log_config=None,
                server_header=False,
                date_header=False,
                backlog=2048,
                timeout_keep_alive=30,
                timeout_graceful_shutdown=5,
            )
            self.server = _DoorServer(config)
            self._tasks.append(asyncio.create_task(self.server.serve(), name="relay-door"))
            while not self.server.started:
                if self._tasks[-1].done():
                    self._tasks[-1].result()  # raises the bind error
                await asyncio.sleep(0.01)
        log.info("relay %s up (role %s, door :%s, dapi %s)", self.instance, s.role, s.public_port, s.dapi_callback_url)

    async def stop(self) -> None:
        """Graceful: close the door (answering what is in progress), stop taking batches, flush events."""
        if self.server is not None:
            self.server.should_exit = True
        if self.forwarder is not None:
            await self.forwarder.stop()
        if self._epochs is not None:
            await self._epochs.stop()
        await self.announcer.drain()
        for task in self._tasks:
            if task.get_name() != "relay-door":
                task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.guard.stop()
        with contextlib.suppress(Exception):
            await self.redis.delete(self.keys.status("callback-relay", self.instance))
        await self.connection.close()
        await self.redis.aclose()

    # --- windows ------------------------------------------------------------------------------------------------

    async def _on_epoch(self, delivery: Delivery) -> None:
        event = delivery.payload
        if isinstance(event, EpochObserved):
            self.windows.observe(event, delivery.envelope.occurred_at)
            await self.windows.save(self.redis, self.keys)

    async def _refresh_windows(self) -> None:
        # Replicas share one relay.epochs queue, so each sees only some events: everyone re-reads the saved view.
        while True:
            await asyncio.sleep(1.0)
            try:
                await self.windows.load(self.redis, self.keys)
            except Exception as exc:
                log.debug("windows refresh failed: %r", exc)

    # --- status -------------------------------------------------------------------------------------------------

    def summary(self) -> dict[str, object]:
        view = self.windows.view
        return {
            "service": "callback-relay",
            "instance": self.instance,
            "role": self.settings.role,
            "started_at": self.started_at,
            "dedupe": self.settings.dedupe,
            "in_flight": self.forwarder.in_flight if self.forwarder else 0,
            "settled": dict(self.forwarder.settled) if self.forwarder else {},
            "height_now": None if view is None else round(view.height_at(time.time()), 1),
            "windows": sorted(self.windows.windows),
        }

    async def _heartbeat(self) -> None:
        key = self.keys.status("callback-relay", self.instance)
        while True:
            with contextlib.suppress(Exception):
                await self.redis.set(key, orjson.dumps(self.summary()), ex=STATUS_TTL_SECONDS)
            await asyncio.sleep(HEARTBEAT_SECONDS)
