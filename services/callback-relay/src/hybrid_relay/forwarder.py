"""The forwarder: ``relay.callbacks`` → the dapi's internal callback server, each batch settled exactly once.

A delivery carries one batch (``callback.forward``) or the door's group of them (``callback.forward_group``). For
every batch:
1. its window already closed (windows.py) → dead ``window_closed``, never posted;
2. a claim on its content digest (ledger.py): content another batch already carried → ``duplicate``, kept out;
   this very batch already settled (a redelivery) → released, not counted again;
3. POST of the sender's bytes to ``DAPI_CALLBACK_URL`` + the route's path, with a timeout; 2xx → ``forwarded``;
   a 4xx the dapi means (bad body, unknown node: gonka-protocol.md §7) → dead ``rejected``; a timeout, a refused
   connection, 5xx, 408/429 → retried with capped exponential backoff and jitter, until the window closes (dead
   ``window_closed``) or attempts run out (dead ``attempts_exhausted``). v2's 503 outside the acceptance window is
   retried the same way: the relay's own view of the window decides when to stop.
4. a dead batch is copied, as a ``callback.forward`` with its reason in the headers, to ``relay.callbacks.dead``
   before its outcome is recorded.
A delivery is acked once every batch in it is recorded (and its event published): after a crash the broker
redelivers it and the ledger recognises what was settled.

Per-node order: batches are handled in queue order on one lane per node (the dapi's ``node_id``); lanes run in
parallel. The delivery is held while a lane retries — bounded by the exchange window (minutes), far below the
broker's 30-minute consumer timeout (reliability.md).

Throughput (issue #11): the Redis work is batched — one claim script for all batches of a delivery, one finish script
for everything settled meanwhile — and outcome events are published with their confirms overlapping.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, TypeVar

import orjson
from aio_pika.abc import AbstractIncomingMessage, AbstractQueue, AbstractRobustConnection
from prometheus_client import Counter
from pydantic import ValidationError
from redis.exceptions import RedisError

from hybrid_common.bus import Unroutable
from hybrid_common.messages.commands import ForwardCallback, ForwardCallbackGroup
from hybrid_common.topology import OWNER_QUEUES, QueueSpec
from hybrid_relay.announcer import Announcer, Event
from hybrid_relay.dapi import DapiCallbackClient
from hybrid_relay.ledger import Claim, RelayLedger, Settlement
from hybrid_relay.metrics import ATTEMPTS, FORWARD_LAG, FORWARDED_ITEMS, IN_FLIGHT, OUTCOMES
from hybrid_relay.publishing import PipelinedPublisher, unbounded_frames
from hybrid_relay.settings import RelaySettings
from hybrid_relay.windows import PocWindows
from hybrid_relay.wire import envelope_body, properties

log = logging.getLogger("hybrid.relay.forwarder")

CALLBACK_QUEUE: QueueSpec = next(q for q in OWNER_QUEUES if q.name == "relay.callbacks")
RETRIED_4XX = frozenset({408, 425, 429})
T = TypeVar("T")


class _Delivery:
    """One AMQP delivery and how many of its batches are still to be settled."""

    __slots__ = ("message", "remaining", "returned")

    def __init__(self, message: AbstractIncomingMessage, remaining: int) -> None:
        self.message = message
        self.remaining = remaining
        self.returned = False  # nacked back to the queue: never ack it afterwards (the channel would close)


@dataclass(slots=True)
class Job:
    cmd: ForwardCallback
    claim: asyncio.Future[Claim]  # resolved by the claimer (in queue order), awaited at the lane's turn
    # Deliveries this batch's settlement releases: its own, plus any redelivered copy that arrived meanwhile.
    holders: list[_Delivery] = field(default_factory=list)


@dataclass(slots=True)
class _Outcome:
    job: Job
    outcome: str
    attempts: int
    status: int | None
    first: str
    lag: float


def _items(cmd: ForwardCallback) -> int:
    # Counted at the door (``items``); a batch queued by an older door is counted from its body.
    if cmd.items is not None:
        return cmd.items
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
        publisher: PipelinedPublisher,
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
        self.dapi = DapiCallbackClient(settings.dapi_callback_url or "", timeout=settings.forward_timeout_s)
        self._lanes: dict[int, asyncio.Queue[Job]] = {}
        self._workers: dict[int, asyncio.Task[None]] = {}
        self._active: dict[str, Job] = {}  # batch_id → its job, while unsettled in this process
        self._claiming: list[Job] = []
        self._claimer: asyncio.Task[None] | None = None
        self._settling: list[_Outcome] = []
        self._recorder: asyncio.Task[None] | None = None
        self._background: set[asyncio.Task[Any]] = set()
        self._queue: AbstractQueue | None = None
        self._tag: str | None = None
        self.settled: dict[str, int] = {}
        self._children: dict[tuple[int, str], Counter] = {}

    # --- consuming ----------------------------------------------------------------------------------------------

    async def start(self) -> None:
        channel = await self.connection.channel()
        await channel.set_qos(prefetch_count=self.settings.prefetch)
        self._queue = await self.topology.declare_queue(channel, CALLBACK_QUEUE)
        self._tag = await self._queue.consume(self._on_message)

    async def stop(self) -> None:
        """Stop taking batches; the unacked ones go back to the queue when the connection closes."""
        if self._queue is not None and self._tag is not None:
            with contextlib.suppress(Exception):
                await self._queue.cancel(self._tag)
        stopping = [*self._workers.values(), *([self._claimer] if self._claimer else [])]
        for task in stopping:
            task.cancel()
        await asyncio.gather(*stopping, return_exceptions=True)
        deadline = time.monotonic() + 5
        while (self._settling or self._background or (self._recorder and not self._recorder.done())) and (
            time.monotonic() < deadline
        ):
            await asyncio.sleep(0.02)
        await self.dapi.close()

    @property
    def in_flight(self) -> int:
        return len(self._active)

    async def _on_message(self, message: AbstractIncomingMessage) -> None:
        # No await before the lanes are chosen: aio-pika starts one task per delivery in arrival order, so the lanes
        # see each node's batches in queue order.
        with contextlib.suppress(Exception):  # the channel as it is now (a reconnect opens a new one)
            unbounded_frames(message.channel)
        try:
            envelope = orjson.loads(message.body)
            if envelope["type"] == "callback.forward_group":
                batches = ForwardCallbackGroup.model_validate(envelope["payload"]).batches
            else:
                batches = [ForwardCallback.model_validate(envelope["payload"])]
        except (orjson.JSONDecodeError, KeyError, TypeError, ValidationError) as exc:
            log.error("dead-lettering an unreadable %s %s: %s", message.type, message.message_id, exc)
            await message.reject(requeue=False)
            return
        delivery = _Delivery(message, len(batches))
        fresh: list[Job] = []
        loop = asyncio.get_running_loop()
        for cmd in batches:
            running = self._active.get(cmd.batch_id)
            if running is not None:
                # A copy of a batch this process is still forwarding (a publish retried after a lost confirm, or a
                # redelivery after a channel loss): it is settled with the original, never posted twice from here.
                running.holders.append(delivery)
                continue
            job = Job(cmd, loop.create_future(), [delivery])
            self._active[cmd.batch_id] = job
            fresh.append(job)
        if not fresh:
            return
        IN_FLIGHT.inc(len(fresh))
        self._claiming += fresh
        if self._claimer is None or self._claimer.done():
            self._claimer = asyncio.create_task(self._claim(), name="relay-claimer")
        for job in fresh:
            lane = self._lanes.get(job.cmd.node_id)
            if lane is None:
                lane = self._lanes[job.cmd.node_id] = asyncio.Queue()
                self._workers[job.cmd.node_id] = asyncio.create_task(
                    self._run_lane(lane), name=f"relay-lane-{job.cmd.node_id}"
                )
            lane.put_nowait(job)

    async def _claim(self) -> None:
        # One claimer at a time, in queue order: of two batches with one content, the one taken first from the
        # queue carries it; what arrives while a claim script runs joins the next one.
        while self._claiming:
            jobs, self._claiming = self._claiming, []
            pairs = [(j.cmd.batch_id, j.cmd.digest) for j in jobs]
            try:
                claims = await self._redis(lambda: self.ledger.claim_many(pairs))  # noqa: B023 (awaited here)
            except asyncio.CancelledError:  # stopping: the lanes waiting on these claims stop too
                for job in jobs:
                    job.claim.cancel()
                raise
            for job, claim in zip(jobs, claims, strict=True):
                if not job.claim.done():
                    job.claim.set_result(claim)

    async def _run_lane(self, lane: asyncio.Queue[Job]) -> None:
        while True:
            job = await lane.get()
            try:
                await self._forward(job)
            except asyncio.CancelledError:
                raise
            except Exception:  # a bug must not stop the lane; the delivery goes back for another try
                log.exception("forwarding batch %s failed unexpectedly", job.cmd.batch_id)
                self._abandon([job])

    # --- one batch ----------------------------------------------------------------------------------------------

    async def _forward(self, job: Job) -> None:
        cmd = job.cmd
        claim = await job.claim
        if claim.state == "done":
            if self._release(job):  # settled before a redelivery: ack, count nothing twice
                IN_FLIGHT.dec()
            return
        if self.windows.closed(cmd.block_height, cmd.kind):
            self._settle(job, "dead:window_closed", attempts=0, status=None)
            return
        if claim.state == "dup":
            self._settle(job, "duplicate", attempts=0, status=None, first=claim.other)
            return
        body = cmd.body.encode()
        attempts, delay = 0, self.settings.backoff_first_s
        while True:
            attempts += 1
            answer = await self.dapi.post(cmd.path, body)
            status = answer if isinstance(answer, int) else None
            self._count_attempt(str(status) if status is not None else type(answer).__name__)
            if status is not None and 200 <= status < 300:
                self._settle(job, "forwarded", attempts=attempts, status=status)
                return
            if status is not None and 400 <= status < 500 and status not in RETRIED_4XX:
                self._settle(job, "dead:rejected", attempts=attempts, status=status)
                return
            if attempts >= self.settings.max_attempts:
                self._settle(job, "dead:attempts_exhausted", attempts=attempts, status=status)
                return
            log.debug("POST %s: %r; retrying", cmd.path, answer)
            pause = random.uniform(delay / 2, delay)  # jitter: lanes retrying together do not stampede the dapi
            delay = min(delay * 2, self.settings.backoff_cap_s)
            deadline = time.monotonic() + pause
            while (left := deadline - time.monotonic()) > 0:
                if self.windows.closed(cmd.block_height, cmd.kind):
                    self._settle(job, "dead:window_closed", attempts=attempts, status=status)
                    return
                await asyncio.sleep(min(left, 0.25))

    def _settle(self, job: Job, outcome: str, *, attempts: int, status: int | None, first: str = "") -> None:
        """Queue the outcome for recording; the lane moves on to its next batch at once.

        Per-node order only needs each POST to follow the previous one's answer; the bookkeeping after it can
        overlap the next POST. A crash in between re-posts batches whose outcome was not yet recorded: duplicates at
        the dapi bounded by what was in flight, which is the guarantee.
        """
        lag = max(0.0, time.time() - job.cmd.received_at.timestamp())
        self._settling.append(_Outcome(job, outcome, attempts, status, first, lag))
        if self._recorder is None or self._recorder.done():
            self._recorder = asyncio.create_task(self._record(), name="relay-recorder")

    # --- recording outcomes (batched) ---------------------------------------------------------------------------

    async def _record(self) -> None:
        # One recorder at a time: outcomes gather for ``record_interval`` and while it waits for Redis, so a round
        # costs one Redis script, one write of events and a few acks however many batches it settles.
        while self._settling:
            await asyncio.sleep(self.settings.record_interval)
            done, self._settling = self._settling, []
            try:
                await self._record_round(done)
            except Exception:  # their deliveries go back to the queue; the ledger recognises what was recorded
                log.exception("recording %d outcomes failed", len(done))
                self._abandon([o.job for o in done])

    async def _record_round(self, done: list[_Outcome]) -> None:
        dead = [o for o in done if o.outcome.startswith("dead:")]
        if dead:
            # The batch itself goes to relay.callbacks.dead with its reason before its outcome is recorded (an
            # operator can replay it); a crash in between can only copy it twice.
            await asyncio.gather(*(self._dead_letter(o) for o in dead))
        settlements = [
            Settlement(
                o.job.cmd.batch_id,
                o.job.cmd.digest,
                o.outcome,
                o.job.cmd.block_height,
                o.job.cmd.node_id,
                _items(o.job.cmd),
            )
            for o in done
        ]
        previous = await self._redis(lambda: self.ledger.finish_many(settlements))
        fresh = [o for o, p in zip(done, previous, strict=True) if p is None]
        # Events and acks in the background: the next round of Redis work does not wait for their confirms.
        self._spawn(self._announce_and_release(fresh, done))

    async def _announce_and_release(self, fresh: list[_Outcome], done: list[_Outcome]) -> None:
        events: list[Event] = []
        outcomes: dict[str, int] = {}
        forwarded_items = 0
        for o in fresh:  # else a redelivery of a batch settled before: nothing new to count or announce
            outcomes[o.outcome] = outcomes.get(o.outcome, 0) + 1
            cmd = o.job.cmd
            items = _items(cmd)
            if o.outcome == "forwarded":
                forwarded_items += items
            correlation = f"poc:{cmd.block_height}"
            if self.settings.accepted_events:
                events.append((*self._accepted(cmd, items), correlation))
            events.append((*self._event(o), correlation))
        # Counted once a round, not per batch (each metric update takes a lock).
        for outcome, n in outcomes.items():
            self._count(OUTCOMES, outcome, n)
            self.settled[outcome] = self.settled.get(outcome, 0) + n
        if forwarded_items:
            FORWARDED_ITEMS.inc(forwarded_items)
        try:
            await self.announcer.publish_many(events)
        except Exception as exc:  # the outcomes are recorded in relay:stats either way
            log.warning("%d outcome events not published: %r", len(events), exc)
        released = sum(self._release(o.job) for o in done)
        if released:
            IN_FLIGHT.dec(released)

    def _release(self, job: Job) -> bool:
        """Ack the deliveries this settled batch held (once all of theirs are settled); True if it was in flight
        (the caller counts it out of ``IN_FLIGHT``)."""
        active = self._active.pop(job.cmd.batch_id, None) is not None
        for holder in job.holders:
            holder.remaining -= 1
            if holder.remaining == 0 and not holder.returned:
                self._spawn(self._ack(holder))
        return active

    def _abandon(self, jobs: list[Job]) -> None:
        """Give these batches back to the broker unsettled (their deliveries are redelivered whole)."""
        for job in jobs:
            if self._active.pop(job.cmd.batch_id, None) is not None:
                IN_FLIGHT.dec()
            for holder in job.holders:
                if not holder.returned:
                    holder.returned = True
                    self._spawn(self._nack(holder))

    async def _nack(self, delivery: _Delivery) -> None:
        try:
            await delivery.message.nack(requeue=True)
        except Exception as exc:  # channel gone: the broker requeues it anyway
            log.info("nack of %s lost (%r)", delivery.message.message_id, exc)

    async def _ack(self, delivery: _Delivery) -> None:
        try:
            await delivery.message.ack()
        except Exception as exc:  # channel gone with the broker: it redelivers, the ledger says "done"
            log.info("ack of %s lost (%r); the redelivery will be recognised", delivery.message.message_id, exc)

    @staticmethod
    def _accepted(cmd: ForwardCallback, items: int) -> tuple[str, dict[str, Any]]:
        return "callback.accepted", {
            "batch_id": cmd.batch_id,
            "path": cmd.path,
            "generation": cmd.generation,
            "kind": cmd.kind,
            "node_id": cmd.node_id,
            "block_height": cmd.block_height,
            "items": items,
        }

    def _event(self, o: _Outcome) -> tuple[str, dict[str, Any]]:
        cmd = o.job.cmd
        if o.outcome == "forwarded":
            FORWARD_LAG.observe(o.lag)
            return "callback.forwarded", {
                "batch_id": cmd.batch_id,
                "attempts": o.attempts,
                "status": o.status,
                "lag_ms": round(o.lag * 1000, 3),
            }
        if o.outcome == "duplicate":
            log.debug("duplicate batch %s kept out (content first carried by %s)", cmd.batch_id, o.first)
            return "callback.duplicate", {"batch_id": cmd.batch_id, "path": cmd.path}
        log.warning(
            "batch %s dead: %s",
            cmd.batch_id,
            o.outcome[5:],
            extra={"fields": {"node_id": cmd.node_id, "block_height": cmd.block_height, "last_status": o.status}},
        )
        return "callback.dead", {
            "batch_id": cmd.batch_id,
            "path": cmd.path,
            "reason": o.outcome[5:],
            "last_status": o.status,
            "attempts": o.attempts,
        }

    async def _dead_letter(self, o: _Outcome) -> None:
        """The batch as a ``callback.forward`` of its own (its id = the batch id), reason in the headers."""
        cmd = o.job.cmd
        headers: dict[str, Any] = {"x-relay-dead-reason": o.outcome[5:], "x-relay-attempts": o.attempts}
        if o.status is not None:
            headers["x-relay-last-status"] = o.status
        now = datetime.now(UTC)
        correlation = f"poc:{cmd.block_height}"
        body = envelope_body(
            ForwardCallback.TYPE, cmd.model_dump(mode="json"), cmd.batch_id, now, correlation_id=correlation
        )
        props = properties(ForwardCallback.TYPE, cmd.batch_id, now, correlation_id=correlation, headers=headers)
        queue = self.topology.name(CALLBACK_QUEUE.name)
        try:
            await self.publisher.publish(self.topology.dlx, queue, body, props, mandatory=True, deadline=120.0)
        except Unroutable:
            # relay.callbacks.dead is gone (deleted by hand?): declare the topology again rather than drop the batch.
            log.warning("relay.callbacks.dead missing; declaring it again")
            channel = await self.connection.channel()
            try:
                await self.topology.declare_queue(channel, CALLBACK_QUEUE)
            finally:
                await channel.close()
            await self.publisher.publish(self.topology.dlx, queue, body, props, mandatory=True, deadline=120.0)

    # --- plumbing -----------------------------------------------------------------------------------------------

    def _count_attempt(self, result: str) -> None:
        self._count(ATTEMPTS, result)

    def _count(self, metric: Counter, label: str, n: int = 1) -> None:
        child = self._children.get((id(metric), label))
        if child is None:  # prometheus_client's labels() takes a lock and builds a key per call
            child = self._children[(id(metric), label)] = metric.labels(label)
        child.inc(n)

    def _spawn(self, work: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

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
