"""Issue #10 acceptance: the structure that makes the proxy's hot path fast (speed itself is ``bench/proxy.py``'s job).

- the hot path never parses what it relays: SSE chunks that are not JSON, split mid-line, and a non-canonical JSON
  body come through byte for byte, with zero JSON parse calls in the process while they do (also with a model map);
- one upstream connection pool serves every request: connections are reused across requests and waves, the pool is
  bounded, idle connections are closed after the proxy's keep-alive (below the upstream's), and a kept-alive
  connection the upstream had dropped is replaced without failing the request;
- the lean HTTP/1.1 client reads every framing an upstream may use: Content-Length, chunked, close-delimited, gzip.

The upstream here is a scripted raw HTTP/1.1 server (asyncio streams): it counts connections and never parses JSON, so
a parse counted during a request can only be the proxy's.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import re
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from tests.integration.test_proxy_kit import PREFIX, base, eventually, running_node

REPO = Path(__file__).resolve().parents[2]
Answer = Callable[[asyncio.StreamWriter, int, bytes], Awaitable[bool]]  # (writer, nth request on conn, body) -> keep


class ScriptedUpstream:
    """A raw HTTP/1.1 keep-alive server: ``answer`` writes each response by hand and says whether to keep the
    connection. Counts connections (opened, open now, most open at once) and keeps every request body."""

    def __init__(self, answer: Answer) -> None:
        self.answer = answer
        self.opened = 0
        self.open = 0
        self.most_open = 0
        self.bodies: list[bytes] = []
        self.heads: list[bytes] = []
        self._server: asyncio.Server | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    async def start(self) -> ScriptedUpstream:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.opened += 1
        self.open += 1
        self.most_open = max(self.most_open, self.open)
        try:
            nth = 0
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                m = re.search(rb"(?im)^content-length:\s*(\d+)", head)
                body = await reader.readexactly(int(m.group(1))) if m else b""
                self.heads.append(head)
                self.bodies.append(body)
                keep = await self.answer(writer, nth, body)
                await writer.drain()
                nth += 1
                if not keep:
                    return
        except ConnectionError:
            return
        finally:
            self.open -= 1
            writer.close()


def fixed(status: int, body: bytes, ctype: bytes = b"application/json", delay: float = 0.0) -> Answer:
    async def answer(writer: asyncio.StreamWriter, nth: int, request: bytes) -> bool:
        if delay:
            await asyncio.sleep(delay)
        writer.write(
            b"HTTP/1.1 %d OK\r\nContent-Type: %s\r\nContent-Length: %d\r\n\r\n" % (status, ctype, len(body)) + body
        )
        return True

    return answer


@pytest.fixture
async def scripted() -> AsyncIterator[Callable[[Answer], Awaitable[ScriptedUpstream]]]:
    started: list[ScriptedUpstream] = []

    async def start(answer: Answer) -> ScriptedUpstream:
        up = await ScriptedUpstream(answer).start()
        started.append(up)
        return up

    yield start
    for up in started:
        await up.close()


class ParseCounter:
    """Counts every ``orjson.loads`` / ``json.loads`` made in this process while installed."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls = 0
        real_orjson, real_json = orjson.loads, json.loads

        def counted_orjson(data: Any) -> Any:
            self.calls += 1
            return real_orjson(data)

        def counted_json(data: Any, *args: Any, **kwargs: Any) -> Any:
            self.calls += 1
            return real_json(data, *args, **kwargs)

        monkeypatch.setattr(orjson, "loads", counted_orjson)
        monkeypatch.setattr(json, "loads", counted_json)


