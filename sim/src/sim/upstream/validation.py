"""Reading an OpenAI request body into a :class:`GenerationRequest`, refusing what the API refuses.

inference-proxy.md: the upstream takes ``stream``, ``logprobs``/``top_logprobs`` (docs contradict each
other on the type of ``logprobs``: ``true`` + ``top_logprobs: N`` is the canonical form, an integer is
also accepted here), ``temperature``, ``top_p``, ``n``, ``max_tokens``, ``stop``, penalties and ``seed``.
gonka-protocol.md §4: the dapi adds ``skip_special_tokens`` and, for validation, ``enforced_tokens`` —
Gonka's vLLM extension that a third-party API does not implement. Like the real upstream, the simulator
ignores unknown fields (``enforced_tokens`` included) rather than rejecting them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import orjson

from sim.upstream.errors import invalid, model_not_found
from sim.upstream.sampling import count_prompt_tokens, digest

GenerationKind = Literal["chat", "completion"]

MAX_TOP_LOGPROBS = 20  # OpenAI and vLLM's default max_logprobs
MAX_N = 16
MAX_STOP = 4
_ROLES = frozenset({"system", "developer", "user", "assistant", "tool", "function"})
# Chat templates add a few tokens per message (role markers); prompt_tokens should reflect that.
_TOKENS_PER_MESSAGE = 4
_TOKENS_PER_IMAGE = 85


@dataclass(frozen=True, slots=True)
class GenerationRequest:
    kind: GenerationKind
    model: str
    prompt_tokens: tuple[int, ...]  # one entry per prompt (chat: exactly one)
    n: int
    max_tokens: int | None
    stop: tuple[str, ...]
    stream: bool
    include_usage: bool
    logprobs: bool
    top_logprobs: int
    greedy: bool
    content_key: bytes  # what the generated tokens depend on
    identity_key: bytes  # what `id` and `created` depend on (the whole canonical body)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _optional_int(body: dict[str, Any], name: str, lo: int, hi: int | None) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if not _is_int(value):
        raise invalid(f"Invalid type for '{name}': expected an integer, but got {type(value).__name__}.", name)
    if value < lo or (hi is not None and value > hi):
        bound = f"between {lo} and {hi}" if hi is not None else f"at least {lo}"
        raise invalid(f"Invalid '{name}': {value}. Expected a value {bound}.", name)
    return int(value)


def _optional_number(body: dict[str, Any], name: str, lo: float, hi: float) -> float | None:
    value = body.get(name)
    if value is None:
        return None
    if not _is_number(value):
        raise invalid(f"Invalid type for '{name}': expected a number, but got {type(value).__name__}.", name)
    if not lo <= float(value) <= hi:
        raise invalid(f"Invalid '{name}': {value}. Expected a value between {lo} and {hi}.", name)
    return float(value)


def _content_text(content: object, where: str) -> tuple[str, int]:
    """(text, extra tokens for non-text parts) of one message's ``content``."""
    if content is None:
        return "", 0
    if isinstance(content, str):
        return content, 0
    if isinstance(content, list):
        texts: list[str] = []
        extra = 0
        for i, part in enumerate(content):
            if not isinstance(part, dict) or not isinstance(part.get("type"), str):
                raise invalid(f"Invalid '{where}[{i}]': expected an object with a 'type'.", where)
            if part["type"] == "text":
                if not isinstance(part.get("text"), str):
                    raise invalid(f"Missing required parameter: '{where}[{i}].text'.", where)
                texts.append(part["text"])
            else:
                extra += _TOKENS_PER_IMAGE
        return "\n".join(texts), extra
    raise invalid(f"Invalid type for '{where}': expected a string or an array of content parts.", where)


def _chat_prompt_tokens(messages: object) -> int:
    if not isinstance(messages, list) or not messages:
        if messages is None:
            raise invalid("Missing required parameter: 'messages'.", "messages")
        raise invalid("Invalid 'messages': expected a non-empty array of messages.", "messages")
    total = 3  # the assistant turn's priming tokens
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise invalid(f"Invalid type for '{where}': expected an object.", where)
        role = message.get("role")
        if role not in _ROLES:
            raise invalid(
                f"Invalid value: '{role}'. Supported values are: 'system', 'developer', 'user', "
                "'assistant', 'tool', and 'function'.",
                f"{where}.role",
            )
        if "content" not in message and role != "assistant":
            raise invalid(f"Missing required parameter: '{where}.content'.", f"{where}.content")
        text, extra = _content_text(message.get("content"), f"{where}.content")
        total += _TOKENS_PER_MESSAGE + count_prompt_tokens(text) + extra
    return total


def _completion_prompts(prompt: object) -> tuple[int, ...]:
    if prompt is None:
        raise invalid("Missing required parameter: 'prompt'.", "prompt")
    if isinstance(prompt, str):
        return (max(count_prompt_tokens(prompt), 1),)
    if isinstance(prompt, list) and prompt:
        if all(isinstance(p, str) for p in prompt):
            return tuple(max(count_prompt_tokens(p), 1) for p in prompt)
        if all(_is_int(t) for t in prompt):  # one prompt as token ids
            return (len(prompt),)
        if all(isinstance(p, list) and p and all(_is_int(t) for t in p) for p in prompt):
            return tuple(len(p) for p in prompt)
    raise invalid("Invalid 'prompt': expected a string, an array of strings, or an array of token arrays.", "prompt")


