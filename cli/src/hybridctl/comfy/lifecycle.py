"""Renting and releasing a ComfyUI instance through the provisioner (the one owner of Vast.ai).

``create`` publishes a ``provision`` of the ``comfyui`` profile (or the config's ``profile``) for a slot of its own (no
dapi registration) and follows the provisioner's events on a private, auto-deleted queue until ``instance.ready`` (or a
final failure); ``instance.reachable`` carries the SSH details the local tunnel needs. ``release`` publishes a
``release`` of the slot and waits for the provisioner's ``job.completed`` (every instance of the slot destroyed), or
for the slot record to say its job has ended already.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from hybrid_common.messages import parse
from hybrid_common.messages.commands import Provision, Release
from hybrid_common.messages.domain import OfferFilter, Purpose
from hybrid_common.messages.events import (
    InstanceFailed,
    InstanceReachable,
    InstanceReady,
    JobCompleted,
    JobFailed,
)
from hybrid_common.settings import CommonSettings
from hybrid_common.topology import Topology

# hybrid_common.bus (aio-pika, redis) is imported where used: every hybridctl invocation imports this module, and most
# never touch the broker (see hybridctl.broker).


class ComfyCreateError(RuntimeError):
    pass


@dataclass
class ComfyConfig:
    offer_filter: OfferFilter
    image: str | None
    env: dict[str, str]
    ssh_key: str | None
    profile: str = "comfyui"
    disk_gb: float | None = None

    @classmethod
    def load(cls, path: Path) -> ComfyConfig:
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except FileNotFoundError:
            raise ComfyCreateError(f"config file {str(path)!r} does not exist") from None
        except yaml.YAMLError as exc:
            raise ComfyCreateError(f"config file {str(path)!r} is not YAML/JSON: {exc}") from None
        if not isinstance(raw, dict):
            raise ComfyCreateError(f"config file {str(path)!r} must be a mapping")
        known = {
            "gpu_names",
            "min_vram_gb",
            "max_dph",
            "min_gpus",
            "min_reliability",
            "image",
            "env",
            "ssh_key",
            "disk_gb",
            "profile",
        }
        unknown = set(raw) - known
        if unknown:
            raise ComfyCreateError(f"config {str(path)!r}: unknown key(s) {sorted(unknown)}; known: {sorted(known)}")
        try:
            offer = OfferFilter(
                **{
                    k: raw[k]
                    for k in ("gpu_names", "min_vram_gb", "max_dph", "min_gpus", "min_reliability")
                    if k in raw
                }
            )
        except ValueError as exc:
            raise ComfyCreateError(f"config {str(path)!r}: {exc}") from None
        env = {str(k): str(v) for k, v in (raw.get("env") or {}).items()}
        profile = str(raw.get("profile") or "comfyui")
        disk = raw.get("disk_gb")
        if disk is not None and (isinstance(disk, bool) or not isinstance(disk, int | float) or disk < 8):
            raise ComfyCreateError(f"config {str(path)!r}: disk_gb={disk!r} must be a number of GB, at least 8")
        return cls(offer, raw.get("image"), env, raw.get("ssh_key"), profile, float(disk) if disk is not None else None)


@dataclass
class Rental:
    """What the command knows of its slot's rental, so that a failure or Ctrl-C releases exactly what is needed."""

    slot_id: str
    requested: bool = False  # the provision went out: the provisioner may be renting for the slot
    ended: bool = False  # the provisioner reported the job failed: it destroyed what it had, nothing to release

    @property
    def needs_release(self) -> bool:
        return self.requested and not self.ended


@dataclass
class CreatedInstance:
    slot_id: str
    instance_id: int
    ssh_host: str
    ssh_port: int
    gpu_name: str
    seconds: float


async def create(
    settings: CommonSettings,
    config: ComfyConfig,
    rental: Rental,
    *,
    timeout: float,
    on_event: Callable[[str], None] | None = None,
) -> CreatedInstance:
    from hybrid_common.bus import Publisher, connect

    slot_id = rental.slot_id
    topology = Topology(settings.namespace)
    conn = await connect(settings.amqp_url, name="hybridctl-comfy", timeout=10)
    started = time.monotonic()
    try:
        channel = await conn.channel()
        await topology.declare_exchanges(channel)
        queue = await channel.declare_queue(exclusive=True, auto_delete=True)
        for key in ("instance.*", "job.*"):
            await queue.bind(topology.events, routing_key=key)
        events: asyncio.Queue[Any] = asyncio.Queue()

        async def on_message(message: Any) -> None:
            async with message.process():
                try:
                    env = parse(message.body)
                except ValueError:
                    return
                if getattr(env.payload, "slot_id", None) == slot_id:
                    await events.put(env.payload)

        await queue.consume(on_message)
        publisher = Publisher(conn, topology, "hybridctl", deadline=10)
        provision = Provision(
            idempotency_key=f"comfy-{slot_id}-{uuid.uuid4().hex[:8]}",
            profile=config.profile,
            slot_ids=[slot_id],
            purpose=Purpose.COMFYUI,
            register_node=False,
            hedge=False,
            offer_filter=config.offer_filter,
            image=config.image,
            disk_gb=config.disk_gb,
            env=config.env,
        )
        rental.requested = True  # before the publish: a Ctrl-C during it may still have reached the broker
        await publisher.publish(provision)
        reachable: InstanceReachable | None = None
        deadline = started + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise ComfyCreateError(f"ComfyUI on slot {slot_id} not ready after {timeout:.0f} s")
            try:
                ev = await asyncio.wait_for(events.get(), remaining)
            except TimeoutError:
                continue
            if on_event:
                on_event(type(ev).TYPE)
            if isinstance(ev, InstanceReachable):
                reachable = ev
            elif isinstance(ev, InstanceReady):
                if reachable is None or not reachable.ssh_host or not reachable.ssh_port:
                    raise ComfyCreateError(
                        f"SSH unavailable on instance {ev.instance_id}: it offers no SSH — an 'args' runtype keeps the "
                        "image's entrypoint without an SSH daemon, so no tunnel is possible; the comfyui profile needs "
                        "an ssh runtype"
                    )
                return CreatedInstance(
                    slot_id,
                    ev.instance_id,
                    reachable.ssh_host,
                    reachable.ssh_port,
                    ev.gpu_name,
                    time.monotonic() - started,
                )
            elif isinstance(ev, JobFailed):
                rental.ended = True
                raise ComfyCreateError(f"renting ComfyUI for {slot_id} failed: {ev.cause.value}: {ev.message}")
            elif isinstance(ev, InstanceFailed) and not ev.will_retry:
                raise ComfyCreateError(f"renting ComfyUI for {slot_id} failed: {ev.cause.value}: {ev.message}")
    finally:
        await conn.close()


async def release(settings: CommonSettings, slot_id: str, *, confirm_within: float = 60.0) -> bool:
    """Release the slot; True once the provisioner reports its job over (its instances destroyed) in time."""
    from hybrid_common.bus import Publisher, connect

    topology = Topology(settings.namespace)
    conn = await connect(settings.amqp_url, name="hybridctl-comfy", timeout=10)
    try:
        channel = await conn.channel()
        await topology.declare_exchanges(channel)
        queue = await channel.declare_queue(exclusive=True, auto_delete=True)
        for key in ("job.completed", "job.failed"):
            await queue.bind(topology.events, routing_key=key)
        over = asyncio.Event()

        async def on_message(message: Any) -> None:
            async with message.process():
                try:
                    payload = parse(message.body).payload
                except ValueError:
                    return
                if isinstance(payload, JobCompleted | JobFailed) and payload.slot_id == slot_id:
                    over.set()

        await queue.consume(on_message)
        await Publisher(conn, topology, "hybridctl", deadline=10).publish(
            Release(
                idempotency_key=f"comfy-release-{slot_id}-{uuid.uuid4().hex[:8]}",
                slot_ids=[slot_id],
                how="delete",
                reason="comfy destroy",
            )
        )
        # The provisioner may have ended the job already (the instance failed, or an earlier release): then no event
        # comes, but the slot record says so — no job on it, its state "released" or "failed", which the provisioner
        # writes only after destroying the slot's instances.
        watcher = asyncio.create_task(_slot_ended(settings, slot_id, over))
        try:
            await asyncio.wait_for(over.wait(), confirm_within)
        except TimeoutError:
            return False
        finally:
            watcher.cancel()
        return True
    finally:
        await conn.close()


async def _slot_ended(settings: CommonSettings, slot_id: str, over: asyncio.Event) -> None:
    from redis.asyncio import Redis
    from redis.exceptions import RedisError

    from hybrid_common.redis_keys import RedisKeys

    key = RedisKeys(settings.namespace).slot(slot_id)
    redis = Redis.from_url(settings.redis_url, socket_timeout=5)
    try:
        while not over.is_set():
            try:
                record = await redis.hgetall(key)
            except RedisError:
                record = {}  # Redis away: the event may still come
            if record.get(b"state") in (b"released", b"failed") and b"job" not in record:
                over.set()
                return
            await asyncio.sleep(1.0)
    finally:
        await redis.aclose()
