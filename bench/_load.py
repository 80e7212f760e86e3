"""A small HTTP/1.1 load generator for the benchmarks (upstream, proxy, relay).

Why not aiohttp/httpx as the client: at several thousand requests per second a general-purpose Python
client costs more CPU than the servers under test, so it would measure itself. This one pre-encodes the
request once, keeps each connection alive, and parses responses with a minimal ``asyncio.Protocol``
(Content-Length and chunked bodies; SSE events counted by their ``data:`` prefix). It can spread
connections over several processes. ``run_wrk`` runs Debian's ``wrk`` on the same target, when installed,
as an independent cross-check.

    from _load import LoadSpec, run_load
    result = run_load(LoadSpec(url=..., body=b"{...}", headers={...}, concurrency=32, duration_s=10))
    print(result.as_dict())   # rps, latency_ms{p50,p90,p99,max,mean}, ttfb_ms{...}, status, errors, ...
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import shutil
import subprocess
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import Any, cast
from urllib.parse import urlsplit


@dataclass(frozen=True)
class LoadSpec:
    url: str
    method: str = "POST"
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    concurrency: int = 32
    duration_s: float | None = 10.0  # stop after this long ...
    requests: int | None = None  # ... or after this many requests (whichever is given; requests wins)
    warmup_s: float = 1.0  # requests in the first warmup_s are sent but not measured
    processes: int = 1  # client processes; connections are split between them
    timeout_s: float = 30.0  # per request

    def request_bytes(self) -> bytes:
        u = urlsplit(self.url)
        target = (u.path or "/") + (f"?{u.query}" if u.query else "")
        lines = [f"{self.method} {target} HTTP/1.1", f"Host: {u.hostname}:{u.port or 80}"]
        names = {k.lower() for k in self.headers}
        if self.body or self.method in {"POST", "PUT", "PATCH"}:
            lines.append(f"Content-Length: {len(self.body)}")
            if "content-type" not in names:
                lines.append("Content-Type: application/json")
        lines += [f"{k}: {v}" for k, v in self.headers.items()]
        return ("\r\n".join(lines) + "\r\n\r\n").encode() + self.body


def _percentiles(values: Sequence[float]) -> dict[str, float]:
    if not values:
        return {}
    s = sorted(values)

    def q(p: float) -> float:
        return round(s[min(len(s) - 1, int(p * len(s)))] * 1000.0, 3)

    return {
        "p50": q(0.50),
        "p90": q(0.90),
        "p99": q(0.99),
        "max": round(s[-1] * 1000.0, 3),
        "mean": round(sum(s) / len(s) * 1000.0, 3),
    }


@dataclass
class LoadResult:
    requests: int = 0
    errors: int = 0
    status: Counter[int] = field(default_factory=Counter)
    duration_s: float = 0.0
    latencies: list[float] = field(default_factory=list)
    ttfbs: list[float] = field(default_factory=list)
    body_bytes: int = 0
    sse_events: int = 0

    @property
    def rps(self) -> float:
        return self.requests / self.duration_s if self.duration_s else 0.0

    def merge(self, other: LoadResult) -> None:
        self.requests += other.requests
        self.errors += other.errors
        self.status.update(other.status)
        self.duration_s = max(self.duration_s, other.duration_s)
        self.latencies += other.latencies
        self.ttfbs += other.ttfbs
        self.body_bytes += other.body_bytes
        self.sse_events += other.sse_events

    def as_dict(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "errors": self.errors,
            "status": {str(k): v for k, v in sorted(self.status.items())},
            "duration_s": round(self.duration_s, 3),
            "rps": round(self.rps, 1),
            "latency_ms": _percentiles(self.latencies),
            "ttfb_ms": _percentiles(self.ttfbs),
            "mean_body_bytes": round(self.body_bytes / self.requests, 1) if self.requests else 0,
            "sse_events_per_request": round(self.sse_events / self.requests, 2) if self.requests else 0,
        }


class _ResponseReader(asyncio.Protocol):
    """One keep-alive connection; ``exchange`` sends the request and waits for the whole response."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.done: asyncio.Future[None] | None = None
        self.closed = False
        self._reset()

    def _reset(self) -> None:
        self.status = 0
        self.headers_done = False
        self.content_length = -1
        self.chunked = False
        self.keep_alive = True
        self.first_body_at = 0.0
        self.body_bytes = 0
        self.events = 0
        self.buf.clear()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's transports are not subclasses

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.done is not None and not self.done.done():
            if self.headers_done and not self.chunked and self.content_length < 0:
                self._body(self.buf)  # a close-delimited body ends with the connection
                self.keep_alive = False
                self.done.set_result(None)
            else:
                self.done.set_exception(ConnectionError("connection closed mid-response"))

    def data_received(self, data: bytes) -> None:
        self.buf += data
        try:
            self._parse()
        except Exception as e:  # a malformed response fails this request, not the generator
            if self.done is not None and not self.done.done():
                self.done.set_exception(e)

    def _body(self, payload: bytes | bytearray) -> None:
        if payload:
            if not self.first_body_at:
                self.first_body_at = time.perf_counter()
            self.body_bytes += len(payload)
            self.events += payload.count(b"data:")

    def _parse(self) -> None:
        buf = self.buf
        if not self.headers_done:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head = bytes(buf[:end]).decode("latin-1").split("\r\n")
            self.status = int(head[0].split(" ", 2)[1])
            for line in head[1:]:
                name, _, value = line.partition(":")
                name = name.strip().lower()
                value = value.strip()
                if name == "content-length":
                    self.content_length = int(value)
                elif name == "transfer-encoding" and "chunked" in value.lower():
                    self.chunked = True
                elif name == "connection" and value.lower() == "close":
                    self.keep_alive = False
            del buf[: end + 4]
            self.headers_done = True
        if self.chunked:
            while True:
                line_end = buf.find(b"\r\n")
                if line_end < 0:
                    return
                size = int(bytes(buf[:line_end]).split(b";", 1)[0], 16)
                if size == 0:
                    if len(buf) < line_end + 4:  # "0\r\n" + the empty trailer line
                        return
                    self._finish()
                    return
                if len(buf) < line_end + 2 + size + 2:
                    return
                self._body(buf[line_end + 2 : line_end + 2 + size])
                del buf[: line_end + 2 + size + 2]
        elif self.status in (204, 304) or self.content_length == 0:
            self._finish()
        elif self.content_length > 0:
            if len(buf) < self.content_length:
                return
            self._body(buf[: self.content_length])
            self._finish()
        # else: no length and not chunked — the body runs until the connection closes

    def _finish(self) -> None:
        if self.done is not None and not self.done.done():
            self.done.set_result(None)

    def send(self, request: bytes) -> asyncio.Future[None]:
        """Write the request now; the future resolves with the whole response.

        Written from the caller's own turn of the loop and awaited as a plain future: wrapping it in a task
        (``asyncio.wait_for`` on a coroutine) would cost a task per request and a loop turn before the request
        leaves, both counted in the latency measured."""
        assert self.transport is not None
        self._reset()
        self.done = asyncio.get_running_loop().create_future()
        self.transport.write(request)
        return self.done

    async def exchange(self, request: bytes) -> None:
        await self.send(request)


