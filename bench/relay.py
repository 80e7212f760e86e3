"""Benchmark of the callback relay (issue #11): accepted batches/s with publisher confirms, accept latency,
forward lag to a healthy dapi simulator, and batches lost — with the machine's share of CPU behind each figure.

Runs the dapi simulator and the relay (``python -m hybrid_relay``) as their own processes and posts unique v1
ProofBatches from a separate client process, ``--concurrency`` keep-alive connections, each one MLNode (its own
``node_id`` unless ``--nodes`` says fewer) waiting for its 200 before its next batch, as the MLNode senders do. Every
body differs (its nonces carry the batch's sequence number), so deduplication never hides forwarding work. The
forward lag (door accept → dapi 2xx) is read from the relay's ``hybrid_relay_forward_lag_seconds`` histogram (the
values its ``callback.forwarded`` events carry; ``--lag-from-events`` consumes the events instead: exact per batch, but
the consumer costs the broker a delivery per batch, which nothing in production pays).

The simulator is ``sim.network``'s, started by this script in a process of its own on uvloop (the real dapi is Go:
the stand-in should not take the CPU the relay needs on a 2-core machine), with one addition for the bench: every
batch the chain logs also appends its sequence number to an arrivals file, which this script reads as it grows.
``lost`` = answered 200 but never reached the dapi. (Reading the simulator's ``/_sim/batches`` instead — its last
15,000–20,000 batches, about 7 MB of JSON — every 2 s cost the simulator and this script ~0.2 s of CPU per read, in
bursts that showed up in the relay's latency tail.)

Before the load, the broker's own ceiling is measured in the same run ("peer"): a minimal aio-pika publisher, one
persistent message per publish to a quorum queue and ``--concurrency`` publishers each awaiting its confirm — what a
door publishing one message per batch could get at best from this broker on this machine right now.

CPU per accepted batch is read from /proc for the relay, the simulator, the broker (the process listening on the AMQP
port), the load client, and the whole machine (every process: other work on a shared machine shows up there).

Two load phases on the same relay, each ``--duration`` seconds with ``--concurrency`` connections:
1. saturated (closed loop): ``accepted_per_s`` is the most this relay accepts with confirms on this machine;
2. at ``--rate`` (default 3,000/s, the issue's throughput target) as an open loop: ``accept_p50_ms`` /
   ``accept_p99_ms`` are read here, counted from each batch's due time. In a closed loop of 64 senders the mean latency
   is 64 / throughput by construction (21 ms at 3,000/s), so the saturated phase cannot show what a fleet sending 3,000
   batches/s waits; its figures are printed beside (``saturated_accept_p99_ms``).

Usage: ``.venv/bin/python bench/relay.py [--duration 10] [--concurrency 64] [--rate 3000] [--nonces 10]``
(``AMQP_URL`` / ``REDIS_URL`` select the broker and Redis; default the local ones). The last line is a JSON object.
"""

from __future__ import annotations

import argparse
import array
import asyncio
import contextlib
import functools
import json
import os
import signal
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
from urllib.parse import urlsplit

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


