"""PoC callback bodies as the MLNodes post them (gonka-protocol.md §2 for v1, §7 for v2).

These are HTTP bodies, not bus messages: the callback relay validates what it accepts against them and the dapi
simulator can parse with them. Types are strict the way the dapi's Go decoder is (an ``int64`` field refuses ``1.5``
and ``"1"``; a ``float64`` field takes an integer); fields the dapi does not read are ignored, and a relay forwards
the sender's bytes unchanged whatever this model keeps.
"""

from __future__ import annotations

import base64
import binascii
from typing import Annotated, Final

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr, field_validator, model_validator

INT64_MIN: Final = -(2**63)
INT64_MAX: Final = 2**63 - 1

Int64 = Annotated[StrictInt, Field(ge=INT64_MIN, le=INT64_MAX)]
# float64: strict mode still takes a JSON integer (as Go decodes 1 into a float64), never a string or a boolean.
Float64 = Annotated[float, Field(allow_inf_nan=False)]


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True, strict=True)


class _Identity(_Body):
    public_key: StrictStr
    block_hash: StrictStr
    block_height: Int64
    node_id: Int64


class ProofBatchV1(_Identity):
    """``POST /v1/poc-batches/generated``: qualifying nonces and their distances, index-aligned."""

    nonces: list[Int64]
    dist: list[Float64]

    @model_validator(mode="after")
    def _aligned(self) -> ProofBatchV1:
        if len(self.nonces) != len(self.dist):
            raise ValueError(f"nonces and dist differ in length ({len(self.nonces)} != {len(self.dist)})")
        return self

    @property
    def items(self) -> int:
        return len(self.nonces)


class ValidatedBatchV1(ProofBatchV1):
    """``POST /v1/poc-batches/validated``: a ProofBatch re-computed by a validator."""

    received_dist: list[Float64]
    r_target: Float64
    fraud_threshold: Float64
    n_invalid: Int64
    probability_honest: Float64
    fraud_detected: StrictBool

    @model_validator(mode="after")
    def _received_aligned(self) -> ValidatedBatchV1:
        if len(self.received_dist) != len(self.nonces):
            raise ValueError(
                f"received_dist and nonces differ in length ({len(self.received_dist)} != {len(self.nonces)})"
            )
        return self


class Artifact(_Body):
    nonce: Int64
    vector_b64: StrictStr

    @field_validator("vector_b64")
    @classmethod
    def _base64(cls, value: str) -> str:
        # The dapi answers 400 for bad base64 (gonka-protocol.md §7).
        try:
            base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            raise ValueError("is not valid base64") from None
        return value


class ArtifactEncoding(_Body):
    dtype: StrictStr
    k_dim: Int64
    endian: StrictStr


class GeneratedBatchV2(_Identity):
    """``POST /v2/poc-batches[/<model>]/generated``: artifacts (fp16 vectors) per nonce."""

    artifacts: list[Artifact]
    encoding: ArtifactEncoding
    request_id: StrictStr | None = None

    @property
    def items(self) -> int:
        return len(self.artifacts)


class ValidatedBatchV2(_Identity):
    """``POST /v2/poc-batches[/<model>]/validated``: a validator's statistical verdict."""

    request_id: StrictStr
    n_total: Int64
    n_mismatch: Int64
    mismatch_nonces: list[Int64]
    p_value: Float64
    fraud_detected: StrictBool

    @property
    def items(self) -> int:
        return self.n_total


PocBatch = ProofBatchV1 | ValidatedBatchV1 | GeneratedBatchV2 | ValidatedBatchV2

BATCH_MODELS: Final[dict[tuple[str, str], type[_Identity]]] = {
    ("v1", "generated"): ProofBatchV1,
    ("v1", "validated"): ValidatedBatchV1,
    ("v2", "generated"): GeneratedBatchV2,
    ("v2", "validated"): ValidatedBatchV2,
}
"""(generation, kind) → the body model the dapi expects on that route."""