async def _connection_loop(
    spec: LoadSpec, request: bytes, measure_from: float, stop_at: float, budget: list[int], out: LoadResult
) -> None:
    u = urlsplit(spec.url)
    loop = asyncio.get_running_loop()
    reader: _ResponseReader | None = None
    while time.perf_counter() < stop_at and (budget[0] != 0):
        if reader is None or reader.closed:
            try:
                _, reader = await loop.create_connection(_ResponseReader, u.hostname or "127.0.0.1", u.port or 80)
            except OSError:
                out.errors += 1
                await asyncio.sleep(0.05)
                continue
        if budget[0] > 0:
            budget[0] -= 1
        started = time.perf_counter()
        try:
            async with asyncio.timeout(spec.timeout_s):
                await reader.send(request)
        except (OSError, ConnectionError, TimeoutError, ValueError):
            if started >= measure_from:
                out.errors += 1
            if reader.transport is not None:
                reader.transport.abort()
            reader = None
            continue
        finished = time.perf_counter()
        if started >= measure_from:
            out.requests += 1
            out.status[reader.status] += 1
            out.latencies.append(finished - started)
            out.ttfbs.append((reader.first_body_at or finished) - started)
            out.body_bytes += reader.body_bytes
            out.sse_events += reader.events
        if not reader.keep_alive and reader.transport is not None:
            reader.transport.close()
            reader = None
    if reader is not None and reader.transport is not None:
        reader.transport.close()


