"""Epoch and confirmation-PoC arithmetic, as the chain computes it (gonka-protocol.md §5, §8).

An epoch is anchored at its PoC start P (``poc_start_block_height``) and read with the *current*
parameters. Epoch 0 runs no PoC; its next PoC starts at ``epoch_length - epoch_shift``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sim.network.params import EpochParams

POC_GENERATE = "PoCGenerate"
POC_GENERATE_WIND_DOWN = "PoCGenerateWindDown"
POC_VALIDATE = "PoCValidate"
POC_VALIDATE_WIND_DOWN = "PoCValidateWindDown"
INFERENCE = "Inference"

# ConfirmationPoCPhase enum values (the dapi's JSON shows them as numbers).
CPOC_INACTIVE = 0
CPOC_GRACE_PERIOD = 1
CPOC_GENERATION = 2
CPOC_VALIDATION = 3
CPOC_COMPLETED = 4


@dataclass(frozen=True)
class EpochContext:
    index: int
    poc_start: int
    params: EpochParams

    def _at(self, offset: int) -> int:
        return 0 if self.index == 0 else self.poc_start + offset

    def start_of_poc(self) -> int:
        return self._at(0)

    def generation_wind_down(self) -> int:
        return self._at(self.params.wind_down_offset())

    def end_of_generation(self) -> int:
        return self._at(self.params.generation_end_offset())

    def exchange_deadline(self) -> int:
        return self._at(self.params.exchange_deadline_offset())

    def validation_start(self) -> int:
        return self._at(self.params.validation_start_offset())

    def validation_wind_down(self) -> int:
        return self._at(self.params.validation_wind_down_offset())

    def validation_end(self) -> int:
        return self._at(self.params.validation_end_offset())

    def set_new_validators(self) -> int:
        return self._at(self.params.set_new_validators_offset())

    def claim_money(self) -> int:
        return self._at(self.params.claim_money_offset())

    def next_poc_start(self) -> int:
        if self.index == 0:
            return self.params.epoch_length - self.params.epoch_shift
        return self.poc_start + self.params.epoch_length

    def inference_validation_cutoff(self) -> int:
        return self.next_poc_start() - self.params.inference_validation_cutoff

    def exchange_window(self) -> tuple[int, int]:
        """Generated batches land on chain in (P, exchange deadline]: the window opens a block after P."""
        if self.index == 0:
            return (0, 0)
        return (self.start_of_poc() + 1, self.exchange_deadline())

    def validation_exchange_window(self) -> tuple[int, int]:
        if self.index == 0:
            return (0, 0)
        return (self.validation_start() + 1, self.validation_end())

    def in_exchange_window(self, height: int) -> bool:
        lo, hi = self.exchange_window()
        return self.index > 0 and lo <= height <= hi

    def in_validation_exchange_window(self, height: int) -> bool:
        lo, hi = self.validation_exchange_window()
        return self.index > 0 and lo <= height <= hi

    def phase(self, height: int) -> str:
        if self.index == 0 or height < self.poc_start:
            return INFERENCE
        if height < self.generation_wind_down():
            return POC_GENERATE
        if height < self.validation_start():
            return POC_GENERATE_WIND_DOWN
        if height < self.validation_wind_down():
            return POC_VALIDATE
        if height < self.validation_end():
            return POC_VALIDATE_WIND_DOWN
        return INFERENCE

    def next(self) -> EpochContext:
        return EpochContext(index=self.index + 1, poc_start=self.next_poc_start(), params=self.params)

    def stages(self) -> dict[str, Any]:
        """``EpochStages`` as the dapi's ``/v1/epochs/latest`` names them."""
        ex, vx = self.exchange_window(), self.validation_exchange_window()
        return {
            "epoch_index": self.index,
            "poc_start": self.start_of_poc(),
            "poc_generation_wind_down": self.generation_wind_down(),
            "poc_generation_end": self.end_of_generation(),
            "poc_validation_start": self.validation_start(),
            "poc_validation_wind_down": self.validation_wind_down(),
            "poc_validation_end": self.validation_end(),
            "set_new_validators": self.set_new_validators(),
            "claim_money": self.claim_money(),
            "inference_validation_cutoff": self.inference_validation_cutoff(),
            "next_poc_start": self.next_poc_start(),
            "poc_exchange_window": {"start": ex[0], "end": ex[1]},
            "poc_validation_exchange_window": {"start": vx[0], "end": vx[1]},
        }


@dataclass
class ConfirmationEvent:
    """An active confirmation PoC (gonka-protocol.md §8); heights follow the chain's helpers."""

    epoch_index: int
    event_sequence: int
    trigger_height: int
    generation_start_height: int
    poc_seed_block_hash: str
    phase: int = CPOC_GRACE_PERIOD

    def generation_end(self, p: EpochParams) -> int:
        return self.generation_start_height + p.poc_stage_duration - 1

    def exchange_end(self, p: EpochParams) -> int:
        return self.generation_end(p) + p.poc_exchange_duration

    def validation_start(self, p: EpochParams) -> int:
        return self.exchange_end(p) + p.poc_validation_delay

    def validation_end(self, p: EpochParams) -> int:
        return self.validation_start(p) + p.poc_validation_duration - 1

    def in_batch_window(self, height: int, p: EpochParams) -> bool:
        """Generation and exchange: batches accepted from G to the exchange end, inclusive."""
        return self.generation_start_height <= height <= self.exchange_end(p)

    def expected_phase(self, height: int, p: EpochParams) -> int:
        if height < self.generation_start_height:
            return CPOC_GRACE_PERIOD
        if height < self.validation_start(p):
            return CPOC_GENERATION
        if height <= self.validation_end(p):
            return CPOC_VALIDATION
        return CPOC_COMPLETED

    def as_proto(self, p: EpochParams) -> dict[str, Any]:
        return {
            "epoch_index": self.epoch_index,
            "event_sequence": self.event_sequence,
            "trigger_height": self.trigger_height,
            "generation_start_height": self.generation_start_height,
            "generation_end_height": self.generation_end(p),
            "validation_start_height": self.validation_start(p),
            "validation_end_height": self.validation_end(p),
            "phase": self.phase,
            "poc_seed_block_hash": self.poc_seed_block_hash,
        }


def should_be_operational(enabled: bool, admin_epoch: int, latest_epoch: int, phase: str) -> bool:
    """The dapi's admin-state rule: a node enabled in the current epoch waits for the next PoC (it only
    serves inference now); a node disabled in the current epoch keeps working until that epoch ends."""
    if enabled:
        return admin_epoch < latest_epoch or phase == INFERENCE
    return admin_epoch >= latest_epoch
