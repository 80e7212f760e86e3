"""Issue #13: fault runs of the whole system (the `make run` process set, tests/support/world.py), each asserting
its outcome — weight earned, or the failure reported and alerted; nothing lost; nothing orphaned.

Three worlds run side by side (each epoch is a wall minute; one after the other they would triple the time), each
collecting several faults that touch different components:

- ``faults`` (the shared broker and Redis, two provisioner replicas): the upstream provider answering 429s while the
  dapi sends inference (epoch 0); the provisioner replica driving epoch 1's GPU SIGKILLed mid-provision (the
  provisioner's test-only fault hook kills whichever replica first brings an instance to ``running``); the dapi's
  callback server down while epoch 1's PoC batches arrive; the Vast host of epoch 2's GPU going offline mid-PoC.
- ``infra`` (a private RabbitMQ and a private Redis with AOF on, like compose): Redis restarted during epoch 1's PoC
  generation; the broker restarted while epoch 2's GPUs are being rented.
- ``confirmation``: a confirmation PoC under each policy, switched by the operator's command: ``ignore`` then
  ``standby`` (back to back) in epoch 1's inference phase, ``burst`` in epoch 2's; the PoCs go on as usual.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from tests.support.infra import PrivateRabbit, PrivateRedis
from tests.support.world import (
    Evidence,
    World,
    assert_callbacks_relayed,
    assert_gpu_billed_only_around_windows,
    assert_inference_served,
    assert_no_orphans,
    assert_weight_earned,
    dapi_batches,
    follow_epochs,
    gpu_runs,
    new_namespace,
    released,
    run_worlds,
    wait_for,
    weighed,
)

pytestmark = [pytest.mark.slow, pytest.mark.broker, pytest.mark.redis, pytest.mark.timeout(480)]

EPOCHS = (1, 2)
UPSTREAM_429S = 12


def _stages(world: World, index: int) -> dict[str, Any]:
    e: dict[str, Any] = wait_for(functools.partial(world.epoch, index), 150, f"[{world.name}] epoch {index} begun")
    return dict(e["stages"])


# ---------------------------------------------------------------------- world "faults"


def faults(world: World, notes: dict[str, Any]) -> None:
    # 1. The upstream provider answers 429 to the next generations (inference-proxy.md: rate limits, no Retry-After).
    before = world.upstream_stats()["by_status"].get("429", 0)
    world.upstream_fault({"kind": "status", "status": 429, "count": UPSTREAM_429S})
    wait_for(
        lambda: world.upstream_stats()["by_status"].get("429", 0) >= before + UPSTREAM_429S,
        60,
        "[faults] the upstream's 429s consumed by the dapi's inference",
    )
    notes["429s_done_at_height"] = world.height()
    notes["inference_at_429s_done"] = world.epoch(0)["inference"]  # type: ignore[index]

    # 2. The replica driving epoch 1's GPU dies (fault hook at "running"); compose would restart it.
    def dead() -> Any:
        return next((p for p in world.provisioners() if p.proc is not None and not p.alive()), None)

    corpse = wait_for(dead, 120, "[faults] a provisioner replica killed mid-provision")
    notes["replica_killed_at_height"] = world.height()
    notes["replica_killed_output"] = corpse.output()[-3000:]
    world.restart_replica(corpse)

    # 3. The dapi's callback server goes dark while epoch 1's batches arrive, and comes back inside the exchange
    # window (gonka-protocol.md §2: generated batches land on chain until poc_start + stage + exchange).
    s1 = _stages(world, 1)
    world.wait_height(s1["poc_start"] + 3)
    world.callback_stop()
    notes["callback_stopped_at"] = world.height()
    world.wait_height(s1["poc_start"] + 14)
    # What the MLNode had handed to the relay by now, against what the dapi had received.
    notes["during_outage"] = {"mlnode": world.delivered(1), "dapi": world.epoch(1)["batches"]}  # type: ignore[index]
    world.callback_start()
    notes["callback_started_at"] = world.height()
    follow_epochs(world, notes, [1])

    # 4. Mid-PoC in epoch 2, the host of the GPU serving the PoC goes offline.
    wait_for(lambda: world.epoch(2), 150, "[faults] epoch 2 begun")
    s2 = _stages(world, 2)
    world.wait_height(s2["poc_start"] + 6)

    def serving() -> Any:
        return next(
            (
                i
                for i in world.ledger()["instances"]
                if "-poc-e2-" in (i["label"] or "") and not i["destroyed"] and i["actual_status"] == "running"
            ),
            None,
        )

    victim = wait_for(serving, 10, "[faults] epoch 2's GPU running")
    world.vast_fault({"kind": "host_offline", "instance_id": victim["id"]})
    notes["offline"] = {"instance_id": victim["id"], "label": victim["label"], "height": world.height()}
    follow_epochs(world, notes, [2])


# ---------------------------------------------------------------------- world "infra"


def infra(world: World, notes: dict[str, Any], rabbit: PrivateRabbit, redis_server: PrivateRedis) -> None:
    # 1. Redis restarts (AOF on, fsync always, like compose) during epoch 1's PoC generation: the relay's ledger,
    # the jobs, the leases and the campaigns live there.
    s1 = _stages(world, 1)
    world.wait_height(s1["poc_start"] + 4)
    redis_server.restart()
    notes["redis_restarted_at"] = world.height()
    follow_epochs(world, notes, [1])

    # 2. The broker restarts while epoch 2's GPUs are being rented (pre-pulls and their events in flight).
    wait_for(
        lambda: world.campaigns().get("poc-e2", {}).get("state") == "renting", 150, "[infra] epoch 2's rentals begun"
    )
    notes["broker_stopped_at"] = world.height()
    rabbit.restart()
    notes["broker_back_at"] = world.height()
    follow_epochs(world, notes, [2])


# ---------------------------------------------------------------------- world "confirmation"


def _policy_is(world: World, policy: str) -> bool:
    return world.confirmation().get("policy") == policy


def _events_beyond(world: World, seen: int) -> dict[str, Any] | None:
    events = world.confirmation().get("events", [])
    return dict(events[-1]) if len(events) > seen else None


def _completed(world: World, trigger_height: int) -> dict[str, Any] | None:
    for e in world.report()["epochs"]:
        for c in e["confirmation_poc"]:
            if c["trigger_height"] == trigger_height and c["completed_at_height"] is not None:
                return dict(c)
    return None


def _standby_pulled(world: World, epoch: int) -> bool:
    camp = world.campaigns().get(f"pocs-e{epoch}", {})
    return any(c["state"] == "stopped" for c in camp.get("candidates", {}).values())


def _trigger(world: World, policy: str) -> dict[str, Any]:
    """Fire a confirmation PoC (at the next Inference-phase block); the scheduler's record of it once it saw it."""
    seen = len(world.confirmation().get("events", []))
    world.confirmation_poc()
    event: dict[str, Any] = wait_for(
        functools.partial(_events_beyond, world, seen), 30, f"[confirmation] the {policy} event seen"
    )
    return event


