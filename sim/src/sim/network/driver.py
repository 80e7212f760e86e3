"""How the dapi drives its ML nodes (gonka-protocol.md §3, §7, §8, §10).

Each node has one *desired* state, a pure function of the chain (height, epoch, confirmation event)
and the node's admin state; a per-node worker brings the node there, one command sequence at a time
(the node's lock — ``DELETE`` waits on it, as the real admin API blocks on the in-flight command).

PoC v1: start = ``state`` → ``stop`` → ``pow/init/generate``; at generation end ``pow/init/validate``;
at validation start other participants' batches go to ``pow/validate``; at validation end ``stop`` →
``inference/up`` (``dtype: float16``). Only connection errors fail a node; status codes are ignored.
PoC v2: start = ``inference/pow/init/generate`` on the model the node already serves (≥ 400 marks it
FAILED); validation = ``inference/pow/generate`` with ``validation.artifacts``; back to inference with
``inference/pow/stop`` (and ``stop`` → ``inference/up`` with ``dtype: auto`` only if it is not serving).

A status poll (every 60 s, scaled) reads ``/api/v1/state``, ``/api/v1/inference/pow/status``, and for a
node in INFERENCE ``{inference}/health`` and ``{inference}/v1/models`` (which must list the node's
model): a non-answer, a non-200 or a wrong model is FAILED. After an upsert the node is not re-polled
before the next tick, so traffic can reach a new host that is not serving yet (§3).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

from hybrid_common import TimeProfile
from sim.mlnode.proofs import v1_dist, v1_nonce, v2_vector_b64
from sim.network.chain import Chain
from sim.network.epochs import CPOC_INACTIVE, INFERENCE, EpochContext, should_be_operational
from sim.network.node_client import CallResult, NodeClient
from sim.network.nodes import (
    FAILED,
    GENERATING,
    IDLE,
    POC,
    STOPPED,
    TRAINING,
    VALIDATING,
    ManagedNode,
    NodeRegistry,
)
from sim.network.nodes import INFERENCE as NODE_INFERENCE
from sim.network.params import V1_POW_PARAMS, NetworkParams

log = logging.getLogger(__name__)

GEN, VAL_INIT, VAL_RUN = "POC_GEN", "POC_VAL_INIT", "POC_VAL_RUN"
PEER_BATCH_NONCES = 24
MAX_HISTORY = 300
V2_STAT_TEST = {"dist_threshold": 0.4, "p_mismatch": 0.1, "fraud_threshold": 0.05}


@dataclass(frozen=True)
class Desired:
    key: tuple[Any, ...]
    status: str
    poc_status: str
    stage: str = ""  # GEN | VAL_INIT | VAL_RUN for PoC, "" otherwise
    stage_height: int = 0
    block_hash: str = ""
    confirmation: bool = False
    generation: str = "v1"


def v2_callback_url(params: NetworkParams) -> str:
    base = params.callback_base.rstrip("/") + "/v2/poc-batches"
    if params.v2_callback_model_path:
        # v0.2.12+: the model id escaped twice, so '/' survives one decoding by the router (§7).
        base += "/" + quote(quote(params.poc_model, safe=""), safe="")
    return base


def v1_callback_url(params: NetworkParams) -> str:
    return params.callback_base.rstrip("/") + "/v1/poc-batches"


class NodeDriver:
    def __init__(
        self,
        *,
        chain: Chain,
        registry: NodeRegistry,
        params: NetworkParams,
        profile: TimeProfile,
        client: NodeClient,
        now: Callable[[], float] = time.monotonic,
    ) -> None:
        self.chain = chain
        self.registry = registry
        self.params = params
        self.profile = profile
        self.client = client
        self._now = now
        self._tasks: set[asyncio.Task[None]] = set()
        self._poll_task: asyncio.Task[None] | None = None
        self.pending_validations: dict[str, str] = {}  # v2 request_id -> validator node id

    # --- desired state ---------------------------------------------------------------------

    @property
    def poll_interval(self) -> float:
        return max(0.05, self.profile.scale(self.params.status_poll_seconds))

    def desired(self, node: ManagedNode) -> Desired:
        chain, params = self.chain, self.params
        gen = chain.generation()
        ctx: EpochContext = chain.context()
        h = chain.height
        phase = ctx.phase(h)
        s = node.status
        if not should_be_operational(s.admin_enabled, s.admin_epoch, ctx.index, phase):
            if not s.admin_enabled:
                return Desired(("STOPPED",), STOPPED, IDLE, generation=gen)
            # Registered after this PoC started: kept serving inference for this PoC (§3).
            return Desired(("INFERENCE",), NODE_INFERENCE, IDLE, generation=gen)
        event = chain.active_event
        if event is not None and phase == INFERENCE and event.phase != CPOC_INACTIVE:
            p = params.epoch
            t = event.trigger_height
            stage = ""
            if event.generation_start_height <= h < event.exchange_end(p):
                stage = GEN
            elif event.exchange_end(p) <= h < event.validation_start(p):
                stage = VAL_INIT
            elif event.validation_start(p) <= h <= event.validation_end(p):
                stage = VAL_RUN
            if stage:
                return Desired(
                    (stage, t, gen, "cpoc"),
                    POC,
                    GENERATING if stage == GEN else VALIDATING,
                    stage=stage,
                    stage_height=t,
                    block_hash=event.poc_seed_block_hash,
                    confirmation=True,
                    generation=gen,
                )
        if ctx.index > 0:
            p0 = ctx.start_of_poc()
            stage = ""
            if p0 <= h < ctx.end_of_generation():
                stage = GEN
            elif ctx.end_of_generation() <= h < ctx.validation_start():
                stage = VAL_INIT
            elif ctx.validation_start() <= h < ctx.validation_end():
                stage = VAL_RUN
            if stage:
                return Desired(
                    (stage, p0, gen),
                    POC,
                    GENERATING if stage == GEN else VALIDATING,
                    stage=stage,
                    stage_height=p0,
                    block_hash=chain.block_hash(p0),
                    generation=gen,
                )
        return Desired(("INFERENCE",), NODE_INFERENCE, IDLE, generation=gen)

    # --- status bookkeeping ----------------------------------------------------------------

    def set_current(self, node: ManagedNode, status: str, poc_status: str, reason: str = "") -> None:
        s = node.status
        changed = (s.current_status, s.poc_current_status) != (status, poc_status) or (
            status == FAILED and s.failure_reason != reason
        )
        s.current_status, s.poc_current_status = status, poc_status
        s.failure_reason = reason if status == FAILED else ""
        if changed:
            s.status_timestamp = dt.datetime.now(dt.UTC)
            rec = self.chain.latest.node(node)
            rec.status_history.append(
                {"height": self.chain.height, "status": status, "poc_status": poc_status, "reason": reason}
            )
            if len(rec.status_history) > MAX_HISTORY:  # a flapping node must not grow the report forever
                del rec.status_history[1 : len(rec.status_history) - MAX_HISTORY + 1]

    def fail(self, node: ManagedNode, reason: str) -> None:
        log.info("node %s FAILED: %s", node.config.id, reason)
        self.set_current(node, FAILED, IDLE, reason)
        node.applied_key = None

    # --- scheduling ------------------------------------------------------------------------

    def start(self) -> None:
        if self._poll_task is None:
            self._poll_task = asyncio.create_task(self._poll_loop(), name="dapi-status-poll")

    def on_block(self) -> None:
        """Called once per processed height: start a reconcile wherever the desired state moved."""
        for node in list(self.registry.nodes.values()):
            self.kick(node)

    def kick(self, node: ManagedNode) -> None:
        if node.busy or node.removed or self._now() < node.retry_after:
            return
        if self.desired(node).key == node.applied_key:
            return
        node.busy = True
        self._spawn(self._reconcile(node), f"reconcile:{node.config.id}")

    def _spawn(self, coro: Any, name: str) -> None:
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _reconcile(self, node: ManagedNode) -> None:
        try:
            async with node.lock:
                for _ in range(4):  # the chain may move on while a sequence runs
                    d = self.desired(node)
                    if node.removed or d.key == node.applied_key:
                        break
                    node.status.intended_status = d.status
                    node.status.poc_intended_status = d.poc_status
                    ok = await self._transition(node, d)
                    if not ok:
                        # A node that did not answer is retried on the next poll tick, not every block.
                        node.applied_key = None
                        node.retry_after = self._now() + self.poll_interval
                        break
                    node.applied_key = d.key
        except Exception:  # a bug here must not kill the simulator; it shows as a FAILED node
            log.exception("reconcile of %s crashed", node.config.id)
            self.fail(node, "internal simulator error during reconcile")
        finally:
            node.busy = False

    # --- command sequences -----------------------------------------------------------------

    async def _cmd(self, node: ManagedNode, method: str, path: str, body: Any = None) -> CallResult:
        return await self.client.call(method, self.client.poc_url(node.config, path), json=body, command=True)

    async def _transition(self, node: ManagedNode, d: Desired) -> bool:
        previous = node.applied_key
        if d.status == STOPPED:
            r = await self._cmd(node, "POST", "/api/v1/stop")
            if not r.answered:
                self.fail(node, f"stop failed: {r.describe()}")
                return False
            self.set_current(node, STOPPED, IDLE)
            return True
        if d.status == NODE_INFERENCE:
            return await (self._inference_v2(node) if d.generation == "v2" else self._inference_v1(node))
        if d.generation == "v2":
            return await self._poc_v2(node, d, previous)
        return await self._poc_v1(node, d, previous)

    async def _inference_v1(self, node: ManagedNode) -> bool:
        r = await self._cmd(node, "POST", "/api/v1/stop")
        if not r.answered:
            self.fail(node, f"stop failed: {r.describe()}")
            return False
        body = {"model": node.config.model, "dtype": "float16", "additional_args": node.config.model_args()}
        r = await self._cmd(node, "POST", "/api/v1/inference/up", body)
        if not r.answered:
            self.fail(node, f"inference/up failed: {r.describe()}")
            return False
        self.set_current(node, NODE_INFERENCE, IDLE)
        return True

    async def _inference_v2(self, node: ManagedNode) -> bool:
        await self._cmd(node, "POST", "/api/v1/inference/pow/stop", {})
        st = await self.client.call("GET", self.client.poc_url(node.config, "/api/v1/state"))
        if not st.answered:
            self.fail(node, f"state check failed: {st.describe()}")
            return False
        body = st.body if isinstance(st.body, dict) else {}
        serving = (
            st.ok
            and body.get("state") == "INFERENCE"
            and body.get("inference_healthy") is not False
            and body.get("loaded_model") in (None, node.config.model)
        )
        if not serving:
            r = await self._cmd(node, "POST", "/api/v1/stop")
            if not r.answered:
                self.fail(node, f"stop failed: {r.describe()}")
                return False
            up = {"model": node.config.model, "dtype": "auto", "additional_args": node.config.model_args()}
            r = await self._cmd(node, "POST", "/api/v1/inference/up", up)
            if not r.answered:
                self.fail(node, f"inference/up failed: {r.describe()}")
                return False
        self.set_current(node, NODE_INFERENCE, IDLE)
        return True

    def _v1_init_body(self, node: ManagedNode, d: Desired) -> dict[str, Any]:
        p = self.params
        return {
            "node_id": node.node_num,
            "node_count": len(self.registry.nodes),
            "block_hash": d.block_hash,
            "block_height": d.stage_height,
            "public_key": p.participant_public_key,
            "batch_size": p.v1_batch_size,
            "r_target": p.r_target,
            "fraud_threshold": p.fraud_threshold,
            "params": dict(V1_POW_PARAMS),
            "url": v1_callback_url(p),
        }

    def _v2_params(self) -> dict[str, Any]:
        return {"model": self.params.poc_model, "seq_len": self.params.poc_seq_len, "k_dim": 12}

    def _mark_commanded(self, node: ManagedNode, d: Desired) -> None:
        if not d.confirmation:
            self.chain.latest.node(node).poc_commanded = True

    async def _poc_v1(self, node: ManagedNode, d: Desired, previous: tuple[Any, ...] | None) -> bool:
        body = self._v1_init_body(node, d)
        same_round = previous is not None and len(previous) > 1 and previous[1] == d.stage_height
        if d.stage == GEN:
            for method, path, payload in (
                ("GET", "/api/v1/state", None),
                ("POST", "/api/v1/stop", None),
                ("POST", "/api/v1/pow/init/generate", body),
            ):
                r = await self._cmd(node, method, path, payload)
                if not r.answered:
                    self.fail(node, f"{path} failed: {r.describe()}")
                    return False
            self._mark_commanded(node, d)
            self.set_current(node, POC, GENERATING)
            return True
        after_init = same_round and previous is not None and previous[0] == VAL_INIT
        if d.stage == VAL_INIT or not after_init:
            if not same_round:  # joined late (or re-driven after a failure): leave whatever it was doing
                r = await self._cmd(node, "POST", "/api/v1/stop")
                if not r.answered:
                    self.fail(node, f"stop failed: {r.describe()}")
                    return False
            r = await self._cmd(node, "POST", "/api/v1/pow/init/validate", body)
            if not r.answered:
                self.fail(node, f"pow/init/validate failed: {r.describe()}")
                return False
            self.set_current(node, POC, VALIDATING)
        if d.stage == VAL_RUN:
            for batch in self._peer_batches_v1(node, d):
                r = await self._cmd(node, "POST", "/api/v1/pow/validate", batch)
                if not r.answered:
                    self.fail(node, f"pow/validate failed: {r.describe()}")
                    return False
            self.set_current(node, POC, VALIDATING)
        return True

    async def _poc_v2(self, node: ManagedNode, d: Desired, previous: tuple[Any, ...] | None) -> bool:
        p = self.params
        if d.stage == GEN:
            body = {
                "block_hash": d.block_hash,
                "block_height": d.stage_height,
                "public_key": p.participant_public_key,
                "node_id": node.node_num,
                "node_count": len(self.registry.nodes),
                "batch_size": p.v2_batch_size,
                "params": self._v2_params(),
                "url": v2_callback_url(p),
                "poc_stronger_rng": True,
            }
            r = await self._cmd(node, "POST", "/api/v1/inference/pow/init/generate", body)
            if not r.answered:
                self.fail(node, f"inference/pow/init/generate failed: {r.describe()}")
                return False
            if r.status >= 400:
                # The one status code the dapi does not ignore (gonka-protocol.md §10).
                self.fail(node, f"inference/pow/init/generate answered HTTP {r.status}: {str(r.body)[:200]}")
                return False
            self._mark_commanded(node, d)
            self.set_current(node, POC, GENERATING)
            return True
        if d.stage == VAL_INIT:
            r = await self._cmd(node, "POST", "/api/v1/inference/pow/stop", {})
            if not r.answered:
                self.fail(node, f"inference/pow/stop failed: {r.describe()}")
                return False
            self.set_current(node, POC, VALIDATING)
            return True
        body = self._peer_request_v2(node, d)
        r = await self._cmd(node, "POST", "/api/v1/inference/pow/generate", body)
        if not r.answered:
            self.fail(node, f"inference/pow/generate failed: {r.describe()}")
            return False
        if isinstance(r.body, dict) and isinstance(r.body.get("request_id"), str):
            self.pending_validations[r.body["request_id"]] = node.config.id
            if len(self.pending_validations) > 10_000:
                del self.pending_validations[next(iter(self.pending_validations))]
        self.set_current(node, POC, VALIDATING)
        return True

    # --- other participants' work to validate ----------------------------------------------

    def _peer_key(self, node: ManagedNode, d: Desired) -> str:
        key = f"peer{node.node_num:04d}" + self.chain.block_hash(d.stage_height)[:56].lower()
        rec = self.chain.record_for_stage(d.stage_height) or self.chain.latest
        rec.validator_keys[key] = node.config.id
        return key

    def _peer_batches_v1(self, node: ManagedNode, d: Desired) -> list[dict[str, Any]]:
        key = self._peer_key(node, d)
        nonces: list[int] = []
        dists: list[float] = []
        i = 0
        while len(nonces) < PEER_BATCH_NONCES:
            n = v1_nonce(0, 1, i)
            dist = v1_dist(d.block_hash, key, n)
            if dist < self.params.r_target:
                nonces.append(n)
                dists.append(dist)
            i += 1
        return [
            {
                "public_key": key,
                "block_hash": d.block_hash,
                "block_height": d.stage_height,
                "nonces": nonces,
                "dist": dists,
                "node_id": 1,
            }
        ]

    def _peer_request_v2(self, node: ManagedNode, d: Desired) -> dict[str, Any]:
        key = self._peer_key(node, d)
        model = self.params.poc_model
        nonces = list(range(PEER_BATCH_NONCES))
        return {
            "block_hash": d.block_hash,
            "block_height": d.stage_height,
            "public_key": key,
            "node_id": 1,
            "node_count": 1,
            "nonces": nonces,
            "params": self._v2_params(),
            "batch_size": self.params.v2_batch_size,
            "wait": False,
            "url": v2_callback_url(self.params),
            "validation": {
                "artifacts": [{"nonce": n, "vector_b64": v2_vector_b64(model, d.block_hash, key, n)} for n in nonces]
            },
            "stat_test": dict(V2_STAT_TEST),
        }

    # --- status polling --------------------------------------------------------------------

    async def _poll_loop(self) -> None:
        while True:
            await asyncio.sleep(self.poll_interval)
            for node in list(self.registry.nodes.values()):
                if not node.busy and not node.lock.locked() and not node.removed:
                    self._spawn(self._poll(node), f"poll:{node.config.id}")

    async def _poll(self, node: ManagedNode) -> None:
        if node.lock.locked():
            return
        async with node.lock:
            if node.removed:
                return
            observed = await self._observe(node)
        if observed is None:
            return
        d = self.desired(node)
        if self._matches(d, *observed):
            if node.status.current_status == FAILED:
                self.set_current(node, *observed)
            return
        self.set_current(node, *observed)
        node.applied_key = None
        self.kick(node)

    async def _observe(self, node: ManagedNode) -> tuple[str, str] | None:
        cfg = node.config
        st = await self.client.call("GET", self.client.poc_url(cfg, "/api/v1/state"))
        if not st.ok:
            self.fail(node, f"state check failed: {st.describe()}")
            return None
        body = st.body if isinstance(st.body, dict) else {}
        state = body.get("state")
        if isinstance(body.get("version"), str):
            node.ml_node_version = body["version"]
        pow_status = None
        pw = await self.client.call("GET", self.client.poc_url(cfg, "/api/v1/inference/pow/status"))
        if pw.ok and isinstance(pw.body, dict):  # errors tolerated: older images have no such route
            pow_status = pw.body.get("status")
        if state == "INFERENCE":
            health = await self.client.call("GET", self.client.inference_url(cfg, "/health"))
            if not health.ok:
                self.fail(node, f"inference health check failed: {health.describe()}")
                return None
            models = await self.client.call("GET", self.client.inference_url(cfg, "/v1/models"))
            data = models.body.get("data") if models.ok and isinstance(models.body, dict) else None
            if not isinstance(data, list):
                self.fail(node, f"models check failed: {models.describe()}")
                return None
            ids = [m.get("id") for m in data if isinstance(m, dict)]
            if cfg.model not in ids:
                self.fail(node, f"model mismatch: node serves {ids}, expected {cfg.model}")
                return None
            if pow_status in (GENERATING, VALIDATING):
                return (POC, pow_status)
            return (NODE_INFERENCE, IDLE)
        if state == "POW":
            poc = node.status.poc_current_status if node.status.poc_current_status != IDLE else GENERATING
            return (POC, poc)
        if state == "STOPPED":
            return (STOPPED, IDLE)
        if state == "TRAIN":
            return (TRAINING, IDLE)
        self.fail(node, f"state check failed: unexpected state {state!r}")
        return None

    @staticmethod
    def _matches(d: Desired, status: str, poc_status: str) -> bool:
        if d.status == POC:
            if d.generation == "v2" and d.stage != GEN:
                # v2 validation runs inside the serving vLLM: the node reports INFERENCE meanwhile.
                return status in (POC, NODE_INFERENCE)
            return status == POC
        return status == d.status

    async def close(self) -> None:
        tasks = [t for t in (self._poll_task, *self._tasks) if t is not None]
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        self._poll_task = None
