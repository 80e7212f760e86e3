"""The chain's answers as the dapi and the gRPC gateway print them (gonka-protocol.md §5, §8), and garbage."""

from __future__ import annotations

from typing import Any

import pytest

from hybrid_scheduler.chain import ConfirmationEvent, parse_epoch, parse_flags, parse_rpc_status
from hybrid_scheduler.window import EpochParams, InvalidChainData

# v0.2.10 parameters; the dapi's Go JSON drops poc_exchange_duration = 0 (omitempty).
PARAMS = {
    "epoch_length": 17280,
    "epoch_shift": 16980,
    "poc_stage_duration": 35,
    "poc_validation_delay": 5,
    "poc_validation_duration": 240,
    "set_new_validators_delay": 120,
    "inference_validation_cutoff": 2,
}


def public(height: int = 1_000_150, **over: Any) -> dict[str, Any]:
    p = 1_000_000
    body: dict[str, Any] = {
        "block_height": height,
        "latest_epoch": {"index": 58, "poc_start_block_height": p},
        "phase": "Inference",
        "epoch_stages": {"epoch_index": 58, "poc_start": p, "poc_validation_end": p + 280, "next_poc_start": p + 17280},
        "next_epoch_stages": {"epoch_index": 59, "poc_start": p + 17280},
        "epoch_params": dict(PARAMS),
        "is_confirmation_poc_active": False,
    }
    body.update(over)
    return body


def rest(height: int = 1_000_150) -> dict[str, Any]:
    return {
        "block_height": str(height),
        "latest_epoch": {"index": "58", "poc_start_block_height": "1000000"},
        "phase": "Inference",
        "params": {
            "epoch_params": {**{k: str(v) for k, v in PARAMS.items()}, "poc_exchange_duration": "0"},
            "poc_params": {"poc_v2_enabled": True},
        },
        "is_confirmation_poc_active": True,
        "active_confirmation_poc_event": {
            "epoch_index": "58",
            "event_sequence": "0",
            "trigger_height": "1000100",
            "generation_start_height": "1000102",
            "phase": 2,
        },
    }


def test_public_answer_gives_the_window_from_live_parameters() -> None:
    view = parse_epoch(public(), source="public", observed_at=0.0)
    assert view.params.poc_exchange_duration == 0  # omitted zero
    w = view.window()
    assert w is not None
    assert (w.heights.generation_end, w.heights.validation_start) == (1_000_035, 1_000_040)
    assert w.heights.validation_end == 1_000_280  # 35 + 5 + 240 blocks: where the chain fixes weight (§3)
    assert w.heights.set_new_validators == 1_000_400
    nxt = view.next_window()
    assert (nxt.epoch_index, nxt.poc_start) == (59, 1_017_280)
    assert w.release_height(release_margin_blocks=15) == 1_000_295
    assert w.release_height(release_margin_blocks=15, after_set_new_validators=True) == 1_000_415


def test_chain_rest_strings_flags_and_confirmation_event() -> None:
    view = parse_epoch(rest(), source="chain-rest", observed_at=0.0)
    assert view.block_height == 1_000_150 and view.epoch_index == 58
    assert view.poc_v2_enabled is True
    assert view.next_poc_start == 1_017_280
    assert view.confirmation == ConfirmationEvent(58, 0, 1_000_100, 1_000_102, 2)


def test_numeric_phase_and_epoch_zero() -> None:
    body = public(phase=4)
    assert parse_epoch(body, source="public", observed_at=0).phase == "Inference"
    zero = public(
        height=10,
        latest_epoch={"index": 0, "poc_start_block_height": 0},
        epoch_stages={"poc_start": 0, "next_poc_start": 300},
        next_epoch_stages={"poc_start": 300},
    )
    view = parse_epoch(zero, source="public", observed_at=0)
    assert view.window() is None and view.next_window().poc_start == 300


@pytest.mark.parametrize(
    "body",
    [
        None,
        [],
        "garbage",
        {"block_height": "x"},
        public(block_height=-5),
        public(epoch_params={"epoch_length": 0, "poc_stage_duration": 1, "poc_validation_duration": 1}),
        public(epoch_params={"poc_stage_duration": 35}),
        public(latest_epoch={"index": 58, "poc_start_block_height": 2_000_000}),  # PoC starting in the future
        public(epoch_stages={"next_poc_start": 5}),  # next PoC in the past
        public(phase="Lunch"),
        public(block_height=True),
    ],
)
def test_garbage_is_refused(body: Any) -> None:
    with pytest.raises(InvalidChainData):
        parse_epoch(body, source="public", observed_at=0)


def test_rpc_and_flags() -> None:
    assert parse_rpc_status({"result": {"sync_info": {"latest_block_height": "42"}}}) == 42
    with pytest.raises(InvalidChainData):
        parse_rpc_status({"result": {}})
    assert parse_flags({"params": {"poc_params": {}}}, {"mlnode_version": {"current_version": "v3.0.8"}}) == (
        False,
        "v3.0.8",
    )
    with pytest.raises(InvalidChainData):
        parse_flags({"params": {"poc_params": {"poc_v2_enabled": "yes"}}}, None)


def test_epoch_params_refuse_a_poc_longer_than_the_epoch() -> None:
    with pytest.raises(InvalidChainData):
        EpochParams.parse({"epoch_length": 10, "poc_stage_duration": 20, "poc_validation_duration": 20})
