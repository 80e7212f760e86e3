"""Test support for the scheduler's acceptance tests (issue #8) — no tests of its own.

- :class:`FakeProvisioner`: a test-only stand-in for ``hybrid_provisioner`` that consumes ``provision`` / ``start`` /
  ``release`` from the ``provisioner.commands`` queue like the real one, "boots" an MLNode simulator behind a
  prefix-stripping front (``tests/integration/sim_network_helpers.FrontedMLNode``) after short delays, registers it in
  the dapi simulator's admin API under the slot id, and publishes ``job.accepted``, ``instance.created`` (``stopped``
  for pre-pulls), ``instance.ready``, ``node.registered``, ``instance.destroyed``. It records every command with the
  chain height it arrived at, so tests can check idempotency and release timing.
- :class:`ChainFaults`: a test-only HTTP front between the scheduler and the dapi's public port that can answer
  garbage, 5xx or hang (timeouts) instead of forwarding.
- :class:`SchedulerWorld`: the dapi simulator in this event loop, the fake provisioner, an event log, a command
  publisher, and scheduler replicas as real processes (``python -m hybrid_scheduler``) so SIGKILL is real.
- :class:`RealProvisionerWorld`: the same scheduler side on top of the provisioner engineer's
  ``ProvisionerWorld`` (Vast.ai simulator, node front, ``python -m hybrid_provisioner``): the whole chain of services.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson
from aiohttp import web
from redis.asyncio import Redis

from hybrid_common import TEST, EpochShape, TimeProfile
from hybrid_common.bus import Consumer, Delivery, Publisher, connect
from hybrid_common.messages import Envelope, Payload
from hybrid_common.messages.commands import Provision, Release, StartStandby
from hybrid_common.messages.domain import FailureCause
from hybrid_common.messages.events import (
    InstanceCreated,
    InstanceDestroyed,
    InstanceFailed,
    InstanceReady,
    JobAccepted,
    NodeDeregistered,
    NodeRegistered,
)
from hybrid_common.topology import OWNER_QUEUES, SUBSCRIPTIONS, QueueSpec, Topology
from tests.integration.sim_network_helpers import DapiHTTP, FrontedMLNode
from tests.support.procs import ManagedProcess

SCHEDULER_ENV = {
    "MODE": "sim",
    "LOG_JSON": "false",
    "LOG_LEVEL": "INFO",
    "SCHEDULER_METRICS_PORT": "0",
    "SCHEDULER_POLL_SECONDS": "0.1",
    "SCHEDULER_HTTP_TIMEOUT": "0.5",
    "SCHEDULER_LEASE_TTL": "2",
    "SCHEDULER_OBSERVE_EVERY": "2",
    "SCHEDULER_FLAGS_EVERY": "0.5",
    "SCHEDULER_REPORT_EVERY": "1",
    # Real-world seconds, divided by the TEST profile's acceleration (60).
    "SCHEDULER_POLICY__STANDBY_COUNT": "2",
    "SCHEDULER_POLICY__STANDBY_SPARES": "1",
    "SCHEDULER_POLICY__PREPULL_LEAD": "720",
    "SCHEDULER_POLICY__PRIOR_STANDBY_BOOT": "180",
    "SCHEDULER_POLICY__PRIOR_FRESH_BOOT": "240",
    "SCHEDULER_POLICY__MIN_LEAD": "420",
}

EPOCH_MODEL = "Qwen/Qwen2.5-7B-Instruct"
# A short epoch so three of them fit in a lean test: 120 blocks of 0.25 s; PoC spans 20 + 4 + 20 blocks.
SHORT_EPOCH = TEST.epoch.model_copy(update={"epoch_length": 120})


async def wait_for(cond: Callable[[], Any], timeout: float, what: str, *, every: float = 0.1) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = cond()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        await asyncio.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


class EventLog:
    """Every event of the namespace, in arrival order."""

    def __init__(self, conn: Any, redis: Redis, topology: Topology) -> None:
        self.items: list[Envelope[Payload]] = []
        self.consumer = Consumer(conn, topology, redis, QueueSpec("test.events", "events", ("#",)), self._on)

    async def _on(self, d: Delivery) -> None:
        self.items.append(d.envelope)

    def of(self, kind: type[Payload], **match: Any) -> list[Any]:
        return [
            e.payload
            for e in self.items
            if isinstance(e.payload, kind) and all(getattr(e.payload, k) == v for k, v in match.items())
        ]


@dataclass
class FakeSlot:
    slot_id: str
    profile: str
    epoch_index: int | None
    start_stopped: bool
    started: bool = False
    node: FrontedMLNode | None = None
    registered_height: int | None = None
    released_height: int | None = None
    instance_id: int = 0
    task: asyncio.Task[None] | None = None
    start_requests: int = 0
    starting: bool = False


@dataclass
class CommandSeen:
    type: str
    key: str | None
    slot_ids: list[str]
    height: int
    at: float
    payload: dict[str, Any] = field(default_factory=dict)


class FakeProvisioner:
    """Consumes the provisioner's owner queue; boots MLNode simulators; registers them in the dapi."""

    def __init__(
        self,
        conn: Any,
        redis: Redis,
        topology: Topology,
        dapi: DapiHTTP,
        *,
        pull_seconds: float = 0.3,
        boot_seconds: float = 0.6,
        fail_slots: set[str] | None = None,
    ) -> None:
        self.topology = topology
        self.dapi = dapi
        self.publisher = Publisher(conn, topology, "fake-provisioner")
        spec = next(s for s in OWNER_QUEUES if s.name == "provisioner.commands")
        self.consumer = Consumer(conn, topology, redis, spec, self._on_command)
        self.pull_seconds = pull_seconds
        self.boot_seconds = boot_seconds
        self.fail_slots = fail_slots or set()
        self.slots: dict[str, FakeSlot] = {}
        self.commands: list[CommandSeen] = []
        self.applied_keys: set[str] = set()
        self.duplicates: list[str] = []
        self.next_instance = random.randrange(1_000_000, 2_000_000)

    async def start(self) -> FakeProvisioner:
        await self.consumer.start()
        return self

    async def close(self) -> None:
        await self.consumer.stop()
        for slot in self.slots.values():
            await self._stop_life(slot)
            if slot.node is not None:
                await slot.node.close()
                slot.node = None

    @staticmethod
    async def _stop_life(slot: FakeSlot) -> None:
        """Cancel a slot's life unless it is half-way through starting its MLNode (a cancelled aiohttp start leaks a
        runner): then let it finish, the node is closed right after."""
        task = slot.task
        if task is None or task.done():
            return
        if not slot.starting:
            task.cancel()
        with contextlib.suppress(BaseException):
            await task

    async def _on_command(self, d: Delivery) -> None:
        p = d.payload
        height = await self.dapi.height()
        key = getattr(p, "idempotency_key", None)
        self.commands.append(
            CommandSeen(d.envelope.type, key, list(getattr(p, "slot_ids", [])), height, time.time(), p.model_dump())
        )
        if key is not None:
            if key in self.applied_keys:
                self.duplicates.append(key)
                return
            self.applied_keys.add(key)
        if isinstance(p, Provision):
            for slot_id in p.slot_ids:
                slot = FakeSlot(slot_id, p.profile, p.epoch_index, p.start_stopped)
                self.next_instance += 1
                slot.instance_id = self.next_instance
                self.slots[slot_id] = slot
                await self._emit(
                    JobAccepted(
                        job_id=f"job-{slot_id}",
                        slot_id=slot_id,
                        profile=p.profile,
                        purpose=p.purpose,
                        deadline=p.deadline,
                    )
                )
                slot.task = asyncio.create_task(self._life(slot))
        elif isinstance(p, StartStandby):
            for slot_id in p.slot_ids:
                standby = self.slots.get(slot_id)
                if standby is not None:
                    standby.start_requests += 1
                    standby.started = True
        elif isinstance(p, Release):
            for slot_id in p.slot_ids:
                held = self.slots.get(slot_id)
                if held is not None:
                    await self._release(held, height)

    async def _emit(self, event: Payload) -> None:
        await self.publisher.publish(event)

    async def _life(self, slot: FakeSlot) -> None:
        await asyncio.sleep(self.pull_seconds)
        await self._emit(
            InstanceCreated(
                job_id=f"job-{slot.slot_id}",
                slot_id=slot.slot_id,
                instance_id=slot.instance_id,
                offer_id=1,
                machine_id=1,
                gpu_name="H100 SXM",
                num_gpus=1,
                dph_total=2.0,
                label=f"test-{slot.slot_id}",
                stopped=slot.start_stopped,
            )
        )
        began = time.monotonic()
        if slot.start_stopped:
            while not slot.started:
                await asyncio.sleep(0.05)
            began = time.monotonic()
        if slot.slot_id in self.fail_slots:
            await asyncio.sleep(self.boot_seconds / 2)
            await self._emit(
                InstanceFailed(
                    job_id=f"job-{slot.slot_id}",
                    slot_id=slot.slot_id,
                    instance_id=slot.instance_id,
                    cause=FailureCause.START_FAILED,
                    message="test: the GPU was taken",
                    will_retry=False,
                )
            )
            return
        await asyncio.sleep(self.boot_seconds)
        slot.starting = True
        try:
            slot.node = await FrontedMLNode.start(generation="v1", profile=TEST, model_download_seconds=0.2)
        finally:
            slot.starting = False
        if slot.released_height is not None:
            return  # released while it booted: _release closes it
        await self.dapi.register(slot.node.registration(slot.slot_id, EPOCH_MODEL))
        slot.registered_height = await self.dapi.height()
        boot = time.monotonic() - began
        await self._emit(
            InstanceReady(
                job_id=f"job-{slot.slot_id}",
                slot_id=slot.slot_id,
                instance_id=slot.instance_id,
                profile=slot.profile,
                gpu_name="H100 SXM",
                boot_seconds=round(boot, 3),
            )
        )
        await self._emit(
            NodeRegistered(
                job_id=f"job-{slot.slot_id}",
                slot_id=slot.slot_id,
                node_id=slot.slot_id,
                host="127.0.0.1",
                poc_port=slot.node.api_front.port,
                inference_port=slot.node.inference_front.port,
                epoch_index=slot.epoch_index,
            )
        )

    async def _release(self, slot: FakeSlot, height: int) -> None:
        if slot.released_height is not None:
            return
        slot.released_height = height
        await self._stop_life(slot)
        if slot.registered_height is not None:
            with contextlib.suppress(Exception):
                await self.dapi.delete(slot.slot_id)
            await self._emit(NodeDeregistered(slot_id=slot.slot_id, node_id=slot.slot_id, how="delete"))
        if slot.node is not None:
            await slot.node.close()
            slot.node = None
        await self._emit(
            InstanceDestroyed(slot_id=slot.slot_id, instance_id=slot.instance_id, reason="released", cost_usd=0.01)
        )

    def provisions(self) -> list[CommandSeen]:
        return [c for c in self.commands if c.type == "provision"]

    def releases(self) -> list[CommandSeen]:
        return [c for c in self.commands if c.type == "release"]

    def epoch_slots(self, epoch: int) -> list[FakeSlot]:
        return [s for s in self.slots.values() if s.epoch_index == epoch]


