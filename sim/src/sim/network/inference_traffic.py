"""Inference the dapi sends to its nodes, and the validations it runs (gonka-protocol.md §4, §10).

Before forwarding, the dapi rewrites the body: ``logprobs=true``, ``top_logprobs=5`` (whatever the
client asked), ``max_tokens`` 5000 when absent, ``skip_special_tokens=false``, a ``seed``, and for
streams ``stream_options.include_usage=true``. From the answer (JSON or SSE) it needs ``model``,
``usage.prompt_tokens/completion_tokens`` (``prompt_tokens == 0`` → ``POST {inference}/tokenize``) and
``choices[0].logprobs.content[]`` entries with ``token, logprob, bytes`` and non-empty
``top_logprobs``. A validation re-sends the prompt to one of the participant's own nodes with
``enforced_tokens``; tokens must match one by one and the top-logprob similarity must exceed 0.99;
a 400/422 from the validating node counts as passed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import random
from collections.abc import Sequence
from typing import Any

import aiohttp
import orjson

from hybrid_common import TimeProfile
from sim.network.chain import Chain
from sim.network.node_client import NodeClient
from sim.network.nodes import INFERENCE, ManagedNode, NodeRegistry
from sim.network.params import NetworkParams

log = logging.getLogger(__name__)

DEFAULT_MAX_TOKENS = 5000
_PROMPTS = (
    "Explain proof of compute in one sentence.",
    "Name three rivers and one mountain.",
    "What does a validator check in a batch?",
    "Summarise the epoch schedule briefly.",
    "Write a short note about rented GPUs.",
)


def dapi_rewrite(body: dict[str, Any], rng: random.Random) -> dict[str, Any]:
    out = dict(body)
    out["logprobs"] = True
    out["top_logprobs"] = 5
    if not out.get("max_tokens"):
        out["max_tokens"] = DEFAULT_MAX_TOKENS
    out["skip_special_tokens"] = False
    if out.get("seed") is None:
        out["seed"] = rng.randrange(1, 2**31)
    if out.get("stream"):
        options = dict(out.get("stream_options") or {})
        options["include_usage"] = True
        out["stream_options"] = options
    return out


def top_similarity(a: Sequence[dict[str, Any]], b: Sequence[dict[str, Any]]) -> float:
    """Mean per-position agreement of two top-logprob lists (1 − total variation of probabilities)."""
    if not a or len(a) != len(b):
        return 0.0
    scores = []
    for pa, pb in zip(a, b, strict=True):
        da = {e.get("token"): math.exp(float(e.get("logprob", -99))) for e in pa.get("top_logprobs") or []}
        db = {e.get("token"): math.exp(float(e.get("logprob", -99))) for e in pb.get("top_logprobs") or []}
        if not da or not db:
            scores.append(0.0)
            continue
        keys = set(da) | set(db)
        scores.append(1.0 - 0.5 * sum(abs(da.get(k, 0.0) - db.get(k, 0.0)) for k in keys))
    return sum(scores) / len(scores)


def _parse_sse(raw: bytes) -> tuple[dict[str, Any] | None, str]:
    """Fold an SSE stream into (model, usage, logprobs content) the way the dapi reads it."""
    model = None
    usage = None
    content: list[dict[str, Any]] = []
    saw_data = False
    for line in raw.split(b"\n"):
        line = line.strip()
        if not line.startswith(b"data:"):
            continue
        payload = line[5:].strip()
        if payload == b"[DONE]":
            continue
        try:
            chunk = orjson.loads(payload)
        except orjson.JSONDecodeError:
            return None, "stream chunk is not JSON"
        saw_data = True
        model = chunk.get("model") or model
        if chunk.get("usage"):
            usage = chunk["usage"]
        for choice in chunk.get("choices") or []:
            lp = choice.get("logprobs") or {}
            content.extend(lp.get("content") or [])
    if not saw_data:
        return None, "empty stream"
    return {"model": model, "usage": usage, "choices": [{"logprobs": {"content": content}}]}, ""


class InferenceTraffic:
    def __init__(
        self,
        *,
        chain: Chain,
        registry: NodeRegistry,
        params: NetworkParams,
        profile: TimeProfile,
        client: NodeClient,
        session: aiohttp.ClientSession,
        seed: int,
    ) -> None:
        self.chain = chain
        self.registry = registry
        self.params = params
        self.profile = profile
        self.client = client
        self._session = session
        self._rng = random.Random(f"inference:{seed}")
        self._task: asyncio.Task[None] | None = None
        self._counter = 0

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._loop(), name="dapi-inference-traffic")

    async def _loop(self) -> None:
        while True:
            interval = self.params.inference_interval_seconds
            if interval <= 0:
                await asyncio.sleep(0.25)
                continue
            await asyncio.sleep(max(0.02, self.profile.scale(interval)))
            if not self._candidates():
                continue
            try:
                await self.send_one()
            except Exception:
                log.exception("simulated inference crashed")

    def _candidates(self) -> list[ManagedNode]:
        return [
            n
            for n in self.registry.nodes.values()
            if n.status.current_status == INFERENCE and n.status.admin_enabled and not n.removed
        ]

    async def send_one(
        self,
        *,
        node_id: str | None = None,
        body: dict[str, Any] | None = None,
        stream: bool | None = None,
        validate: bool | None = None,
    ) -> dict[str, Any]:
        """One client request routed like the dapi routes it; returns what happened."""
        if node_id is not None:
            node = self.registry.nodes.get(node_id)
            if node is None:
                return {"ok": False, "reason": f"unknown node {node_id}", "node_id": node_id}
        else:
            candidates = self._candidates()
            if not candidates:
                return {"ok": False, "reason": "no node in INFERENCE", "node_id": None}
            node = self._rng.choice(sorted(candidates, key=lambda n: n.config.id))
        self._counter += 1
        if stream is None:
            stream = self._counter % 2 == 0
        request = dict(body or {})
        request.setdefault("model", node.config.model)
        request.setdefault("messages", [{"role": "user", "content": self._rng.choice(_PROMPTS)}])
        request["stream"] = stream
        sent = dapi_rewrite(request, self._rng)
        counts = self.chain.latest.inference
        result: dict[str, Any] = {"node_id": node.config.id, "stream": stream, "request": sent}
        ok, reason, parsed = await self._complete(node, sent)
        result.update(ok=ok, reason=reason)
        if not ok or parsed is None:
            counts.fail(f"{node.config.id}: {reason}")
            return result
        counts.ok += 1
        content = parsed["choices"][0]["logprobs"]["content"]
        result["completion_tokens"] = len(content)
        do_validate = validate if validate is not None else self._rng.random() < self.params.validation_rate
        if do_validate:
            result["validation"] = await self._validate(node, sent, content)
        return result

    async def _complete(self, node: ManagedNode, sent: dict[str, Any]) -> tuple[bool, str, dict[str, Any] | None]:
        url = self.client.inference_url(node.config, "/v1/chat/completions")
        try:
            async with self._session.post(
                url,
                data=orjson.dumps(sent),
                headers={"Content-Type": "application/json"},
                timeout=aiohttp.ClientTimeout(total=self.client.command_timeout),
            ) as resp:
                raw = await resp.read()
                status = resp.status
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            return False, f"no answer: {type(exc).__name__}: {exc}", None
        if status != 200:
            return False, f"HTTP {status}: {raw[:200].decode(errors='replace')}", None
        if sent.get("stream"):
            parsed, err = _parse_sse(raw)
            if parsed is None:
                return False, err, None
        else:
            try:
                parsed = orjson.loads(raw)
            except orjson.JSONDecodeError:
                return False, "response is not JSON", None
        if not isinstance(parsed, dict) or not parsed.get("model"):
            return False, "response has no model", None
        usage = parsed.get("usage")
        if not isinstance(usage, dict) or "completion_tokens" not in usage or "prompt_tokens" not in usage:
            return False, "response has no usage (prompt_tokens/completion_tokens)", None
        if not usage.get("prompt_tokens"):
            tok = await self.client.call(
                "POST",
                self.client.inference_url(node.config, "/tokenize"),
                json={"model": sent.get("model"), "prompt": str(sent.get("messages"))},
                command=True,
            )
            if not tok.ok or not isinstance(tok.body, dict) or not isinstance(tok.body.get("count"), int):
                return False, f"prompt_tokens is 0 and /tokenize failed: {tok.describe()}", None
        try:
            content = parsed["choices"][0]["logprobs"]["content"]
        except (KeyError, IndexError, TypeError):
            return False, "response has no choices[0].logprobs.content", None
        if not isinstance(content, list) or not content:
            return False, "empty logprobs content", None
        for entry in content:
            if not isinstance(entry, dict) or not all(k in entry for k in ("token", "logprob", "bytes")):
                return False, "logprobs entry lacks token/logprob/bytes", None
            if not entry.get("top_logprobs"):
                return False, "empty top_logprobs makes the inference invalid", None
        return True, "", parsed

    async def _validate(
        self, served_by: ManagedNode, sent: dict[str, Any], content: list[dict[str, Any]]
    ) -> dict[str, Any]:
        counts = self.chain.latest.inference
        others = [n for n in self._candidates() if n.config.id != served_by.config.id]
        validator = self._rng.choice(sorted(others, key=lambda n: n.config.id)) if others else served_by
        body = {
            "model": sent["model"],
            "messages": sent["messages"],
            "max_tokens": len(content),
            "seed": sent["seed"],
            "logprobs": True,
            "top_logprobs": 5,
            "skip_special_tokens": False,
            "stream": False,
            "enforced_tokens": {
                "tokens": [
                    {"token": e["token"], "top_tokens": [t.get("token") for t in e.get("top_logprobs") or []]}
                    for e in content
                ]
            },
        }
        out: dict[str, Any] = {"validator": validator.config.id}
        r = await self.client.call(
            "POST", self.client.inference_url(validator.config, "/v1/chat/completions"), json=body, command=True
        )
        if r.answered and r.status in (400, 422):
            out.update(passed=True, reason=f"HTTP {r.status} from the validating node counts as passed")
            counts.validations_passed += 1
            return out
        if not r.ok or not isinstance(r.body, dict):
            out.update(passed=False, reason=f"validation request failed: {r.describe()}")
            counts.validations_failed += 1
            return out
        with contextlib.suppress(KeyError, IndexError, TypeError):
            theirs = r.body["choices"][0]["logprobs"]["content"]
            if [e.get("token") for e in theirs] != [e.get("token") for e in content]:
                out.update(passed=False, reason="enforced tokens were not reproduced")
                counts.validations_failed += 1
                return out
            similarity = top_similarity(content, theirs)
            passed = similarity > self.params.validation_similarity_threshold
            out.update(
                passed=passed,
                similarity=round(similarity, 6),
                reason="" if passed else "top-logprob similarity too low",
            )
            if passed:
                counts.validations_passed += 1
            else:
                counts.validations_failed += 1
            return out
        out.update(passed=False, reason="validation response has no logprobs")
        counts.validations_failed += 1
        return out

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
