"""Issue #12: the alert webhook gets failed rentals, budget blocks, orphans destroyed, FAILED nodes, missed
registrations and dead-lettered callbacks, as Slack/Discord-compatible JSON, through a flaky receiver, with no secret."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest
from aiohttp import web
from redis.asyncio import Redis

from hybrid_common.alerts import AlertNotifier
from hybrid_common.bus import Publisher, connect
from hybrid_common.messages.domain import FailureCause
from hybrid_common.messages.events import (
    BudgetBlocked,
    CallbackDead,
    InstanceFailed,
    JobFailed,
    NodeFailed,
    OrphanDestroyed,
)
from hybrid_common.topology import Topology
from tests.support.webhook import Webhook

pytestmark = pytest.mark.timeout(90)

SECRET = "sk-vast-0123456789abcdef"


@pytest.fixture
async def receiver() -> AsyncIterator[Webhook]:
    # Its first post fails: the notifier must retry. The token in its path must never reach an alert's text.
    async with Webhook(path="/hook/T0KEN", fail_first=1) as hook:
        yield hook


async def test_webhook_receives_every_alerted_event(
    amqp_url: str, redis_url: str, namespace: str, receiver: Webhook
) -> None:
    conn = await connect(amqp_url, name="test-alerts")
    redis = Redis.from_url(redis_url)
    topology = Topology(namespace)
    notifier = AlertNotifier(conn, topology, redis, receiver.url, secrets=[SECRET], backoff=0.05)
    try:
        await notifier.start()
        publisher = Publisher(conn, topology, "provisioner")
        events = [
            InstanceFailed(
                job_id="j1",
                slot_id="gpu-1a",
                instance_id=901,
                cause=FailureCause.PULL_FAILED,
                message=f"pull failed (key {SECRET})",
                will_retry=True,
            ),
            BudgetBlocked(job_id="j2", scope="day", cap_usd=10, spent_usd=9.5, estimated_usd=1.2),
            OrphanDestroyed(instance_id=902, label="ghm-gpu-2a-7", reason="no job owns it"),
            NodeFailed(node_id="gpu-3a", failure_reason="PoC not started", observed_by="scheduler"),
            JobFailed(
                job_id="j4", slot_id="gpu-4a", cause=FailureCause.DEADLINE_MISSED, message="not ready at poc_start"
            ),
            CallbackDead(batch_id="b1", path="/v1/poc-batches/generated", reason="window_closed", attempts=3),
        ]
        for event in events:
            await publisher.publish(event)
        deadline = time.monotonic() + 45
        while len(receiver.bodies) < len(events) and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
    finally:
        await notifier.stop()
        await conn.close()
        await redis.aclose()

    assert receiver.posts == len(events) + 1  # the first post failed and was retried
    by_type = {b["event_type"]: b for b in receiver.bodies}
    assert set(by_type) == {
        "instance.failed",
        "budget.blocked",
        "orphan.destroyed",
        "node.failed",
        "job.failed",
        "callback.dead",
    }
    for body in receiver.bodies:
        assert body["text"] == body["content"]  # Slack reads text, Discord content
        assert SECRET not in body["text"] and "T0KEN" not in body["text"]
    assert "rental failed for slot gpu-1a: pull_failed" in by_type["instance.failed"]["text"]
    assert "**********" in by_type["instance.failed"]["text"]
    assert "budget blocked" in by_type["budget.blocked"]["text"] and "$10.00" in by_type["budget.blocked"]["text"]
    assert "orphan instance 902 destroyed" in by_type["orphan.destroyed"]["text"]
    assert "gpu-3a FAILED" in by_type["node.failed"]["text"]
    assert "missed registration for slot gpu-4a" in by_type["job.failed"]["text"]
    assert "callback dead-lettered: window_closed" in by_type["callback.dead"]["text"]


async def test_a_refusing_webhook_dead_letters_the_alert(amqp_url: str, redis_url: str, namespace: str) -> None:
    refused: list[int] = []

    async def hook(request: web.Request) -> web.Response:
        refused.append(1)
        return web.Response(status=400, text="invalid_payload")

    app = web.Application()
    app.router.add_post("/hook", hook)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    url = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}/hook"  # type: ignore[union-attr]
    conn = await connect(amqp_url, name="test-alerts-dead")
    redis = Redis.from_url(redis_url)
    topology = Topology(namespace)
    notifier = AlertNotifier(conn, topology, redis, url, backoff=0.01, max_attempts=2)
    try:
        await notifier.start()
        await Publisher(conn, topology, "scheduler").publish(
            NodeFailed(node_id="gpu-9a", failure_reason="x", observed_by="scheduler")
        )
        channel = await conn.channel()
        dead = await channel.declare_queue(topology.name("alerts.dead"), passive=True)
        deadline = time.monotonic() + 30
        message = None
        while message is None and time.monotonic() < deadline:
            message = await dead.get(no_ack=True, fail=False)
            if message is None:
                await asyncio.sleep(0.1)
        assert message is not None, "the alert was neither posted nor dead-lettered"
        assert message.type == "node.failed"
        assert len(refused) == 2  # a 4xx is final per attempt: one post per bus delivery, no inner retries
    finally:
        await notifier.stop()
        await conn.close()
        await redis.aclose()
        await runner.cleanup()
