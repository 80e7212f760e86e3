"""Live controls of the upstream simulator: timing settings, injected faults, and what it observed.

Everything here is reachable both in-process (``RunningUpstream.state``) and over HTTP under ``/_sim/...``
so that proxy tests can, for example, force the next N requests to 429/5xx or check that a client
disconnect closed the upstream stream (inference-proxy.md: "client disconnect must cancel the upstream
request").
"""

from __future__ import annotations

import time
from collections import Counter, deque
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

FaultKind = Literal["status", "disconnect", "stall"]
StreamOutcome = Literal["open", "completed", "client_disconnect", "fault_disconnect"]


@dataclass
class UpstreamSettings:
    """Timing applied to every generation; all in wall-clock units (not scaled by the profile)."""

    latency_ms: float = 0.0  # before the response headers
    ttft_ms: float = 0.0  # time to first token, after the headers
    tokens_per_s: float = 0.0  # 0 = as fast as possible
    rate_limit_per_min: int | None = None

    def update(self, changes: dict[str, Any]) -> None:
        for name in ("latency_ms", "ttft_ms", "tokens_per_s"):
            if name in changes:
                value = float(changes[name])
                if value < 0:
                    raise ValueError(f"{name} must be >= 0")
                setattr(self, name, value)
        if "rate_limit_per_min" in changes:
            limit = changes["rate_limit_per_min"]
            if limit is not None and int(limit) < 1:
                raise ValueError("rate_limit_per_min must be >= 1 or null")
            self.rate_limit_per_min = None if limit is None else int(limit)


@dataclass
class Fault:
    """One injected misbehaviour, applied to the next ``count`` generation requests.

    - ``status``: answer ``status`` (429 or 5xx) with an OpenAI-style error body (``retry_after`` adds
      the header, which the real upstream does not promise).
    - ``disconnect``: drop the connection — streams after ``after_tokens`` token steps, JSON before any byte.
    - ``stall``: wait ``seconds`` before the response headers, then answer normally.
    """

    kind: FaultKind
    count: int = 1
    status: int = 500
    message: str | None = None
    retry_after: float | None = None
    after_tokens: int = 0
    seconds: float = 0.0

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Fault:
        kind = data.get("kind", "status")
        if kind not in ("status", "disconnect", "stall"):
            raise ValueError("kind must be one of status, disconnect, stall")
        fault = cls(
            kind=kind,
            count=int(data.get("count", 1)),
            status=int(data.get("status", 500)),
            message=data.get("message"),
            retry_after=None if data.get("retry_after") is None else float(data["retry_after"]),
            after_tokens=int(data.get("after_tokens", 0)),
            seconds=float(data.get("seconds", 0.0)),
        )
        if fault.count < 1:
            raise ValueError("count must be >= 1")
        if kind == "status" and not (fault.status == 429 or 500 <= fault.status <= 599):
            raise ValueError("status faults are 429 or 5xx")
        return fault


class FaultQueue:
    def __init__(self) -> None:
        self._faults: deque[Fault] = deque()

    def __bool__(self) -> bool:
        return bool(self._faults)

    def add(self, fault: Fault) -> None:
        self._faults.append(fault)

    def take(self) -> Fault | None:
        """The fault for this request (first in, first applied), consuming one of its count."""
        if not self._faults:
            return None
        fault = self._faults[0]
        fault.count -= 1
        if fault.count <= 0:
            self._faults.popleft()
        return fault

    def clear(self) -> None:
        self._faults.clear()

    def pending(self) -> list[dict[str, Any]]:
        return [asdict(f) for f in self._faults]


@dataclass
class StreamRecord:
    id: int
    path: str
    model: str
    opened_at: float  # time.time()
    closed_at: float | None = None
    outcome: StreamOutcome = "open"
    steps_sent: int = 0

    def close(self, outcome: StreamOutcome) -> None:
        self.closed_at = time.time()
        self.outcome = outcome


@dataclass
class ReceivedRequest:
    at: float
    method: str
    path: str
    raw_headers: tuple[tuple[bytes, bytes], ...]  # as received; decoded only when asked for (hot path)
    body: bytes

    def headers(self) -> list[tuple[str, str]]:
        return [(k.decode("latin-1"), v.decode("latin-1")) for k, v in self.raw_headers]


@dataclass
class UpstreamStats:
    requests: int = 0
    by_status: Counter[int] = field(default_factory=Counter)
    by_path: Counter[str] = field(default_factory=Counter)
    completion_tokens: int = 0
    streams_opened: int = 0
    streams_by_outcome: Counter[str] = field(default_factory=Counter)
    open_streams: dict[int, StreamRecord] = field(default_factory=dict)
    recent_streams: deque[StreamRecord] = field(default_factory=lambda: deque(maxlen=256))
    received: deque[ReceivedRequest] = field(default_factory=lambda: deque(maxlen=256))

    def open_stream(self, path: str, model: str) -> StreamRecord:
        self.streams_opened += 1
        record = StreamRecord(self.streams_opened, path, model, time.time())
        self.open_streams[record.id] = record
        self.recent_streams.append(record)
        return record

    def close_stream(self, record: StreamRecord, outcome: StreamOutcome) -> None:
        record.close(outcome)
        self.open_streams.pop(record.id, None)
        self.streams_by_outcome[outcome] += 1

    def reset(self) -> None:
        fresh = UpstreamStats()
        fresh.open_streams = self.open_streams  # streams still running keep being tracked
        self.__dict__.update(fresh.__dict__)

    def snapshot(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "by_status": {str(k): v for k, v in sorted(self.by_status.items())},
            "by_path": dict(self.by_path),
            "completion_tokens": self.completion_tokens,
            "streams": {
                "opened": self.streams_opened,
                "open": len(self.open_streams),
                **{
                    k: self.streams_by_outcome.get(k, 0) for k in ("completed", "client_disconnect", "fault_disconnect")
                },
            },
            "recent_streams": [asdict(r) for r in list(self.recent_streams)[-32:]],
        }