class ChainFaults:
    """Between the scheduler and the dapi's public port: forwards, or misbehaves on every route while ``mode`` says."""

    MODES = ("ok", "garbage", "5xx", "hang", "jump", "mixed")

    def __init__(self, target: str) -> None:
        self.target = target.rstrip("/")
        self.mode = "ok"
        self.served: dict[str, int] = {}
        self._runner: web.AppRunner | None = None
        self._session: aiohttp.ClientSession | None = None
        self.url = ""
        self._n = 0
        self._closing = asyncio.Event()

    async def start(self) -> ChainFaults:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._session = aiohttp.ClientSession()
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", 0).start()
        self.url = f"http://127.0.0.1:{self._runner.addresses[0][1]}"
        return self

    async def close(self) -> None:
        self._closing.set()  # release hanging requests so the server can shut down at once
        if self._runner is not None:
            await self._runner.cleanup()
        if self._session is not None:
            await self._session.close()

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        mode = self.mode
        if mode == "mixed":
            self._n += 1
            mode = ("garbage", "5xx", "hang", "jump", "truncated")[self._n % 5]
        self.served[mode] = self.served.get(mode, 0) + 1
        if mode == "garbage":
            return web.Response(body=b"<html>502 Bad Gateway</html>", content_type="application/json")
        if mode == "truncated":
            return web.Response(body=b'{"block_height": 12, "latest_ep', content_type="application/json")
        if mode == "5xx":
            return web.json_response({"error": "internal"}, status=503)
        if mode == "hang":
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._closing.wait(), 30)
            return web.json_response({})
        assert self._session is not None
        async with self._session.get(self.target + request.rel_url.path_qs) as upstream:
            body = await upstream.read()
        if mode == "jump":
            # plausible JSON with an absurd height: must never move the plan (or release anything)
            data = orjson.loads(body)
            if isinstance(data, dict) and "block_height" in data:
                height = data["block_height"]
                data["block_height"] = (
                    (int(height) + 100_000) if not isinstance(height, str) else str(int(height) + 100_000)
                )
            body = orjson.dumps(data)
        return web.Response(body=body, status=upstream.status, content_type="application/json")


