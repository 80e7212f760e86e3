"""The simulated Vast.ai account and marketplace, without HTTP: offers, instances, keys, money, faults.

Every delay is a real-world duration scaled by the time profile (``profile.scale``) and by ``boot_scale``
(other tests' knob for fast boots). Instances are driven by one asyncio task each; any user action
cancels the current one and starts the next.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import random
import secrets
import time
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any, Final

import asyncssh

from hybrid_common import TimeProfile
from sim.vast.billing import BillingMeter
from sim.vast.catalogue import GPU_MODELS, Offer, build_catalogue
from sim.vast.faults import Fault, FaultBook
from sim.vast.instance import Instance, container_variables, published_ports
from sim.vast.query import QueryError, parse_filters, parse_order, row_matches, sort_rows
from sim.vast.replies import ApiError, invalid_args, no_such_ask, no_such_instance
from sim.vast.sshd import InstanceSshd
from sim.workloads import (
    ContainerNetwork,
    ContainerSpec,
    ImageSpec,
    RunningContainer,
    allocate_port,
    manifest_not_found,
    resolve_image,
)

RUNTYPES: Final = frozenset(
    {
        "ssh",
        "ssh_proxy",
        "ssh_direc ssh_proxy",
        "ssh_direct ssh_proxy",
        "jupyter_proxy ssh_proxy",
        "jupyter_direc ssh_direc ssh_proxy",
        "jupyter_direc ssh_direc",
        "jupyter",
        "args",
    }
)
# real-world seconds (min, max)
SCHEDULING: Final = (2.0, 10.0)
CREATED: Final = (1.0, 4.0)
CONTAINER_START: Final = (5.0, 20.0)
STOPPING: Final = (2.0, 6.0)
REBOOT: Final = (10.0, 30.0)
LOG_READY: Final = (1.0, 3.0)
OCI_ERROR: Final = (
    "Error response from daemon: failed to create task for container: failed to create shim task: "
    ": OCI runtime create failed: runc create failed: unable to start container process: error during "
    "container init: error running hook #0: error running hook: exit status 1, stdout: , stderr: "
    "Auto-detected mode as 'legacy' nvidia-container-cli: device error: 0: unknown device: unknown"
)


@dataclass
class VastSettings:
    api_key: str = "test"
    seed: int = 0
    profile: TimeProfile | None = None
    credit: float = 1000.0
    boot_scale: float = 1.0
    start_gpu_taken_probability: float = 0.0
    ssh_host: str = "localhost"
    catalogue_size: int = 320


@dataclass
class LogResult:
    text: str
    ready_at: float


@dataclass
class AccountKey:
    id: int
    public_key: str
    created_at: float

    def as_json(self) -> dict[str, Any]:
        return {"id": self.id, "public_key": self.public_key, "ssh_key": self.public_key, "created_at": self.created_at}


@dataclass
class VastWorld:
    settings: VastSettings
    profile: TimeProfile
    offers: dict[int, Offer] = field(default_factory=dict)
    instances: dict[int, Instance] = field(default_factory=dict)
    account_keys: list[AccountKey] = field(default_factory=list)
    faults: FaultBook = field(default_factory=FaultBook)
    log_results: dict[str, LogResult] = field(default_factory=dict)
    host_key: asyncssh.SSHKey | None = None
    _timers: set[asyncio.Task[None]] = field(default_factory=set)

    def __post_init__(self) -> None:
        self.rng = random.Random(self.settings.seed)
        self.offers = {o.id: o for o in build_catalogue(self.settings.seed, self.settings.catalogue_size)}
        self._instance_ids = itertools.count(24_400_000 + self.rng.randrange(0, 500_000), 1)
        self._key_ids = itertools.count(41_000)
        self.host_key = asyncssh.generate_private_key("ssh-ed25519")

    # ---- clock & delays

    @staticmethod
    def now() -> float:
        return time.time()

    def delay(self, real_range: tuple[float, float], rng: random.Random | None = None) -> float:
        """Wall seconds for a randomized real-world delay."""
        lo, hi = real_range
        real = (rng or self.rng).uniform(lo, hi)
        return self.profile.scale(real) * self.settings.boot_scale

    # ---- account

    def spent(self, now: float | None = None) -> float:
        at = self.now() if now is None else now
        total = 0.0
        for inst in self.instances.values():
            storage, gpu = inst.meter.cost(at, self.profile.acceleration)
            total += storage + gpu
        return total

    def user_json(self, api_key: str) -> dict[str, Any]:
        credit = round(self.settings.credit - self.spent(), 6)
        return {
            "id": 313_370,
            "username": "sim-user",
            "email": "sim-user@example.invalid",
            "fullname": "Simulated User",
            "credit": credit,
            "balance": 0.0,
            "balance_threshold": 0.0,
            "balance_threshold_enabled": False,
            "billed_verified": True,
            "can_pay": True,
            "has_billing": True,
            "host_agreement_accepted": False,
            "is_provider": False,
            "ssh_key": self.account_keys[-1].public_key if self.account_keys else None,
            "api_key": api_key,
            "sid": None,
            "user": "me",
            "rights": None,
        }

    def add_account_key(self, text: Any) -> AccountKey:
        _check_public_key(text)
        key = AccountKey(next(self._key_ids), str(text).strip(), self.now())
        self.account_keys.append(key)
        return key

    # ---- offers

    def search(self, body: dict[str, Any]) -> list[dict[str, Any]]:
        offer_type = str(body.get("type") or "on-demand")
        offer_type = {"ondemand": "on-demand", "interruptible": "bid"}.get(offer_type, offer_type)
        if offer_type not in {"on-demand", "bid", "reserved"}:
            raise invalid_args(f"invalid type {offer_type!r}: on-demand, bid or reserved")
        storage_raw = body.get("allocated_storage", 5.0)
        try:
            storage = float(storage_raw if storage_raw is not None else 5.0)
            limit = int(body["limit"]) if body.get("limit") is not None else 64
        except (TypeError, ValueError):
            raise invalid_args("allocated_storage and limit must be numbers") from None
        try:
            filters = parse_filters(body, reserved=("order", "type", "limit", "allocated_storage", "disable_bundling"))
            order = parse_order(body.get("order", [["score", "desc"]]))
        except QueryError as exc:
            raise invalid_args(str(exc)) from None
        rows = []
        for offer in self.offers.values():
            if self._machine_offline(offer.machine_id):
                continue
            row = offer.as_json(offer_type=offer_type, allocated_storage=storage)
            if row_matches(row, filters):
                rows.append(row)
        return sort_rows(rows, order)[: max(0, limit)]

    def gpu_names(self) -> list[str]:
        return sorted({o.gpu.name for o in self.offers.values()})

    def gpu_types(self) -> list[dict[str, Any]]:
        return [{"canonical_name": g.name, "gpu_ram_mb": g.vram_mb} for g in GPU_MODELS]

    def _machine_offline(self, machine_id: int) -> bool:
        return any(i.offline and i.offer.machine_id == machine_id for i in self.instances.values())

    # ---- create

    def create(self, offer_id: int, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        """``PUT /asks/{id}/`` → (HTTP status, reply). Raises ApiError for refusals."""
        request = _CreateRequest.parse(offer_id, body)
        offer = self.offers.get(offer_id)
        if offer is None:
            raise no_such_ask(offer_id)
        gone = self.faults.take("offer_gone", offer_id=offer_id, machine_id=offer.machine_id)
        if gone is not None:
            offer.rented_elsewhere = True
            offer.rentable = False
            raise no_such_ask(offer_id, gone=gone.status == 410)
        if not offer.available or self._machine_offline(offer.machine_id):
            raise no_such_ask(offer_id, gone=offer.holder is not None or offer.rented_elsewhere)
        if request.disk > offer.disk_space:
            raise invalid_args(
                f"disk {request.disk:g} GB exceeds the {offer.disk_space:g} GB this offer has", 3605, ask_id=offer_id
            )
        wanted_ports = len(published_ports(request.env))
        if wanted_ports > offer.direct_port_count:
            raise invalid_args(
                f"{wanted_ports} open ports requested but machine {offer.machine_id} has "
                f"{offer.direct_port_count} direct ports",
                3606,
                ask_id=offer_id,
            )
        if self.settings.credit - self.spent() <= 0:
            raise ApiError(402, "insufficient_credit", "error 402/3640: insufficient credit to rent", ask_id=offer_id)

        now = self.now()
        instance_id = next(self._instance_ids)
        gpu_dph = request.price if request.price is not None else offer.dph_base
        inst = Instance(
            id=instance_id,
            offer=offer,
            image=request.image,
            image_spec=resolve_image(request.image),
            env=request.env,
            runtype=request.runtype,
            args=request.args,
            onstart=request.onstart,
            label=request.label,
            disk=request.disk,
            bid_price=request.price,
            created_at=now,
            instance_api_key=secrets.token_hex(32),
            ssh_host=self.settings.ssh_host,
            ssh_port=_ssh_port(request.runtype),
            meter=BillingMeter(storage_dph=offer.storage_dph(request.disk), gpu_dph=gpu_dph, opened_at=now),
            authorized_keys=[k.public_key for k in self.account_keys],
        )
        self.instances[instance_id] = inst
        inst.record(now)
        context = {
            "offer_id": offer_id,
            "machine_id": offer.machine_id,
            "image": request.image,
            "label": request.label,
            "instance_id": instance_id,
        }

        leaves = self.faults.take("create_leaves_instance", **context)
        too_low = request.price is not None and request.price < offer.min_bid
        if leaves is not None or too_low:
            # vastai-api.md "Trap": success:false *with* new_contract — an instance that exists, stopped,
            # billing storage. Its GPU was never scheduled.
            msg = (
                f"error 400/3611: bid price {request.price} is below the minimum bid {offer.min_bid} for ask {offer_id}"
                if too_low and leaves is None
                else f"error 500/3690: failed to schedule instance on machine {offer.machine_id}; instance left stopped"
            )
            inst.intended_status = inst.cur_state = inst.next_state = "stopped"
            inst.actual_status = "stopped"
            inst.status_msg = msg.split(": ", 1)[1]
            inst.gpu_taken = True
            inst.record(now)
            inst.log(inst.status_msg)
            status = leaves.status if leaves is not None and leaves.status else 200
            reply = {
                "success": False,
                "error": "bid_too_low" if too_low and leaves is None else "scheduling_failed",
                "msg": msg,
                "new_contract": instance_id,
                "ask_id": offer_id,
            }
            return status, reply

        offer.holder = instance_id
        target = request.target_state or "running"
        if target == "stopped":
            inst.intended_status = inst.cur_state = inst.next_state = "stopped"
            inst.record(now)
        self._drive(inst, self._boot(inst, context, target))
        return 200, {"success": True, "new_contract": instance_id, "instance_api_key": inst.instance_api_key}

    # ---- instance lifecycle

    def _drive(self, inst: Instance, work: Coroutine[Any, Any, None]) -> None:
        previous = inst.task
        if previous is not None and not previous.done():
            previous.cancel()
        inst.task = asyncio.create_task(self._guarded(inst, work, previous), name=f"vast-instance-{inst.id}")

    async def _guarded(
        self, inst: Instance, work: Coroutine[Any, Any, None], previous: asyncio.Task[None] | None
    ) -> None:
        try:
            if previous is not None:
                # wait() does not raise the previous task's CancelledError; our own cancellation does.
                await asyncio.wait([previous])
        except asyncio.CancelledError:
            work.close()
            raise
        try:
            await work
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a simulator bug must show, not hang the instance silently
            inst.log(f"simulator error: {type(exc).__name__}: {exc}")
            self._set(inst, status_msg=f"simulator error: {exc}")

    def _set(self, inst: Instance, **changes: Any) -> None:
        for name, value in changes.items():
            setattr(inst, name, value)
        inst.record(self.now())

    async def _boot(self, inst: Instance, context: dict[str, Any], target: str) -> None:
        rng = random.Random(f"{self.settings.seed}:{inst.id}")
        await asyncio.sleep(self.delay(SCHEDULING, rng))
        self._set(inst, actual_status="created", status_msg=None)
        inst.log(f"Contract {inst.id} placed on machine {inst.offer.machine_id}")
        await asyncio.sleep(self.delay(CREATED, rng))
        spec = inst.image_spec
        failed = spec is None or self.faults.take("pull_failure", **context) is not None
        if failed:
            # vastai-api.md: image pull failure = actual_status "created", intended "running", manifest msg.
            message = manifest_not_found(inst.image)
            inst.log(message)
            self._set(inst, status_msg=message)
            return
        assert spec is not None
        stuck = self.faults.take("stuck_loading", **context) is not None
        await self._pull(inst, spec, rng, stuck)
        if target == "stopped":
            self._release_gpu(inst)
            self._set(
                inst,
                actual_status="stopped",
                status_msg="image pulled; instance created stopped (target_state=stopped)",
            )
            return
        self._set(inst, status_msg="starting container")
        await asyncio.sleep(self.delay(CONTAINER_START, rng))
        if self.faults.take("oci_failure", **context) is not None:
            inst.log(OCI_ERROR)
            self._set(inst, actual_status="created", status_msg=OCI_ERROR)
            return
        await self._bring_up(inst, fresh_network=True)

    async def _pull(self, inst: Instance, spec: ImageSpec, rng: random.Random, stuck: bool) -> None:
        self._set(inst, actual_status="loading", status_msg=f"{inst.image}: Pulling fs layer")
        inst.log(f"Pulling image {inst.image}")
        total = self.delay(spec.pull_seconds, rng)
        steps = 4
        for step in range(1, steps + 1):
            await asyncio.sleep(total / steps)
            if stuck and step == 2:
                inst.stuck = True
                self._set(inst, status_msg=f"{inst.image}: Downloading 41%")
                await asyncio.Event().wait()  # forever, until destroyed
            pct = int(100 * step / steps)
            self._set(inst, status_msg=f"{inst.image}: Downloading {pct}%" if step < steps else "Extracting")
        inst.image_pulled = True
        inst.log(f"Status: Downloaded newer image for {inst.image}")

    async def _bring_up(self, inst: Instance, *, fresh_network: bool) -> None:
        """Start the container (its services, its SSH server) and mark the instance running."""
        spec = inst.image_spec
        assert spec is not None
        rng = random.Random(f"{self.settings.seed}:{inst.id}:{len(inst.history)}")
        if fresh_network or inst.network is None:
            inst.network = ContainerNetwork()
            for container_port, _ in published_ports(inst.env):
                inst.network.host_port(container_port)
        container = RunningContainer(
            ContainerSpec(
                instance_id=inst.id,
                image=spec,
                runtype=inst.runtype,
                env=container_variables(inst.env),
                onstart=inst.onstart,
                gpu_name=inst.offer.gpu.name,
                gpu_count=inst.offer.num_gpus,
                vram_mb=inst.offer.gpu.vram_mb,
                profile=self.profile,
                service_delay=self.delay(spec.service_seconds, rng),
                seed=self.settings.seed + inst.id,
                model_download_delay=self.delay(spec.model_seconds, rng),
            ),
            inst.network,
            inst.log,
        )
        inst.container = container
        await container.start()
        if inst.gives_ssh:
            await self._start_sshd(inst)
        inst.running_since = self.now()
        inst.meter.gpu_on(self.now())
        suffix = "/jupyter" if "jupyter" in inst.runtype else ("/ssh" if inst.gives_ssh else "")
        self._set(
            inst,
            actual_status="running",
            cur_state="running",
            intended_status="running",
            next_state="running",
            status_msg=f"success, running {inst.image}{suffix}",
        )

    async def _start_sshd(self, inst: Instance) -> None:
        assert self.host_key is not None
        sshd = InstanceSshd(
            instance_id=inst.id,
            host_key=self.host_key,
            authorized_keys=lambda: inst.authorized_keys,
            network=lambda: inst.network,
            environment=inst.container_environment,
        )
        inst.sshd = sshd
        try:
            await sshd.start(inst.sshd_port)
        except OSError:
            inst.ssh_port = _ssh_port(inst.runtype)  # the pre-allocated port got taken meanwhile
            await sshd.start(inst.sshd_port)

    async def _bring_down(self, inst: Instance) -> None:
        container, inst.container = inst.container, None
        sshd, inst.sshd = inst.sshd, None
        if container is not None:
            await container.close()
        if sshd is not None:
            await sshd.close()
        inst.running_since = None

    def _release_gpu(self, inst: Instance) -> None:
        inst.meter.gpu_off(self.now())
        if inst.offer.holder == inst.id:
            inst.offer.holder = None

    async def _stop(self, inst: Instance, rng: random.Random) -> None:
        await self._bring_down(inst)
        self._release_gpu(inst)
        await asyncio.sleep(self.delay(STOPPING, rng))
        self._set(inst, actual_status="stopped", cur_state="stopped", status_msg="stopped by user request")
        inst.log("container stopped")

    async def _start(self, inst: Instance, rng: random.Random) -> None:
        spec = inst.image_spec
        if spec is None:
            return
        if not inst.image_pulled:
            await self._pull(inst, spec, rng, stuck=False)
        else:
            self._set(inst, actual_status="loading", status_msg="starting container")
            await asyncio.sleep(self.delay(CONTAINER_START, rng))
        await self._bring_up(inst, fresh_network=True)

    async def _reboot(self, inst: Instance, rng: random.Random) -> None:
        await self._bring_down(inst)
        self._set(inst, actual_status="rebooting", status_msg="rebooting")
        await asyncio.sleep(self.delay(REBOOT, rng))
        # A reboot keeps the GPU (vastai-api.md): billing never paused, same ports.
        await self._bring_up(inst, fresh_network=False)

    # ---- user actions

    def get(self, instance_id: int) -> Instance:
        inst = self.instances.get(instance_id)
        if inst is None or inst.destroyed:
            raise no_such_instance(instance_id)
        return inst

    def live(self) -> list[Instance]:
        return [i for i in self.instances.values() if not i.destroyed]

    async def destroy(self, instance_id: int) -> None:
        inst = self.get(instance_id)
        now = self.now()
        inst.destroyed_at = now
        task, inst.task = inst.task, None
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        await self._bring_down(inst)
        self._release_gpu(inst)
        inst.meter.close(now)
        inst.actual_status = inst.intended_status = inst.cur_state = inst.next_state = "destroyed"
        inst.status_msg = "destroyed"
        inst.record(now)
        inst.log("instance destroyed")

    def set_state(self, instance_id: int, state: str) -> dict[str, Any]:
        inst = self.get(instance_id)
        rng = random.Random(f"{self.settings.seed}:{inst.id}:{state}:{len(inst.history)}")
        if state == "stopped":
            if inst.intended_status == "stopped" and inst.actual_status in {"stopped", None, "created"}:
                return {"success": True}
            self._set(inst, intended_status="stopped", next_state="stopped")
            self._drive(inst, self._stop(inst, rng))
            return {"success": True}
        if state != "running":
            raise invalid_args(f"state must be running or stopped, not {state!r}", 3107)
        if inst.actual_status in {"running", "loading", "rebooting"} and inst.intended_status == "running":
            return {"success": True}
        if inst.offline or inst.image_spec is None or inst.actual_status in {None, "created"}:
            self._set(inst, intended_status="running", next_state="running")
            return {"success": True}
        offer = inst.offer
        taken = (
            inst.gpu_taken
            or offer.rented_elsewhere
            or (offer.holder not in (None, inst.id))
            or self.faults.take("gpu_taken", instance_id=inst.id, machine_id=offer.machine_id, label=inst.label)
            is not None
            or rng.random() < self.settings.start_gpu_taken_probability
        )
        if taken:
            # vastai-api.md: a stopped instance's GPU may be rented meanwhile; it then waits, stopped.
            inst.gpu_taken = True
            self._set(
                inst,
                intended_status="running",
                next_state="running",
                status_msg=(
                    f"scheduling: the GPU(s) on machine {offer.machine_id} were rented by another client while "
                    "this instance was stopped; waiting for them to become available"
                ),
            )
            return {"success": True}
        offer.holder = inst.id
        self._set(inst, intended_status="running", next_state="running")
        self._drive(inst, self._start(inst, rng))
        return {"success": True}

    def set_label(self, instance_id: int, label: str | None) -> None:
        inst = self.get(instance_id)
        if label is not None and (not isinstance(label, str) or len(label) > 256):
            raise invalid_args("label must be a string of at most 256 characters", 3104)
        inst.label = label

    def reboot(self, instance_id: int) -> dict[str, Any]:
        inst = self.get(instance_id)
        if inst.actual_status != "running":
            return {"success": False, "msg": f"Instance {instance_id} is not running"}
        rng = random.Random(f"{self.settings.seed}:{inst.id}:reboot:{len(inst.history)}")
        self._drive(inst, self._reboot(inst, rng))
        return {"success": True}

    def attach_key(self, instance_id: int, text: Any) -> dict[str, Any]:
        inst = self.get(instance_id)
        _check_public_key(text)
        key = str(text).strip()
        if key not in inst.authorized_keys:
            inst.authorized_keys.append(key)
        return {"success": True, "msg": "SSH key added to instance."}

    def request_logs(self, instance_id: int, tail: Any, grep: Any) -> str:
        inst = self.get(instance_id)
        lines = list(inst.logs)
        if grep:
            lines = [line for line in lines if str(grep) in line]
        if tail is not None:
            try:
                n = int(tail)
            except (TypeError, ValueError):
                raise invalid_args("tail must be a number", 3108) from None
            lines = lines[-n:] if n > 0 else []
        token = secrets.token_hex(16)
        self.log_results[token] = LogResult(
            "\n".join(lines) + ("\n" if lines else ""), self.now() + self.delay(LOG_READY)
        )
        return token

    # ---- listing

    def list_instances(
        self,
        select_filters: dict[str, Any],
        order_by: Any,
        limit: int,
        offset: int,
        select_cols: list[str] | None,
    ) -> dict[str, Any]:
        allowed = {"actual_status", "label", "gpu_name", "id", "verification", "machine_id", "intended_status"}
        try:
            filters = parse_filters(select_filters)
            order = parse_order(order_by) or [("id", False)]
        except QueryError as exc:
            raise invalid_args(str(exc), 3120) from None
        bad = sorted({f for f, _, _ in filters} - allowed)
        if bad:
            raise invalid_args(f"cannot filter instances on {bad}; filterable: {sorted(allowed)}", 3121)
        now = self.now()
        rows = [i.as_json(now) for i in self.live()]
        # Missing columns must still filter (e.g. label in [null]); every filterable column is present.
        rows = [r for r in rows if row_matches(r, filters)]
        rows = sort_rows(rows, order)
        page = rows[offset : offset + limit]
        label_counts: dict[str, int] = {}
        for row in rows:
            key = row["label"] or ""
            label_counts[key] = label_counts.get(key, 0) + 1
        if select_cols and "*" not in select_cols:
            page = [{c: r.get(c) for c in select_cols} for r in page]
        more = offset + limit < len(rows)
        return {
            "success": True,
            "instances_found": len(page),
            "total_instances": len(rows),
            "label_counts": label_counts,
            "next_offset": offset + limit if more else None,
            "instances": page,
        }

    def instance_filters(self) -> list[dict[str, Any]]:
        seen: dict[tuple[Any, ...], dict[str, Any]] = {}
        for inst in self.live():
            combo = {
                "actual_status": inst.actual_status,
                "verification": "verified" if inst.offer.verified else "unverified",
                "gpu_name": inst.offer.gpu.name,
            }
            seen[tuple(combo.values())] = combo
        return list(seen.values())

    # ---- faults that act on their own

    def arm(self, spec: dict[str, Any]) -> Fault:
        fault = self.faults.add(spec)
        if fault.kind == "host_offline":
            when = fault.at if fault.at is not None else self.now() + float(fault.after or 0.0)
            self._later(max(0.0, when - self.now()), self._host_offline(fault))
        elif fault.kind == "outbid":
            self._later(0.0, self._outbid(fault))
        return fault

    def _later(self, seconds: float, work: Coroutine[Any, Any, None]) -> None:
        async def run() -> None:
            try:
                await asyncio.sleep(seconds)
            except asyncio.CancelledError:
                work.close()
                raise
            await work

        task = asyncio.create_task(run())
        self._timers.add(task)
        task.add_done_callback(self._timers.discard)

    def _targets(self, fault: Fault) -> list[Instance]:
        return [
            i
            for i in self.live()
            if (fault.instance_id is None or i.id == fault.instance_id)
            and (fault.machine_id is None or i.offer.machine_id == fault.machine_id)
        ]

    async def _host_offline(self, fault: Fault) -> None:
        for inst in self._targets(fault):
            fault.fired += 1
            task, inst.task = inst.task, None
            if task is not None and not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
            await self._bring_down(inst)
            inst.meter.gpu_off(self.now())
            inst.offline = True
            inst.log("host went offline: no heartbeat from machine")
            self._set(inst, actual_status="offline", status_msg="host offline: no heartbeat from the machine")

    async def _outbid(self, fault: Fault) -> None:
        for inst in self._targets(fault):
            fault.fired += 1
            task, inst.task = inst.task, None
            if task is not None and not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
            await self._bring_down(inst)
            self._release_gpu(inst)
            inst.gpu_taken = True
            # vastai-api.md: outbid spot = cur_state == intended_status == next_state == "stopped".
            self._set(
                inst,
                actual_status="stopped",
                intended_status="stopped",
                cur_state="stopped",
                next_state="stopped",
                status_msg="instance outbid: a higher bid took the GPU",
            )

    # ---- ledger & shutdown

    def ledger(self) -> dict[str, Any]:
        now = self.now()
        acc = self.profile.acceleration
        rows: list[dict[str, Any]] = []
        spent = 0.0
        for inst in self.instances.values():
            storage_cost, gpu_cost = inst.meter.cost(now, acc)
            spent += storage_cost + gpu_cost
            rows.append(
                {
                    "id": inst.id,
                    "label": inst.label,
                    "offer_id": inst.offer.id,
                    "machine_id": inst.offer.machine_id,
                    "gpu_name": inst.offer.gpu.name,
                    "num_gpus": inst.offer.num_gpus,
                    "image": inst.image,
                    "runtype": inst.runtype,
                    "disk": inst.disk,  # GB allocated: what storage_dph bills
                    "is_bid": inst.bid_price is not None,
                    "created_at": inst.created_at,
                    "destroyed_at": inst.destroyed_at,
                    "destroyed": inst.destroyed,
                    "actual_status": inst.actual_status,
                    "intended_status": inst.intended_status,
                    "gpu_dph": inst.meter.gpu_dph,
                    "storage_dph": round(inst.meter.storage_dph, 6),
                    "wall_storage_seconds": round(inst.meter.storage_wall(now), 3),
                    "wall_gpu_seconds": round(inst.meter.gpu_wall(now), 3),
                    "billed_storage_seconds": round(inst.meter.storage_wall(now) * acc, 3),
                    "billed_gpu_seconds": round(inst.meter.gpu_wall(now) * acc, 3),
                    "cost_storage": round(storage_cost, 6),
                    "cost_gpu": round(gpu_cost, 6),
                    "cost": round(storage_cost + gpu_cost, 6),
                    "history": [h.as_json() for h in inst.history],
                    "container": _container_view(inst),
                }
            )
        return {
            "acceleration": acc,
            "credit_start": self.settings.credit,
            "spent": round(spent, 6),
            "instances_total": len(rows),
            "instances_live": sum(1 for r in rows if not r["destroyed"]),
            "instances": rows,
        }

    async def close(self) -> None:
        for timer in list(self._timers):
            timer.cancel()
        for inst in self.instances.values():
            task, inst.task = inst.task, None
            if task is not None and not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
            await self._bring_down(inst)
        if self._timers:
            await asyncio.gather(*self._timers, return_exceptions=True)


def _container_view(inst: Instance) -> dict[str, Any]:
    container = inst.container
    return {
        "ports": {str(k): v for k, v in (inst.network.as_dict() if inst.network else {}).items()},
        "ssh_listening": inst.sshd is not None,
        "service_state": container.service_state if container is not None else None,
        "service_implementation": container.implementation if container is not None else None,
    }


def _ssh_port(runtype: str) -> int:
    """The ``ssh_port`` to show, chosen so the SSH server's own port is free (see Instance.sshd_port)."""
    free = allocate_port()
    return free - 1 if "jupyter" in runtype else free


