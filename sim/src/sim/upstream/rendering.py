"""Response bytes for a parsed request: the JSON body, or the SSE stream as timed steps.

Shapes follow the OpenAI API as vLLM-based providers serve it (inference-proxy.md, gonka-protocol.md §4):
chat ``logprobs.content[]`` entries carry ``token, logprob, bytes, top_logprobs[]``; legacy completions carry
``tokens, token_logprobs, top_logprobs, text_offset``. Streams are ``data: {json}\\n\\n`` events ending with
``data: [DONE]``; with ``stream_options.include_usage`` every chunk has ``"usage": null`` and one last chunk
with ``"choices": []`` carries the usage, after the chunk that has ``finish_reason``.
Everything is a pure function of the request, so it is rendered once and cached by the app.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson

from sim.upstream.sampling import TOKEN_BYTES, SampledToken, completion_length, sample_tokens, seed_from
from sim.upstream.validation import GenerationRequest

# `created` is derived from the request, not the clock, so that identical requests give identical bytes.
_CREATED_BASE = 1_735_689_600  # 2025-01-01T00:00:00Z
_CREATED_SPREAD = 31_536_000  # one year
_DONE = b"data: [DONE]\n\n"


@dataclass(frozen=True, slots=True)
class ChoiceOutput:
    index: int
    tokens: list[SampledToken]
    finish_reason: str

    @property
    def text(self) -> str:
        return "".join(t.token for t in self.tokens)


@dataclass(frozen=True, slots=True)
class StreamPlan:
    """SSE bytes grouped by when they may be sent.

    ``head`` goes out with the first token (chat: the ``role`` delta); ``steps[i]`` is the i-th token
    position of every choice; ``tail`` holds the ``finish_reason`` chunks, the usage chunk and ``[DONE]``.
    """

    head: bytes
    steps: tuple[bytes, ...]
    tail: bytes
    whole: bytes  # all of it, for the no-delay case (one write)


@dataclass(frozen=True, slots=True)
class Rendered:
    """What the app sends for one request body: a JSON body, or a stream plan."""

    model: str
    completion_tokens: int
    json_body: bytes | None = None
    stream: StreamPlan | None = None


def _apply_stop(tokens: list[SampledToken], stop: tuple[str, ...]) -> tuple[list[SampledToken], bool]:
    """Cut before the first stop sequence (the stop text itself is not returned, like OpenAI)."""
    if not stop:
        return tokens, False
    text = "".join(t.token for t in tokens)
    cut = min((i for i in (text.find(s) for s in stop) if i >= 0), default=-1)
    if cut < 0:
        return tokens, False
    kept: list[SampledToken] = []
    end = 0
    for tok in tokens:
        end += len(tok.token)
        if end > cut:
            break
        kept.append(tok)
    return kept, True


def generate(req: GenerationRequest) -> list[ChoiceOutput]:
    choices: list[ChoiceOutput] = []
    index = 0
    for prompt_index in range(len(req.prompt_tokens)):
        for sample in range(req.n):
            seed = seed_from(req.content_key, prompt_index * 1000 + sample + 1)
            wanted = completion_length(seed)
            count = wanted if req.max_tokens is None else min(wanted, req.max_tokens)
            tokens = sample_tokens(seed, count=count, top_k=req.top_logprobs, greedy=req.greedy)
            tokens, stopped = _apply_stop(tokens, req.stop)
            finish = "stop" if stopped or count == wanted else "length"
            choices.append(ChoiceOutput(index, tokens, finish))
            index += 1
    return choices


def _usage(req: GenerationRequest, choices: list[ChoiceOutput]) -> dict[str, int]:
    prompt = sum(req.prompt_tokens)
    completion = sum(len(c.tokens) for c in choices)
    return {"prompt_tokens": prompt, "total_tokens": prompt + completion, "completion_tokens": completion}


def _identity(req: GenerationRequest) -> tuple[str, int]:
    prefix = "chatcmpl-" if req.kind == "chat" else "cmpl-"
    created = _CREATED_BASE + int.from_bytes(req.identity_key[8:12], "big") % _CREATED_SPREAD
    return prefix + req.identity_key.hex(), created


def _token_entry(tok: SampledToken) -> dict[str, Any]:
    return {
        "token": tok.token,
        "logprob": tok.logprob,
        "bytes": TOKEN_BYTES[tok.token],
        "top_logprobs": [{"token": a.token, "logprob": a.logprob, "bytes": TOKEN_BYTES[a.token]} for a in tok.top],
    }


def _legacy_logprobs(tokens: list[SampledToken], offset: int) -> dict[str, Any]:
    offsets: list[int] = []
    for tok in tokens:
        offsets.append(offset)
        offset += len(tok.token)
    return {
        "tokens": [t.token for t in tokens],
        "token_logprobs": [t.logprob for t in tokens],
        # vLLM adds the sampled token to its top list when it ranked lower.
        "top_logprobs": [{**{a.token: a.logprob for a in t.top}, t.token: t.logprob} for t in tokens],
        "text_offset": offsets,
    }


def render(req: GenerationRequest) -> Rendered:
    choices = generate(req)
    usage = _usage(req, choices)
    ident, created = _identity(req)
    completion_tokens = usage["completion_tokens"]
    if not req.stream:
        return Rendered(req.model, completion_tokens, json_body=_render_json(req, choices, usage, ident, created))
    return Rendered(req.model, completion_tokens, stream=_render_stream(req, choices, usage, ident, created))


def _render_json(
    req: GenerationRequest, choices: list[ChoiceOutput], usage: dict[str, int], ident: str, created: int
) -> bytes:
    out: list[dict[str, Any]] = []
    for c in choices:
        if req.kind == "chat":
            out.append(
                {
                    "index": c.index,
                    "message": {"role": "assistant", "content": c.text, "tool_calls": []},
                    "logprobs": {"content": [_token_entry(t) for t in c.tokens]} if req.logprobs else None,
                    "finish_reason": c.finish_reason,
                    "stop_reason": None,
                }
            )
        else:
            out.append(
                {
                    "index": c.index,
                    "text": c.text,
                    "logprobs": _legacy_logprobs(c.tokens, 0) if req.logprobs else None,
                    "finish_reason": c.finish_reason,
                    "stop_reason": None,
                }
            )
    body = {
        "id": ident,
        "object": "chat.completion" if req.kind == "chat" else "text_completion",
        "created": created,
        "model": req.model,
        "choices": out,
        "usage": usage,
    }
    return orjson.dumps(body)


def _render_stream(
    req: GenerationRequest, choices: list[ChoiceOutput], usage: dict[str, int], ident: str, created: int
) -> StreamPlan:
    obj = "chat.completion.chunk" if req.kind == "chat" else "text_completion"

    def event(choice_list: list[dict[str, Any]], usage_value: dict[str, int] | None = None) -> bytes:
        chunk: dict[str, Any] = {
            "id": ident,
            "object": obj,
            "created": created,
            "model": req.model,
            "choices": choice_list,
        }
        if req.include_usage:
            chunk["usage"] = usage_value
        return b"data: " + orjson.dumps(chunk) + b"\n\n"

    head = b""
    if req.kind == "chat":
        head = b"".join(
            event(
                [
                    {
                        "index": c.index,
                        "delta": {"role": "assistant", "content": ""},
                        "logprobs": None,
                        "finish_reason": None,
                    }
                ]
            )
            for c in choices
        )

    offsets = [0] * len(choices)
    steps: list[bytes] = []
    for position in range(max((len(c.tokens) for c in choices), default=0)):
        parts: list[bytes] = []
        for c in choices:
            if position >= len(c.tokens):
                continue
            tok = c.tokens[position]
            if req.kind == "chat":
                entry: dict[str, Any] = {
                    "index": c.index,
                    "delta": {"content": tok.token},
                    "logprobs": {"content": [_token_entry(tok)]} if req.logprobs else None,
                    "finish_reason": None,
                }
            else:
                entry = {
                    "index": c.index,
                    "text": tok.token,
                    "logprobs": _legacy_logprobs([tok], offsets[c.index]) if req.logprobs else None,
                    "finish_reason": None,
                }
                offsets[c.index] += len(tok.token)
            parts.append(event([entry]))
        steps.append(b"".join(parts))

    tail_parts: list[bytes] = []
    for c in choices:
        if req.kind == "chat":
            final: dict[str, Any] = {
                "index": c.index,
                "delta": {},
                "logprobs": None,
                "finish_reason": c.finish_reason,
                "stop_reason": None,
            }
        else:
            final = {
                "index": c.index,
                "text": "",
                "logprobs": None,
                "finish_reason": c.finish_reason,
                "stop_reason": None,
            }
        tail_parts.append(event([final]))
    if req.include_usage:
        tail_parts.append(event([], usage))
    tail_parts.append(_DONE)
    tail = b"".join(tail_parts)
    return StreamPlan(head=head, steps=tuple(steps), tail=tail, whole=head + b"".join(steps) + tail)
