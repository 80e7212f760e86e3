"""Prometheus metrics of the inference-only node (exposed on ``port("proxy.metrics")``).

Labelled children are bound once here so the hot path pays one ``inc``/``observe`` per figure, not a label lookup.
"""

from __future__ import annotations

from functools import cache

from prometheus_client import Counter, Histogram

from hybrid_common.metrics import counter, gauge, histogram

REQUESTS = counter("proxy_requests_total", "requests answered by the proxy node", ("route", "status"))
UPSTREAM_ERRORS = counter(
    "proxy_upstream_errors_total", "upstream answers that were not 2xx, and failures to get one", ("status",)
)
UPSTREAM_RETRIES = counter(
    "proxy_upstream_retries_total", "upstream attempts retried before the first byte", ("reason",)
)
ADDED_LATENCY = histogram(
    "proxy_added_latency_seconds",
    "time the proxy itself adds to a request (before the upstream call and after its answer)",
    ("route",),
)
TTFB = histogram(
    "proxy_time_to_first_byte_seconds",
    "request received -> first response byte written to the client",
    ("route",),
    buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0),
)
TOKENS = counter("proxy_tokens_total", "tokens reported by the upstream's usage", ("kind",))
STREAMS_OPEN = gauge("proxy_streams_open", "streams being relayed now")
CLIENT_DISCONNECTS = counter("proxy_client_disconnects_total", "clients that went away before the answer ended")
REFUSED_SOURCES = counter("proxy_refused_total", "requests refused by the inbound source allowlist")
VALIDATIONS = counter("proxy_validation_requests_total", "enforced_tokens requests by outcome", ("outcome",))
HEALTH_CHECKS = counter("proxy_health_checks_total", "upstream health probes by result", ("result",))
NODE_STATE = gauge("proxy_node_state", "1 for the MLNode state the node reports", ("state",))
REGISTRATIONS = counter("proxy_registrations_total", "upserts of the proxy node into the dapi by outcome", ("outcome",))

PROMPT_TOKENS = TOKENS.labels("prompt")
COMPLETION_TOKENS = TOKENS.labels("completion")


@cache
def requests(route: str, status: int) -> Counter:
    return REQUESTS.labels(route, str(status))


@cache
def upstream_error(status: int | str) -> Counter:
    return UPSTREAM_ERRORS.labels(str(status))


@cache
def added_latency(route: str) -> Histogram:
    return ADDED_LATENCY.labels(route)


@cache
def ttfb(route: str) -> Histogram:
    return TTFB.labels(route)