def _check_public_key(text: Any) -> None:
    if not isinstance(text, str) or not text.strip():
        raise invalid_args("ssh_key is required", 3130)
    try:
        asyncssh.import_public_key(text.strip())
    except (asyncssh.KeyImportError, ValueError):
        raise invalid_args("ssh_key is not a valid OpenSSH public key", 3131) from None


@dataclass
class _CreateRequest:
    image: str
    env: dict[str, str]
    price: float | None
    disk: float
    label: str | None
    onstart: str | None
    runtype: str
    args: list[str] | None
    target_state: str | None

    @classmethod
    def parse(cls, offer_id: int, body: dict[str, Any]) -> _CreateRequest:
        """Validate a create payload as the API does (vastai-api.md "Create": limits and types)."""

        def bad(detail: str, code: int = 3101) -> ApiError:
            return invalid_args(detail, code, ask_id=offer_id)

        image = body.get("image")
        if not isinstance(image, str) or not image.strip():
            raise bad("image is required")
        if len(image) > 1024:
            raise bad("image must be at most 1024 characters", 3102)
        env = body.get("env")
        if env is None:
            env = {}
        if isinstance(env, str):
            # The official clients turn "-e K=V -p 8000:8000" into a dict; the API only takes the dict.
            raise bad("env must be a dict of docker options and variables, not a string", 3103)
        if not isinstance(env, dict):
            raise bad("env must be a dict", 3103)
        clean_env: dict[str, str] = {}
        for key, value in env.items():
            if not isinstance(key, str) or isinstance(value, (dict, list)):
                raise bad(f"invalid env entry {key!r}", 3103)
            text = "" if value is None else str(value)
            if len(key) > 256 or len(text) > 256:
                raise bad(f"env entry {key[:40]!r} is longer than 256 characters", 3103)
            if key.startswith("-p") and not published_ports({key: text}):
                raise bad(f"invalid port option {key!r}", 3103)
            clean_env[key] = text
        label = body.get("label")
        if label is not None and (not isinstance(label, str) or len(label) > 256):
            raise bad("label must be a string of at most 256 characters", 3104)
        onstart = body.get("onstart")
        if onstart is not None and not isinstance(onstart, str):
            raise bad("onstart must be a string", 3105)
        args = body.get("args")
        if args is not None:
            if isinstance(args, str):
                args = [args]
            if not isinstance(args, list) or not all(isinstance(a, str) for a in args):
                raise bad("args must be a list of strings", 3105)
        args_str = body.get("args_str")
        if args is None and isinstance(args_str, str) and args_str:
            args = args_str.split()
        if len(" ".join(args or [])) + len(onstart or "") > 4096:
            raise bad("args + onstart must be at most 4096 characters", 3105)
        runtype = body.get("runtype") or ("args" if args else "ssh")
        if not isinstance(runtype, str) or " ".join(runtype.split()) not in RUNTYPES:
            raise bad(f"invalid runtype {runtype!r}", 3106)
        runtype = " ".join(runtype.split())
        try:
            raw_disk = body.get("disk")
            disk = float(raw_disk if raw_disk is not None else 10)
        except (TypeError, ValueError):
            raise bad("disk must be a number") from None
        if disk < 8:
            raise bad("disk must be at least 8 GB", 3107)
        price = body.get("price")
        if price is not None:
            if isinstance(price, bool) or not isinstance(price, (int, float)) or price <= 0:
                raise bad("price must be a positive number or null", 3108)
            price = float(price)
        target_state = body.get("target_state")
        if target_state not in (None, "running", "stopped"):
            raise bad("target_state must be running or stopped", 3109)
        return cls(
            image=image.strip(),
            env=clean_env,
            price=price,
            disk=disk,
            label=label,
            onstart=onstart,
            runtype=runtype,
            args=args,
            target_state=target_state,
        )