def _switch(world: World, policy: str) -> None:
    """The operator's command (hybridctl publish scheduler.confirmation_policy)."""
    world.publish("scheduler.confirmation_policy", {"policy": policy})
    wait_for(functools.partial(_policy_is, world, policy), 30, f"[confirmation] policy {policy}")


def _done(world: World, policy: str, event: dict[str, Any]) -> dict[str, Any]:
    chain: dict[str, Any] = wait_for(
        functools.partial(_completed, world, event["trigger_height"]), 90, f"[confirmation] the {policy} event done"
    )
    return {"policy": policy, "scheduler": event, "chain": chain, "clock": world.clock()}


def _closed(world: World, key: str) -> bool:
    return any(e["key"] == key and e["ended_height"] is not None for e in world.confirmation().get("events", []))


def confirmation(world: World, notes: dict[str, Any]) -> None:
    """Each event must complete inside the inference phase it fires in (the chain only fires them there, §8), so
    ``ignore`` and ``standby`` go in epoch 1's and ``burst`` in epoch 2's."""
    events: list[dict[str, Any]] = []
    # ignore: fired once epoch 1's GPU is gone, as it is for most of an epoch: nothing can answer.
    weighed(world, notes, 1)
    released(world, 1)
    ignore = _trigger(world, "ignore")
    _switch(world, "standby")  # the standby is pulled while the ignore event runs
    wait_for(functools.partial(_standby_pulled, world, 1), 90, "[confirmation] a standby pulled and stopped")
    # The next event in the block after the chain completed this one, usually before the scheduler polled again:
    # back to back, each must still be closed (with its end and its verdict).
    events.append(_done(world, "ignore", ignore))
    standby = _trigger(world, "standby")
    _switch(world, "burst")
    events.append(_done(world, "standby", standby))
    weighed(world, notes, 2)
    events.append(_done(world, "burst", _trigger(world, "burst")))
    released(world, 2)
    for e in events:  # the scheduler closes each event at its next look at the chain
        wait_for(functools.partial(_closed, world, e["scheduler"]["key"]), 30, f"[confirmation] {e['policy']} closed")
    notes["events"] = events
    # A confirmation rental is billed outside the PoC windows by design: admitted from the trigger to the release.
    notes["extra_windows"] = [
        (
            world.time_of(e["chain"]["trigger_height"], e["clock"]),
            world.time_of(e["chain"]["validation_end_height"] + 60, e["clock"]),
        )
        for e in events
    ]
    wait_for(
        lambda: (
            not [
                i
                for i in world.ledger()["instances"]
                if not i["destroyed"] and any(k in (i["label"] or "") for k in ("-pocc-", "-pocs-"))
            ]
        ),
        90,
        "[confirmation] every confirmation rental destroyed",
    )


