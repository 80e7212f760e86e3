"""Benchmark of the callback relay (issue #11): accepted batches/s with publisher confirms, accept latency,
forward lag to a healthy dapi simulator, and batches lost.

Runs the dapi simulator (``python -m sim dapi``) and the relay (``python -m hybrid_relay``) as their own processes
and posts unique v1 ProofBatches from a separate client process, ``--concurrency`` keep-alive connections, each
waiting for its 200 before the next batch (as the MLNode senders do). Every body differs (its nonces carry the
batch's sequence number), so deduplication never hides forwarding work. The relay's ``callback.forwarded`` events
give the forward lag (door accept → dapi 2xx); the simulator's ``/_sim/batches`` tells which batches reached it:
``lost`` = answered 200 but never reached the dapi (nor dead-lettered).

Usage: ``.venv/bin/python bench/relay.py [--duration 10] [--concurrency 64] [--nonces 10]``
(``AMQP_URL`` / ``REDIS_URL`` select the broker and Redis; default the local ones). The last line is a JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _load import _percentiles, _ResponseReader

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_port(port: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listens on {port}")


def _spawn(args: list[str], env: dict[str, str], log: str) -> subprocess.Popen[bytes]:
    with open(log, "wb") as out:
        return subprocess.Popen(args, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _batch(seq: int, nonces: int) -> bytes:
    first = seq * 1000
    body = {
        "public_key": "bench-pk",
        "block_hash": "bench-hash",
        "block_height": 100,
        "nonces": [first + i for i in range(nonces)],
        "dist": [0.25 + i / 1000 for i in range(nonces)],
        "node_id": seq % 16,
    }
    return json.dumps(body, separators=(",", ":")).encode()


def _request(port: int, body: bytes) -> bytes:
    return (
        f"POST /v1/poc-batches/generated HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode() + body


async def _client(port: int, concurrency: int, duration: float, warmup: float, nonces: int) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    seq = [0]
    accepted: list[int] = []
    latencies: list[float] = []
    status: dict[int, int] = {}
    errors = [0]
    start = time.perf_counter()
    measure_from, stop_at = start + warmup, start + warmup + duration

    async def connection() -> None:
        reader: _ResponseReader | None = None
        while time.perf_counter() < stop_at:
            if reader is None or reader.closed:
                _, reader = await loop.create_connection(_ResponseReader, "127.0.0.1", port)
            seq[0] += 1
            n = seq[0]
            t0 = time.perf_counter()
            try:
                await asyncio.wait_for(reader.exchange(_request(port, _batch(n, nonces))), 30)
            except (OSError, TimeoutError, ValueError):
                errors[0] += 1
                reader = None
                continue
            t1 = time.perf_counter()
            status[reader.status] = status.get(reader.status, 0) + 1
            if reader.status == 200:
                accepted.append(n)
                if t0 >= measure_from:
                    latencies.append(t1 - t0)

    await asyncio.gather(*(connection() for _ in range(concurrency)))
    return {
        "accepted": accepted,
        "latencies": latencies,
        "status": status,
        "errors": errors[0],
        "measured_s": time.perf_counter() - measure_from,
    }


def _client_process(port: int, concurrency: int, duration: float, warmup: float, nonces: int) -> dict[str, Any]:
    import uvloop

    return uvloop.run(_client(port, concurrency, duration, warmup, nonces))


async def _collect_lags(amqp_url: str, namespace: str, lags: dict[str, float], ready: asyncio.Event) -> None:
    import aio_pika

    conn = await aio_pika.connect_robust(amqp_url)
    async with conn:
        ch = await conn.channel()
        ex = await ch.declare_exchange(f"{namespace}.events", aio_pika.ExchangeType.TOPIC, durable=True)
        q = await ch.declare_queue(exclusive=True, auto_delete=True)
        await q.bind(ex, routing_key="callback.forwarded")
        ready.set()
        async with q.iterator(no_ack=True) as it:
            async for message in it:
                payload = json.loads(message.body)["payload"]
                lags[payload["batch_id"]] = payload["lag_ms"]


async def _sim_batches(public_port: int) -> list[dict[str, Any]]:
    import aiohttp

    async with (
        aiohttp.ClientSession() as s,
        s.get(f"http://127.0.0.1:{public_port}/_sim/batches") as r,
    ):
        data = await r.json()
        return data if isinstance(data, list) else data.get("batches", [])


async def main(args: argparse.Namespace) -> dict[str, Any]:
    amqp_url = os.environ.get("AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
    redis_url = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
    namespace = f"bench{uuid.uuid4().hex[:8]}"
    public, admin, callback, relay_port = _free_port(), _free_port(), _free_port(), _free_port()
    logs = tempfile.mkdtemp(prefix="relay-bench-")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    dapi_args = ["--public-port", str(public), "--admin-port", str(admin), "--callback-port", str(callback)]
    dapi = _spawn([PY, "-m", "sim", "dapi", *dapi_args], env, f"{logs}/dapi.log")
    relay_env = {
        **env,
        "AMQP_URL": amqp_url,
        "REDIS_URL": redis_url,
        "HYBRID_NAMESPACE": namespace,
        "DAPI_CALLBACK_URL": f"http://127.0.0.1:{callback}",
        "RELAY_PUBLIC_HOST": "127.0.0.1",
        "RELAY_PUBLIC_PORT": str(relay_port),
        "RELAY_METRICS_PORT": "0",
        "LOG_LEVEL": "WARNING",
        "RELAY_ACCEPTED_EVENTS": "false" if args.no_accepted_events else "true",
    }
    profile = os.environ.get("RELAY_BENCH_PROFILE")  # a file: run the relay under cProfile
    relay = _spawn(
        [PY, *(["-m", "cProfile", "-o", profile] if profile else []), "-m", "hybrid_relay"],
        {**relay_env, "RELAY_ROLE": "door" if args.split else "all"},
        f"{logs}/relay.log",
    )
    # --split: the forwarder in a process of its own (RELAY_ROLE=forwarder), so the relay can use both cores.
    forwarder = (
        _spawn([PY, "-m", "hybrid_relay"], {**relay_env, "RELAY_ROLE": "forwarder"}, f"{logs}/fwd.log")
        if args.split
        else None
    )
    lags: dict[str, float] = {}
    try:
        _wait_port(callback)
        _wait_port(relay_port)
        ready = asyncio.Event()
        collector = asyncio.create_task(_collect_lags(amqp_url, namespace, lags, ready))
        await asyncio.wait_for(ready.wait(), 20)
        loop = asyncio.get_running_loop()
        procs = [("relay", relay), ("dapi", dapi)] + ([("forwarder", forwarder)] if forwarder else [])
        cpu_before = {name: _cpu_seconds(proc.pid) for name, proc in procs}
        with ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn")) as pool:
            result = await loop.run_in_executor(
                pool, _client_process, relay_port, args.concurrency, args.duration, args.warmup, args.nonces
            )
        accepted: list[int] = result["accepted"]
        cpu_us = {
            name: round(1e6 * (_cpu_seconds(proc.pid) - cpu_before[name]) / max(1, len(accepted)), 1)
            for name, proc in procs
        }
        print(f"client: {len(accepted)} batches answered 200, status {result['status']}, errors {result['errors']}")
        # Drain: every accepted batch forwarded (or the wait gives up and they count as lost).
        deadline = time.monotonic() + args.drain_timeout
        while len(lags) < len(accepted) and time.monotonic() < deadline:
            await asyncio.sleep(0.25)
        drained_at = time.monotonic()
        collector.cancel()
        batches = await _sim_batches(public)
        reached = {b["nonce_sample"][0] // 1000 for b in batches if b.get("nonce_sample")}
        lost = sum(1 for n in accepted if n not in reached)
        dapi_duplicates = len(batches) - len(reached)
        lat = _percentiles(result["latencies"])
        lag_values = sorted(lags.values())
        lag = {
            "p50": lag_values[len(lag_values) // 2] if lag_values else None,
            "p99": lag_values[min(len(lag_values) - 1, int(0.99 * len(lag_values)))] if lag_values else None,
            "max": lag_values[-1] if lag_values else None,
        }
        accepted_per_s = len(result["latencies"]) / result["measured_s"]
        print(f"accepted/s (with confirms): {accepted_per_s:.0f}   accept latency ms: {lat}")
        print(f"forward lag ms (door accept → dapi 2xx): {lag}   forwarded events: {len(lags)}")
        print(f"reached the dapi: {len(reached)}   lost: {lost}   duplicates at the dapi: {dapi_duplicates}")
        print(f"CPU per accepted batch (µs, during the load): {cpu_us}")
        print(f"drain wait after the load: {drained_at - deadline + args.drain_timeout:.1f}s   logs: {logs}")
        return {
            "accepted_per_s": round(accepted_per_s, 1),
            "accept_p50_ms": lat.get("p50"),
            "accept_p99_ms": lat.get("p99"),
            "forward_lag_p50_ms": lag["p50"],
            "forward_lag_p99_ms": lag["p99"],
            "lost": lost,
            "dapi_duplicates": dapi_duplicates,
            "accepted": len(accepted),
            "concurrency": args.concurrency,
            "duration_s": args.duration,
            "nonces_per_batch": args.nonces,
            "split": args.split,
            "accepted_events": not args.no_accepted_events,
            "cpu_us_per_batch": cpu_us,
            "cpus": os.cpu_count(),
            "load_avg_1m": os.getloadavg()[0],
        }
    finally:
        alive = [p for p in (forwarder, relay, dapi) if p is not None]
        for proc in alive:
            proc.terminate()
        for proc in alive:
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--nonces", type=int, default=10, help="nonces per batch")
    parser.add_argument("--no-accepted-events", action="store_true", help="RELAY_ACCEPTED_EVENTS=false")
    parser.add_argument("--split", action="store_true", help="door and forwarder in separate processes")
    parser.add_argument("--drain-timeout", type=float, default=60.0)
    figures = asyncio.run(main(parser.parse_args()))
    print(json.dumps(figures))
