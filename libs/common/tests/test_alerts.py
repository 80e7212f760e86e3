"""Severity of a failed job's alert: a spare pre-pull the market could not serve warns, everything else pages."""

from __future__ import annotations

import pytest

from hybrid_common.alerts import describe, webhook_body
from hybrid_common.messages.domain import FailureCause
from hybrid_common.messages.events import JobFailed


def _failed(cause: FailureCause, *, standby: bool) -> JobFailed:
    return JobFailed(job_id="gpu-3b.0a1b2c", slot_id="gpu-3b", cause=cause, message="m", standby=standby)


@pytest.mark.parametrize(
    "cause",
    [FailureCause.NO_OFFERS, FailureCause.OFFER_GONE, FailureCause.BUDGET, FailureCause.INSUFFICIENT_CREDIT],
)
def test_a_standby_prepull_left_unrented_is_a_warning(cause: FailureCause) -> None:
    alert = describe(_failed(cause, standby=True))
    assert alert is not None
    assert alert.severity == "warning"
    assert alert.title == f"standby pre-pull not rented for slot gpu-3b: {cause.value}"
    assert webhook_body(alert, event_type="job.failed", source="provisioner")["severity"] == "warning"


@pytest.mark.parametrize(
    ("cause", "title"),
    [
        # A spare that rented and then broke (pull, host) or gave up on its machines is worth a page.
        (FailureCause.PULL_FAILED, "rental gave up for slot gpu-3b: pull_failed"),
        (FailureCause.CREATE_FAILED, "rental gave up for slot gpu-3b: create_failed"),
        (FailureCause.API_ERROR, "rental gave up for slot gpu-3b: api_error"),
        # Missing the window is critical whatever the job was.
        (FailureCause.DEADLINE_MISSED, "missed registration for slot gpu-3b: deadline_missed"),
        (FailureCause.REGISTRATION_FAILED, "missed registration for slot gpu-3b: registration_failed"),
    ],
)
def test_a_standby_prepull_that_broke_or_missed_the_window_is_critical(cause: FailureCause, title: str) -> None:
    alert = describe(_failed(cause, standby=True))
    assert alert is not None and (alert.severity, alert.title) == ("critical", title)


@pytest.mark.parametrize("cause", list(FailureCause))
def test_the_slots_own_rental_failing_is_always_critical(cause: FailureCause) -> None:
    alert = describe(_failed(cause, standby=False))
    assert alert is not None and alert.severity == "critical"


def test_a_job_failed_from_before_the_standby_field_pages() -> None:
    # Envelopes already in queues (or the outbox of a job recorded by an older replica) lack the field.
    old = JobFailed.model_validate(
        {"job_id": "gpu-3b.0a1b2c", "slot_id": "gpu-3b", "cause": "no_offers", "message": "no offer fits"}
    )
    assert old.standby is False
    alert = describe(old)
    assert alert is not None and alert.severity == "critical"
