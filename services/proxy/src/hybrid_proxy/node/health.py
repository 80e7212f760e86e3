"""``GET /health``: 200 only while the upstream answers (gonka-protocol.md §3, §9: a non-200 marks the node FAILED).

The check is real but cheap. Traffic is evidence: an upstream answer within the freshness window (and no failure
since) is enough. Otherwise one probe (``GET /models``) runs — single-flight, so a burst of health polls costs one
upstream call — and its result is reused for the window. A provider's rate limit is per minute (inference-proxy.md),
so probing on every poll would spend the budget inference needs.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field

from hybrid_proxy.node import metrics
from hybrid_proxy.node.upstream import UpstreamClient, UpstreamFailure

log = logging.getLogger("hybrid.proxy.health")


@dataclass(frozen=True)
class HealthResult:
    healthy: bool
    reason: str
    status: int | None = None  # the probe's HTTP status, when one was made
    latency_ms: float | None = None
    checked_at: float = field(default_factory=time.time)  # wall clock, for the status view
    source: str = "probe"  # probe | traffic


def _judge(status: int) -> tuple[bool, str]:
    if 200 <= status < 300:
        return True, "upstream answers"
    if status in (404, 405):
        return True, f"upstream answers (GET /models is {status} there)"  # Hyperbolic does not document it
    if status == 429:
        return True, "upstream answers (rate limited now)"
    if status in (401, 403):
        return False, f"upstream refuses the API key (HTTP {status})"
    return False, f"upstream answered HTTP {status}"


class UpstreamHealth:
    def __init__(self, upstream: UpstreamClient, *, ttl: float, timeout: float) -> None:
        self.upstream = upstream
        self.ttl = ttl
        self.timeout = timeout
        self._result: HealthResult | None = None
        self._result_at = float("-inf")  # loop time
        self._inflight: asyncio.Task[HealthResult] | None = None
        self._was_healthy: bool | None = None

    def known(self) -> HealthResult | None:
        """The freshest view without probing (for ``/api/v1/state``'s ``inference_healthy``)."""
        now = asyncio.get_running_loop().time()
        traffic = self._from_traffic(now)
        if traffic is not None:
            return traffic
        if self._result is not None and now - self._result_at < self.ttl:
            return self._result
        return None

    def _from_traffic(self, now: float) -> HealthResult | None:
        up = self.upstream
        if now - up.last_answer_at < self.ttl and up.last_answer_at > up.last_failure_at:
            return HealthResult(True, "upstream answered recent traffic", source="traffic")
        return None

    async def check(self) -> HealthResult:
        known = self.known()
        if known is not None:
            return known
        if self._inflight is None or self._inflight.done():
            self._inflight = asyncio.create_task(self._probe(), name="upstream-health-probe")
        return await asyncio.shield(self._inflight)

    async def _probe(self) -> HealthResult:
        loop = asyncio.get_running_loop()
        started = loop.time()
        try:
            status, _ = await self.upstream.list_models(self.timeout)
        except UpstreamFailure as exc:
            result = HealthResult(False, exc.message, None, 1000 * (loop.time() - started))
        else:
            healthy, reason = _judge(status)
            result = HealthResult(healthy, reason, status, 1000 * (loop.time() - started))
        metrics.HEALTH_CHECKS.labels("healthy" if result.healthy else "unhealthy").inc()
        if result.healthy != self._was_healthy:
            (log.info if result.healthy else log.warning)("upstream health: %s", result.reason)
            self._was_healthy = result.healthy
        self._result = result
        self._result_at = loop.time()
        return result
