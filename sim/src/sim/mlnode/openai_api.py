"""The MLNode's inference port (container port 5000): vLLM's OpenAI-compatible routes.

``/v1/chat/completions`` (JSON or SSE) with ``logprobs``/``top_logprobs`` and Gonka's
``enforced_tokens`` extension (gonka-protocol.md §4), ``/v1/models``, ``/tokenize``, ``/health``.
Like the real image there is no version-prefix stripping: ``/v3.0.8/v1/models`` is a 404.
Before 3.0.12 this port *is* vLLM, so it is closed while vLLM is down (the owner shuts the gate);
from 3.0.12 a proxy holds it and answers 503 when no backend is up.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

import orjson
from aiohttp import web

from hybrid_common import TimeProfile
from sim.mlnode import language_model
from sim.mlnode.vllm import VllmRunner

MAX_MODEL_LEN = 32768
TOKEN_SECONDS = 0.02  # real-world time per streamed token


def _json(data: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(data), status=status, content_type="application/json")


def _openai_error(message: str, kind: str, status: int) -> web.Response:
    return _json({"object": "error", "message": message, "type": kind, "param": None, "code": status}, status)


class OpenAIRoutes:
    def __init__(self, vllm: VllmRunner, profile: TimeProfile) -> None:
        self._vllm = vllm
        self._profile = profile
        self.requests_served = 0

    def app(self) -> web.Application:
        app = web.Application(client_max_size=64 * 1024**2)
        app.router.add_get("/health", self.health)
        app.router.add_get("/v1/models", self.models)
        app.router.add_post("/v1/chat/completions", self.chat_completions)
        app.router.add_post("/tokenize", self.tokenize)
        return app

    def _unavailable(self) -> web.Response | None:
        if self._vllm.is_up:
            return None
        # Only reachable with the 3.0.12+ proxy in front; before that the port itself is shut.
        return _json({"detail": "No vLLM backends available"}, 503)

    async def health(self, request: web.Request) -> web.Response:
        if not self._vllm.is_up:
            return web.Response(status=503)
        return web.Response(status=200)

    async def models(self, request: web.Request) -> web.Response:
        if (resp := self._unavailable()) is not None:
            return resp
        model = self._vllm.model or ""
        return _json(
            {
                "object": "list",
                "data": [
                    {
                        "id": model,
                        "object": "model",
                        "created": int(time.time()),
                        "owned_by": "vllm",
                        "root": model,
                        "parent": None,
                        "max_model_len": MAX_MODEL_LEN,
                    }
                ],
            }
        )

    async def tokenize(self, request: web.Request) -> web.Response:
        if (resp := self._unavailable()) is not None:
            return resp
        try:
            body = orjson.loads(await request.read())
        except orjson.JSONDecodeError:
            return _openai_error("Invalid JSON body", "BadRequestError", 400)
        prompt = body.get("prompt", body.get("messages", ""))
        count = language_model.count_prompt_tokens(prompt)
        return _json({"count": count, "max_model_len": MAX_MODEL_LEN, "tokens": list(range(count))})

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        if (resp := self._unavailable()) is not None:
            return resp
        try:
            body = orjson.loads(await request.read())
        except orjson.JSONDecodeError:
            return _openai_error("Invalid JSON body", "BadRequestError", 400)
        if not isinstance(body, dict) or not isinstance(body.get("messages"), list):
            return _openai_error("'messages' is required", "BadRequestError", 400)
        model = body.get("model")
        if model != self._vllm.model:
            return _openai_error(f"The model `{model}` does not exist.", "NotFoundError", 404)
        enforced = body.get("enforced_tokens")
        enforced_tokens: list[str] | None = None
        if enforced is not None:
            try:
                enforced_tokens = [str(t["token"]) for t in enforced["tokens"]]
            except (KeyError, TypeError):
                return _openai_error("enforced_tokens must be {tokens: [{token, top_tokens}]}", "BadRequestError", 400)
        max_tokens = body.get("max_tokens") or body.get("max_completion_tokens") or 16
        try:
            max_tokens = int(max_tokens)
            seed = int(body.get("seed") or 0)
            top_n = int(body.get("top_logprobs") or 0)
        except (TypeError, ValueError):
            return _openai_error("max_tokens, seed and top_logprobs must be integers", "BadRequestError", 400)
        if top_n > 20:
            return _openai_error("top_logprobs must be <= 20", "BadRequestError", 400)
        want_logprobs = bool(body.get("logprobs"))
        messages = body["messages"]
        tokens, finish = language_model.generate(
            str(model), messages, max_tokens=max_tokens, seed=seed, enforced=enforced_tokens
        )
        prompt_tokens = language_model.count_prompt_tokens(messages)
        usage = {
            "prompt_tokens": prompt_tokens,
            "total_tokens": prompt_tokens + len(tokens),
            "completion_tokens": len(tokens),
            "prompt_tokens_details": None,
        }
        completion_id = f"chatcmpl-{uuid.uuid4().hex}"
        created = int(time.time())
        self.requests_served += 1
        if body.get("stream"):
            include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
            return await self._stream(
                request, completion_id, created, str(model), tokens, finish, usage, want_logprobs, top_n, include_usage
            )
        await asyncio.sleep(self._profile.scale(TOKEN_SECONDS) * len(tokens))
        return _json(
            {
                "id": completion_id,
                "object": "chat.completion",
                "created": created,
                "model": model,
                "choices": [
                    {
                        "index": 0,
                        "message": {
                            "role": "assistant",
                            "reasoning_content": None,
                            "content": "".join(t.token for t in tokens),
                            "tool_calls": [],
                        },
                        "logprobs": {"content": [t.as_openai(top_n) for t in tokens]} if want_logprobs else None,
                        "finish_reason": finish,
                        "stop_reason": None,
                    }
                ],
                "usage": usage,
                "prompt_logprobs": None,
            }
        )

    async def _stream(
        self,
        request: web.Request,
        completion_id: str,
        created: int,
        model: str,
        tokens: list[language_model.TokenChoice],
        finish: str,
        usage: dict[str, Any],
        want_logprobs: bool,
        top_n: int,
        include_usage: bool,
    ) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await resp.prepare(request)

        def chunk(choices: list[dict[str, Any]], with_usage: Any = None) -> bytes:
            data: dict[str, Any] = {
                "id": completion_id,
                "object": "chat.completion.chunk",
                "created": created,
                "model": model,
                "choices": choices,
            }
            if include_usage:
                data["usage"] = with_usage
            return b"data: " + orjson.dumps(data) + b"\n\n"

        delay = self._profile.scale(TOKEN_SECONDS)
        await resp.write(
            chunk(
                [{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}]
            )
        )
        for i, tok in enumerate(tokens):
            last = i == len(tokens) - 1
            await resp.write(
                chunk(
                    [
                        {
                            "index": 0,
                            "delta": {"content": tok.token},
                            "logprobs": {"content": [tok.as_openai(top_n)]} if want_logprobs else None,
                            "finish_reason": finish if last else None,
                            "stop_reason": None,
                        }
                    ]
                )
            )
            if delay:
                await asyncio.sleep(delay)
        if not tokens:
            await resp.write(chunk([{"index": 0, "delta": {"content": ""}, "logprobs": None, "finish_reason": finish}]))
        if include_usage:
            # Usage arrives in a final chunk with no choices, after finish_reason (inference-proxy.md).
            await resp.write(chunk([], usage))
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp
