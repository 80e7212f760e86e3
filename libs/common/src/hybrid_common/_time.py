"""The simulated world's one time profile.

Every simulator and every wall-clock delay in tests derives from a :class:`TimeProfile`:
the chain's epoch shape (in blocks), the block time, and one ``acceleration`` factor that
divides every *real-world* delay (Vast boot times, rate-limit intervals, MLNode sender
cadences, the dapi's 60 s node-sync tick, ...). ``real`` is the network as it is
(gonka-protocol.md §5: genesis parameters, ~6 s blocks); ``test`` and ``demo`` shrink it so
a whole epoch runs in about a minute.
"""

from __future__ import annotations

import os
from typing import Final

from pydantic import BaseModel, ConfigDict, Field


class EpochShape(BaseModel):
    """Epoch parameters in blocks, named as the chain names them (gonka-protocol.md §5)."""

    model_config = ConfigDict(frozen=True)

    epoch_length: int = Field(gt=0)
    poc_stage_duration: int = Field(gt=0)
    poc_exchange_duration: int = Field(ge=0)
    poc_validation_delay: int = Field(ge=0)
    poc_validation_duration: int = Field(gt=0)
    set_new_validators_delay: int = Field(ge=0)
    inference_validation_cutoff: int = Field(ge=0)
    confirmation_poc_safety_window: int = Field(ge=0, default=0)


class TimeProfile(BaseModel):
    """One clock for the whole simulated world."""

    model_config = ConfigDict(frozen=True)

    name: str
    block_seconds: float = Field(gt=0, description="wall seconds per simulated block")
    acceleration: float = Field(gt=0, description="real-world delays are divided by this")
    epoch: EpochShape

    def scale(self, real_seconds: float) -> float:
        """Wall seconds a real-world delay of ``real_seconds`` takes in this profile."""
        return real_seconds / self.acceleration

    def blocks_to_seconds(self, blocks: float) -> float:
        return blocks * self.block_seconds

    def with_acceleration(self, acceleration: float) -> TimeProfile:
        return self.model_copy(update={"acceleration": acceleration})


# Genesis parameters (gonka-protocol.md §5); read live in production, these are only the sim's defaults.
REAL: Final = TimeProfile(
    name="real",
    block_seconds=6.0,
    acceleration=1.0,
    epoch=EpochShape(
        epoch_length=17280,
        poc_stage_duration=60,
        poc_exchange_duration=5,
        poc_validation_delay=5,
        poc_validation_duration=20,
        set_new_validators_delay=120,
        inference_validation_cutoff=80,
        confirmation_poc_safety_window=50,
    ),
)

# Tests: 240 blocks of 0.25 s = one epoch a minute; real delays run 60x faster
# (a 14-minute Vast boot takes 14 s, the dapi's 60 s node sync 1 s, the MLNode's 5 s sender cadence 83 ms).
TEST: Final = TimeProfile(
    name="test",
    block_seconds=0.25,
    acceleration=60.0,
    epoch=EpochShape(
        epoch_length=240,
        poc_stage_duration=20,
        poc_exchange_duration=4,
        poc_validation_delay=4,
        poc_validation_duration=20,
        set_new_validators_delay=16,
        inference_validation_cutoff=8,
        confirmation_poc_safety_window=4,
    ),
)

# The demo (`make run`): an epoch in about two minutes so a person can watch each phase.
DEMO: Final = TimeProfile(
    name="demo",
    block_seconds=0.5,
    acceleration=40.0,
    epoch=TEST.epoch,
)

PROFILES: Final[dict[str, TimeProfile]] = {p.name: p for p in (REAL, TEST, DEMO)}


def current_profile() -> TimeProfile:
    """The profile named by ``HYBRID_TIME_PROFILE`` (empty = unset), optionally re-accelerated by
    ``HYBRID_ACCELERATION`` and re-clocked by ``HYBRID_BLOCK_SECONDS``. Unset: ``real`` with ``MODE=live``; otherwise
    the simulators' ``HYBRID_TIME_PROFILE_SIM`` when set (compose gives both the same one, so services and the
    simulated world run on one clock), else ``test``. ``CommonSettings`` refuses any other than ``real`` in
    ``MODE=live``."""
    live = (os.environ.get("MODE") or os.environ.get("HYBRID_MODE")) == "live"
    name = os.environ.get("HYBRID_TIME_PROFILE") or (
        "real" if live else os.environ.get("HYBRID_TIME_PROFILE_SIM") or "test"
    )
    try:
        profile = PROFILES[name]
    except KeyError:
        raise ValueError(f"HYBRID_TIME_PROFILE={name!r} is not one of {sorted(PROFILES)}") from None
    if acc := os.environ.get("HYBRID_ACCELERATION"):
        profile = profile.with_acceleration(float(acc))
    if bs := os.environ.get("HYBRID_BLOCK_SECONDS"):
        profile = profile.model_copy(update={"block_seconds": float(bs)})
    return profile
