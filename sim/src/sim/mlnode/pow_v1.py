"""PoC v1 inside the MLNode 3.0.11 (gonka-protocol.md §1–§2): ``pow/init/generate`` starts a
generator that reports qualifying nonces in ProofBatches every few seconds; ``pow/init/validate``
switches to validating (unsent generated batches are dropped by the sender); ``pow/validate``
re-computes a batch it is given and reports a ValidatedBatch.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass
from typing import Any

from hybrid_common import TimeProfile
from sim.mlnode.proofs import v1_dist, v1_nonce
from sim.mlnode.senders import V1CallbackSender

BATCH_SECONDS = 5.0  # "batches every few seconds"
MODEL_INIT_SECONDS = 30.0  # loading the PoW model before the first nonce


@dataclass
class PowInit:
    node_id: int
    node_count: int
    block_hash: str
    block_height: int
    public_key: str
    batch_size: int
    r_target: float
    fraud_threshold: float
    params: dict[str, Any]
    url: str


@dataclass
class PowV1Stats:
    batches_generated: int = 0
    nonces_generated: int = 0
    batches_validated: int = 0


class PowV1Engine:
    def __init__(self, sender: V1CallbackSender, profile: TimeProfile, *, gpu_count: int, seed: int = 0) -> None:
        self._sender = sender
        self._offset = (seed % 1000) / 1000  # nodes do not report in lockstep: a per-node phase in the cadence
        self._profile = profile
        self._gpu_count = max(1, gpu_count)
        self.status = "IDLE"  # IDLE | LOADING | GENERATING | VALIDATING | STOPPED
        self.model_initialized = False
        self.init: PowInit | None = None
        self._task: asyncio.Task[None] | None = None
        self._next_index = 0
        self.stats = PowV1Stats()

    @property
    def is_running(self) -> bool:
        return self.status in ("LOADING", "GENERATING", "VALIDATING")

    def describe(self) -> dict[str, Any]:
        return {"status": self.status, "is_model_initialized": self.model_initialized}

    def _cancel(self) -> None:
        if self._task is not None and not self._task.done():
            self._task.cancel()
        self._task = None

    def start_generate(self, init: PowInit) -> None:
        self._cancel()
        same_round = self.init is not None and self.init.block_hash == init.block_hash
        self.init = init
        if not same_round:
            self._next_index = 0
        self.status = "LOADING"
        self._task = asyncio.create_task(self._generate(), name="pow-v1-generate")

    def start_validate(self, init: PowInit) -> None:
        self._cancel()
        self.init = init
        self._sender.drop_generated()
        self.status = "VALIDATING"
        self.model_initialized = True

    def phase_generate(self) -> None:
        if self.init is not None:
            self.start_generate(self.init)

    def phase_validate(self) -> None:
        if self.init is not None:
            self.start_validate(self.init)

    def stop(self) -> None:
        self._cancel()
        if self.status != "IDLE":
            self.status = "STOPPED"

    async def _generate(self) -> None:
        assert self.init is not None
        if not self.model_initialized:
            await asyncio.sleep(self._profile.scale(MODEL_INIT_SECONDS))
            self.model_initialized = True
        self.status = "GENERATING"
        interval = self._profile.scale(BATCH_SECONDS)
        await asyncio.sleep(interval * self._offset)
        while True:
            await asyncio.sleep(interval)
            init = self.init
            nonces: list[int] = []
            dists: list[float] = []
            for _ in range(init.batch_size * self._gpu_count):
                nonce = v1_nonce(init.node_id, init.node_count, self._next_index)
                self._next_index += 1
                dist = v1_dist(init.block_hash, init.public_key, nonce)
                if dist < init.r_target:  # only qualifying nonces are reported (§2)
                    nonces.append(nonce)
                    dists.append(dist)
            if not nonces:
                continue
            batch = {
                "public_key": init.public_key,
                "block_hash": init.block_hash,
                "block_height": init.block_height,
                "nonces": nonces,
                "dist": dists,
                "node_id": init.node_id,
            }
            self._sender.enqueue(f"{init.url}/generated", batch, "generated")
            self.stats.batches_generated += 1
            self.stats.nonces_generated += len(nonces)

    def validate(self, batch: dict[str, Any]) -> None:
        """Re-compute a received ProofBatch and queue the ValidatedBatch for the callback URL."""
        init = self.init
        if init is None:
            return
        nonces = [int(n) for n in batch.get("nonces", [])]
        received = [float(d) for d in batch.get("dist", [])]
        public_key = str(batch.get("public_key", ""))
        block_hash = str(batch.get("block_hash", init.block_hash))
        computed = [v1_dist(block_hash, public_key, n) for n in nonces]
        n_invalid = sum(
            1 for i, c in enumerate(computed) if i >= len(received) or abs(c - received[i]) > 1e-6 or c >= init.r_target
        )
        fraud = n_invalid > 0
        validated = {
            **batch,
            "dist": computed,
            "received_dist": received,
            "r_target": init.r_target,
            "fraud_threshold": init.fraud_threshold,
            "n_invalid": n_invalid,
            "probability_honest": 0.0 if fraud else 1.0,
            "fraud_detected": fraud,
        }
        self.stats.batches_validated += 1
        self._sender.enqueue(f"{init.url}/validated", validated, "validated")

    async def close(self) -> None:
        task = self._task
        self._cancel()
        if task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await task
