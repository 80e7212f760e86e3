"""A PoC window missed for a reason an operator meets: the bandwidth floor the scheduler puts on every rental
(``SCHEDULER_POLICY__MIN_INET_DOWN_MBPS``) is above every host on the market, so each pre-pull and fresh rental ends
``job.failed`` ``no_offers`` and nothing is registered by poc_start.

A node id registered after poc_start does not join that PoC (gonka-protocol.md §3): the slot earns no weight this
epoch, and the scheduler drops its candidates at poc_start — before the provisioner's own ``deadline_missed`` could
say so. The scheduler's critical ``alert.raised`` is then the only page naming the lost window: it must reach the
operator's webhook through the real AlertNotifier once, not on every tick after.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from hybrid_common.alerts import AlertNotifier, describe
from hybrid_common.messages.domain import FailureCause
from hybrid_common.messages.events import AlertRaised, InstanceCreated, JobFailed
from tests.integration.test_scheduler_kit import RealProvisionerWorld
from tests.support.webhook import Webhook

pytestmark = [pytest.mark.broker, pytest.mark.redis, pytest.mark.timeout(240)]

FIRST_POC_START = 120
EPOCH = 1  # the first window: its poc_start comes ~30 s into the test (0.25 s blocks)
SLOT = 1
# The simulated Vast market's hosts download at 200–9000 Mbps: a 20 Gbps floor is one no offer meets.
UNMET_INET_DOWN_MBPS = "20000"
# Blocks watched after the miss: ~5 s, some 50 scheduler ticks (SCHEDULER_POLL_SECONDS 0.1) that must not re-page.
AFTER_MISS_BLOCKS = 20
MISSED_TITLE = f"epoch {EPOCH}: slot {SLOT} missed its PoC window (missed registration)"


@pytest.fixture
async def webhook() -> AsyncIterator[Webhook]:
    async with Webhook() as hook:
        yield hook


async def test_a_window_missed_for_want_of_a_fitting_offer_pages_once_and_leaves_nothing_billing(
    amqp_url: str, redis_url: str, namespace: str, tmp_path: Path, webhook: Webhook
) -> None:
    async with RealProvisionerWorld(amqp_url, redis_url, namespace, tmp_path, first_poc_start=FIRST_POC_START) as w:
        notifier = AlertNotifier(w.conn, w.pw.topology, w.redis, webhook.url, backoff=0.05)
        await notifier.start()
        try:
            w.start_scheduler(SCHEDULER_POLICY__MIN_INET_DOWN_MBPS=UNMET_INET_DOWN_MBPS)

            async def missed() -> bool:
                campaign = await w.campaign(EPOCH)
                return campaign is not None and campaign["missed_slots"] == [SLOT]

            await w.wait(missed, 90, f"epoch {EPOCH} slot {SLOT} recorded as missed")
            missed_at = await w.http.height()
            # Nothing may be declared missed before the window opens: the chain decides at poc_start (§3, §5).
            assert missed_at >= FIRST_POC_START, missed_at
            await w.http.wait_height(missed_at + AFTER_MISS_BLOCKS, timeout=60)

            def alertable() -> int:
                return sum(1 for e in w.events.items if describe(e.payload) is not None)

            # The notifier consumes the same events as the log: once it has posted all of them, the webhook is whole.
            await w.wait(lambda: len(webhook.bodies) >= alertable(), 30, "the webhook caught up with the bus")

            raised = [e for e in w.events.of(AlertRaised) if e.title == MISSED_TITLE]
            assert len(raised) == 1, [e.title for e in w.events.of(AlertRaised)]
            assert raised[0].severity == "critical"
            assert f"poc_start {FIRST_POC_START}" in raised[0].detail, raised[0].detail
            posted = [b for b in webhook.bodies if b["event_type"] == "alert.raised" and b["title"] == MISSED_TITLE]
            assert len(posted) == 1, [b["title"] for b in webhook.bodies]
            assert posted[0]["severity"] == "critical"
            assert f"epoch {EPOCH}" in posted[0]["text"] and f"slot {SLOT} missed" in posted[0]["text"]

            # The cause is the one staged: every rental the scheduler asked for found no offer, none was created.
            failed = w.events.of(JobFailed)
            assert failed and {f.cause for f in failed} == {FailureCause.NO_OFFERS}, [
                (f.slot_id, f.cause) for f in failed
            ]
            assert w.events.of(InstanceCreated) == []

            campaign = await w.campaign(EPOCH)
            assert campaign is not None
            assert campaign["missed_slots"] == [SLOT], campaign["notes"]
            assert not [c for c in campaign["candidates"].values() if c["state"] == "ready"], campaign["notes"]
            # Nothing bills on Vast for a window that is lost anyway.
            ledger = w.pw.vast.ledger()
            assert ledger["instances_live"] == 0, ledger["instances"]
        finally:
            await notifier.stop()