# SSE whose data is not JSON (broken objects, bare words, bytes that are not UTF-8), sent in pieces that split
# lines and events: a proxy that parsed (or re-serialized) chunks would fail or change them.
GARBAGE_PIECES = [
    b'data: {"id": "x", "model": "up-model", "choices": [ {"delta": ',
    b'{"content": "half"\n\ndata: not json at all\n\n',
    b"data: \xff\xfe\x00 binary\n\n: a comment line\n\n",
    b'data: {"model":"up-model","usage":{"prompt_tokens":7,"completion_tokens":3}, trailing\n\n',
    b"data: [DONE]\n\n",
]
ODD_JSON = b'{"b" :1,   "a":[1.0e0, 12345678901234567890123456789], "a": 2, "model":"up-model", "x":"\\u00e9"}'


async def sse_garbage(writer: asyncio.StreamWriter, nth: int, request: bytes) -> bool:
    if b'"stream": true' not in request and b'"stream":true' not in request:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(ODD_JSON))
        writer.write(ODD_JSON)
        return True
    writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n")
    for piece in GARBAGE_PIECES:
        writer.write(b"%x\r\n%s\r\n" % (len(piece), piece))
        await writer.drain()
        await asyncio.sleep(0.02)  # separate reads on the proxy's side
    writer.write(b"0\r\n\r\n")
    return True


async def test_the_hot_path_never_parses_what_it_relays(
    scripted: Callable[[Answer], Awaitable[ScriptedUpstream]], monkeypatch: pytest.MonkeyPatch
) -> None:
    up = await scripted(sse_garbage)
    stream_body = b'{"model": "dapi-model", "messages": [{"role": "user", "content": "hi"}], "stream": true}'
    json_body = b'{"model": "dapi-model", "messages": [{"role": "user", "content": "hi"}]}'
    want_stream = b"".join(GARBAGE_PIECES)
    async with aiohttp.ClientSession() as http:
        for model_map in ({}, {"dapi-model": "up-model"}):
            async with running_node(up.url, model_map=model_map) as node:
                counter = ParseCounter(monkeypatch)
                for path in ("/v1/chat/completions", PREFIX + "/v1/chat/completions"):
                    async with http.post(base(node) + path, data=stream_body) as r:
                        assert r.status == 200 and r.headers["Content-Type"] == "text/event-stream"
                        got = await r.read()
                    async with http.post(base(node) + path, data=json_body) as r:
                        assert r.status == 200
                        got_json = await r.read()
                    if model_map:  # only the model string changes, in both directions
                        assert got == want_stream.replace(b'"model":"up-model"', b'"model":"dapi-model"').replace(
                            b'"model": "up-model"', b'"model": "dapi-model"'
                        )
                        assert got_json == ODD_JSON.replace(b'"model":"up-model"', b'"model":"dapi-model"')
                        assert up.bodies[-1] == json_body.replace(b"dapi-model", b"up-model")
                    else:
                        assert got == want_stream
                        assert got_json == ODD_JSON
                        assert up.bodies[-1] == json_body
                assert counter.calls == 0, f"{counter.calls} JSON parse call(s) on the hot path"
                monkeypatch.undo()


async def test_one_shared_bounded_pool_reuses_upstream_connections(
    scripted: Callable[[Answer], Awaitable[ScriptedUpstream]],
) -> None:
    up = await scripted(fixed(200, b'{"ok": true}', delay=0.02))
    body = b'{"model": "m", "messages": []}'
    async with running_node(up.url) as node, aiohttp.ClientSession() as http:

        async def one() -> int:
            async with http.post(base(node) + "/v1/chat/completions", data=body) as r:
                await r.read()
                return r.status

        for _wave in range(3):
            assert await asyncio.gather(*(one() for _ in range(32))) == [200] * 32
        pool = node.upstream.pool
        assert up.opened <= 32 and pool.opened == up.opened  # 96 requests, at most one connection per concurrent one
        assert pool.in_use == 0 and pool.idle == up.opened
        opened = up.opened
        for _ in range(20):
            assert await one() == 200
        assert up.opened == opened  # sequential requests ride the kept-alive connections
        assert len(up.bodies) == 96 + 20

    # Bounded: with a pool of 4, 24 concurrent requests all succeed over at most 4 upstream connections.
    up2 = await scripted(fixed(200, b'{"ok": true}', delay=0.05))
    async with (
        running_node(up2.url, upstream_pool_size=4) as node,
        aiohttp.ClientSession() as http,
    ):
        results = await asyncio.gather(*(http.post(base(node) + "/v1/chat/completions", data=body) for _ in range(24)))
        assert [r.status for r in results] == [200] * 24
        for r in results:
            r.release()
        assert up2.most_open <= 4 and up2.opened <= 4


