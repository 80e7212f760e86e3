"""Prometheus helpers: one registry per process, the ``hybrid_`` prefix, and an exposition server."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

REGISTRY = CollectorRegistry(auto_describe=True)

# Latency buckets from sub-millisecond (proxy overhead) to a GPU boot (minutes).
FAST_BUCKETS = (0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
SLOW_BUCKETS = (1, 5, 15, 30, 60, 120, 300, 600, 900, 1200, 1800, 3600)


def counter(name: str, doc: str, labels: tuple[str, ...] = ()) -> Counter:
    return Counter(f"hybrid_{name}", doc, labels, registry=REGISTRY)


def gauge(name: str, doc: str, labels: tuple[str, ...] = ()) -> Gauge:
    return Gauge(f"hybrid_{name}", doc, labels, registry=REGISTRY)


def histogram(
    name: str, doc: str, labels: tuple[str, ...] = (), buckets: tuple[float, ...] = FAST_BUCKETS
) -> Histogram:
    return Histogram(f"hybrid_{name}", doc, labels, registry=REGISTRY, buckets=buckets)


def serve_metrics(port: int, addr: str = "127.0.0.1") -> None:
    """Expose ``/metrics`` on ``addr:port`` (0 = disabled)."""
    if port:
        start_http_server(port, addr=addr, registry=REGISTRY)
