"""Deterministic "generation": tokens and their log-probabilities as a pure function of a key.

The simulator has no model; it needs output that (a) looks like an LLM's — text made of tokens with
leading spaces, punctuation, a few multi-byte characters so that ``bytes`` matters — and (b) is
byte-for-byte reproducible for the same request and seed, so a proxy in front of it can be checked
byte for byte (issue #5). Every number comes from BLAKE2b digests of (request digest, choice, position):
no ``random`` module, no process-dependent hashing, and hashlib does the work in C — a never-seen request
renders in well under a millisecond.
"""

from __future__ import annotations

import hashlib
import math
import re
import struct
from typing import NamedTuple

# Vocabulary: word pieces as a BPE tokenizer emits them (a leading space belongs to the token).
# A few non-ASCII tokens make the UTF-8 ``bytes`` field differ from the text (gonka-protocol.md §4:
# the dapi stores token, logprob, bytes and top_logprobs per position).
_WORD_TEXT = """
the of and to in is that for it as with was on be by this are from at or an which have not one all
were can more when there been has their if will each about how up out them then she many some so
these would other into time could two see way first water long down day did get come made may part
over new sound take only little work know place year live back give most very after thing our just
name good sentence man think say great where help through much before line right too mean old any
same tell boy follow came want show also around form three small set put end does another well large
must big even such because turn here why ask went men read need land different home us move try kind
hand picture again change off play spell air away animal house point page letter mother answer found
study still learn should world network node proof work epoch block weight model token inference
validator chain reward
"""
_WORDS = tuple(_WORD_TEXT.split())
_STARTERS = ("The", "In", "A", "This", "It", "When", "Each", "We", "Our", "Every")
_PUNCT = (",", ".", ";", ":", "!", "?")
_EXOTIC = (" café", "—", " naïve", "…", " über", " 東京", "’s", " résumé")

VOCABULARY: tuple[str, ...] = (
    *(" " + w for w in _WORDS),
    *_PUNCT,
    *_EXOTIC,
    "\n",
    "\n\n",
)


class Alternative(NamedTuple):  # NamedTuples: built by the thousand per request, far cheaper than dataclasses
    token: str
    logprob: float


class SampledToken(NamedTuple):
    token: str
    logprob: float
    top: tuple[Alternative, ...]  # most likely first; may or may not contain the sampled token


# UTF-8 bytes of every token, computed once (the ``bytes`` field of each logprobs entry).
TOKEN_BYTES: dict[str, list[int]] = {t: list(t.encode()) for t in (*VOCABULARY, *_STARTERS)}


def digest(material: bytes) -> bytes:
    return hashlib.blake2b(material, digest_size=16).digest()


def seed_from(digest_bytes: bytes, salt: int = 0) -> bytes:
    """The seed of one choice: the request digest salted with the choice number."""
    return hashlib.blake2b(digest_bytes + salt.to_bytes(8, "little"), digest_size=16).digest()


_BLOCK = struct.Struct("<32H")  # one 64-byte digest = 32 values in [0, 65536)
_UNIT = 1.0 / 65536.0
_STARTERS_COUNT = len(_STARTERS)
_VOCAB_COUNT = len(VOCABULARY)


def _position_values(seed: bytes, position: int, needed: int) -> tuple[int, ...]:
    """At least ``needed`` pseudo-random 16-bit values for one token position, always in the same order."""
    prefix = seed + position.to_bytes(4, "little")
    values: tuple[int, ...] = ()
    block = 0
    while len(values) < needed:
        values += _BLOCK.unpack(hashlib.blake2b(prefix + bytes((block,)), digest_size=64).digest())
        block += 1
    return values


def _ranked(values: tuple[int, ...], count: int, first: bool) -> list[Alternative]:
    """The ``count`` most likely candidates at one position, most likely first.

    Rank r uses values 2+2r (its probability) and 3+2r (its token), and a collision moves to the next
    vocabulary entry instead of drawing again, so the first k entries do not depend on how many are asked
    for: the sampled text is the same whatever ``top_logprobs`` is.
    """
    vocab = VOCABULARY
    out: list[Alternative] = []
    seen: set[str] = set()
    # A confident head and a decaying tail whose sum stays below 1, like a truncated softmax.
    remaining = 1.0
    p = 1.0
    for rank in range(count):
        u = values[2 + 2 * rank] * _UNIT
        if rank == 0:
            p = 0.45 + 0.5 * u
        else:
            q = remaining * (0.2 + 0.5 * u)
            p = q if q < p else p
            p = p if p > 1e-12 else 1e-12
        remaining -= p
        if first and rank == 0:
            tok = _STARTERS[values[3] % _STARTERS_COUNT]
        else:
            index = values[3 + 2 * rank] % _VOCAB_COUNT
            tok = vocab[index]
            while tok in seen:
                index = (index + 1) % _VOCAB_COUNT
                tok = vocab[index]
        seen.add(tok)
        out.append(Alternative(tok, math.log(p)))
    return out


def sample_tokens(seed: bytes, *, count: int, top_k: int, greedy: bool) -> list[SampledToken]:
    """``count`` tokens, each with its ``top_k`` most likely alternatives.

    ``greedy`` (temperature 0) always samples the most likely token, as vLLM does; otherwise the
    sampled token is now and then a lower-ranked one (sometimes outside the returned top list),
    which is what real sampling looks like in logprobs.
    """
    out: list[SampledToken] = []
    for position in range(count):
        head = _position_values(seed, position, 2)
        rank = 0
        if not greedy and head[0] * _UNIT > 0.9:
            rank = 1 + head[1] % 4
        ranks = max(top_k, rank + 1)
        values = head if 2 + 2 * ranks <= len(head) else _position_values(seed, position, 2 + 2 * ranks)
        ranked = _ranked(values, ranks, position == 0)
        chosen = ranked[rank]
        out.append(SampledToken(chosen.token, chosen.logprob, tuple(ranked[:top_k])))
    return out


def completion_length(seed: bytes, minimum: int = 8, maximum: int = 64) -> int:
    """How many tokens a choice "wants" before its natural stop (then capped by max_tokens)."""
    roll = int.from_bytes(hashlib.blake2b(seed + b"length", digest_size=8).digest(), "little")
    return minimum + roll % (maximum - minimum + 1)


_WORD_OR_MARK = re.compile(r"\w+|[^\w\s]")


def count_prompt_tokens(text: str) -> int:
    """An approximate token count (words and punctuation marks), stable for the same text."""
    return len(_WORD_OR_MARK.findall(text))