class SchedulerWorld:
    """Everything a scheduler acceptance test needs, in one async context."""

    def __init__(
        self,
        amqp_url: str,
        redis_url: str,
        namespace: str,
        *,
        profile: TimeProfile = TEST,
        epoch: EpochShape = SHORT_EPOCH,
        first_poc_start: int = 120,
        faults: bool = False,
        fake: dict[str, Any] | None = None,
        dapi_kwargs: dict[str, Any] | None = None,
    ) -> None:
        self.amqp_url = amqp_url
        self.redis_url = redis_url
        self.namespace = namespace
        self.profile = profile
        self.epoch = epoch
        self.first_poc_start = first_poc_start
        self.with_faults = faults
        self.fake_kwargs = fake or {}
        self.dapi_kwargs = dapi_kwargs or {}
        self.topology = Topology(namespace)
        self.schedulers: list[ManagedProcess] = []

    async def __aenter__(self) -> SchedulerWorld:
        from sim.network import start_dapi

        self.dapi = await start_dapi(
            profile=self.profile, epoch=self.epoch, first_poc_start=self.first_poc_start, **self.dapi_kwargs
        )
        self.session = aiohttp.ClientSession()
        self.http = DapiHTTP(self.session, self.dapi.public_url, self.dapi.admin_url, self.dapi.callback_url)
        self.faults = await ChainFaults(self.dapi.public_url).start() if self.with_faults else None
        self.redis = Redis.from_url(self.redis_url)
        self.conn = await connect(self.amqp_url, name="scheduler-test")
        self.publisher = Publisher(self.conn, self.topology, "test")
        ch = await self.conn.channel()
        await self.topology.declare_all(ch)
        await ch.close()
        self.events = EventLog(self.conn, self.redis, self.topology)
        await self.events.consumer.start()
        self.provisioner = await FakeProvisioner(
            self.conn, self.redis, self.topology, self.http, **self.fake_kwargs
        ).start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        for s in self.schedulers:
            s.stop(timeout=5)
        if exc and exc[0] is not None:
            for i, s in enumerate(self.schedulers):
                print(f"----- scheduler {i} -----\n{s.output()}")
        await self.provisioner.close()
        await self.events.consumer.stop()
        with contextlib.suppress(Exception):
            await self._delete_topology()
        with contextlib.suppress(Exception):
            await self.conn.close()
        if self.faults is not None:
            await self.faults.close()
        await self.session.close()
        await self.dapi.close()
        with contextlib.suppress(Exception):
            keys = [k async for k in self.redis.scan_iter(match=f"{self.namespace}:*", count=500)]
            if keys:
                await self.redis.delete(*keys)
        await self.redis.aclose()

    async def _delete_topology(self) -> None:
        ch = await self.conn.channel()
        names = [spec.name for spec in (*OWNER_QUEUES, *SUBSCRIPTIONS)] + ["test.events"]
        for base in names:
            for name in (self.topology.name(base), self.topology.name(base) + ".dead"):
                await ch.queue_delete(name)
        for exchange in (self.topology.events, self.topology.commands, self.topology.dlx):
            await ch.exchange_delete(exchange)
        await ch.close()

    def env(self, **extra: str) -> dict[str, str]:
        public = self.faults.url if self.faults is not None else self.dapi.public_url
        env = {
            **SCHEDULER_ENV,
            "AMQP_URL": self.amqp_url,
            "REDIS_URL": self.redis_url,
            "HYBRID_NAMESPACE": self.namespace,
            "HYBRID_TIME_PROFILE": self.profile.name,
            "GONKA_PUBLIC_API_URL": public,
        }
        env.update(extra)
        return env

    def start_scheduler(self, **extra: str) -> ManagedProcess:
        proc = ManagedProcess(["-m", "hybrid_scheduler"], env=self.env(**extra), name="scheduler")
        proc.start()
        self.schedulers.append(proc)
        return proc

    async def campaigns(self) -> dict[str, dict[str, Any]]:
        raw = await self.redis.hgetall(f"{self.namespace}:scheduler:epochs")
        return {(k.decode() if isinstance(k, bytes) else k): orjson.loads(v) for k, v in raw.items()}

    async def campaign(self, epoch: int) -> dict[str, Any] | None:
        return (await self.campaigns()).get(f"poc-e{epoch}")

    async def leader(self) -> str | None:
        v = await self.redis.get(f"{self.namespace}:lease:scheduler")
        return v.decode() if isinstance(v, bytes) else v

    async def dapi_jump(self, height: int) -> None:
        status, body = await self.http._json("POST", f"{self.dapi.public_url}/_sim/clock/jump", {"height": height})
        assert status == 200, body

    async def report(self) -> dict[str, Any]:
        return await self.http.report()

    async def wait(self, cond: Callable[[], Any], timeout: float, what: str) -> Any:
        try:
            return await wait_for(cond, timeout, what)
        except AssertionError:
            print("commands:", [(c.type, c.slot_ids, c.height) for c in self.provisioner.commands])
            for key, c in sorted((await self.campaigns()).items()):
                print("campaign", key, c["state"], c["notes"])
            raise


