"""Issue #12: ``hybridctl`` as a real process against the real broker and Redis.

``status`` reads the owners' Redis views (written here in their shapes); commands are seen on a queue bound to the
commands exchange; queries are answered by a stand-in owner on that queue (or not at all: the timeout names the
owner); ``check`` runs against the simulated Vast.ai, the simulated dapi and the real callback relay.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import aio_pika
import orjson
import pytest
from redis.asyncio import Redis

from hybrid_common.bus import Publisher, connect, reply
from hybrid_common.messages import parse
from hybrid_common.messages.commands import LogsReply, OffersReply, TunnelListReply
from hybrid_common.messages.domain import OfferSummary
from hybrid_common.redis_keys import RedisKeys
from hybrid_common.topology import Topology
from tests.support.net import free_port
from tests.support.procs import CliRun, ManagedProcess

pytestmark = pytest.mark.timeout(120)


async def cli(env: dict[str, str], *args: str, timeout: float = 60) -> CliRun:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "hybridctl",
        *args,
        env={**os.environ, "COLUMNS": "200", "NO_COLOR": "1", **env},
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), timeout)
    assert proc.returncode is not None
    return CliRun(proc.returncode, out.decode(), err.decode())


@pytest.fixture
def env(amqp_url: str, redis_url: str, namespace: str) -> dict[str, str]:
    return {"AMQP_URL": amqp_url, "REDIS_URL": redis_url, "HYBRID_NAMESPACE": namespace, "MODE": "sim"}


class Tap:
    """A throw-away queue bound to every command: sees what the CLI publishes, and can answer queries."""

    def __init__(self, conn: aio_pika.abc.AbstractRobustConnection, topology: Topology) -> None:
        self.conn, self.topology = conn, topology
        self.seen: asyncio.Queue[Any] = asyncio.Queue()
        self.answers: dict[str, Any] = {}
        self.publisher = Publisher(conn, topology, "test-owner")

    async def start(self) -> None:
        channel = await self.conn.channel()
        await self.topology.declare_exchanges(channel)
        queue = await channel.declare_queue(exclusive=True, auto_delete=True)
        await queue.bind(self.topology.commands, routing_key="#")
        await queue.consume(self._on, no_ack=True)

    async def _on(self, message: aio_pika.abc.AbstractIncomingMessage) -> None:
        env = parse(message.body)
        await self.seen.put(env)
        answer = self.answers.get(env.type)
        if answer is not None:
            await reply(self.publisher, env, message.reply_to, answer(env.payload))

    async def next(self, timeout: float = 30) -> Any:
        return await asyncio.wait_for(self.seen.get(), timeout)


@pytest.fixture
async def tap(amqp_url: str, namespace: str) -> AsyncIterator[Tap]:
    conn = await connect(amqp_url, name="test-tap")
    t = Tap(conn, Topology(namespace))
    await t.start()
    yield t
    await conn.close()


async def seed_views(redis: Redis, keys: RedisKeys) -> None:
    """What the scheduler, provisioner, proxy and relay keep, in their shapes (KEY_TABLE)."""
    now = time.time()
    view = {
        "epoch_index": 7,
        "block_height": 1234,
        "phase": "Inference",
        "poc_v2_enabled": False,
    }
    await redis.set(keys.chain_view(), orjson.dumps({"view": view, "stale_seconds": 0.4, "source": "public"}))
    plan = {
        "epoch_index": 7,
        "phase": "Inference",
        "block_height": 1234,
        "next_window": {"epoch_index": 8, "heights": {"poc_start": 1300}, "times": {"poc_start": now + 90}},
        "campaign": {"key": "ghm-e8", "state": "planned", "profile": "mlnode-v1", "slots": 1},
    }
    await redis.set(keys.scheduler("plan"), orjson.dumps(plan))
    campaign = {
        "key": "ghm-e7",
        "purpose": "poc",
        "epoch_index": 7,
        "state": "released",
        "window": {"poc_start": 1200},
        "weight": 42.5,
        "created_at": now - 300,
    }
    await redis.hset(keys.scheduler("epochs"), "ghm-e7", orjson.dumps(campaign))
    await redis.set(keys.scheduler("confirmation"), orjson.dumps({"policy": "burst", "events": [], "active": None}))
    instance = {
        "instance_id": 501,
        "slot_id": "gpu-1a",
        "epoch_index": 7,
        "state": "running",
        "gpu_name": "RTX 4090",
        "num_gpus": 1,
        "dph_total": 0.45,
        "created_at": now - 120,
        "route": {"connectivity": "direct", "public_ip": "10.0.0.5"},
        "gpu_seconds": 120.0,
        "cost_usd": 0.015,
    }
    await redis.hset(keys.instances(), "501", orjson.dumps(instance))
    await redis.hset(keys.spend_epoch(7), mapping={"usd": 0.03, "gpu_seconds": 240.0, "instances": 1})
    await redis.set(keys.spend_day(datetime.now(UTC).strftime("%Y-%m-%d")), 0.03)
    await redis.hset(keys.relay_stats(), mapping={"1200:gpu-1a:accepted": 5, "1200:gpu-1a:forwarded": 5})
    tunnel = {"instance_id": 501, "slot_id": "gpu-1a", "ssh_host": "h", "ssh_port": 22, "state": "up", "forwards": []}
    await redis.hset(keys.tunnels(), "501", orjson.dumps(tunnel))
    route = {"slot_id": "gpu-1a", "gateway_poc_port": 15000, "gateway_inference_port": 15001, "host": "127.0.0.1"}
    route |= {"state": "up", "reason": "", "instance_id": 501, "connectivity": "direct"}
    await redis.hset(keys.front_routes(), "gpu-1a", orjson.dumps(route))


async def test_status_reads_every_view_and_tolerates_absence(
    env: dict[str, str], redis_url: str, namespace: str
) -> None:
    empty = await cli(env, "status")
    assert empty.code == 0, empty.err
    assert "chain: not running" in empty.out and "scheduler not running" in empty.out
    assert (await cli(env, "status", "--json")).json()["chain"]["height"] is None

    redis = Redis.from_url(redis_url)
    try:
        await seed_views(redis, RedisKeys(namespace))
    finally:
        await redis.aclose()
    text = await cli(env, "status")
    assert text.code == 0, text.err
    assert "height 1234" in text.out and "phase Inference" in text.out
    assert "next PoC: epoch 8 at height 1300 in" in text.out
    assert "501" in text.out and "running" in text.out and "RTX 4090" in text.out
    assert "forwarded 5" in text.out and "policy burst" in text.out
    assert "127.0.0.1:15000/15001" in text.out  # the slot's node-front route

    data = (await cli(env, "status", "--json")).json()
    assert data["chain"]["height"] == 1234 and data["chain"]["phase"] == "Inference"
    [epoch] = data["epochs"]
    assert epoch["index"] == 7 and epoch["weight"] == 42.5
    assert epoch["batches_relayed"] == 5
    assert epoch["gpu_minutes"] == pytest.approx(4 + 2)  # 240 s booked + 120 s of the live instance
    assert [(i["instance_id"], i["state"]) for i in data["instances"]] == [(501, "running")]
    assert 60 < data["next_poc"]["in_seconds"] <= 90
    assert data["tunnels"][0]["instance_id"] == 501


async def test_commands_reach_the_queue_with_their_arguments(env: dict[str, str], tap: Tap) -> None:
    cases: list[tuple[tuple[str, ...], str, dict[str, Any]]] = [
        (
            ("provision", "mlnode-v1", "--slots", "gpu-1,gpu-2", "--epoch", "9"),
            "provision",
            {"slot_ids": ["gpu-1", "gpu-2"], "epoch_index": 9, "profile": "mlnode-v1"},
        ),
        (
            ("release", "gpu-1", "gpu-2", "--how", "disable"),
            "release",
            {"slot_ids": ["gpu-1", "gpu-2"], "how": "disable"},
        ),
        (("destroy", "77"), "destroy", {"instance_id": 77, "all_labelled": False}),
        (("destroy", "--all-labelled"), "destroy", {"instance_id": None, "all_labelled": True}),
        (("reconcile",), "reconcile", {}),
        (("pause",), "scheduler.pause", {}),
        (("resume",), "scheduler.resume", {}),
        (("rehearse", "--profile", "mlnode-v2"), "scheduler.rehearse", {"profile": "mlnode-v2"}),
        (("tunnel", "close", "77", "--node-front"), "tunnel.close", {"instance_id": 77, "all": False}),
        (("tunnel", "close-all", "--node-front"), "tunnel.close", {"all": True}),
    ]
    for args, kind, fields in cases:
        run = await cli(env, *args, "--json")
        assert run.code == 0, (args, run.err)
        printed = run.json()
        assert printed["published"] == kind
        envelope = await tap.next()
        assert envelope.type == kind and str(envelope.id) == printed["id"]
        dumped = envelope.payload.model_dump(mode="json")
        assert {k: dumped[k] for k in fields} == fields, args


async def test_bad_arguments_exit_non_zero_naming_the_value(env: dict[str, str]) -> None:
    cases = [
        (("provision", "mlnode-v1", "--slots", "bad slot!"), "'bad slot!'"),
        (("provision", "Not/AProfile", "--slots", "gpu-1"), "'Not/AProfile'"),
        (("destroy", "abc"), "'abc'"),
        (("destroy",), "--all-labelled"),
        (("release", "gpu-1", "--how", "shred"), "'shred'"),
        (("tunnel", "close", "x1"), "'x1'"),
        (("provision", "mlnode-v1", "--epoch", "-1"), "-1 is below the minimum 0"),
        (("offers", "mlnode-v1", "--limit", "0"), "0 is below the minimum 1"),
        (("logs", "12", "--tail", "20000"), "20000 is above the maximum 10000"),
        (("publish", "scheduler.confirmation_policy", '{"policy":"sometimes"}'), "policy='sometimes'"),
        (("publish", "scheduler.confirmation_policy", "{bad"), "'{bad' is not JSON"),
    ]
    for args, named in cases:
        run = await cli(env, *args)
        assert run.code != 0, args
        assert named in run.err, (args, run.err)


async def test_no_owner_is_named(env: dict[str, str], amqp_url: str) -> None:
    # Nothing bound: the command is unroutable and the CLI names the service that should own it.
    run = await cli(env, "reconcile")
    assert run.code == 1 and "provisioner" in run.err
    run = await cli(env, "tunnel", "close-all", "--node-front")
    assert run.code == 1 and "proxy" in run.err


async def test_queries_answered_and_timed_out(env: dict[str, str], tap: Tap) -> None:
    offer = OfferSummary(
        offer_id=11,
        machine_id=22,
        gpu_name="H100 SXM",
        num_gpus=1,
        gpu_ram_mb=81920,
        dph_total=1.9,
        reliability=0.99,
        inet_down_mbps=900,
        direct_port_count=40,
        estimated_cost_usd=0.95,
    )
    tap.answers["offers.query"] = lambda q: OffersReply(profile=q.profile, offers=[offer])
    tap.answers["logs.query"] = lambda q: LogsReply(instance_id=q.instance_id, text=f"log of {q.instance_id}\nready\n")
    tap.answers["tunnel.list"] = lambda q: TunnelListReply(
        tunnels=[{"instance_id": 5, "slot_id": "gpu-1a", "ssh_host": "ssh5", "ssh_port": 2222, "state": "up"}]
    )
    run = await cli(env, "offers", "mlnode-v1", "--estimated-minutes", "30")
    assert run.code == 0, run.err
    assert "H100 SXM" in run.out and "0.950" in run.out
    assert (await tap.next()).payload.estimated_minutes == 30
    data = (await cli(env, "offers", "mlnode-v1", "--json")).json()
    assert data["offers"][0]["offer_id"] == 11
    run = await cli(env, "logs", "42")
    assert run.code == 0 and run.out == "log of 42\nready\n"
    run = await cli(env, "tunnel", "list", "--node-front")
    assert run.code == 0 and "ssh5:2222" in run.out
    assert (await cli(env, "tunnel", "list", "--node-front", "--json")).json()[0]["instance_id"] == 5

    tap.answers.clear()  # the owner is gone: the CLI waits, then names it
    run = await cli(env, "logs", "42", "--timeout", "1")
    assert run.code == 1 and "provisioner did not answer logs.query" in run.err

    # The owner's queue exists but nothing consumes it (the provisioner stopped): no wait, the owner is named.
    from hybrid_common.topology import OWNER_QUEUES

    channel = await tap.conn.channel()
    await tap.topology.declare_queue(channel, next(q for q in OWNER_QUEUES if q.name == "provisioner.commands"))
    started = time.monotonic()
    run = await cli(env, "logs", "42", "--timeout", "60")
    assert run.code == 1 and "the provisioner is not running" in run.err, run.err
    assert time.monotonic() - started < 30


async def test_live_mode_asks_before_renting(env: dict[str, str], tap: Tap) -> None:
    live = {
        **env,
        "MODE": "live",
        "VASTAI_API_KEY": "k",
        "VASTAI_MAX_PRICE": "2.0",
        "DAPI_ADMIN_URL": "http://127.0.0.1:1",
        "DAPI_PUBLIC_URL": "http://127.0.0.1:1",
        "DAPI_CALLBACK_URL": "http://127.0.0.1:1",
    }
    run = await cli(live, "provision", "mlnode-v1", "--slots", "a,b", "--estimated-minutes", "90")
    assert run.code == 1
    assert "$6.00" in run.err and "--yes" in run.err  # 2 GPUs x $2/h x 1.5 h
    assert tap.seen.empty()
    run = await cli(live, "rehearse")
    assert run.code == 1 and "$1.00" in run.err  # 1 GPU x $2/h x 30 min
    run = await cli(live, "provision", "mlnode-v1", "--slots", "a", "--yes", "--json")
    assert run.code == 0, run.err
    assert (await tap.next()).type == "provision"


async def test_check_verifies_the_path_without_renting(
    env: dict[str, str], amqp_url: str, redis_url: str, namespace: str
) -> None:
    from sim.network import start_dapi
    from sim.vast import start_vast

    relay_port = free_port()
    relay_url = f"http://127.0.0.1:{relay_port}"
    vast = await start_vast()
    good = await start_dapi(callback_base=relay_url)
    wrong = await start_dapi()  # hands MLNodes its own callback server: the relay never sees a batch
    relay = ManagedProcess(
        ["-m", "hybrid_relay"],
        env={
            **env,
            "HYBRID_TIME_PROFILE": "test",
            "DAPI_CALLBACK_URL": good.callback_url,
            "RELAY_PUBLIC_HOST": "127.0.0.1",
            "RELAY_PUBLIC_PORT": str(relay_port),
            "RELAY_METRICS_PORT": "0",
            "LOG_JSON": "false",
        },
        wait_for_port=relay_port,
        timeout=60,
    )
    try:
        relay.start()
        base = {**env, "VAST_URL": vast.url, "RELAY_PUBLIC_URL": relay_url, "SSH_KEY_PATH": "/nonexistent/key"}
        run = await cli({**base, "DAPI_ADMIN_URL": good.admin_url}, "check", "--json")
        assert run.code == 0, run.out + run.err
        checks = {c["name"]: c for c in run.json()["checks"]}
        for name in ("broker", "redis", "vast credit", "dapi admin API", "relay public URL", "dapi callback URL"):
            assert checks[name]["ok"], checks[name]
        assert not checks["ssh key"]["ok"] and not checks["ssh key"]["required"]  # a warning in sim mode
        assert vast.ledger()["instances_live"] == 0 and not vast.ledger()["instances"]  # rented nothing

        run = await cli({**base, "DAPI_ADMIN_URL": wrong.admin_url}, "check")
        assert run.code == 1
        assert "dapi callback URL" in run.out and "not to the relay" in run.out
    finally:
        relay.stop()
        await good.close()
        await wrong.close()
        await vast.close()


async def test_status_and_pause_against_the_real_scheduler(env: dict[str, str]) -> None:
    """The scheduler's own views (chain, plan, paused flag, heartbeat) as status shows them, and watch mode."""
    from hybrid_common import TimeProfile
    from hybrid_common._time import TEST
    from sim.network import start_dapi

    profile: TimeProfile = TEST
    dapi = await start_dapi(profile=profile)
    scheduler = ManagedProcess(
        ["-m", "hybrid_scheduler"],
        env={
            **env,
            "HYBRID_TIME_PROFILE": profile.name,
            "GONKA_PUBLIC_API_URL": dapi.public_url,
            "LOG_JSON": "false",
            "SCHEDULER_METRICS_PORT": "0",
            "SCHEDULER_POLL_SECONDS": "0.2",
            "SCHEDULER_LEASE_TTL": "2",
        },
        name="scheduler",
    )

    async def status_until(check: Any, what: str) -> dict[str, Any]:
        deadline = time.monotonic() + 60
        data: dict[str, Any] = {}
        while time.monotonic() < deadline:
            run = await cli(env, "status", "--json")
            assert run.code == 0, run.err
            data = run.json()
            if check(data):
                return data
            await asyncio.sleep(0.5)
        raise AssertionError(f"status never showed {what}: {data}\n{scheduler.output()[-3000:]}")

    try:
        scheduler.start()
        data = await status_until(lambda d: d["chain"]["height"] and d["plan"], "the chain and the plan")
        assert data["chain"]["phase"] and data["next_poc"]["height"] > data["chain"]["height"]
        assert data["services"]["scheduler"], "no scheduler heartbeat"
        run = await cli(env, "pause")
        assert run.code == 0, run.err
        assert "published scheduler.pause" in run.out and "scheduling paused" in run.out
        await status_until(lambda d: d["paused"], "paused")
        assert "scheduling PAUSED" in (await cli(env, "status")).out
        assert (await cli(env, "resume")).code == 0
        await status_until(lambda d: not d["paused"], "resumed")

        watch = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "hybridctl",
            "status",
            "--watch",
            "--json",
            "--interval",
            "0.3",
            env={**os.environ, **env},
            stdout=asyncio.subprocess.PIPE,
        )
        try:
            assert watch.stdout is not None
            first = json.loads(await asyncio.wait_for(watch.stdout.readline(), 30))
            second = json.loads(await asyncio.wait_for(watch.stdout.readline(), 30))
            assert second["at"] > first["at"] and second["chain"]["height"] >= first["chain"]["height"]
        finally:
            watch.terminate()
            await watch.wait()
    finally:
        scheduler.stop()
        await dapi.close()


