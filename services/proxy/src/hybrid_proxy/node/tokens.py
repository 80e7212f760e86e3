"""Token figures without parsing the answer: ``usage`` scanned from raw bytes, and the ``/tokenize`` estimate.

inference-proxy.md: no JSON parsing per chunk — scan for ``"usage"`` when accounting needs it. The usage object
comes last (in a stream: the final chunk, after ``finish_reason``), so the scan starts at the last ``"usage"``.
"""

from __future__ import annotations

import math
import re
from typing import Any

_USAGE_KEY = b'"usage"'
_FIELD = re.compile(rb'"(prompt_tokens|completion_tokens)"\s*:\s*(\d+)')
_PIECE = re.compile(r"\w+|[^\w\s]", re.UNICODE)
# A BPE vocabulary of Qwen/Llama size splits an English word into ~1.3 tokens; long words into chunks of a
# few characters. Close enough for the dapi's fallback (gonka-protocol.md §4: it asks /tokenize only when the upstream
# reported prompt_tokens == 0); an exact count needs the model's tokenizer (PROXY_TOKENIZE_URL).
_CHARS_PER_TOKEN = 6.0
_TEMPLATE_TOKENS_PER_MESSAGE = 4


def scan_usage(data: bytes) -> tuple[int, int] | None:
    """(prompt_tokens, completion_tokens) of the last ``usage`` object in ``data``, if there is one."""
    at = data.rfind(_USAGE_KEY)
    if at < 0:
        return None
    prompt = completion = 0
    found = False
    for m in _FIELD.finditer(data, at):
        found = True
        if m.group(1) == b"prompt_tokens":
            prompt = int(m.group(2))
        else:
            completion = int(m.group(2))
        if prompt and completion:
            break
    return (prompt, completion) if found else None


def estimate_text(text: str) -> int:
    return sum(max(1, math.ceil(len(p) / _CHARS_PER_TOKEN)) for p in _PIECE.findall(text))


def estimate(prompt: Any) -> int:
    """Token count of a ``/tokenize`` prompt: a string, a list of strings, token ids, or chat messages."""
    if prompt is None:
        return 0
    if isinstance(prompt, str):
        return estimate_text(prompt)
    if isinstance(prompt, int | float) and not isinstance(prompt, bool):
        return 1
    if isinstance(prompt, list):
        if all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            return len(prompt)  # already token ids
        total = 0
        for item in prompt:
            if isinstance(item, dict):
                total += _TEMPLATE_TOKENS_PER_MESSAGE + estimate(item.get("content"))
            else:
                total += estimate(item)
        return total
    if isinstance(prompt, dict):
        if "text" in prompt:
            return estimate(prompt["text"])
        return estimate(prompt.get("content"))
    return estimate_text(str(prompt))
