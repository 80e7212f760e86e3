"""The forwarder: ``relay.callbacks`` → the dapi's internal callback server, each batch settled exactly once.

For every ``callback.forward`` it takes from the queue:
1. its window already closed (windows.py) → dead ``window_closed``, never posted;
2. a claim on its content digest (ledger.py): content another batch already carried → ``duplicate``, kept out;
   this very batch already settled (a redelivery) → acked, not counted again;
3. POST of the sender's bytes to ``DAPI_CALLBACK_URL`` + the route's path, with a timeout; 2xx → ``forwarded``;
   a 4xx the dapi means (bad body, unknown node: gonka-protocol.md §7) → dead ``rejected``; a timeout, a refused
   connection, 5xx, 408/429 → retried with capped exponential backoff and jitter, until the window closes (dead
   ``window_closed``) or attempts run out (dead ``attempts_exhausted``). v2's 503 outside the acceptance window is
   retried the same way: the relay's own view of the window decides when to stop.
4. a dead batch is copied, with its reason in the headers, to ``relay.callbacks.dead`` before it is acked.

Per-node order: batches are handled in queue order on one lane per node (the dapi's ``node_id``); lanes run in
parallel. The delivery is held while its lane retries — bounded by the exchange window (minutes), far below the
broker's 30-minute consumer timeout (reliability.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import aio_pika
import aiohttp
import orjson
from aio_pika.abc import AbstractIncomingMessage, AbstractRobustConnection
from pydantic import ValidationError
from redis.exceptions import RedisError
from yarl import URL

from hybrid_common.bus import Publisher
from hybrid_common.messages.commands import ForwardCallback
from hybrid_common.topology import OWNER_QUEUES, QueueSpec
from hybrid_relay.announcer import Announcer
from hybrid_relay.ledger import Claim, RelayLedger
from hybrid_relay.metrics import ATTEMPTS, FORWARD_LAG, FORWARDED_ITEMS, IN_FLIGHT, OUTCOMES
from hybrid_relay.settings import RelaySettings
from hybrid_relay.windows import PocWindows

log = logging.getLogger("hybrid.relay.forwarder")

CALLBACK_QUEUE: QueueSpec = next(q for q in OWNER_QUEUES if q.name == "relay.callbacks")
RETRIED_4XX = frozenset({408, 425, 429})
T = TypeVar("T")


@dataclass(slots=True)
class Job:
    message: AbstractIncomingMessage
    cmd: ForwardCallback
    claim: asyncio.Task[Claim]  # started when the batch enters its lane, awaited when its turn comes


def _items(cmd: ForwardCallback) -> int:
    # Nonces (v1) or artifacts (v2): counted from the body only when settling, never on the door's hot path.
    try:
        body = orjson.loads(cmd.body)
    except orjson.JSONDecodeError:
        return 0
    if cmd.generation == "v1":
        return len(body.get("nonces") or [])
    if cmd.kind == "generated":
        return len(body.get("artifacts") or [])
    n = body.get("n_total")
    return n if isinstance(n, int) else 0


class CallbackForwarder:
    def __init__(
        self,
        settings: RelaySettings,
        connection: AbstractRobustConnection,
        publisher: Publisher,
        announcer: Announcer,
        ledger: RelayLedger,
        windows: PocWindows,
    ) -> None:
        self.settings = settings
        self.connection = connection
        self.publisher = publisher
        self.topology = publisher.topology
        self.announcer = announcer
        self.ledger = ledger
        self.windows = windows
        self.base_url = (settings.dapi_callback_url or "").rstrip("/")
        self.timeout = settings.forward_timeout_s
        self.session: aiohttp.ClientSession | None = None
        self._lanes: dict[int, asyncio.Queue[Job]] = {}
        self._workers: dict[int, asyncio.Task[None]] = {}
        self._completions: set[asyncio.Task[None]] = set()
        self._queue: aio_pika.abc.AbstractQueue | None = None
        self._tag: str | None = None
        self.settled: dict[str, int] = {}

    # --- consuming ----------------------------------------------------------------------------------------------

    async def start(self) -> None:
        self.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=30),
            timeout=aiohttp.ClientTimeout(total=self.timeout),
            skip_auto_headers=("User-Agent",),
        )
        channel = await self.connection.channel()
        await channel.set_qos(prefetch_count=self.settings.prefetch)
        self._queue = await self.topology.declare_queue(channel, CALLBACK_QUEUE)
        self._tag = await self._queue.consume(self._on_message)

    async def stop(self) -> None:
        """Stop taking batches; the unacked ones go back to the queue when the connection closes."""
        if self._queue is not None and self._tag is not None:
            with contextlib.suppress(Exception):
                await self._queue.cancel(self._tag)
        for task in self._workers.values():
            task.cancel()
        await asyncio.gather(*self._workers.values(), return_exceptions=True)
        if self._completions:
            await asyncio.wait(set(self._completions), timeout=5)
        if self.session is not None:
            await self.session.close()

    @property
    def in_flight(self) -> int:
        return sum(q.qsize() for q in self._lanes.values()) + len(self._completions)

    async def _on_message(self, message: AbstractIncomingMessage) -> None:
        # No await before the lane is chosen: aio-pika starts one task per delivery in arrival order, so the lanes
        # see each node's batches in queue order.
        try:
            envelope = orjson.loads(message.body)
            cmd = ForwardCallback.model_validate(envelope["payload"])
        except (orjson.JSONDecodeError, KeyError, TypeError, ValidationError) as exc:
            log.error("dead-lettering an unreadable callback.forward %s: %s", message.message_id, exc)
            await message.reject(requeue=False)
            return
        lane = self._lanes.get(cmd.node_id)
        if lane is None:
            lane = self._lanes[cmd.node_id] = asyncio.Queue()
            self._workers[cmd.node_id] = asyncio.create_task(self._run_lane(lane), name=f"relay-lane-{cmd.node_id}")
        IN_FLIGHT.inc()
        claim = asyncio.create_task(self._redis(lambda: self.ledger.claim(cmd.batch_id, cmd.digest)))
        lane.put_nowait(Job(message, cmd, claim))

    async def _run_lane(self, lane: asyncio.Queue[Job]) -> None:
        while True:
            job = await lane.get()
            try:
                await self._forward(job)
            except asyncio.CancelledError:
                raise
            except Exception:  # a bug must not stop the lane; the message goes back for another try
                log.exception("forwarding batch %s failed unexpectedly", job.cmd.batch_id)
                IN_FLIGHT.dec()
                job.claim.cancel()
                with contextlib.suppress(Exception):
                    await job.message.nack(requeue=True)

    # --- one batch ----------------------------------------------------------------------------------------------

    async def _forward(self, job: Job) -> None:
        cmd = job.cmd
        claim = await job.claim
        if claim.state == "done":
            self._complete(self._ack(job))  # settled before a redelivery: ack, count nothing twice
            return
        if self.windows.closed(cmd.block_height, cmd.kind):
            self._settle(job, "dead:window_closed", attempts=0, status=None)
            return
        if claim.state == "dup":
            self._settle(job, "duplicate", attempts=0, status=None, first=claim.other)
            return
        attempts, delay = 0, self.settings.backoff_first_s
        while True:
            attempts += 1
            status = await self._post(cmd)
            if status is not None and 200 <= status < 300:
                self._settle(job, "forwarded", attempts=attempts, status=status)
                return
            if status is not None and 400 <= status < 500 and status not in RETRIED_4XX:
                self._settle(job, "dead:rejected", attempts=attempts, status=status)
                return
            if attempts >= self.settings.max_attempts:
                self._settle(job, "dead:attempts_exhausted", attempts=attempts, status=status)
                return
            pause = random.uniform(delay / 2, delay)  # jitter: lanes retrying together do not stampede the dapi
            delay = min(delay * 2, self.settings.backoff_cap_s)
            deadline = time.monotonic() + pause
            while (left := deadline - time.monotonic()) > 0:
                if self.windows.closed(cmd.block_height, cmd.kind):
                    self._settle(job, "dead:window_closed", attempts=attempts, status=status)
                    return
                await asyncio.sleep(min(left, 0.25))

    async def _post(self, cmd: ForwardCallback) -> int | None:
        assert self.session is not None
        try:
            async with self.session.post(
                URL(self.base_url + cmd.path, encoded=True),  # the path as received (v2 model ids escaped twice)
                data=cmd.body.encode(),
                headers={"Content-Type": "application/json"},
            ) as response:
                await response.read()
                ATTEMPTS.labels(str(response.status)).inc()
                return response.status
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            ATTEMPTS.labels(type(exc).__name__).inc()
            log.debug("POST %s failed: %r", cmd.path, exc)
            return None

    def _settle(self, job: Job, outcome: str, *, attempts: int, status: int | None, first: str = "") -> None:
        """Record the outcome in the background; the lane moves on to its next batch at once.

        Per-node order only needs each POST to follow the previous one's answer; the bookkeeping after it can
        overlap the next POST. A crash in between re-posts batches whose outcome was not yet recorded: duplicates at
        the dapi bounded by what was in flight, which is the guarantee.
        """
        lag = max(0.0, time.time() - job.cmd.received_at.timestamp())
        self._complete(self._record(job, outcome, attempts, status, first, lag))

    async def _record(self, job: Job, outcome: str, attempts: int, status: int | None, first: str, lag: float) -> None:
        cmd = job.cmd
        items = _items(cmd)
        if outcome.startswith("dead:"):
            # The batch itself goes to relay.callbacks.dead with its reason before it is acked (an operator can
            # replay it); a crash in between can only copy it twice.
            await self._dead_letter(job, outcome[5:], attempts, status)
        previous = await self._redis(
            lambda: self.ledger.finish(
                cmd.batch_id, cmd.digest, outcome, block_height=cmd.block_height, node_id=cmd.node_id, items=items
            )
        )
        if previous is None:  # else a redelivery of a batch settled before: nothing new to count or announce
            OUTCOMES.labels(outcome).inc()
            self.settled[outcome] = self.settled.get(outcome, 0) + 1
            try:
                await self.announcer.publish(
                    *self._event(cmd, outcome, attempts, status, first, lag, items),
                    correlation_id=f"poc:{cmd.block_height}",
                )
            except Exception as exc:  # the outcome is recorded in relay:stats either way
                log.warning("event for %s not published: %r", cmd.batch_id, exc)
        await self._ack(job)

    def _event(
        self, cmd: ForwardCallback, outcome: str, attempts: int, status: int | None, first: str, lag: float, items: int
    ) -> tuple[str, dict[str, Any]]:
        if outcome == "forwarded":
            FORWARD_LAG.observe(lag)
            FORWARDED_ITEMS.inc(items)
            return "callback.forwarded", {
                "batch_id": cmd.batch_id,
                "attempts": attempts,
                "status": status,
                "lag_ms": round(lag * 1000, 3),
            }
        if outcome == "duplicate":
            log.debug("duplicate batch %s kept out (content first carried by %s)", cmd.batch_id, first)
            return "callback.duplicate", {"batch_id": cmd.batch_id, "path": cmd.path}
        log.warning(
            "batch %s dead: %s",
            cmd.batch_id,
            outcome[5:],
            extra={"fields": {"node_id": cmd.node_id, "block_height": cmd.block_height, "last_status": status}},
        )
        return "callback.dead", {
            "batch_id": cmd.batch_id,
            "path": cmd.path,
            "reason": outcome[5:],
            "last_status": status,
            "attempts": attempts,
        }

    def _complete(self, work: Awaitable[None]) -> None:
        task = asyncio.ensure_future(work)
        self._completions.add(task)
        task.add_done_callback(self._completions.discard)

    async def _ack(self, job: Job) -> None:
        IN_FLIGHT.dec()
        try:
            await job.message.ack()
        except Exception as exc:  # channel gone with the broker: it redelivers, the ledger says "done"
            log.info("ack of %s lost (%r); the redelivery will be recognised", job.cmd.batch_id, exc)

    async def _dead_letter(self, job: Job, reason: str, attempts: int, status: int | None) -> None:
        original = job.message
        headers: dict[str, Any] = {"x-relay-dead-reason": reason, "x-relay-attempts": attempts}
        if status is not None:
            headers["x-relay-last-status"] = status
        message = aio_pika.Message(
            original.body,
            headers=headers,
            message_id=original.message_id,
            type=original.type,
            content_type=original.content_type,
            correlation_id=original.correlation_id,
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            app_id=original.app_id,
        )
        queue = self.topology.name(CALLBACK_QUEUE.name)
        await self.publisher.publish_raw(self.topology.dlx, queue, message, mandatory=True)

    async def _redis(self, call: Callable[[], Awaitable[T]]) -> T:
        """Redis is where dedupe and accounting live: wait for it rather than forward blind."""
        delay = 0.1
        while True:
            try:
                return await call()
            except (RedisError, OSError) as exc:
                log.warning("redis unavailable (%r); retrying", exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)
