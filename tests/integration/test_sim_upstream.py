"""Issue #5 acceptance: the OpenAI-compatible upstream simulator (Hyperbolic stand-in).

The official ``openai`` SDK must get streaming and non-streaming completions with logprobs and usage;
bytes must be deterministic for a request + seed; rate limits, faults, timing and stream bookkeeping
must be observable so that proxy tests can rely on them.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Mapping
from typing import Any

import aiohttp
import openai
import pytest
from multidict import CIMultiDictProxy
from openai.types.chat import ChatCompletionMessageParam

from hybrid_common import TEST
from sim.upstream import DEFAULT_MODELS, Fault, RunningUpstream, start_upstream
from tests.support.net import free_port
from tests.support.procs import ManagedProcess

MODEL = "Qwen/Qwen2.5-7B-Instruct"
BIG_MODEL = "Qwen/Qwen3-235B-A22B-Instruct-2507-FP8"
MESSAGES: list[ChatCompletionMessageParam] = [{"role": "user", "content": "Say something about proof of work."}]


@pytest.fixture
async def upstream() -> AsyncIterator[RunningUpstream]:
    up = await start_upstream(profile=TEST)
    try:
        yield up
    finally:
        await up.close()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


def sdk(up: RunningUpstream, key: str | None = None) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=up.url, api_key=key or up.api_key, max_retries=0, timeout=20)


async def post(
    http: aiohttp.ClientSession,
    up: RunningUpstream,
    body: Mapping[str, object] | bytes,
    path: str = "/chat/completions",
) -> tuple[int, bytes, CIMultiDictProxy[str]]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    async with http.post(
        up.url + path,
        data=data,
        headers={"Authorization": f"Bearer {up.api_key}", "Content-Type": "application/json"},
    ) as r:
        return r.status, await r.read(), r.headers


def sse_payloads(raw: bytes) -> list[str]:
    events = raw.decode().split("\n\n")
    assert events[-1] == "", "an SSE stream ends with a blank line"
    out = []
    for e in events[:-1]:
        assert e.startswith("data: "), e
        out.append(e[len("data: ") :])
    return out


async def test_sdk_non_streaming_chat_with_logprobs_and_usage(upstream: RunningUpstream) -> None:
    client = sdk(upstream)
    resp = await client.chat.completions.create(
        model=BIG_MODEL,
        messages=MESSAGES,
        logprobs=True,
        top_logprobs=5,
        seed=11,
        max_tokens=5000,
    )
    choice = resp.choices[0]
    assert resp.model == BIG_MODEL and resp.object == "chat.completion"
    assert choice.message.role == "assistant" and choice.message.content
    assert choice.finish_reason == "stop"
    assert choice.logprobs is not None and choice.logprobs.content
    entries = choice.logprobs.content
    # gonka-protocol.md §4: token, logprob, bytes, top_logprobs — an empty top_logprobs invalidates an inference.
    assert "".join(e.token for e in entries) == choice.message.content
    for e in entries:
        assert e.bytes == list(e.token.encode())
        assert e.logprob <= 0
        assert len(e.top_logprobs) == 5
        lps = [t.logprob for t in e.top_logprobs]
        assert lps == sorted(lps, reverse=True)
        assert all(t.bytes == list(t.token.encode()) for t in e.top_logprobs)
    assert resp.usage is not None
    assert resp.usage.completion_tokens == len(entries)
    assert resp.usage.prompt_tokens > 0
    assert resp.usage.total_tokens == resp.usage.prompt_tokens + resp.usage.completion_tokens
    await client.close()


async def test_sdk_streaming_chat_matches_non_streaming(upstream: RunningUpstream) -> None:
    client = sdk(upstream)
    kwargs: dict[str, Any] = {
        "model": MODEL,
        "messages": MESSAGES,
        "logprobs": True,
        "top_logprobs": 5,
        "seed": 3,
        "max_tokens": 40,
    }
    full = await client.chat.completions.create(**kwargs)
    stream = await client.chat.completions.create(**kwargs, stream=True, stream_options={"include_usage": True})
    text, tokens, finish, usage, after_usage = [], [], None, None, 0
    async for chunk in stream:
        if usage is not None:
            after_usage += 1
        if chunk.usage is not None:
            usage = chunk.usage
            assert chunk.choices == []
            assert finish is not None, "usage comes after the finish_reason chunk"
            continue
        for c in chunk.choices:
            if c.delta.content:
                text.append(c.delta.content)
            if c.logprobs and c.logprobs.content:
                tokens.extend(c.logprobs.content)
            if c.finish_reason:
                finish = c.finish_reason
    assert after_usage == 0, "the usage chunk is the last one"
    assert "".join(text) == full.choices[0].message.content
    assert [t.token for t in tokens] == [t.token for t in full.choices[0].logprobs.content]
    assert [t.logprob for t in tokens] == [t.logprob for t in full.choices[0].logprobs.content]
    assert finish == full.choices[0].finish_reason
    assert usage is not None and full.usage is not None
    assert usage.model_dump() == full.usage.model_dump()
    await client.close()


async def test_sdk_completions_models_and_auth(upstream: RunningUpstream) -> None:
    client = sdk(upstream)
    comp = await client.completions.create(model=MODEL, prompt="Once upon a time", logprobs=3, max_tokens=6, seed=1)
    c = comp.choices[0]
    assert comp.object == "text_completion" and c.text
    assert c.logprobs is not None and c.logprobs.tokens is not None
    assert "".join(c.logprobs.tokens) == c.text
    assert c.logprobs.text_offset is not None and c.logprobs.text_offset[0] == 0
    assert comp.usage is not None and comp.usage.completion_tokens == len(c.logprobs.tokens)

    chunks = [
        ch
        async for ch in await client.completions.create(
            model=MODEL, prompt="Once upon a time", max_tokens=6, seed=1, stream=True
        )
    ]
    assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == c.text

    models = [m.id async for m in client.models.list()]
    assert MODEL in models and BIG_MODEL in models and models == list(DEFAULT_MODELS)

    bad = sdk(upstream, key="not-the-key")
    with pytest.raises(openai.AuthenticationError) as err:
        await bad.chat.completions.create(model=MODEL, messages=MESSAGES)
    assert err.value.status_code == 401
    assert err.value.code == "invalid_api_key"
    with pytest.raises(openai.NotFoundError):
        await client.chat.completions.create(model="no/such-model", messages=MESSAGES)
    with pytest.raises(openai.BadRequestError, match="logprobs"):
        await client.chat.completions.create(model=MODEL, messages=MESSAGES, top_logprobs=3)
    await client.close()
    await bad.close()


async def test_bytes_are_deterministic_for_request_and_seed(
    upstream: RunningUpstream, http: aiohttp.ClientSession
) -> None:
    body = {"model": MODEL, "messages": MESSAGES, "logprobs": True, "top_logprobs": 5, "seed": 5, "max_tokens": 50}
    s1, b1, _ = await post(http, upstream, body)
    s2, b2, _ = await post(http, upstream, body)
    assert s1 == s2 == 200 and b1 == b2

    # A second simulator with the same server seed answers the same bytes (id and created included).
    other = await start_upstream(profile=TEST)
    try:
        s3, b3, _ = await post(http, other, body)
    finally:
        await other.close()
    assert s3 == 200 and b3 == b1

    # The same request re-serialized (key order, whitespace) gets the same completion text.
    reserialized = json.dumps(dict(reversed(list(body.items()))), indent=2).encode()
    _, b4, _ = await post(http, upstream, reserialized)
    assert json.loads(b4)["choices"] == json.loads(b1)["choices"]

    # Another seed changes the text; temperature 0 makes the seed irrelevant (greedy decoding).
    _, b5, _ = await post(http, upstream, {**body, "seed": 6})
    assert json.loads(b5)["choices"][0]["message"]["content"] != json.loads(b1)["choices"][0]["message"]["content"]
    _, g1, _ = await post(http, upstream, {**body, "temperature": 0, "seed": 1})
    _, g2, _ = await post(http, upstream, {**body, "temperature": 0, "seed": 2})
    assert json.loads(g1)["choices"] == json.loads(g2)["choices"]

    # enforced_tokens is Gonka's vLLM extension: Hyperbolic ignores it (gonka-protocol.md §4).
    enforced = {
        **body,
        "enforced_tokens": {"tokens": [{"token": "x", "top_tokens": ["x"]}]},
        "skip_special_tokens": False,
    }
    s6, b6, _ = await post(http, upstream, enforced)
    assert s6 == 200 and json.loads(b6)["choices"] == json.loads(b1)["choices"]

    # Streams are deterministic too, and end with [DONE].
    sbody = {**body, "stream": True, "stream_options": {"include_usage": True}}
    _, r1, h1 = await post(http, upstream, sbody)
    _, r2, _ = await post(http, upstream, sbody)
    assert r1 == r2
    assert h1["Content-Type"].startswith("text/event-stream")
    payloads = sse_payloads(r1)
    assert payloads[-1] == "[DONE]"
    assert json.loads(payloads[-2])["choices"] == [] and json.loads(payloads[-2])["usage"]["completion_tokens"] > 0
    assert all(json.loads(p)["usage"] is None for p in payloads[:-2])


async def test_request_options_stop_n_max_tokens_and_validation(
    upstream: RunningUpstream, http: aiohttp.ClientSession
) -> None:
    base = {"model": MODEL, "messages": MESSAGES, "seed": 9}
    _, raw, _ = await post(http, upstream, base)
    text = json.loads(raw)["choices"][0]["message"]["content"]
    words = text.split(" ")
    assert len(words) > 3
    stop_at = " " + words[3]
    _, raw, _ = await post(http, upstream, {**base, "stop": [stop_at]})
    stopped = json.loads(raw)["choices"][0]
    assert stopped["finish_reason"] == "stop"
    assert stopped["message"]["content"] == text[: text.index(stop_at)]

    _, raw, _ = await post(http, upstream, {**base, "max_tokens": 2})
    short = json.loads(raw)
    assert short["choices"][0]["finish_reason"] == "length" and short["usage"]["completion_tokens"] == 2

    _, raw, _ = await post(http, upstream, {**base, "n": 3, "logprobs": True})
    many = json.loads(raw)
    assert [c["index"] for c in many["choices"]] == [0, 1, 2]
    assert len({c["message"]["content"] for c in many["choices"]}) == 3
    assert many["usage"]["completion_tokens"] == sum(len(c["logprobs"]["content"]) for c in many["choices"])

    cases: list[tuple[dict[str, object], int, str]] = [
        ({**base, "stream_options": {"include_usage": True}}, 400, "stream_options"),
        ({**base, "logprobs": True, "top_logprobs": 21}, 400, "top_logprobs"),
        ({**base, "max_tokens": 0}, 400, "max_tokens"),
        ({"model": MODEL}, 400, "messages"),
        ({**base, "model": "gpt-nope"}, 404, "model"),
    ]
    for bad, status, param in cases:
        s, raw, _ = await post(http, upstream, bad)
        assert s == status, (bad, raw)
        err = json.loads(raw)["error"]
        assert err["param"] == param and err["message"]
    s, raw, _ = await post(http, upstream, b"{not json")
    assert s == 400 and "JSON" in json.loads(raw)["error"]["message"]


async def test_rate_limit_per_key_and_window_reset(http: aiohttp.ClientSession) -> None:
    # One real minute is 3 s here: wide enough that four quick requests fit in one window under CPU load.
    up = await start_upstream(profile=TEST.with_acceleration(20), rate_limit_per_min=3)
    try:
        body = {"model": MODEL, "messages": MESSAGES}
        statuses = [(await post(http, up, body))[0] for _ in range(4)]
        assert statuses == [200, 200, 200, 429]
        s, raw, headers = await post(http, up, body)
        assert s == 429
        assert json.loads(raw)["error"]["type"] == "rate_limit_error"
        assert "Retry-After" not in headers  # inference-proxy.md: not promised
        deadline = time.monotonic() + 20
        while (await post(http, up, body))[0] == 429:
            assert time.monotonic() < deadline, "the window never reset"
            await asyncio.sleep(0.1)
        async with http.get(f"{up.root}/_sim/stats") as r:
            stats = await r.json()
        assert stats["by_status"]["429"] >= 2
    finally:
        await up.close()


async def test_injected_faults_over_http(upstream: RunningUpstream, http: aiohttp.ClientSession) -> None:
    body = {"model": MODEL, "messages": MESSAGES}
    async with http.post(f"{upstream.root}/_sim/faults", json={"kind": "status", "status": 503, "count": 2}) as r:
        assert r.status == 200 and (await r.json())[0]["count"] == 2
    async with http.post(f"{upstream.root}/_sim/faults", json={"kind": "status", "status": 429, "retry_after": 2}) as r:
        assert r.status == 200
    results = [await post(http, upstream, body) for _ in range(4)]
    assert [s for s, _, _ in results] == [503, 503, 429, 200]
    assert json.loads(results[0][1])["error"]["type"] == "server_error"
    assert results[2][2]["Retry-After"] == "2"

    # A stream cut after 3 tokens: no finish_reason, no [DONE].
    upstream.inject(Fault(kind="disconnect", after_tokens=3))
    received = b""
    with pytest.raises(aiohttp.ClientPayloadError):
        async with http.post(
            upstream.url + "/chat/completions",
            json={**body, "stream": True},
            headers={"Authorization": f"Bearer {upstream.api_key}"},
        ) as r:
            assert r.status == 200
            async for chunk in r.content.iter_any():
                received += chunk
    assert b"[DONE]" not in received and b'"content":""' in received
    stats = upstream.state.stats.snapshot()
    assert stats["streams"]["fault_disconnect"] == 1

    # A JSON request dropped before any byte.
    upstream.inject(Fault(kind="disconnect"))
    with pytest.raises(aiohttp.ClientError):
        await post(http, upstream, body)
    assert (await post(http, upstream, body))[0] == 200


async def test_timing_ttft_and_token_rate(upstream: RunningUpstream, http: aiohttp.ClientSession) -> None:
    async with http.post(
        f"{upstream.root}/_sim/config", json={"latency_ms": 100, "ttft_ms": 200, "tokens_per_s": 100}
    ) as r:
        cfg = await r.json()
    assert cfg["ttft_ms"] == 200 and cfg["tokens_per_s"] == 100
    body = {"model": MODEL, "messages": MESSAGES, "max_tokens": 20, "stream": True, "seed": 1}
    started = time.monotonic()
    first_token_at = None
    async with http.post(
        upstream.url + "/chat/completions", json=body, headers={"Authorization": f"Bearer {upstream.api_key}"}
    ) as r:
        headers_at = time.monotonic() - started
        async for line in r.content:
            if first_token_at is None and b'"content":"' in line and b'"content":""' not in line:
                first_token_at = time.monotonic() - started
        done_at = time.monotonic() - started
    assert headers_at >= 0.095
    assert first_token_at is not None and first_token_at >= 0.29
    assert done_at >= 0.29 + 19 / 100 - 0.01  # 20 tokens at 100/s after the first
    assert done_at < 5.0

    started = time.monotonic()
    s, raw, _ = await post(http, upstream, {**body, "stream": False})
    took = time.monotonic() - started
    tokens = json.loads(raw)["usage"]["completion_tokens"]
    assert s == 200 and took >= 0.1 + 0.2 + tokens / 100 - 0.01


async def test_client_disconnect_closes_the_stream_promptly(
    upstream: RunningUpstream, http: aiohttp.ClientSession
) -> None:
    upstream.configure(tokens_per_s=4)  # a slow generation: ~15 s for 64 tokens
    body = {"model": MODEL, "messages": MESSAGES, "stream": True, "seed": 2, "max_tokens": 60}
    r = await http.post(
        upstream.url + "/chat/completions", json=body, headers={"Authorization": f"Bearer {upstream.api_key}"}
    )
    assert r.status == 200
    await r.content.readuntil(b"\n\n")
    async with http.get(f"{upstream.root}/_sim/stats") as s:
        assert (await s.json())["streams"]["open"] == 1
    closed_at = time.time()
    r.close()  # the client goes away mid-stream
    deadline = time.monotonic() + 5
    while True:
        async with http.get(f"{upstream.root}/_sim/stats") as s:
            stats = await s.json()
        if stats["streams"]["open"] == 0:
            break
        assert time.monotonic() < deadline, stats
        await asyncio.sleep(0.02)
    record = stats["recent_streams"][-1]
    assert record["outcome"] == "client_disconnect"
    assert stats["streams"]["client_disconnect"] == 1
    assert record["closed_at"] - closed_at < 1.0
    assert record["steps_sent"] < 10


async def test_request_log_shows_what_the_upstream_received(
    upstream: RunningUpstream, http: aiohttp.ClientSession
) -> None:
    await post(http, upstream, {"model": MODEL, "messages": MESSAGES, "enforced_tokens": {"tokens": []}})
    async with http.get(f"{upstream.root}/_sim/requests?limit=1") as r:
        [logged] = await r.json()
    assert logged["path"] == "/v1/chat/completions"
    assert logged["body"]["enforced_tokens"] == {"tokens": []}
    headers = {k.lower(): v for k, v in logged["headers"]}
    assert headers["authorization"] == f"Bearer {upstream.api_key}"
    async with http.post(f"{upstream.root}/_sim/reset") as r:
        assert r.status == 200
    async with http.get(f"{upstream.root}/_sim/stats") as r:
        assert (await r.json())["requests"] == 0


def test_cli_process_serves_the_sdk() -> None:
    port = free_port()
    with ManagedProcess(
        ["-m", "sim", "upstream", "--port", str(port), "--api-key", "k1", "--model", MODEL], wait_for_port=port
    ) as proc:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="k1", max_retries=0, timeout=20)
        resp = client.chat.completions.create(model=MODEL, messages=MESSAGES, logprobs=True, top_logprobs=5)
        assert resp.choices[0].logprobs is not None and resp.usage is not None
        assert [m.id for m in client.models.list()] == [MODEL]
        client.close()
        assert proc.alive()
    assert not proc.alive()
