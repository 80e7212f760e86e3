"""PoC v2 inside vLLM (MLNode 3.0.12+, gonka-protocol.md §7).

PoC runs on the model vLLM already serves: ``inference/pow/init/generate`` needs a healthy backend
(503 without one, 409 when the model differs or it is already generating) and then reports artifacts
(``nonce`` + base64 fp16 vector) every 5 s. ``inference/pow/generate`` queues specific nonces — with
``validation.artifacts`` it is a validation request and the result is posted to ``{url}/validated``.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import uuid
from dataclasses import dataclass
from typing import Any

from hybrid_common import TimeProfile
from sim.mlnode.proofs import v1_nonce, v2_distance, v2_vector, v2_vector_b64
from sim.mlnode.senders import V2CallbackSender
from sim.mlnode.vllm import VllmRunner

BATCH_SECONDS = 5.0
MAX_QUEUED_NONCES = 100_000


class PocV2Error(Exception):
    def __init__(self, status: int, detail: Any) -> None:
        super().__init__(str(detail))
        self.status = status
        self.detail = detail


@dataclass
class PocV2Round:
    block_hash: str
    block_height: int
    public_key: str
    node_id: int
    node_count: int
    batch_size: int
    model: str
    seq_len: int
    k_dim: int
    url: str | None


class PocV2Engine:
    def __init__(
        self,
        vllm: VllmRunner,
        sender: V2CallbackSender,
        profile: TimeProfile,
        *,
        port: int,
        gpu_count: int,
        seed: int = 0,
    ) -> None:
        self._vllm = vllm
        self._offset = (seed % 1000) / 1000  # a per-node phase in the 5 s cadence
        self._sender = sender
        self._profile = profile
        self._port = port
        self._gpu_count = max(1, gpu_count)
        self.round: PocV2Round | None = None
        self.generating = False
        self._task: asyncio.Task[None] | None = None
        self._next_index = 0
        self._queued = 0
        self._workers: set[asyncio.Task[None]] = set()
        self.artifacts_generated = 0
        self.validations_done = 0

    @property
    def status(self) -> str:
        if not self._vllm.is_up:
            return "NO_BACKENDS"
        return "GENERATING" if self.generating or self._queued else "IDLE"

    def backends(self) -> list[dict[str, Any]]:
        if not self._vllm.is_up:
            return []
        return [{"port": self._port, "status": "GENERATING" if self.generating else "IDLE"}]

    def _require_backend(self, model: str) -> None:
        if not self._vllm.is_up:
            raise PocV2Error(503, "No vLLM backends available")
        if self._vllm.model != model:
            # vLLM answers 409 when asked for PoC on a model it does not serve (§7).
            raise PocV2Error(
                502,
                {
                    "errors": [
                        {"port": self._port, "error": f"model mismatch: serving {self._vllm.model}, asked {model}"}
                    ]
                },
            )

    def init_generate(self, body: dict[str, Any]) -> dict[str, Any]:
        params = body["params"]
        self._require_backend(str(params["model"]))
        if self.generating:
            raise PocV2Error(502, {"errors": [{"port": self._port, "error": "409: already generating"}]})
        rnd = PocV2Round(
            block_hash=str(body["block_hash"]),
            block_height=int(body["block_height"]),
            public_key=str(body["public_key"]),
            node_id=int(body["node_id"]),
            node_count=int(body["node_count"]),
            batch_size=int(body.get("batch_size", 32)),
            model=str(params["model"]),
            seq_len=int(params.get("seq_len", 1024)),
            k_dim=int(params.get("k_dim", 12)),
            url=body.get("url"),
        )
        if self.round is None or self.round.block_hash != rnd.block_hash:
            self._next_index = 0
        self.round = rnd
        self.generating = True
        self._cancel()
        self._task = asyncio.create_task(self._generate(), name="pow-v2-generate")
        return {
            "status": "OK",
            "backends": 1,
            "n_groups": 1,
            "results": [{"port": self._port, "status": "OK"}],
            "errors": None,
        }

    def _cancel(self) -> None:
        if self._task is not None and not self._task.done():
            self._task.cancel()
        self._task = None

    def stop(self) -> dict[str, Any]:
        if not self._vllm.is_up:
            return {"status": "OK", "message": "No backends to stop"}
        self.generating = False
        self._cancel()
        return {"status": "OK", "results": [{"port": self._port, "status": "stopped"}], "errors": None}

    def on_vllm_down(self) -> None:
        self.generating = False
        self._cancel()

    async def _generate(self) -> None:
        interval = self._profile.scale(BATCH_SECONDS)
        await asyncio.sleep(interval * self._offset)
        while self.generating and self.round is not None:
            await asyncio.sleep(interval)
            rnd = self.round
            if rnd is None or not self._vllm.is_up:
                return
            artifacts = []
            for _ in range(rnd.batch_size * self._gpu_count):
                nonce = v1_nonce(rnd.node_id, rnd.node_count, self._next_index)
                self._next_index += 1
                artifacts.append(
                    {
                        "nonce": nonce,
                        "vector_b64": v2_vector_b64(rnd.model, rnd.block_hash, rnd.public_key, nonce, rnd.k_dim),
                    }
                )
            self.artifacts_generated += len(artifacts)
            if rnd.url:
                payload = {
                    "block_hash": rnd.block_hash,
                    "block_height": rnd.block_height,
                    "public_key": rnd.public_key,
                    "node_id": rnd.node_id,
                    "artifacts": artifacts,
                    "encoding": {"dtype": "f16", "k_dim": rnd.k_dim, "endian": "le"},
                }
                self._sender.enqueue(f"{rnd.url}/generated", payload, "generated")

    def generate(self, body: dict[str, Any]) -> dict[str, Any]:
        """Queue nonces for computation; a ``validation`` block makes it a validation request."""
        params = body["params"]
        self._require_backend(str(params["model"]))
        nonces = [int(n) for n in body.get("nonces", [])]
        if self._queued + len(nonces) > MAX_QUEUED_NONCES:
            raise PocV2Error(429, f"Too many queued nonces (> {MAX_QUEUED_NONCES})")
        request_id = uuid.uuid4().hex
        self._queued += len(nonces)
        task = asyncio.create_task(self._compute(request_id, body, nonces), name=f"pow-v2-request:{request_id}")
        self._workers.add(task)
        task.add_done_callback(self._workers.discard)
        return {"status": "queued", "request_id": f"{self._port}:{request_id}", "queued_count": len(nonces)}

    async def _compute(self, request_id: str, body: dict[str, Any], nonces: list[int]) -> None:
        try:
            await asyncio.sleep(self._profile.scale(1.0))
            params = body["params"]
            model = str(params["model"])
            k_dim = int(params.get("k_dim", 12))
            block_hash = str(body["block_hash"])
            public_key = str(body["public_key"])
            url = body.get("url")
            validation = body.get("validation")
            if validation is None:
                artifacts = [
                    {"nonce": n, "vector_b64": v2_vector_b64(model, block_hash, public_key, n, k_dim)} for n in nonces
                ]
                if url:
                    payload = {
                        "block_hash": block_hash,
                        "block_height": int(body["block_height"]),
                        "public_key": public_key,
                        "node_id": int(body["node_id"]),
                        "artifacts": artifacts,
                        "encoding": {"dtype": "f16", "k_dim": k_dim, "endian": "le"},
                        "request_id": f"{self._port}:{request_id}",
                    }
                    self._sender.enqueue(f"{url}/generated", payload, "generated")
                return
            stat = body.get("stat_test") or {}
            threshold = float(stat.get("dist_threshold", 0.02))
            received = {int(a["nonce"]): str(a.get("vector_b64", "")) for a in validation.get("artifacts", [])}
            mismatches: list[int] = []
            for n in nonces:
                mine = v2_vector(model, block_hash, public_key, n, k_dim)
                try:
                    theirs = base64.b64decode(received.get(n, ""), validate=True)
                except (binascii.Error, ValueError):
                    theirs = b""
                if v2_distance(mine, theirs) > threshold:
                    mismatches.append(n)
            n_total = len(nonces)
            fraud_threshold = float(stat.get("fraud_threshold", 0.01))
            p_value = 1.0 if not mismatches else max(0.0, 1.0 - len(mismatches) / max(1, n_total))
            self.validations_done += 1
            if url:
                self._sender.enqueue(
                    f"{url}/validated",
                    {
                        "request_id": f"{self._port}:{request_id}",
                        "block_hash": block_hash,
                        "block_height": int(body["block_height"]),
                        "public_key": public_key,
                        "node_id": int(body["node_id"]),
                        "n_total": n_total,
                        "n_mismatch": len(mismatches),
                        "mismatch_nonces": mismatches,
                        "p_value": p_value,
                        "fraud_detected": bool(mismatches) and p_value < fraud_threshold,
                    },
                    "validated",
                )
        finally:
            self._queued -= len(nonces)

    async def close(self) -> None:
        self._cancel()
        for task in list(self._workers):
            task.cancel()
        for task in list(self._workers):
            with contextlib.suppress(asyncio.CancelledError):
                await task
