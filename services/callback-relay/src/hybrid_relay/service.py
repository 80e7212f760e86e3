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

import orjson
from redis.asyncio import BlockingConnectionPool, Redis

from hybrid_common.bus import Consumer, Delivery, connect
from hybrid_common.messages.events import EpochObserved
from hybrid_common.redis_keys import RedisKeys
from hybrid_common.topology import SUBSCRIPTIONS, Topology
from hybrid_relay.announcer import Announcer
from hybrid_relay.door import CallbackDoor, DoorServer
from hybrid_relay.forwarder import CALLBACK_QUEUE, CallbackForwarder
from hybrid_relay.guard import DoorGuard
from hybrid_relay.handoff import GroupHandoff
from hybrid_relay.ledger import RelayLedger
from hybrid_relay.publishing import PipelinedPublisher
from hybrid_relay.settings import RelaySettings
from hybrid_relay.windows import PocWindows
from hybrid_relay.wire import SOURCE

log = logging.getLogger("hybrid.relay")

EPOCH_QUEUE = next(q for q in SUBSCRIPTIONS if q.name == "relay.epochs")
HEARTBEAT_SECONDS = 10.0
STATUS_TTL_SECONDS = 30


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
        self.handoff: GroupHandoff | None = None
        self.server: DoorServer | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._epochs: Consumer | None = None
        self.started_at = time.time()

    async def start(self) -> None:
        s = self.settings
        self.connection = await connect(s.amqp_url, name=f"{SOURCE}-{self.instance}")
        channel = await self.connection.channel()
        await self.topology.declare_queue(channel, CALLBACK_QUEUE)
        await channel.close()
        self.publisher = PipelinedPublisher(self.connection, self.topology)
        await self.publisher.start()
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
            # One connection for door and forwarder on purpose: measured with a connection of its own, the door took
            # ~20% more batches under a saturating load and the forwarder fell seconds behind (issue #11's lag
            # target); sharing it, the door's confirms wait a little behind the forwarder's traffic and the two stay
            # in step. RELAY_ROLE=door|forwarder splits them into processes when a machine has cores to spare.
            # Its own channel, though: the broker handles a channel's publishes one after another, and the door's
            # group would otherwise wait behind the forwarder's outcome events (two a batch) — issue #11's latency.
            door_publisher = PipelinedPublisher(self.connection, self.topology)
            await door_publisher.start()
            self.handoff = GroupHandoff(
                door_publisher,
                max_batches=s.door_group_max_batches,
                max_bytes=s.door_group_max_bytes,
                max_in_flight=s.door_groups_in_flight,
                deadline=s.door_publish_deadline,
            )
            door = CallbackDoor(
                handoff=self.handoff,
                windows=self.windows,
                guard=self.guard,
                max_body_bytes=s.max_body_bytes,
                refuse_at_door=s.refuse_at_door,
            )
            self.server = DoorServer(door, s.public_host, s.public_port, keepalive=s.door_keepalive)
            await self.server.start()
        log.info("relay %s up (role %s, door :%s, dapi %s)", self.instance, s.role, s.public_port, s.dapi_callback_url)

    async def stop(self) -> None:
        """Graceful: close the door (answering what is in progress), stop taking batches, flush outcomes."""
        if self.server is not None:
            await self.server.stop(grace=5.0)
        if self.handoff is not None:
            await self.handoff.drain(timeout=5.0)
        if self.forwarder is not None:
            await self.forwarder.stop()
        if self._epochs is not None:
            await self._epochs.stop()
        for task in self._tasks:
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
            "handed_off": {"groups": self.handoff.groups, "batches": self.handoff.batches} if self.handoff else {},
            "height_now": None if view is None else round(view.height_at(time.time()), 1),
            "windows": sorted(self.windows.windows),
        }

    async def _heartbeat(self) -> None:
        key = self.keys.status("callback-relay", self.instance)
        while True:
            with contextlib.suppress(Exception):
                await self.redis.set(key, orjson.dumps(self.summary()), ex=STATUS_TTL_SECONDS)
            await asyncio.sleep(HEARTBEAT_SECONDS)