async def test_offers_from_the_real_provisioner(env: dict[str, str], tmp_path: Any) -> None:
    """``offers`` answered by the provisioner pricing the simulated Vast.ai catalogue; nothing is rented."""
    import asyncssh

    from sim.network import start_dapi
    from sim.vast import start_vast

    key = asyncssh.generate_private_key("ssh-ed25519")
    key_path = tmp_path / "id_ed25519"
    key.write_private_key(str(key_path))
    key.write_public_key(str(key_path) + ".pub")
    vast = await start_vast()
    dapi = await start_dapi()
    provisioner = ManagedProcess(
        ["-m", "hybrid_provisioner"],
        env={
            **env,
            "HYBRID_TIME_PROFILE": "test",
            "VAST_URL": vast.url,
            "GONKA_ADMIN_API_URL": dapi.admin_url,
            "SSH_KEY_PATH": str(key_path),
            "LOG_JSON": "false",
            "PROVISIONER_METRICS_PORT": "0",
        },
        name="provisioner",
    )
    try:
        provisioner.start()
        deadline = time.monotonic() + 60
        run = await cli(env, "offers", "mlnode-v1", "--json", "--limit", "3", "--timeout", "10")
        while run.code != 0 and time.monotonic() < deadline:  # until the provisioner consumes its queue
            await asyncio.sleep(0.5)
            run = await cli(env, "offers", "mlnode-v1", "--json", "--limit", "3", "--timeout", "10")
        assert run.code == 0, run.err + provisioner.output()[-2000:]
        offers = run.json()["offers"]
        assert 0 < len(offers) <= 3 and all(o["estimated_cost_usd"] for o in offers)
        text = await cli(env, "offers", "mlnode-v1", "--limit", "3")
        assert text.code == 0 and f"{offers[0]['dph_total']:.3f}" in text.out
        bad = await cli(env, "offers", "no-such-profile", "--timeout", "10")
        assert bad.code == 1 and "no-such-profile" in bad.err
        assert vast.ledger()["instances_live"] == 0
    finally:
        provisioner.stop()
        await dapi.close()
        await vast.close()
