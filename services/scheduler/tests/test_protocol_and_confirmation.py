"""Which image speaks which PoC, and the confirmation PoC's timeline (gonka-protocol.md §7, §8)."""

from __future__ import annotations

import pytest

from hybrid_scheduler.chain import ConfirmationEvent
from hybrid_scheduler.confirmation import validation_end
from hybrid_scheduler.protocol import IncompatibleImage, check, image_generations
from hybrid_scheduler.window import EpochParams

SEEDS_IMAGE = "ghcr.io/product-science/mlnode:3.0.11-post1@sha256:0cf224b2f88694def989731ecdd23950a6d899be5d70e01e8dcf823b906199af"


def test_image_generations() -> None:
    assert image_generations(SEEDS_IMAGE) == {"v1"}
    assert image_generations("ghcr.io/gonka-ai/mlnode:3.0.14-post2") == {"v1", "v2"}
    assert image_generations("product-science/mlnode:3.0.12") == {"v1", "v2"}
    assert image_generations("my/own-image:latest") is None


def test_check_refuses_clearly() -> None:
    check("v1", "mlnode-v1", SEEDS_IMAGE)
    check("v2", "mlnode-v2", None)
    check("v2", "custom", "my/own-image:latest")  # unknown version: the profile's business
    with pytest.raises(IncompatibleImage, match="speaks only v1"):
        check("v2", "mlnode-v2", SEEDS_IMAGE)
    with pytest.raises(IncompatibleImage, match="v1 profile"):
        check("v2", "mlnode-v1", None)


def test_confirmation_validation_end() -> None:
    p = EpochParams(
        epoch_length=240,
        poc_stage_duration=20,
        poc_exchange_duration=4,
        poc_validation_delay=4,
        poc_validation_duration=20,
        set_new_validators_delay=16,
        inference_validation_cutoff=8,
    )
    event = ConfirmationEvent(
        epoch_index=3, event_sequence=0, trigger_height=1000, generation_start_height=1008, phase=1
    )
    # generation 1008…1027, exchange to 1031, validation from 1035 for 20 blocks: …1054
    assert validation_end(event, p) == 1054
    reported = ConfirmationEvent(3, 0, 1000, 1008, 2, validation_end_height=1060)
    assert validation_end(reported, p) == 1060