def _listener_pid(port: int) -> int | None:
    """The process listening on ``port`` (the broker), from /proc."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(table).read_text().splitlines()[1:]:
                f = line.split()
                if f[3] == "0A" and int(f[1].rsplit(":", 1)[1], 16) == port:
                    inodes.add(f[9])
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            for fd in (proc / "fd").iterdir():
                target = os.readlink(fd)
                if target.startswith("socket:[") and target[8:-1] in inodes:
                    return int(proc.name)
    return None


def _machine_jiffies() -> tuple[float, float]:
    """(busy, total) jiffies of the whole machine, all cores."""
    f = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return float(sum(f) - f[3] - f[4]), float(sum(f))


def _batch(seq: int, nonces: int, node: int) -> bytes:
    """A v1 ProofBatch whose nonces carry ``seq`` (``nonce // 1000``); built from a template (cheap for the client)."""
    first = seq * 1000
    listed = ",".join(map(str, range(first, first + nonces)))
    return b'%s[%s],"dist":%s,"node_id":%d}' % (_BATCH_HEAD, listed.encode(), _dist(nonces), node)


RATED_FIRST_SEQ = 1_000_000  # the open-loop phase's batches are numbered from here (never a saturated phase's)
_BATCH_HEAD = b'{"public_key":"bench-pk","block_hash":"bench-hash","block_height":100,"nonces":'


@functools.cache
def _dist(nonces: int) -> bytes:
    return json.dumps([0.25 + i / 1000 for i in range(nonces)], separators=(",", ":")).encode()


def _request(port: int, body: bytes) -> bytes:
    return (
        b"POST /v1/poc-batches/generated HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n"
        b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (port, len(body), body)
    )


# --- the load client (its own process) ------------------------------------------------------------------------------


async def _client(
    port: int, concurrency: int, duration: float, warmup: float, nonces: int, nodes: int, rate: float, first: int
) -> dict[str, Any]:
    """``rate`` 0: a closed loop (each connection sends its next batch on its 200: the saturated throughput).
    ``rate`` > 0: an open loop — batch i is due at ``start + i / rate`` and the first free connection of the
    ``concurrency`` sends it; its latency is counted from when it was *due*, so a stall that delays later sends is
    charged to them too (no coordinated omission)."""
    loop = asyncio.get_running_loop()
    seq = [first]
    accepted: list[int] = []
    latencies: list[float] = []
    status: dict[int, int] = {}
    errors = [0]
    start = time.perf_counter()
    measure_from, stop_at = start + warmup, start + warmup + duration

    async def connection(node: int) -> None:
        # One connection is one MLNode sender: its batches one after another, each after the previous one's 200.
        reader: _ResponseReader | None = None
        while time.perf_counter() < stop_at:
            if reader is None or reader.closed:
                _, reader = await loop.create_connection(_ResponseReader, "127.0.0.1", port)
            seq[0] += 1
            n = seq[0]
            if rate:
                due = start + (n - first) / rate
                if due >= stop_at:
                    break
                if (wait := due - time.perf_counter()) > 0:
                    await asyncio.sleep(wait)
                t0 = due
            else:
                t0 = time.perf_counter()
            try:
                async with asyncio.timeout(30):
                    await reader.send(_request(port, _batch(n, nonces, node)))
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

    await asyncio.gather(*(connection(i % nodes) for i in range(concurrency)))
    return {
        "accepted": accepted,
        "latencies": latencies,
        "status": status,
        "errors": errors[0],
        "measured_s": time.perf_counter() - measure_from,
    }


def _client_process(
    port: int, concurrency: int, duration: float, warmup: float, nonces: int, nodes: int, rate: float, first: int
) -> dict[str, Any]:
    import uvloop

    cpu = time.process_time()
    result = uvloop.run(_client(port, concurrency, duration, warmup, nonces, nodes, rate, first))
    result["cpu_s"] = time.process_time() - cpu
    return result


# --- the broker's own ceiling (the peer) -----------------------------------------------------------------------------


async def _broker_peer(amqp_url: str, concurrency: int, seconds: float, broker_pid: int | None) -> dict[str, Any]:
    """A minimal aio-pika publisher: persistent messages to a quorum queue, ``concurrency`` publishers each
    awaiting its confirm before the next — one message per batch, as a door without grouping would publish."""
    import aio_pika

    conn = await aio_pika.connect_robust(amqp_url)
    name = f"bench-peer-{uuid.uuid4().hex[:8]}"
    try:
        channel = await conn.channel(publisher_confirms=True)
        exchange = await channel.declare_exchange(name, aio_pika.ExchangeType.DIRECT, auto_delete=True)
        queue = await channel.declare_queue(name, durable=True, arguments={"x-queue-type": "quorum"})
        await queue.bind(exchange, routing_key="batch")
        body = _batch(1, 10, 0) * 2  # about a callback.forward envelope
        latencies: list[float] = []
        stop_at = time.perf_counter() + seconds

        async def publisher() -> None:
            while time.perf_counter() < stop_at:
                t0 = time.perf_counter()
                message = aio_pika.Message(body, delivery_mode=aio_pika.DeliveryMode.PERSISTENT)
                await exchange.publish(message, routing_key="batch", mandatory=True, timeout=10)
                latencies.append(time.perf_counter() - t0)

        cpu = _cpu_seconds(broker_pid) if broker_pid else 0.0
        started = time.perf_counter()
        await asyncio.gather(*(publisher() for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
        broker_us = 1e6 * (_cpu_seconds(broker_pid) - cpu) / max(1, len(latencies)) if broker_pid else None
        await queue.delete(if_unused=False, if_empty=False)
    finally:
        await conn.close()
    lat = _percentiles(latencies)
    return {
        "confirms_per_s": round(len(latencies) / elapsed, 1),
        "p50_ms": lat.get("p50"),
        "p99_ms": lat.get("p99"),
        "broker_cpu_us_per_msg": None if broker_us is None else round(broker_us, 1),
    }


# --- what reached the dapi -------------------------------------------------------------------------------------------


def _serve_dapi(public: int, admin: int, callback: int, arrivals: str) -> None:
    """The bench's dapi simulator (a process of its own): ``sim.network`` on uvloop, appending the sequence number of
    every batch its chain logs to ``arrivals`` (native 8-byte integers; -1 for a batch without nonces)."""
    import uvloop

    from hybrid_common import current_profile
    from sim.network.dapi import start_dapi

    async def serve() -> None:
        running = await start_dapi(
            public_port=public, admin_port=admin, callback_port=callback, profile=current_profile()
        )
        chain = running.dapi.chain
        seqs = array.array("q")
        add_batch = chain.add_batch

        def logged(entry: Any) -> None:
            sample = entry.nonce_sample
            seqs.append(sample[0] // 1000 if sample else -1)
            add_batch(entry)

        chain.add_batch = logged  # type: ignore[method-assign]
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        print(f"dapi public={running.public_url} callback={running.callback_url}", flush=True)
        with open(arrivals, "wb", buffering=0) as out:
            while not stop.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), 0.2)
                if seqs:
                    out.write(seqs.tobytes())
                    del seqs[:]
        await running.close()

    uvloop.run(serve())


class DapiArrivals:
    """How many times each batch (by sequence number) reached the simulator, from its arrivals file."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.counts: dict[int, int] = {}
        self._offset = 0

    def read(self) -> dict[int, int]:
        with contextlib.suppress(FileNotFoundError), open(self.path, "rb") as f:
            f.seek(self._offset)
            data = f.read()
            whole = len(data) - len(data) % 8  # a write still in progress is read next time
            self._offset += whole
            seqs = array.array("q")
            seqs.frombytes(data[:whole])
            counts = self.counts
            for seq in seqs:
                counts[seq] = counts.get(seq, 0) + 1
        return self.counts


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


async def _histogram(port: int, name: str) -> dict[str, Any]:
    """p50/p99/max-bucket (ms) of one of the relay's histograms, interpolated within buckets as Prometheus'
    histogram_quantile does. ``hybrid_relay_forward_lag_seconds`` holds the values the ``callback.forwarded`` events
    carry; ``hybrid_relay_accept_seconds`` the door's own part of the accept latency (request parsed → confirm in)."""
    import aiohttp

    async with aiohttp.ClientSession() as s, s.get(f"http://127.0.0.1:{port}/metrics") as r:
        text = await r.text()
    buckets: list[tuple[float, float]] = []
    for line in text.splitlines():
        if line.startswith(f"{name}_bucket"):
            le = line.split('le="', 1)[1].split('"', 1)[0]
            buckets.append((float(le), float(line.rsplit(" ", 1)[1])))
    buckets.sort()
    total = buckets[-1][1] if buckets else 0.0

    def quantile(q: float) -> float | None:
        if not total:
            return None
        rank, prev_le, prev_count = q * total, 0.0, 0.0
        for le, count in buckets:
            if count >= rank:
                if le == float("inf"):
                    return prev_le * 1000
                return 1000 * (prev_le + (le - prev_le) * (rank - prev_count) / max(1.0, count - prev_count))
            prev_le, prev_count = le, count
        return None

    top = next((le for le, count in buckets if count >= total), None)
    return {
        "p50": round(quantile(0.5) or 0, 1),
        "p99": round(quantile(0.99) or 0, 1),
        "max_bucket_le_ms": None if top is None else top * 1000,
        "count": int(total),
    }


async def _handed_off(port: int) -> dict[str, Any]:
    """Hand-off messages the door published and the batches they carried, from its ``hybrid_relay_handoff_batches``
    histogram (count = messages, sum = batches)."""
    import aiohttp

    async with aiohttp.ClientSession() as s, s.get(f"http://127.0.0.1:{port}/metrics") as r:
        text = await r.text()
    values = {}
    for line in text.splitlines():
        if line.startswith(("hybrid_relay_handoff_batches_count ", "hybrid_relay_handoff_batches_sum ")):
            name, value = line.split(" ", 1)
            values[name.rsplit("_", 1)[1]] = float(value)
    groups, batches = int(values.get("count", 0)), int(values.get("sum", 0))
    return {"groups": groups, "batches": batches, "mean_group": round(batches / groups, 1) if groups else None}


async def _delete_redis_keys(redis_url: str, namespace: str) -> None:
    """The run's Redis keys that have no TTL (the per-batch ones expire after RELAY_SEEN_TTL)."""
    from redis.asyncio import Redis

    from hybrid_common.redis_keys import RedisKeys

    keys = RedisKeys(namespace)
    redis = Redis.from_url(redis_url)
    try:
        await redis.delete(keys.relay_stats(), keys.relay_windows())
    finally:
        await redis.aclose()


async def _delete_namespace(amqp_url: str, namespace: str) -> None:
    """Remove the run's queues and exchanges: quorum queues are heavy, and hundreds of them left behind by benchmark
    runs stall this machine's RabbitMQ 3.10 (seen: connections accepted, AMQP handshakes never answered)."""
    import aio_pika

    from hybrid_common.topology import OWNER_QUEUES, SUBSCRIPTIONS

    queues = [f"{namespace}.{q.name}{suffix}" for q in (*OWNER_QUEUES, *SUBSCRIPTIONS) for suffix in ("", ".dead")]
    exchanges = [f"{namespace}.{e}" for e in ("events", "commands", "dlx")]
    conn = await aio_pika.connect(amqp_url, timeout=10)
    async with conn:
        for name in queues:
            channel = await conn.channel()  # a missing queue closes the channel: one per attempt
            with contextlib.suppress(Exception):
                await channel.queue_delete(name)
            with contextlib.suppress(Exception):
                await channel.close()
        channel = await conn.channel()
        for name in exchanges:
            with contextlib.suppress(Exception):
                await channel.exchange_delete(name)


async def main(args: argparse.Namespace) -> dict[str, Any]:
    amqp_url = os.environ.get("AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
    redis_url = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
    namespace = f"bench{uuid.uuid4().hex[:8]}"
    load_before = os.getloadavg()
    print(f"machine: {os.cpu_count()} cores, load average before the run {load_before}")
    broker = _listener_pid(int(urlsplit(amqp_url).port or 5672))
    peer = None
    if args.peer_seconds > 0:
        peer = await _broker_peer(amqp_url, args.concurrency, args.peer_seconds, broker)
        print(f"peer (minimal aio-pika publisher, 1 message per publish, concurrency {args.concurrency}): {peer}")
    public, admin, callback, relay_port = _free_port(), _free_port(), _free_port(), _free_port()
    metrics_port, forwarder_metrics_port = _free_port(), _free_port()
    logs = tempfile.mkdtemp(prefix="relay-bench-")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    arrivals_file = f"{logs}/dapi-arrivals.bin"
    dapi_args = ["--serve-dapi", str(public), str(admin), str(callback), arrivals_file]
    dapi = _spawn([PY, str(Path(__file__).resolve()), *dapi_args], env, f"{logs}/dapi.log")
    relay_env = {
        **env,
        "AMQP_URL": amqp_url,
        "REDIS_URL": redis_url,
        "HYBRID_NAMESPACE": namespace,
        "DAPI_CALLBACK_URL": f"http://127.0.0.1:{callback}",
        "RELAY_PUBLIC_HOST": "127.0.0.1",
        "RELAY_PUBLIC_PORT": str(relay_port),
        "RELAY_METRICS_PORT": str(metrics_port),
        "LOG_LEVEL": "WARNING",
        # The dedupe memory only has to outlive the run: the shared Redis is not left with an hour of 5 keys a batch.
        "RELAY_SEEN_TTL": "300",
        "RELAY_ACCEPTED_EVENTS": "false" if args.no_accepted_events else "true",
        **dict(kv.split("=", 1) for kv in args.relay_env),
    }
    profile = os.environ.get("RELAY_BENCH_PROFILE")  # a file: run the relay under cProfile
    relay = _spawn(
        [PY, *(["-m", "cProfile", "-o", profile] if profile else []), "-m", "hybrid_relay"],
        {**relay_env, "RELAY_ROLE": "door" if args.split else "all"},
        f"{logs}/relay.log",
    )
    # --split: the forwarder in a process of its own (RELAY_ROLE=forwarder), so the relay can use both cores.
    forwarder = (
        _spawn(
            [PY, "-m", "hybrid_relay"],
            {**relay_env, "RELAY_ROLE": "forwarder", "RELAY_METRICS_PORT": str(forwarder_metrics_port)},
            f"{logs}/fwd.log",
        )
        if args.split
        else None
    )
    lags: dict[str, float] = {}
    dapi_log = DapiArrivals(arrivals_file)
    try:
        _wait_port(callback)
        _wait_port(relay_port)
        collector = None
        if args.lag_from_events:
            ready = asyncio.Event()
            collector = asyncio.create_task(_collect_lags(amqp_url, namespace, lags, ready))
            await asyncio.wait_for(ready.wait(), 20)
        loop = asyncio.get_running_loop()
        procs = [("relay", relay.pid), ("dapi", dapi.pid)]
        procs += [("forwarder", forwarder.pid)] if forwarder else []
        procs += [("broker", broker)] if broker else []
        cpu_before = {name: _cpu_seconds(pid) for name, pid in procs}
        machine_before = _machine_jiffies()

        async def load(rate: float, first: int) -> dict[str, Any]:
            """One load phase in a client process of its own (``rate`` 0: the saturated closed loop)."""
            with ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn")) as pool:
                client = (relay_port, args.concurrency, args.duration, args.warmup, args.nonces)
                return await loop.run_in_executor(
                    pool, _client_process, *client, args.nodes or args.concurrency, rate, first
                )

        result = await load(0.0, 0)
        accepted: list[int] = result["accepted"]
        busy, total = (b - a for a, b in zip(machine_before, _machine_jiffies(), strict=True))
        per_batch = 1e6 / max(1, len(accepted))
        cpu_us = {name: round(per_batch * (_cpu_seconds(pid) - cpu_before[name]), 1) for name, pid in procs}
        cpu_us["load_client"] = round(per_batch * result["cpu_s"], 1)
        cpu_us["machine_all"] = round(per_batch * busy / os.sysconf("SC_CLK_TCK"), 1)
        # What the machine spent besides the processes above (Redis, the kernel, this script, other people's work on a
        # shared machine): a large share means the run measured the neighbours as much as the relay.
        cpu_us["everything_else"] = round(
            cpu_us["machine_all"] - sum(v for k, v in cpu_us.items() if k != "machine_all"), 1
        )
        machine_busy_pct = round(100 * busy / max(1.0, total), 1)
        print(f"client: {len(accepted)} batches answered 200, status {result['status']}, errors {result['errors']}")
        at_rate: dict[str, Any] = {}
        if args.rate > 0:
            # The same relay, now offered --rate batches/s by the same 64 connections (an open loop): the latency an
            # MLNode fleet sending that many batches sees, instead of the closed loop's own queue at saturation
            # (there, mean latency = concurrency / throughput: 64 / 3,000 per s is already 21 ms).
            rated = await load(args.rate, RATED_FIRST_SEQ)
            accepted += rated["accepted"]
            at_rate = {
                "offered_per_s": args.rate,
                "accepted_per_s": round(len(rated["latencies"]) / rated["measured_s"], 1),
                "latency_ms": _percentiles(rated["latencies"]),
                "status": rated["status"],
                "errors": rated["errors"],
            }
            print(f"at an offered {args.rate:.0f}/s (open loop, latency from each batch's due time): {at_rate}")
        # Drain: every accepted batch reached the dapi (or the wait gives up and the rest count as lost).
        deadline = time.monotonic() + args.drain_timeout
        waited_from = time.monotonic()
        while True:
            arrivals = dapi_log.read()
            if all(n in arrivals for n in accepted) and (collector is None or len(lags) >= len(accepted)):
                break
            if time.monotonic() > deadline:
                break
            await asyncio.sleep(0.5)
        drained_s = time.monotonic() - waited_from
        if collector is not None:
            collector.cancel()
            with contextlib.suppress(BaseException):
                await collector
        await asyncio.sleep(0.5)  # the last outcomes are recorded (record_interval) before the histogram is read
        lag_port = forwarder_metrics_port if forwarder is not None else metrics_port
        lag_metrics = await _histogram(lag_port, "hybrid_relay_forward_lag_seconds")
        door_part = await _histogram(metrics_port, "hybrid_relay_accept_seconds")
        confirm_part = await _histogram(metrics_port, "hybrid_relay_handoff_confirm_seconds")
        handed_off = await _handed_off(metrics_port)
        lost = sum(1 for n in accepted if n not in arrivals)
        dapi_duplicates = sum(c - 1 for c in arrivals.values() if c > 1)
        lat = _percentiles(result["latencies"])
        lag_values = sorted(lags.values())
        lag: dict[str, Any] = (
            {
                "p50": lag_values[len(lag_values) // 2],
                "p99": lag_values[min(len(lag_values) - 1, int(0.99 * len(lag_values)))],
                "max": lag_values[-1],
                "from": "callback.forwarded events",
            }
            if lag_values
            else {**lag_metrics, "from": "hybrid_relay_forward_lag_seconds histogram"}
        )
        accepted_per_s = len(result["latencies"]) / result["measured_s"]
        print(f"saturated accepted/s (with confirms): {accepted_per_s:.0f}   accept latency ms: {lat}")
        if peer:
            print(f"  ratio to the peer's confirmed publishes/s: {accepted_per_s / peer['confirms_per_s']:.2f}")
        print(f"  inside the relay (request parsed → confirmed), from its histogram: {door_part}")
        print(f"  of which the broker's confirm of a hand-off message: {confirm_part}")
        print(f"forward lag ms (door accept → dapi 2xx): {lag}")
        if lag_values:
            print(f"  the same from the relay's histogram: {lag_metrics}")
        print(f"reached the dapi: {len(arrivals)}   lost: {lost}   duplicates at the dapi: {dapi_duplicates}")
        print(f"CPU per accepted batch (µs, during the load): {cpu_us}; machine busy {machine_busy_pct}%")
        print(f"drain wait after the load: {drained_s:.1f}s   logs: {logs}")
        print(f"door hand-off: {handed_off}")
        rated_lat = at_rate.get("latency_ms", {})
        return {
            "accepted_per_s": round(accepted_per_s, 1),
            # The latency targets are read at the target rate (--rate); the saturated closed loop's are beside them.
            "accept_p50_ms": rated_lat.get("p50", lat.get("p50")),
            "accept_p99_ms": rated_lat.get("p99", lat.get("p99")),
            "accept_latency_at": f"{args.rate:.0f}/s offered" if at_rate else "saturation",
            "saturated_accept_p50_ms": lat.get("p50"),
            "saturated_accept_p99_ms": lat.get("p99"),
            "at_rate": at_rate or None,
            "accept_inside_relay_p99_ms": door_part.get("p99"),
            "forward_lag_p50_ms": lag["p50"],
            "forward_lag_p99_ms": lag["p99"],
            "lost": lost,
            "dapi_duplicates": dapi_duplicates,
            "accepted": len(accepted),
            "concurrency": args.concurrency,
            "duration_s": args.duration,
            "nonces_per_batch": args.nonces,
            "nodes": args.nodes or args.concurrency,
            "split": args.split,
            "accepted_events": not args.no_accepted_events,
            "door_mean_group": handed_off.get("mean_group"),
            "cpu_us_per_batch": cpu_us,
            "machine_busy_pct": machine_busy_pct,
            "peer": peer,
            # Batches the relay accepts (HTTP, validation, dedupe, forwarding, one confirmed group per ~10 batches)
            # per bare confirmed publish the broker takes from the minimal publisher in the same run.
            "ratio_to_peer": round(accepted_per_s / peer["confirms_per_s"], 2) if peer else None,
            "cpus": os.cpu_count(),
            "load_avg_1m_before": round(load_before[0], 2),
            "load_avg_1m_after": round(os.getloadavg()[0], 2),
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
        try:
            await asyncio.wait_for(_delete_namespace(amqp_url, namespace), 60)
        except Exception as exc:
            print(f"could not delete the namespace {namespace} from the broker: {exc!r}", file=sys.stderr)
        with contextlib.suppress(Exception):
            await _delete_redis_keys(redis_url, namespace)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--serve-dapi"]:  # the simulator's own process, started by main()
        _serve_dapi(int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5])
        sys.exit(0)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument(
        "--rate",
        type=float,
        default=3000.0,
        help="then offer this many batches/s (open loop) for the latency figures (0: saturated closed loop only)",
    )
    parser.add_argument("--nonces", type=int, default=10, help="nonces per batch")
    parser.add_argument("--nodes", type=int, default=0, help="distinct node_ids (default: one per connection)")
    parser.add_argument("--no-accepted-events", action="store_true", help="RELAY_ACCEPTED_EVENTS=false")
    parser.add_argument("--split", action="store_true", help="door and forwarder in separate processes")
    parser.add_argument("--peer-seconds", type=float, default=3.0, help="broker ceiling measured first (0: skip)")
    parser.add_argument("--relay-env", nargs="*", default=[], metavar="NAME=VALUE", help="extra relay settings")
    parser.add_argument(
        "--lag-from-events",
        action="store_true",
        help="exact lag per batch from a consumer of callback.forwarded (costs the broker a delivery per batch)",
    )
    parser.add_argument("--drain-timeout", type=float, default=60.0)
    figures = asyncio.run(main(parser.parse_args()))
    print(json.dumps(figures))
