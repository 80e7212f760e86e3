"""The alert webhook: events an operator must hear about, posted as Slack/Discord-compatible JSON.

A consumer of the ``alerts`` subscription queue (topology.SUBSCRIPTIONS) turns each event into one short message and
POSTs ``{"text": ..., "content": ...}`` to ``ALERT_WEBHOOK_URL``: Slack incoming webhooks read ``text``, Discord
webhooks read ``content``, each ignores the other. Alerted: failed rentals (``instance.failed``, ``job.failed``),
budget blocks, orphans destroyed, FAILED nodes, missed registrations (``job.failed`` with ``deadline_missed`` or
``registration_failed``), dead-lettered callbacks, confirmation PoCs and the services' own ``alert.raised``.

Severity of ``job.failed``: critical, except a standby pre-pull (``standby``) that gave up because the market had no
machine left for it or a budget/credit cap refused it — a warning. The scheduler pre-pulls several spares per slot and
falls back to fresh rentals, so a healthy epoch routinely ends some spares that way; the slot's own rental failing,
a missed deadline and a budget block (its ``budget.blocked`` event) still page.

Delivery: a few quick retries with backoff inside the handler; if the webhook still fails the handler raises, so the
bus retries the message and finally dead-letters it to ``alerts.dead`` (reliability.md: never lose an event
silently). Several replicas may share the queue: the bus's idempotency by envelope id posts each alert once.
No secrets: the text carries only event fields, passed through the redactor; the webhook URL (itself a credential for
Slack and Discord) is never logged, only its host.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Final
from urllib.parse import urlsplit

import httpx
from aio_pika.abc import AbstractRobustConnection
from pydantic import AliasChoices, Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict
from redis.asyncio import Redis

from hybrid_common.bus import Consumer, Delivery
from hybrid_common.messages import Payload
from hybrid_common.messages.domain import FailureCause
from hybrid_common.messages.events import (
    AlertRaised,
    BudgetBlocked,
    CallbackDead,
    ConfirmationPocDetected,
    InstanceFailed,
    JobFailed,
    NodeFailed,
    OrphanDestroyed,
)
from hybrid_common.metrics import counter
from hybrid_common.topology import SUBSCRIPTIONS, QueueSpec, Topology

log = logging.getLogger("hybrid.alerts")

ALERTS_QUEUE: Final[QueueSpec] = next(s for s in SUBSCRIPTIONS if s.name == "alerts")
# Discord refuses content over 2000 characters; Slack truncates long text anyway.
MAX_TEXT: Final = 1900
MISSED_REGISTRATION = {FailureCause.DEADLINE_MISSED, FailureCause.REGISTRATION_FAILED}
# Why a spare may end without a rental: nothing fits (or the one that did was taken first), or a cap refused it —
# which ``budget.blocked`` has already reported as critical. No instance failed and no money went.
SPARE_NOT_RENTED = {
    FailureCause.NO_OFFERS,
    FailureCause.OFFER_GONE,
    FailureCause.BUDGET,
    FailureCause.INSUFFICIENT_CREDIT,
}

SENT = counter("alerts_sent_total", "alert webhook posts by outcome", ("outcome",))


class AlertSettings(BaseSettings):
    # ALERT_WEBHOOK_URL= (or compose's ${ALERT_WEBHOOK_URL:-}) means unset: no notifier posting to an empty URL.
    model_config = SettingsConfigDict(
        env_file=".env", env_file_encoding="utf-8", extra="ignore", populate_by_name=True, env_ignore_empty=True
    )

    alert_webhook_url: SecretStr | None = Field(default=None, validation_alias=AliasChoices("ALERT_WEBHOOK_URL"))
    alert_webhook_timeout: float = Field(default=5.0, gt=0, validation_alias=AliasChoices("ALERT_WEBHOOK_TIMEOUT"))
    alert_webhook_attempts: int = Field(default=4, ge=1, validation_alias=AliasChoices("ALERT_WEBHOOK_ATTEMPTS"))


@dataclass(frozen=True)
class Alert:
    severity: str  # info | warning | critical
    title: str
    detail: str


def _instance_failed(p: InstanceFailed) -> Alert:
    where = f"instance {p.instance_id}" if p.instance_id is not None else "no instance"
    retry = "retrying on another offer" if p.will_retry else "not retrying"
    return Alert("warning", f"rental failed for slot {p.slot_id}: {p.cause.value}", f"{where}: {p.message} ({retry})")


def _job_failed(p: JobFailed) -> Alert:
    if p.cause in MISSED_REGISTRATION:
        return Alert("critical", f"missed registration for slot {p.slot_id}: {p.cause.value}", p.message)
    if p.standby and p.cause in SPARE_NOT_RENTED:
        return Alert("warning", f"standby pre-pull not rented for slot {p.slot_id}: {p.cause.value}", p.message)
    return Alert("critical", f"rental gave up for slot {p.slot_id}: {p.cause.value}", p.message)


def _budget(p: BudgetBlocked) -> Alert:
    return Alert(
        "critical",
        f"budget blocked a rental ({p.scope} cap ${p.cap_usd:.2f})",
        f"spent ${p.spent_usd:.2f}, the rental would add about ${p.estimated_usd:.2f}; job {p.job_id or '-'}",
    )


def _orphan(p: OrphanDestroyed) -> Alert:
    return Alert("warning", f"orphan instance {p.instance_id} destroyed", f"label {p.label or '-'}: {p.reason}")


def _node_failed(p: NodeFailed) -> Alert:
    return Alert("critical", f"dapi node {p.node_id} FAILED", f"{p.failure_reason} (seen by {p.observed_by})")


def _callback_dead(p: CallbackDead) -> Alert:
    status = f", last HTTP {p.last_status}" if p.last_status is not None else ""
    return Alert(
        "critical",
        f"PoC callback dead-lettered: {p.reason}",
        f"batch {p.batch_id} to {p.path} after {p.attempts} attempts{status}",
    )


def _confirmation(p: ConfirmationPocDetected) -> Alert:
    return Alert(
        "warning",
        f"confirmation PoC in epoch {p.epoch_index} (event {p.event_sequence})",
        f"generation starts at height {p.generation_start_height}; policy {p.policy.value}: {p.action}",
    )


def _raised(p: AlertRaised) -> Alert:
    return Alert(p.severity, p.title, p.detail)


DESCRIBE: Final[dict[type[Payload], Callable[[Any], Alert]]] = {
    InstanceFailed: _instance_failed,
    JobFailed: _job_failed,
    BudgetBlocked: _budget,
    OrphanDestroyed: _orphan,
    NodeFailed: _node_failed,
    CallbackDead: _callback_dead,
    ConfirmationPocDetected: _confirmation,
    AlertRaised: _raised,
}

ICON = {"info": "ℹ️", "warning": "⚠️", "critical": "🚨"}


def describe(payload: Payload) -> Alert | None:
    """The alert for an event, or None for an event that is not alerted on."""
    fn = DESCRIBE.get(type(payload))
    return fn(payload) if fn is not None else None


def redact(text: str, secrets: Iterable[str]) -> str:
    for s in secrets:
        if s and len(s) >= 4:
            text = text.replace(s, "**********")
    return text


def webhook_body(alert: Alert, *, event_type: str, source: str, secrets: Iterable[str] = ()) -> dict[str, Any]:
    """Slack (``text``) and Discord (``content``) read the same message; the rest is for other receivers."""
    text = (
        f"{ICON.get(alert.severity, '')} [{alert.severity}] {alert.title}\n{alert.detail}\n({event_type} from {source})"
    )
    text = redact(text, list(secrets))[:MAX_TEXT]
    return {
        "text": text,
        "content": text,
        "username": "gonka-hybrid",
        "severity": alert.severity,
        "title": redact(alert.title, list(secrets)),
        "event_type": event_type,
    }


class AlertNotifier:
    """Consume ``alerts`` and post each alert to the webhook."""

    def __init__(
        self,
        connection: AbstractRobustConnection,
        topology: Topology,
        redis: Redis,
        url: str,
        *,
        secrets: Iterable[str] = (),
        timeout: float = 5.0,
        attempts: int = 4,
        backoff: float = 0.5,
        max_attempts: int = 5,
    ) -> None:
        self.url = url
        self.secrets = [s for s in secrets if s]
        self.attempts = attempts
        self.backoff = backoff
        self.client = httpx.AsyncClient(timeout=timeout)
        self.consumer = Consumer(
            connection, topology, redis, ALERTS_QUEUE, self.handle, prefetch=4, max_attempts=max_attempts
        )
        self.sent = 0

    @property
    def host(self) -> str:
        return urlsplit(self.url).netloc or "?"

    async def start(self) -> None:
        await self.consumer.start()
        log.info("alert webhook: posting to %s", self.host)

    async def stop(self) -> None:
        await self.consumer.stop()
        await self.client.aclose()

    async def handle(self, d: Delivery) -> None:
        alert = describe(d.payload)
        if alert is None:
            return
        body = webhook_body(alert, event_type=d.envelope.type, source=d.envelope.source, secrets=self.secrets)
        await self.post(body)

    async def post(self, body: dict[str, Any]) -> None:
        """POST with retries; 2xx is success, 429/5xx and network errors are retried, other 4xx are final."""
        last = ""
        for attempt in range(1, self.attempts + 1):
            try:
                r = await self.client.post(self.url, json=body)
                if r.status_code < 300:
                    self.sent += 1
                    SENT.labels("sent").inc()
                    return
                last = f"HTTP {r.status_code}"
                if r.status_code != 429 and r.status_code < 500:
                    break  # the receiver refuses this body: retrying it will not help
                retry_after = r.headers.get("retry-after")
                delay = (
                    float(retry_after) if retry_after and retry_after.isdigit() else self.backoff * 2 ** (attempt - 1)
                )
            except httpx.HTTPError as exc:
                last = type(exc).__name__  # the exception text may carry the URL (a credential): only its class
                delay = self.backoff * 2 ** (attempt - 1)
            if attempt < self.attempts:
                await asyncio.sleep(min(delay, 30.0))
        SENT.labels("failed").inc()
        raise RuntimeError(f"alert webhook at {self.host} failed: {last}")


async def start_alert_notifier(
    connection: AbstractRobustConnection,
    topology: Topology,
    redis: Redis,
    *,
    settings: AlertSettings | None = None,
    secrets: Iterable[str] = (),
) -> AlertNotifier | None:
    """Start the notifier when ``ALERT_WEBHOOK_URL`` is set; None (and nothing consumed) when it is not."""
    s = settings or AlertSettings()
    if s.alert_webhook_url is None:
        log.info("ALERT_WEBHOOK_URL not set: alerts are not posted")
        return None
    notifier = AlertNotifier(
        connection,
        topology,
        redis,
        s.alert_webhook_url.get_secret_value(),
        secrets=secrets,
        timeout=s.alert_webhook_timeout,
        attempts=s.alert_webhook_attempts,
    )
    await notifier.start()
    return notifier