async def test_idle_connections_close_and_dropped_ones_are_replaced(
    scripted: Callable[[Answer], Awaitable[ScriptedUpstream]],
) -> None:
    body = b'{"model": "m", "messages": []}'
    up = await scripted(fixed(200, b'{"ok": true}'))
    async with (
        running_node(up.url, upstream_keepalive_seconds=0.3) as node,
        aiohttp.ClientSession() as http,
    ):
        for _ in range(2):
            async with http.post(base(node) + "/v1/chat/completions", data=body) as r:
                assert r.status == 200
        assert up.opened == 1 and up.open == 1 and node.upstream.pool.idle == 1  # kept alive, reused

        async def upstream_sees_it_close() -> bool:
            return up.open == 0

        # The proxy's keep-alive (below the upstream's own) ends the idle connection, not the upstream.
        await eventually(upstream_sees_it_close, timeout=10, what="idle upstream connection closed by the proxy")
        assert node.upstream.pool.idle == 0
        async with http.post(base(node) + "/v1/chat/completions", data=body) as r:
            assert r.status == 200
        assert up.opened == 2

    # An upstream that silently dropped a kept-alive connection: the second request on it gets no answer, the
    # connection just closes. The proxy sends it again on a new connection, even with retries off.
    async def drops_second(writer: asyncio.StreamWriter, nth: int, request: bytes) -> bool:
        if nth >= 1:
            return False
        return await fixed(200, b'{"ok": 1}')(writer, nth, request)

    up2 = await scripted(drops_second)
    async with running_node(up2.url, upstream_retries=0) as node, aiohttp.ClientSession() as http:
        for _ in range(3):
            async with http.post(base(node) + "/v1/chat/completions", data=body) as r:
                assert r.status == 200 and await r.read() == b'{"ok": 1}'
        # Each kept-alive connection was tried, dropped, and replaced: 3 answers, 5 requests seen, 3 connections.
        assert len(up2.bodies) == 5 and up2.opened == 3


async def test_every_upstream_framing_is_read(scripted: Callable[[Answer], Awaitable[ScriptedUpstream]]) -> None:
    payload = b'{"id": "c", "choices": [{"message": {"content": "' + b"x" * 70_000 + b'"}}]}'

    async def chunked(writer: asyncio.StreamWriter, nth: int, request: bytes) -> bool:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n")
        for i in range(0, len(payload), 9_000):
            part = payload[i : i + 9_000]
            writer.write(b"%x;ext=1\r\n%s\r\n" % (len(part), part))
        writer.write(b"0\r\nX-Trailer: t\r\n\r\n")
        return True

    async def close_delimited(writer: asyncio.StreamWriter, nth: int, request: bytes) -> bool:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: close\r\n\r\n" + payload)
        return False

    async def gzipped(writer: asyncio.StreamWriter, nth: int, request: bytes) -> bool:
        packed = gzip.compress(payload)
        writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Encoding: gzip\r\n"
            b"Content-Length: %d\r\n\r\n" % len(packed) + packed
        )
        return True

    async def interim_then_answer(writer: asyncio.StreamWriter, nth: int, request: bytes) -> bool:
        writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        return await fixed(200, payload)(writer, nth, request)

    body = b'{"model": "m", "messages": []}'
    async with aiohttp.ClientSession() as http:
        for answer in (fixed(200, payload), chunked, close_delimited, gzipped, interim_then_answer):
            up = await scripted(answer)
            async with running_node(up.url, upstream_retries=0) as node:
                for _ in range(2):  # the second rides the kept-alive connection, or a new one after a close
                    async with http.post(base(node) + "/v1/chat/completions", data=body) as r:
                        assert r.status == 200, answer
                        assert r.headers["Content-Type"] == "application/json"
                        assert "Content-Encoding" not in r.headers
                        assert await r.read() == payload, answer
            assert all(b"Authorization: Bearer " in h and b"Accept-Encoding: identity" in h for h in up.heads)

    # A body cut short (fewer bytes than its Content-Length) is a broken answer, never a short 200.
    async def cut_short(writer: asyncio.StreamWriter, nth: int, request: bytes) -> bool:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 999\r\n\r\n{}")
        return False

    up = await scripted(cut_short)
    async with (
        running_node(up.url, upstream_retries=0) as node,
        aiohttp.ClientSession() as http,
        http.post(base(node) + "/v1/chat/completions", data=body) as r,
    ):
        assert r.status == 502
        assert (await r.json())["error"]["code"] == "upstream_broken"


