"""The relay's Prometheus metrics (``hybrid_relay_*`` on the metrics port)."""

from __future__ import annotations

from hybrid_common.metrics import counter, gauge, histogram

# Forward lag: fine enough below a second to read p50/p99 from the histogram (the target is p99 ≤ 1 s).
LAG_BUCKETS = (
    0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0
)  # fmt: skip

DOOR_ANSWERS = counter("relay_door_answers_total", "HTTP answers of the public door", ("status",))
REFUSED = counter("relay_refused_total", "requests refused by the door's protection", ("reason",))
ACCEPTED = counter("relay_accepted_total", "batches confirmed by the broker and answered 200", ("generation", "kind"))
ACCEPTED_ITEMS = counter("relay_accepted_items_total", "nonces (v1) or artifacts (v2) in accepted batches")
# Accept latency: fine around the 20 ms p99 target of issue #11.
ACCEPT_BUCKETS = (
    0.001, 0.0025, 0.005, 0.0075, 0.01, 0.0125, 0.015, 0.0175, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.25, 0.5,
    1.0, 2.5, 5.0, 10.0,
)  # fmt: skip

ACCEPT_SECONDS = histogram(
    "relay_accept_seconds", "door latency of an accepted batch, confirm included", buckets=ACCEPT_BUCKETS
)
HANDOFF_SECONDS = histogram(
    "relay_handoff_confirm_seconds", "one hand-off message: published → confirmed", buckets=ACCEPT_BUCKETS
)
HANDOFF_BATCHES = histogram(
    "relay_handoff_batches", "batches per hand-off message", buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256)
)
OUTCOMES = counter("relay_outcomes_total", "final outcome per accepted batch", ("outcome",))
FORWARDED_ITEMS = counter("relay_forwarded_items_total", "nonces (v1) or artifacts (v2) the dapi took")
ATTEMPTS = counter("relay_forward_attempts_total", "POSTs to the dapi by result", ("result",))
FORWARD_LAG = histogram(
    "relay_forward_lag_seconds", "accepted at the door → answered 2xx by the dapi", buckets=LAG_BUCKETS
)
IN_FLIGHT = gauge("relay_in_flight", "batches taken from the queue and not yet settled")
EVENTS_DROPPED = counter("relay_events_failed_total", "outcome/accepted events that could not be published")
