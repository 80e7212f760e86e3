"""``/v1/epochs/{epoch}/participants`` as the dapi prints it: gogoproto types through Go's ``encoding/json``, so every
zero field is absent (a participant's ``weight``, a node's ``poc_weight``, an empty list), and garbage."""

from __future__ import annotations

from typing import Any

import pytest

from hybrid_scheduler.chain import parse_participants
from hybrid_scheduler.window import InvalidChainData

OURS = "gonka16egtfj93fd349hqu9xj9l9cmd52sjpezhtqwre"
THEIRS = "gonka1keplur8gsfau8aatgjaqlyxr3fy5kc33dgzjzq"


def answer(*participants: dict[str, Any], **active: Any) -> dict[str, Any]:
    return {
        "active_participants": {
            "participants": list(participants),
            "epoch_group_id": 12,
            "poc_start_block_height": 1_000_000,
            "effective_block_height": 1_000_400,
            "created_at_block_height": 1_000_400,
            **active,
        },
        "addresses": ["BBDEDC12E4830D2086263415BE3FB4BF43C505A5"],
        "proof_ops": None,
        "validators": [],
        "block": None,
    }


def test_weights_by_address_with_each_nodes_poc_weight() -> None:
    parsed = parse_participants(
        answer(
            {
                "index": OURS,
                "validator_key": "ljvRT9VScsxQKKX4S91yJRNppbz691ceD4sBYBRrAys=",
                "weight": 2139,
                "inference_url": "http://node:8000",
                "models": ["Qwen/Qwen2.5-7B-Instruct"],
                "ml_nodes": [
                    {"ml_nodes": [{"node_id": "poc-e12-1a", "poc_weight": 2139, "timeslot_allocation": [True, False]}]},
                    {"ml_nodes": [{"node_id": "hyperbolic-proxy-1", "timeslot_allocation": [True, False]}]},
                ],
            },
            {"index": THEIRS, "weight": "567"},  # a string int64 is still a number
        ),
        12,
    )
    assert parsed.weights == {OURS: 2139, THEIRS: 567}
    assert parsed.node_weights[OURS] == {"poc-e12-1a": 2139, "hyperbolic-proxy-1": 0}  # omitempty: no poc_weight = 0
    assert parsed.node_weights[THEIRS] == {}
    assert (parsed.epoch_index, parsed.poc_start, parsed.created_at_height) == (12, 1_000_000, 1_000_400)


def test_omitted_zero_fields() -> None:
    parsed = parse_participants({"active_participants": {"participants": [{"index": OURS}]}}, 3)
    assert parsed.weights == {OURS: 0} and parsed.created_at_height is None and parsed.poc_start is None
    assert parse_participants({"active_participants": {}}, 3).weights == {}  # an empty list vanishes too


@pytest.mark.parametrize(
    "body",
    [
        None,
        [],
        {"active_participants": None},
        {"active_participants": {"participants": {"index": OURS}}},
        answer({"weight": 5}),
        answer({"index": OURS, "weight": -1}),
        answer({"index": OURS, "weight": "lots"}),
        answer({"index": OURS, "weight": True}),
        answer({"index": OURS, "weight": 1}, epoch_id=11),  # another epoch's record
    ],
)
def test_garbage_is_refused(body: Any) -> None:
    with pytest.raises(InvalidChainData):
        parse_participants(body, 12)