async def _run_async(spec: LoadSpec, connections: int, requests: int | None, start_wall: float) -> LoadResult:
    await asyncio.sleep(max(0.0, start_wall - time.time()))
    request = spec.request_bytes()
    now = time.perf_counter()
    warmup = spec.warmup_s if requests is None else 0.0
    measure_from = now + warmup
    stop_at = now + warmup + (spec.duration_s or 0.0) if requests is None else now + 86400.0
    budget = [requests if requests is not None else -1]
    out = LoadResult()
    await asyncio.gather(
        *(_connection_loop(spec, request, measure_from, stop_at, budget, out) for _ in range(connections))
    )
    out.duration_s = time.perf_counter() - measure_from
    return out


def _worker(spec: LoadSpec, connections: int, requests: int | None, start_wall: float) -> LoadResult:
    try:
        import uvloop

        return uvloop.run(_run_async(spec, connections, requests, start_wall))
    except ImportError:
        return asyncio.run(_run_async(spec, connections, requests, start_wall))


def run_load(spec: LoadSpec) -> LoadResult:
    """Run the load described by ``spec`` (blocking) and return the merged measurements."""
    procs = max(1, min(spec.processes, spec.concurrency))
    shares = [spec.concurrency // procs + (1 if i < spec.concurrency % procs else 0) for i in range(procs)]
    req_shares: list[int | None] = [None] * procs
    if spec.requests is not None:
        req_shares = [spec.requests * s // spec.concurrency for s in shares]
        req_shares[0] = (req_shares[0] or 0) + spec.requests - sum(r or 0 for r in req_shares)
    if procs == 1:
        return _worker(spec, shares[0], req_shares[0], time.time())
    start_wall = time.time() + 1.0  # every process starts together, after its imports
    merged = LoadResult()
    with ProcessPoolExecutor(max_workers=procs, mp_context=get_context("spawn")) as pool:
        futures = [pool.submit(_worker, spec, shares[i], req_shares[i], start_wall) for i in range(procs)]
        for f in futures:
            merged.merge(f.result())
    return merged


_WRK_UNITS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60000.0}


def _wrk_ms(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text)
    if not m:
        return float("nan")
    return round(float(m.group(1)) * _WRK_UNITS[m.group(2)], 3)


def run_wrk(spec: LoadSpec, threads: int = 1) -> dict[str, Any] | None:
    """The same load with ``wrk`` (C, epoll), or None when wrk is not installed."""
    wrk = shutil.which("wrk")
    if wrk is None:
        return None

    def lua_str(s: str) -> str:
        return "'" + s.replace("\\", "\\\\").replace("'", "\\'").replace("\n", "\\n") + "'"

    script = [f"wrk.method = {lua_str(spec.method)}", f"wrk.body = {lua_str(spec.body.decode())}"]
    headers = {"Content-Type": "application/json", **spec.headers}
    script += [f"wrk.headers[{lua_str(k)}] = {lua_str(v)}" for k, v in headers.items()]
    with tempfile.TemporaryDirectory() as tmp:
        lua = Path(tmp) / "load.lua"
        lua.write_text("\n".join(script) + "\n")
        duration = max(1, round(spec.duration_s or 10))
        cmd = [wrk, f"-t{threads}", f"-c{spec.concurrency}", f"-d{duration}s", "--latency", "-s", str(lua), spec.url]
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=duration + 30)
            text = proc.stdout
            rps = re.search(r"Requests/sec:\s+([\d.]+)", text)
            if not rps:
                return {"error": (proc.stderr or text)[-500:]}
            lat = dict(re.findall(r"^\s+(50|90|99)%\s+(\S+)$", text, re.MULTILINE))
            non2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", text)
            errors = re.search(r"Socket errors: (.*)$", text, re.MULTILINE)
            return {
                "rps": float(rps.group(1)),
                "latency_ms": {f"p{k}": _wrk_ms(v) for k, v in lat.items()},
                "non_2xx": int(non2xx.group(1)) if non2xx else 0,
                "socket_errors": errors.group(1) if errors else "",
                "command": " ".join([*cmd[:-3], "<lua>", spec.url]),
            }
    return None
