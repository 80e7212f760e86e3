"""Issue #13: the whole system, as `make run` starts it, through two consecutive accelerated epochs — both PoC
generations, side by side, with confirmation PoC off and fixed seeds.

Per generation: the participant earns weight in every epoch (a GPU rented, registered before ``poc_start``, weight
fixed at the end of PoC validation), inference is served throughout with the proxy node never FAILED, every PoC batch
the MLNode produced was handed to the relay and forwarded to the dapi once, GPUs are billed only around the PoC
windows (the Vast simulator's ledger), and nothing is left rented: every instance of both windows destroyed by the
system, 0 live after make run's shutdown. The simulators run with fixed seeds (tests/support/world.py).

The two worlds (each the full process set on free ports, its own namespace) run concurrently in one module fixture:
each epoch is a wall minute, so running them one after the other would double the test's time.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from tests.support.world import (
    Evidence,
    World,
    assert_callbacks_relayed,
    assert_gpu_billed_only_around_windows,
    assert_inference_served,
    assert_no_orphans,
    assert_weight_earned,
    follow_epochs,
    new_namespace,
    run_worlds,
)

pytestmark = [pytest.mark.slow, pytest.mark.broker, pytest.mark.redis, pytest.mark.timeout(420)]

EPOCHS = (1, 2)


def two_epochs(world: World, notes: dict[str, Any]) -> None:
    follow_epochs(world, notes, EPOCHS)


@pytest.fixture(scope="module")
def runs(amqp_url: str, redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Evidence]]:
    worlds = [
        World(
            amqp_url=amqp_url,
            redis_url=redis_url,
            namespace=new_namespace(),
            state=tmp_path_factory.mktemp(name),
            poc_v2=(name == "v2"),
            name=name,
        )
        for name in ("v1", "v2")
    ]
    evidence = run_worlds([(w, two_epochs) for w in worlds])
    for ev in evidence.values():
        print(f"[{ev.name}] ran {ev.seconds} s")
    yield evidence


@pytest.mark.parametrize("generation", ["v1", "v2"])
def test_two_epochs_weight_inference_callbacks_billing_and_no_orphans(
    runs: dict[str, Evidence], generation: str
) -> None:
    ev = runs[generation]
    with ev.explained():
        # The chain ran the generation asked for, and the scheduler rented its profile.
        assert ev.report["poc_generation"] == generation
        for index in EPOCHS:
            assert ev.epoch(index)["poc_generation"] == generation
            assert ev.campaigns[f"poc-e{index}"]["profile"] == f"mlnode-{generation}", ev.campaigns[f"poc-e{index}"]

        weights = [assert_weight_earned(ev, index) for index in EPOCHS]
        print(f"[{generation}] weights {weights}")

        assert_inference_served(ev, (0, *EPOCHS))
        assert_callbacks_relayed(ev, EPOCHS, from_mlnode=EPOCHS)
        gpu_seconds = assert_gpu_billed_only_around_windows(ev, EPOCHS)
        print(f"[{generation}] GPU held {gpu_seconds:.1f} wall s over {len(EPOCHS)} windows")
        assert_no_orphans(ev, [f"-poc-e{index}-" for index in EPOCHS])

        # Nothing went wrong that the operator must hear about: no missed registration, no dead callback, no FAILED
        # node, no orphan found by the reconciler, no budget block. (Pre-pulled standbys that find no offer are
        # alerted, and are not a failure of the window: the v2 profile's multi-GPU offers are few in the simulator.)
        for alarm in ("missed registration", "dead-lettered", "FAILED", "orphan", "budget"):
            assert not ev.alerted(alarm), (alarm, ev.alerts)