async def test_a_slow_client_pauses_the_upstream_instead_of_filling_memory(
    scripted: Callable[[Answer], Awaitable[ScriptedUpstream]],
) -> None:
    total = 48 * 1024 * 1024  # far more than every socket buffer on the way can hold
    piece = b"data: " + b"x" * (64 * 1024 - 8) + b"\n\n"
    sent = [0]

    async def big_stream(writer: asyncio.StreamWriter, nth: int, request: bytes) -> bool:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n")
        while sent[0] < total:
            writer.write(b"%x\r\n%s\r\n" % (len(piece), piece))
            await writer.drain()  # blocks while nobody reads further down the chain
            sent[0] += len(piece)
        writer.write(b"0\r\n\r\n")
        return True

    up = await scripted(big_stream)
    body = b'{"model": "m", "messages": [], "stream": true}'
    # A read timeout far shorter than the client's stall: a pause caused by our own client is not upstream silence.
    async with (
        running_node(up.url, upstream_read_timeout=0.4) as node,
        aiohttp.ClientSession() as http,
        http.post(base(node) + "/v1/chat/completions", data=body) as r,
    ):
        assert r.status == 200
        got = len(await r.content.readany())

        async def upstream_stuck() -> bool:
            before = sent[0]
            await asyncio.sleep(0.3)
            return sent[0] == before

        await eventually(upstream_stuck, timeout=10, what="the upstream held back while the client does not read")
        await asyncio.sleep(1.0)  # the client stalls well past the read timeout
        assert sent[0] < total / 2, f"the proxy kept reading: {sent[0]} of {total} bytes sent"
        while chunk := await r.content.readany():
            got += len(chunk)
        assert sent[0] == total and got == total

        async def settled() -> bool:
            return node.upstream.pool.in_use == 0 and node.upstream.pool.idle == 1

        await eventually(settled, timeout=5, what="the connection back in the pool")


@pytest.mark.slow
def test_the_benchmark_prints_its_figures_as_a_json_last_line() -> None:
    """``bench/proxy.py`` end to end, without LiteLLM (its install is the full run's business) and briefly."""
    done = subprocess.run(
        [sys.executable, "bench/proxy.py", "--quick", "--no-litellm", "--duration", "0.5"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=240,
    )
    lines = done.stdout.strip().splitlines()
    assert lines, done.stderr[-2000:]
    result = json.loads(lines[-1])
    for key in ("added_p50_ms_c1", "rps_c32", "stream_rps_c32", "rps_ratio_vs_litellm", "litellm_version"):
        assert key in result, key
    assert result["rps_c32"] > 0 and result["stream_rps_c32"] > 0 and result["added_p50_ms_c1"] is not None
    assert result["summary"]["json_c32"]["proxy"]["errors"] == 0
    assert result["summary"]["stream_c32"]["proxy"]["cpu_ms_per_request"] > 0
    assert result["rps_ratio_vs_litellm"] is None and result["litellm_version"] is None  # skipped, and said so
