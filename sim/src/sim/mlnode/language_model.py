"""A deterministic stand-in for a served model: tokens and top-logprobs as pure functions.

What the dapi checks (gonka-protocol.md §4) is structure and agreement, not prose: every output token
carries ``token, logprob, bytes, top_logprobs[]``, and a validator re-running the same prompt with
``enforced_tokens`` on the *same model* must reproduce the top-logprobs (similarity > 0.99). So the
distribution at each position depends only on (model, prompt, position, previous token): two nodes
serving one model agree exactly, a different model disagrees. The request ``seed`` picks among the
likely tokens, as sampling does.
"""

from __future__ import annotations

import hashlib
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

_WORDS = (  # noqa: SIM905 - a word list reads better as prose
    "the a of to and in is it that for on with as was by be at this are from or an not but have "
    "compute proof weight node epoch block chain model token nonce batch valid window stage gpu "
    "network inference rented fast slow bright quiet river mountain cloud signal vector answer "
    "question simple careful exact measure window hour minute second first last next every each "
    "small large early late open closed ready waiting running stopped healthy failed done yes no"
).split()
# Leading spaces, as BPE vocabularies spell most word tokens; a few punctuation tokens.
VOCABULARY: tuple[str, ...] = tuple(
    dict.fromkeys([" " + w for w in _WORDS] + [w.capitalize() for w in _WORDS[:20]] + [".", ",", "!", "?", "\n"])
)
CANDIDATES_PER_POSITION = 20


@dataclass(frozen=True)
class TokenChoice:
    token: str
    logprob: float
    top: tuple[tuple[str, float], ...]  # (token, logprob) best first

    def as_openai(self, top_n: int) -> dict[str, Any]:
        return {
            "token": self.token,
            "logprob": self.logprob,
            "bytes": list(self.token.encode()),
            "top_logprobs": [{"token": t, "logprob": lp, "bytes": list(t.encode())} for t, lp in self.top[:top_n]],
        }


def _rng(*parts: object) -> random.Random:
    digest = hashlib.blake2b("\x1f".join(str(p) for p in parts).encode(), digest_size=8).digest()
    return random.Random(int.from_bytes(digest, "big"))


def prompt_key(messages: Any) -> str:
    """A stable digest of the conversation (what the validator re-sends verbatim)."""
    if isinstance(messages, list):
        text = "\x1e".join(f"{m.get('role', '')}:{m.get('content', '')}" for m in messages if isinstance(m, dict))
    else:
        text = str(messages)
    return hashlib.blake2b(text.encode(), digest_size=12).hexdigest()


def count_prompt_tokens(messages: Any) -> int:
    """Whitespace pieces plus a few template tokens per message, like a chat template adds."""
    if isinstance(messages, str):
        return max(1, len(messages.split()))
    total = 0
    if isinstance(messages, list):
        for m in messages:
            if isinstance(m, dict):
                content = m.get("content", "")
                total += 4 + len(str(content).split())
    return max(1, total + 2)


def distribution(model: str, key: str, position: int, previous: str) -> tuple[tuple[str, float], ...]:
    """The model's top candidates at one position, (token, logprob) best first."""
    rng = _rng("dist", model, key, position, previous)
    tokens = rng.sample(VOCABULARY, CANDIDATES_PER_POSITION)
    logits = sorted((rng.gauss(0.0, 2.0) for _ in tokens), reverse=True)
    norm = math.log(sum(math.exp(x) for x in logits))
    return tuple((t, round(x - norm, 6)) for t, x in zip(tokens, logits, strict=True))


def natural_length(model: str, key: str, seed: int) -> int:
    return 6 + _rng("len", model, key, seed).randrange(26)


def generate(
    model: str,
    messages: Any,
    *,
    max_tokens: int,
    seed: int,
    enforced: Sequence[str] | None = None,
) -> tuple[list[TokenChoice], str]:
    """Tokens for a completion and its finish reason (``stop`` or ``length``)."""
    key = prompt_key(messages)
    if enforced is not None:
        target = len(enforced)
        finish = "stop"
    else:
        natural = natural_length(model, key, seed)
        target = min(natural, max(0, max_tokens))
        finish = "length" if max_tokens < natural else "stop"
    out: list[TokenChoice] = []
    previous = ""
    pick = _rng("pick", model, key, seed)
    for position in range(target):
        top = distribution(model, key, position, previous)
        if enforced is not None:
            token = enforced[position]
            lookup = dict(top)
            logprob = lookup.get(token, round(top[-1][1] - 3.0, 6))
        else:
            # Mostly the best candidate, sometimes the second or third: sampling with a seed.
            index = min(int(pick.expovariate(2.0)), 2)
            token, logprob = top[index]
        out.append(TokenChoice(token=token, logprob=logprob, top=top))
        previous = token
    return out, finish