# ---------------------------------------------------------------------- the runs


@pytest.fixture(scope="module")
def runs(amqp_url: str, redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Evidence]]:
    die_dir = tmp_path_factory.mktemp("die")
    rabbit, redis_server = PrivateRabbit(), PrivateRedis(appendonly=True)
    # The private broker takes several seconds to boot: the other worlds start meanwhile.
    boot_failed: list[BaseException] = []

    def boot() -> None:
        try:
            rabbit.start()
            redis_server.start()
        except BaseException as exc:
            boot_failed.append(exc)

    def booted() -> None:
        infra_up.join()
        if boot_failed:
            raise boot_failed[0]

    infra_up = threading.Thread(target=boot, name="private-infra")
    infra_up.start()
    try:

        def world(name: str, **kw: Any) -> World:
            return World(
                amqp_url=kw.pop("amqp_url", amqp_url),
                redis_url=kw.pop("redis_url", redis_url),
                namespace=new_namespace(),
                state=tmp_path_factory.mktemp(name),
                name=name,
                **kw,
            )

        evidence = run_worlds(
            [
                (
                    world(
                        "faults",
                        provisioners=2,
                        provisioner_env={
                            "PROVISIONER_TEST_DIE_AT": "running",
                            "PROVISIONER_TEST_DIE_DIR": str(die_dir),
                        },
                    ),
                    faults,
                ),
                (world("confirmation"), confirmation),
                (
                    world("infra", amqp_url=rabbit.url, redis_url=redis_server.url),
                    lambda w, notes: infra(w, notes, rabbit, redis_server),
                ),
            ],
            before_start={"infra": booted},
        )
    finally:
        infra_up.join()
        rabbit.cleanup()
        redis_server.cleanup()
    for ev in evidence.values():
        print(f"[{ev.name}] ran {ev.seconds} s")
    yield evidence


def _common(ev: Evidence) -> None:
    """What every run must keep whatever the fault: weight in both epochs, inference served, the proxy never
    FAILED, every accepted callback relayed, GPUs billed only around the windows, nothing orphaned."""
    for index in EPOCHS:
        assert_weight_earned(ev, index)
    assert_inference_served(ev, (0, *EPOCHS))
    assert_gpu_billed_only_around_windows(ev, EPOCHS)
    assert_no_orphans(ev, [f"-poc-e{index}-" for index in EPOCHS])


