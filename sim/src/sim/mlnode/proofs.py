"""Proof-of-compute values as pure functions, so a validator can recompute what a generator sent.

PoC v1 (gonka-protocol.md §2): a nonce's ``dist`` is a function of the PoC seed (block hash), the
participant's public key and the nonce; only nonces with ``dist < r_target`` are reported.
PoC v2 (§7): each nonce yields a ``k_dim`` vector sent as base64 of little-endian fp16, computed by
the served model; another node serving the same model reproduces it, a different model does not.
"""

from __future__ import annotations

import base64
import hashlib
import struct


def _unit(*parts: object) -> float:
    digest = hashlib.blake2b("\x1f".join(str(p) for p in parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


def v1_dist(block_hash: str, public_key: str, nonce: int) -> float:
    """Distance in [1.0, 2.0): with the dapi's r_target ≈ 1.398 about 40 % of nonces qualify."""
    return 1.0 + _unit("dist", block_hash, public_key, nonce)


def v1_nonce(node_id: int, node_count: int, index: int) -> int:
    """Nonces are strided by node so the nodes of one participant never collide."""
    return index * max(1, node_count) + max(0, node_id)


def v2_vector(model: str, block_hash: str, public_key: str, nonce: int, k_dim: int = 12) -> bytes:
    values = [(_unit("vec", model, block_hash, public_key, nonce, i) - 0.5) * 4.0 for i in range(k_dim)]
    return struct.pack(f"<{k_dim}e", *values)


def v2_vector_b64(model: str, block_hash: str, public_key: str, nonce: int, k_dim: int = 12) -> str:
    return base64.b64encode(v2_vector(model, block_hash, public_key, nonce, k_dim)).decode()


def v2_distance(a: bytes, b: bytes) -> float:
    """L2 distance of two fp16 vectors of the same length (inf when the shapes differ)."""
    if len(a) != len(b) or len(a) % 2:
        return float("inf")
    n = len(a) // 2
    va = struct.unpack(f"<{n}e", a)
    vb = struct.unpack(f"<{n}e", b)
    return float(sum((x - y) ** 2 for x, y in zip(va, vb, strict=True)) ** 0.5)