def _stop(body: dict[str, Any]) -> tuple[str, ...]:
    stop = body.get("stop")
    if stop is None:
        return ()
    if isinstance(stop, str):
        return (stop,) if stop else ()
    if isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        if len(stop) > MAX_STOP:
            raise invalid(f"Invalid 'stop': array too long. Expected at most {MAX_STOP} items.", "stop")
        return tuple(s for s in stop if s)
    raise invalid("Invalid type for 'stop': expected a string or an array of strings.", "stop")


def _logprobs(body: dict[str, Any], kind: GenerationKind) -> tuple[bool, int]:
    """(whether to return logprobs, how many alternatives per position)."""
    raw = body.get("logprobs")
    top = _optional_int(body, "top_logprobs", 0, MAX_TOP_LOGPROBS)
    if kind == "completion":
        # Legacy completions: `logprobs` is the number of alternatives (0..N), null/absent = none.
        if raw is None or raw is False:
            return False, 0
        if raw is True:
            return True, top or 0
        if not _is_int(raw) or not 0 <= raw <= MAX_TOP_LOGPROBS:
            raise invalid(f"Invalid 'logprobs': expected an integer between 0 and {MAX_TOP_LOGPROBS}.", "logprobs")
        return True, int(raw)
    if raw is None or raw is False:
        if top:
            # OpenAI and vLLM both refuse top_logprobs without logprobs.
            raise invalid("Invalid value for 'top_logprobs': 'logprobs' must be set to true.", "top_logprobs")
        return False, 0
    if raw is True:
        return True, top or 0
    if _is_int(raw) and 0 <= raw <= MAX_TOP_LOGPROBS:
        # The integer form some docs show: treat as `true` with that many alternatives.
        return True, top if top is not None else int(raw)
    raise invalid("Invalid type for 'logprobs': expected a boolean.", "logprobs")


def parse_generation(
    kind: GenerationKind, raw_body: bytes, models: frozenset[str], server_seed: int
) -> GenerationRequest:
    try:
        body = orjson.loads(raw_body)
    except orjson.JSONDecodeError:
        raise invalid(
            "We could not parse the JSON body of your request. The OpenAI API expects a JSON payload."
        ) from None
    if not isinstance(body, dict):
        raise invalid("Invalid request body: expected a JSON object.")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise invalid("You must provide a model parameter.", "model")
    if model not in models:
        raise model_not_found(model)

    if kind == "chat":
        prompt_tokens: tuple[int, ...] = (_chat_prompt_tokens(body.get("messages")),)
        content_input: object = body["messages"]
    else:
        prompt_tokens = _completion_prompts(body.get("prompt"))
        content_input = body["prompt"]

    max_tokens = _optional_int(body, "max_completion_tokens", 1, None)
    if max_tokens is None:
        max_tokens = _optional_int(body, "max_tokens", 1, None)
    n = _optional_int(body, "n", 1, MAX_N) or 1
    temperature = _optional_number(body, "temperature", 0.0, 2.0)
    top_p = _optional_number(body, "top_p", 0.0, 1.0)
    frequency_penalty = _optional_number(body, "frequency_penalty", -2.0, 2.0)
    presence_penalty = _optional_number(body, "presence_penalty", -2.0, 2.0)
    seed = body.get("seed")
    if seed is not None and not _is_int(seed):
        raise invalid("Invalid type for 'seed': expected an integer.", "seed")

    stream = body.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise invalid("Invalid type for 'stream': expected a boolean.", "stream")
    stream_options = body.get("stream_options")
    include_usage = False
    if stream_options is not None:
        if not stream:
            raise invalid("The 'stream_options' parameter is only allowed when 'stream' is enabled.", "stream_options")
        if not isinstance(stream_options, dict):
            raise invalid("Invalid type for 'stream_options': expected an object.", "stream_options")
        include_usage = bool(stream_options.get("include_usage", False))

    logprobs, top_logprobs = _logprobs(body, kind)
    greedy = temperature == 0.0
    content_key = digest(
        orjson.dumps(
            [
                kind,
                model,
                content_input,
                None if greedy else seed,
                temperature,
                top_p,
                frequency_penalty,
                presence_penalty,
                server_seed,
            ],
            option=orjson.OPT_SORT_KEYS,
        )
    )
    identity_key = digest(orjson.dumps([body, server_seed], option=orjson.OPT_SORT_KEYS))
    return GenerationRequest(
        kind=kind,
        model=model,
        prompt_tokens=prompt_tokens,
        n=n,
        max_tokens=max_tokens,
        stop=_stop(body),
        stream=stream,
        include_usage=include_usage,
        logprobs=logprobs,
        top_logprobs=top_logprobs,
        greedy=greedy,
        content_key=content_key,
        identity_key=identity_key,
    )