def test_upstream_429s_are_absorbed_and_the_proxy_never_fails(runs: dict[str, Evidence]) -> None:
    ev = runs["faults"]
    with ev.explained():
        assert ev.upstream["by_status"].get("429", 0) >= UPSTREAM_429S
        # The proxy retries 429s before the first byte (PROXY_UPSTREAM_RETRIES=2: 3 tries a request), so at most one
        # dapi request in three of the burst saw the 429 passed through, and none once the burst was over.
        e0 = ev.epoch(0)["inference"]
        assert e0["failed"] <= UPSTREAM_429S // 3, e0
        assert e0["ok"] > ev.notes["inference_at_429s_done"]["ok"], (e0, ev.notes)
        assert_inference_served(ev, (0, *EPOCHS))


def test_provisioner_replica_killed_mid_provision_the_other_finishes(runs: dict[str, Evidence]) -> None:
    ev = runs["faults"]
    with ev.explained():
        assert "test fault hook: dying at running" in ev.notes["replica_killed_output"]
        # Killed while epoch 1's GPU was booting, before the window …
        assert ev.notes["replica_killed_at_height"] < ev.epoch(1)["poc_start"], ev.notes
        # … every job of the window was driven to its end by the other replica (a job its dead holder left half
        # way would still be provisioning: its lease lapsed and nobody took it over) …
        jobs = {j["slot_id"]: j["state"] for j in ev.jobs.values() if j["slot_id"].startswith("poc-e1-")}
        assert jobs and all(state in ("released", "failed") for state in jobs.values()), jobs
        # … so the GPU was registered in time and earned weight, and nothing was left rented.
        assert_weight_earned(ev, 1)
        assert_no_orphans(ev, ["-poc-e1-"])


def test_dapi_down_while_callbacks_arrive_nothing_lost(runs: dict[str, Evidence]) -> None:
    ev = runs["faults"]
    with ev.explained():
        during = ev.notes["during_outage"]
        dapi_then = during["dapi"]["generated"]["accepted"] + during["dapi"]["validated"]["accepted"]
        # The outage was real: while the dapi was down the MLNode kept handing batches to the relay (answered 200
        # once durably queued), which the dapi had not received …
        assert during["mlnode"] is not None and during["mlnode"]["delivered"] > dapi_then + 5, during
        stopped, started = ev.notes["callback_stopped_at"], ev.notes["callback_started_at"]
        arrivals = [b["arrival_height"] for b in ev.batches if b["epoch_index"] == 1]
        assert not [h for h in arrivals if stopped < h < started - 1], (stopped, started, sorted(arrivals))
        # … and every one of them reached the dapi once it was back, inside the exchange window: none lost.
        assert_callbacks_relayed(ev, [1], from_mlnode=[1])
        assert_weight_earned(ev, 1)


def test_vast_host_offline_mid_poc(runs: dict[str, Evidence]) -> None:
    ev = runs["faults"]
    with ev.explained():
        offline = ev.notes["offline"]
        e2 = ev.epoch(2)
        assert e2["poc_start"] < offline["height"] < e2["stages"]["poc_generation_end"], offline
        # The batches generated before the host went away count: the participant keeps weight for the epoch.
        assert_weight_earned(ev, 2)
        # The loss is reported and alerted …
        assert ev.alerted("host_offline") or ev.alerted(str(offline["instance_id"])), ev.alerts
        # … and the lost instance is destroyed like every other one (nothing billed, nothing orphaned).
        inst = next(i for i in ev.ledger["instances"] if i["id"] == offline["instance_id"])
        assert inst["destroyed"], inst["actual_status"]
        assert_callbacks_relayed(ev, [2])
        _common(ev)


def test_redis_and_broker_restarts_mid_epoch(runs: dict[str, Evidence]) -> None:
    ev = runs["infra"]
    with ev.explained():
        e1 = ev.epoch(1)
        assert e1["poc_start"] <= ev.notes["redis_restarted_at"] <= e1["stages"]["poc_validation_end"], ev.notes
        assert ev.notes["broker_back_at"] < ev.epoch(2)["poc_start"], ev.notes
        # The relay's ledger (Redis, AOF fsync always) came back whole: every batch the MLNodes handed over is
        # accounted for and forwarded once, through the Redis restart mid-PoC and after the broker's.
        assert_callbacks_relayed(ev, EPOCHS, from_mlnode=EPOCHS)
        # Rentals in flight when the broker went away were carried through: epoch 2 earned weight too, and every
        # instance was destroyed by the system.
        _common(ev)