class RealProvisionerWorld:
    """The scheduler over the real provisioner (``tests/integration/test_provisioner_kit.ProvisionerWorld``)."""

    def __init__(
        self, amqp_url: str, redis_url: str, namespace: str, tmp: Any, *, first_poc_start: int = 120, **_: Any
    ) -> None:
        from tests.integration.test_provisioner_kit import ProvisionerWorld

        self.namespace = namespace
        self.amqp_url = amqp_url
        self.redis_url = redis_url
        self.pw = ProvisionerWorld(
            amqp_url,
            redis_url,
            namespace,
            tmp,
            boot_scale=0.2,
            first_poc_blocks=first_poc_start,
            gateway_pairs=16,
            dapi_kwargs={"epoch": SHORT_EPOCH},
        )
        self.schedulers: list[ManagedProcess] = []

    async def __aenter__(self) -> RealProvisionerWorld:
        await self.pw.__aenter__()
        self.dapi = self.pw.dapi
        self.redis = self.pw.redis
        self.events = self.pw.events
        self.publisher = self.pw.publisher
        self.conn = self.pw.conn
        self.session = aiohttp.ClientSession()
        self.http = DapiHTTP(self.session, self.dapi.public_url, self.dapi.admin_url, self.dapi.callback_url)
        self.pw.start_replica()
        return self

    async def __aexit__(self, *exc: object) -> None:
        for s in self.schedulers:
            s.stop(timeout=5)
        if exc and exc[0] is not None:
            for i, s in enumerate(self.schedulers):
                print(f"----- scheduler {i} -----\n{s.output()}")
        await self.session.close()
        await self.pw.__aexit__(*exc)

    def env(self, **extra: str) -> dict[str, str]:
        env = {
            **SCHEDULER_ENV,
            "AMQP_URL": self.amqp_url,
            "REDIS_URL": self.redis_url,
            "HYBRID_NAMESPACE": self.namespace,
            "HYBRID_TIME_PROFILE": "test",
            "GONKA_PUBLIC_API_URL": self.dapi.public_url,
            # Vast simulator boots (pull, start, MLNode download) take several wall seconds at boot_scale 0.2.
            "SCHEDULER_POLICY__PRIOR_STANDBY_BOOT": "600",
            "SCHEDULER_POLICY__MIN_LEAD": "600",
            "SCHEDULER_POLICY__PREPULL_LEAD": "1200",
        }
        env.update(extra)
        return env

    def start_scheduler(self, **extra: str) -> ManagedProcess:
        proc = ManagedProcess(["-m", "hybrid_scheduler"], env=self.env(**extra), name="scheduler")
        proc.start()
        self.schedulers.append(proc)
        return proc

    async def campaigns(self) -> dict[str, dict[str, Any]]:
        raw = await self.redis.hgetall(f"{self.namespace}:scheduler:epochs")
        return {(k.decode() if isinstance(k, bytes) else k): orjson.loads(v) for k, v in raw.items()}

    async def campaign(self, epoch: int) -> dict[str, Any] | None:
        return (await self.campaigns()).get(f"poc-e{epoch}")

    async def leader(self) -> str | None:
        v = await self.redis.get(f"{self.namespace}:lease:scheduler")
        return v.decode() if isinstance(v, bytes) else v

    async def report(self) -> dict[str, Any]:
        return await self.http.report()

    async def wait(self, cond: Callable[[], Any], timeout: float, what: str) -> Any:
        try:
            return await wait_for(cond, timeout, what)
        except AssertionError:
            print("events:", [e.type for e in self.events.items][-80:])
            for key, c in sorted((await self.campaigns()).items()):
                print("campaign", key, c["state"], c["notes"])
            raise
