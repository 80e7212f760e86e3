"""Epoch parameters as read live from the chain, and the PoC window computed from them.

gonka-protocol.md §5: with P = ``poc_start_block_height``, generation ends at P + stage, the exchange deadline is
``poc_exchange_duration`` after that, validation starts ``poc_validation_delay`` after the generation end and lasts
``poc_validation_duration``, ``set_new_validators`` comes ``set_new_validators_delay`` after the end of validation, and
the next PoC starts at P + ``epoch_length``. The parameters changed across upgrades (v0.2.10: stage 35, validation
240, exchange 0), so nothing here has a default that stands in for a live value, except fields the dapi's Go JSON
omits when they are zero (omitempty), which are zero.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from hybrid_common.messages.domain import PocWindowHeights
from hybrid_scheduler.blockclock import BlockClock

# gonka-protocol.md §3: the dapi syncs its admin node list to the chain every 60 s, so a removal reaches the chain up to
# a minute after the admin call. The default release margin covers one tick and 30 s of slack (real seconds).
NODE_SYNC_SECONDS = 60.0
DEFAULT_RELEASE_MARGIN_SECONDS = NODE_SYNC_SECONDS + 30.0


class InvalidChainData(ValueError):
    """A chain answer that cannot be a real chain's (missing fields, negative lengths, impossible heights)."""


@dataclass(frozen=True)
class EpochParams:
    """The inference module's ``EpochParams`` (in blocks) plus the two chain flags the plan depends on."""

    epoch_length: int
    poc_stage_duration: int
    poc_exchange_duration: int
    poc_validation_delay: int
    poc_validation_duration: int
    set_new_validators_delay: int
    inference_validation_cutoff: int
    confirmation_poc_safety_window: int = 0
    epoch_multiplier: int = 1

    @classmethod
    def parse(cls, raw: Any) -> EpochParams:
        """From ``epoch_params`` of ``/v1/epochs/latest`` (numbers, zero fields omitted) or chain REST (strings)."""
        if not isinstance(raw, dict):
            raise InvalidChainData("epoch_params is not an object")

        def field(name: str, *, required: bool, minimum: int) -> int:
            value = raw.get(name)
            if value is None or value == "":
                if required:
                    raise InvalidChainData(f"epoch_params.{name} is missing")
                return 0 if minimum == 0 else minimum
            number = as_int(value, f"epoch_params.{name}")
            if number < minimum:
                raise InvalidChainData(f"epoch_params.{name} = {number} is below {minimum}")
            return number

        params = cls(
            epoch_length=field("epoch_length", required=True, minimum=1),
            poc_stage_duration=field("poc_stage_duration", required=True, minimum=1),
            # Go omitempty drops zero values: v0.2.10 set the exchange duration to 0, which then vanishes.
            poc_exchange_duration=field("poc_exchange_duration", required=False, minimum=0),
            poc_validation_delay=field("poc_validation_delay", required=False, minimum=0),
            poc_validation_duration=field("poc_validation_duration", required=True, minimum=1),
            set_new_validators_delay=field("set_new_validators_delay", required=False, minimum=0),
            inference_validation_cutoff=field("inference_validation_cutoff", required=False, minimum=0),
            confirmation_poc_safety_window=field("confirmation_poc_safety_window", required=False, minimum=0),
            epoch_multiplier=field("epoch_multiplier", required=False, minimum=1),
        )
        if params.poc_span() >= params.epoch_length * params.epoch_multiplier:
            raise InvalidChainData("the PoC stages are longer than the epoch")
        return params

    def _m(self, blocks: int) -> int:
        return blocks * self.epoch_multiplier

    def poc_span(self) -> int:
        """Blocks from the PoC start to the end of PoC validation."""
        return self._m(self.poc_stage_duration + self.poc_validation_delay + self.poc_validation_duration)

    def window(self, poc_start: int) -> PocWindowHeights:
        generation_end = poc_start + self._m(self.poc_stage_duration)
        validation_start = generation_end + self._m(self.poc_validation_delay)
        validation_end = validation_start + self._m(self.poc_validation_duration)
        return PocWindowHeights(
            poc_start=poc_start,
            generation_end=generation_end,
            exchange_end=generation_end + self._m(self.poc_exchange_duration),
            validation_start=validation_start,
            validation_end=validation_end,
            set_new_validators=validation_end + self._m(self.set_new_validators_delay),
            next_poc_start=poc_start + self._m(self.epoch_length),
        )


def as_int(value: Any, what: str) -> int:
    """An int64 the dapi prints as a number and chain REST as a string; anything else is garbage."""
    if isinstance(value, bool):
        raise InvalidChainData(f"{what} is a boolean")
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            raise InvalidChainData(f"{what} = {value!r} is not an integer") from None
    raise InvalidChainData(f"{what} = {value!r} is not an integer")


@dataclass(frozen=True)
class PocWindow:
    """One epoch's PoC window: heights from the live parameters, wall times estimated from the measured clock."""

    epoch_index: int
    heights: PocWindowHeights

    @classmethod
    def compute(cls, epoch_index: int, poc_start: int, params: EpochParams) -> PocWindow:
        return cls(epoch_index=epoch_index, heights=params.window(poc_start))

    @property
    def poc_start(self) -> int:
        return self.heights.poc_start

    @property
    def validation_end(self) -> int:
        return self.heights.validation_end

    def release_height(self, *, release_margin_blocks: int, after_set_new_validators: bool = False) -> int:
        """The first height at which the window's GPUs may go (gonka-protocol.md §3).

        The chain fixes weight in the block where PoC validation ends, from its on-chain node list, which follows the
        dapi's admin list on a 60 s sync tick: a removal must land *after* that block, so the release waits for the end
        of validation plus a margin covering one sync tick. The older, conservative rule waits for
        ``set_new_validators`` (~120 more blocks of GPU time).
        """
        base = self.heights.set_new_validators if after_set_new_validators else self.heights.validation_end
        return base + max(release_margin_blocks, 1)

    def times(self, clock: BlockClock) -> dict[str, float]:
        """Estimated wall time (unix seconds) of every height of the window."""
        return {name: clock.time_of(height) for name, height in self.heights.model_dump().items()}