def test_confirmation_poc_under_each_policy(runs: dict[str, Evidence]) -> None:
    ev = runs["confirmation"]
    with ev.explained():
        fired = {e["policy"]: e for e in ev.notes["events"]}
        assert list(fired) == ["ignore", "standby", "burst"], list(fired)
        final = {e["key"]: e for e in ev.confirmation["events"]}
        action = {"ignore": "nothing", "standby": "started standby", "burst": "rented"}
        for policy, e in fired.items():
            seen, chain = final[e["scheduler"]["key"]], e["chain"]
            # Detected under the policy in force, acted on as the policy says, and alerted.
            assert seen["policy"] == policy and seen["action"] == action[policy], seen
            assert ev.alerted(f"(event {seen['event_sequence']})", f"policy {policy}: {action[policy]}"), ev.alerts
            assert chain["outcome"] in ("passed", "inactive"), chain
            # Reported honestly: "answered in time" only if a GPU of ours was registered by the event's generation
            # start (the dapi moves only nodes already operational into it, gonka-protocol.md §8) …
            assert seen["ended_height"] is not None, seen
            if policy == "ignore":
                # Nothing rented and our GPU already gone: the chain finds no confirmation weight, the participant
                # would be INACTIVE (the risk the status states).
                assert seen["campaign"] is None and ev.confirmation["policies"]["ignore"]["rentals"] == 0
                assert seen["answered_in_time"] is False, seen
                assert chain["confirmation_weight"] == 0 and chain["outcome"] == "inactive", chain
                continue
            registered = seen["registered_height"]
            in_time = registered is not None and registered <= seen["generation_start_height"]
            assert seen["answered_in_time"] is in_time, seen
            # … and the chain agrees: a GPU of ours submitted for the event exactly when it was there in time.
            ours = sum(v for k, v in chain["node_weights"].items() if k.startswith(seen["campaign"]))
            assert (ours > 0) is in_time, (chain, seen)
            if in_time:
                # What it generated for the event was relayed, every batch (relay:stats keys it by trigger height),
                # and reached the dapi. The event's exchange window is as short as a PoC's (4 blocks: one wall
                # second here, while the relay's HTTP takes live milliseconds): the last batches may land a block
                # after it — out of the window, or refused as no longer the active stage once the event completed.
                relayed = ev.status["relay"]["per_poc"].get(str(seen["trigger_height"]), {})
                assert relayed.get("accepted", 0) > 0, (seen, ev.status["relay"])
                got = dapi_batches(ev, seen["trigger_height"])
                assert relayed["forwarded"] == relayed["accepted"] == sum(got.values()), (relayed, got)
                assert set(got) <= {"accepted", "out_of_window", "rejected"}, got  # never a duplicate
                assert got.get("accepted", 0) >= sum(got.values()) - 2, got
            else:
                # A rental that cannot join is a missed registration: alerted.
                assert ev.alerted("missed registration", seen["campaign"]), ev.alerts
            # standby starts the instance pulled and stopped beforehand; burst rents a fresh one. Each is let go
            # after the event's validation, and destroyed.
            campaign = ev.campaigns[seen["campaign"]]
            assert campaign["state"] == "released", (seen["campaign"], campaign["state"], campaign["notes"])
            assert campaign["release_height"] > seen["validation_end_height"], (campaign["release_height"], seen)
            rows = [i for i in ev.ledger["instances"] if f"-{seen['campaign']}-" in (i["label"] or "")]
            assert rows, (seen["campaign"], "nothing rented")
            for inst in rows:
                statuses = [h["actual_status"] for h in inst["history"]]
                before_gpu = statuses[: statuses.index("running")] if "running" in statuses else statuses
                assert ("stopped" in before_gpu) is (policy == "standby"), (inst["label"], statuses)
            if policy == "standby":
                assert any(gpu_runs(i) for i in rows), [(i["label"], i["history"]) for i in rows]
            assert all(i["destroyed"] for i in rows), [(i["label"], i["actual_status"]) for i in rows]
        assert "only a GPU already serving can answer" in ev.confirmation["statement"]
        _common(ev)
        assert_callbacks_relayed(ev, EPOCHS, from_mlnode=EPOCHS)
