"""Issue #9 acceptance: the proxy's OpenAI routes pass the upstream's bytes through.

The upstream simulator is deterministic (fixed seed: identical request bytes give identical answer bytes), so the
official ``openai`` SDK must get byte-identical streams and identical JSON (logprobs included) through the proxy and
from the upstream directly; with a model map, identical except the model string. Failures before the first byte are
OpenAI-style errors with the right status; a client that disconnects closes the upstream stream.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam

from hybrid_common import TEST
from sim.upstream import DEFAULT_MODELS, Fault, RunningUpstream, start_upstream
from tests.integration.test_proxy_kit import BIG_MODEL, EPOCH_MODEL, PREFIX, base, eventually, running_node
from tests.support.net import free_port

MESSAGES: list[ChatCompletionMessageParam] = [{"role": "user", "content": "Say something about proof of work."}]
# What the dapi sends (gonka-protocol.md §4): logprobs forced, top_logprobs 5, a seed, skip_special_tokens.
DAPI_FIELDS: dict[str, Any] = {"logprobs": True, "top_logprobs": 5, "seed": 1234, "max_tokens": 24}
EXTRA = {"skip_special_tokens": False}


@pytest.fixture
async def upstream() -> AsyncIterator[RunningUpstream]:
    up = await start_upstream(profile=TEST, seed=7)
    try:
        yield up
    finally:
        await up.close()


def sdk(url: str, key: str = "anything") -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=url, api_key=key, max_retries=0, timeout=30)


async def raw_chat(client: openai.AsyncOpenAI, **kwargs: Any) -> tuple[bytes, Any]:
    resp = await client.chat.completions.with_raw_response.create(**kwargs)
    return resp.http_response.content, resp.parse()


async def raw_stream(client: openai.AsyncOpenAI, **kwargs: Any) -> bytes:
    async with client.chat.completions.with_streaming_response.create(stream=True, **kwargs) as resp:
        return b"".join([chunk async for chunk in resp.iter_bytes()])


async def test_sdk_gets_identical_json_and_byte_identical_streams(upstream: RunningUpstream) -> None:
    async with running_node(upstream.url) as node:
        direct = sdk(upstream.url, upstream.api_key)
        proxied = sdk(base(node) + "/v1")
        prefixed = sdk(base(node) + PREFIX + "/v1")  # the dapi's version prefix
        for model in (EPOCH_MODEL, BIG_MODEL):
            want_raw, want = await raw_chat(direct, model=model, messages=MESSAGES, **DAPI_FIELDS, extra_body=EXTRA)
            for client in (proxied, prefixed):
                got_raw, got = await raw_chat(client, model=model, messages=MESSAGES, **DAPI_FIELDS, extra_body=EXTRA)
                assert got_raw == want_raw
                assert got.model_dump() == want.model_dump()
            assert want.choices[0].logprobs is not None
            assert want.choices[0].logprobs.content and want.choices[0].logprobs.content[0].top_logprobs
            assert want.usage is not None and want.usage.completion_tokens > 0

            stream_args: dict[str, Any] = {
                "model": model,
                "messages": MESSAGES,
                "stream_options": {"include_usage": True},
                **DAPI_FIELDS,
                "extra_body": EXTRA,
            }
            want_stream = await raw_stream(direct, **stream_args)
            assert want_stream.endswith(b"data: [DONE]\n\n") and b'"usage":{' in want_stream
            assert await raw_stream(proxied, **stream_args) == want_stream
            assert await raw_stream(prefixed, **stream_args) == want_stream

        # Legacy completions, JSON and SSE, with logprobs.
        comp: dict[str, Any] = {"model": EPOCH_MODEL, "prompt": "Once upon a time", "max_tokens": 12, "logprobs": 3}
        a = await direct.completions.with_raw_response.create(**comp)
        b = await proxied.completions.with_raw_response.create(**comp)
        assert b.http_response.content == a.http_response.content
        async with direct.completions.with_streaming_response.create(stream=True, **comp) as r1:
            s1 = b"".join([c async for c in r1.iter_bytes()])
        async with proxied.completions.with_streaming_response.create(stream=True, **comp) as r2:
            s2 = b"".join([c async for c in r2.iter_bytes()])
        assert s1 == s2 and s1.endswith(b"data: [DONE]\n\n")

        # The upstream received exactly the bytes the client sent: every field reached it intact.
        received = upstream.state.stats.received
        bodies = [json.loads(r.body) for r in received if r.path == "/v1/chat/completions"]
        proxied_body = bodies[-1]
        assert proxied_body["seed"] == 1234 and proxied_body["top_logprobs"] == 5
        assert proxied_body["stream_options"] == {"include_usage": True}
        assert proxied_body["skip_special_tokens"] is False


async def test_model_map_renames_only_the_model_string() -> None:
    provider_name = "provider/qwen2.5-7b-instruct-fp8"
    up = await start_upstream(profile=TEST, seed=3, models=[provider_name, *DEFAULT_MODELS])
    try:
        async with running_node(up.url, model_map={EPOCH_MODEL: provider_name}) as node:
            direct = sdk(up.url, up.api_key)
            proxied = sdk(base(node) + "/v1")
            want_raw, _ = await raw_chat(direct, model=provider_name, messages=MESSAGES, **DAPI_FIELDS)
            got_raw, got = await raw_chat(proxied, model=EPOCH_MODEL, messages=MESSAGES, **DAPI_FIELDS)
            assert provider_name.encode() in want_raw
            assert got.model == EPOCH_MODEL
            assert got_raw == want_raw.replace(provider_name.encode(), EPOCH_MODEL.encode())

            # Streams are renamed line by line, even when a read splits a model string (tokens_per_s: many reads).
            up.configure(tokens_per_s=400)
            args: dict[str, Any] = {"messages": MESSAGES, "stream_options": {"include_usage": True}, **DAPI_FIELDS}
            want_stream = await raw_stream(direct, model=provider_name, **args)
            got_stream = await raw_stream(proxied, model=EPOCH_MODEL, **args)
            assert want_stream.count(provider_name.encode()) > 5
            assert got_stream == want_stream.replace(provider_name.encode(), EPOCH_MODEL.encode())

            # The upstream only ever saw its own name; the dapi only ever sees its own.
            assert all(json.loads(r.body)["model"] == provider_name for r in up.state.stats.received)
            models = await proxied.models.list()
            assert [m.id for m in models.data] == [EPOCH_MODEL]
    finally:
        await up.close()


async def test_upstream_failures_become_openai_errors_with_the_right_status(upstream: RunningUpstream) -> None:
    body: dict[str, Any] = {"model": EPOCH_MODEL, "messages": MESSAGES, **DAPI_FIELDS}
    async with running_node(upstream.url, upstream_retries=1) as node:
        client = sdk(base(node) + "/v1")
        # One 503 is retried before the first byte: the client never sees it.
        upstream.inject(Fault(kind="status", status=503, count=1))
        ok = await client.chat.completions.create(**body)
        assert ok.choices[0].message.content
        # A dropped connection before any byte is retried too.
        upstream.inject(Fault(kind="disconnect", count=1))
        assert (await client.chat.completions.create(**body)).choices
        # Persistent 429 and 5xx come back with their status, OpenAI-shaped.
        for status, error_type in ((429, openai.RateLimitError), (502, openai.InternalServerError)):
            upstream.inject(Fault(kind="status", status=status, count=2, retry_after=0.01))
            with pytest.raises(error_type) as caught:
                await client.chat.completions.create(**body)
            assert caught.value.status_code == status
            assert isinstance(caught.value.body, dict) and caught.value.body.get("message")
        # The upstream's 4xx passes through as it is.
        with pytest.raises(openai.NotFoundError):
            await client.chat.completions.create(model="no/such-model", messages=MESSAGES)

    # A silent upstream: 504 after the read timeout, not a hang.
    async with running_node(upstream.url, upstream_read_timeout=0.5, upstream_retries=0) as node:
        upstream.inject(Fault(kind="stall", seconds=3.0))
        started = time.monotonic()
        with pytest.raises(openai.APIStatusError) as caught:
            await sdk(base(node) + "/v1").chat.completions.create(**body)
        assert caught.value.status_code == 504
        assert time.monotonic() - started < 2.5
        assert isinstance(caught.value.body, dict) and caught.value.body.get("code") == "upstream_timeout"

    # Nothing listening upstream: 502 with a clear message.
    dead = f"http://127.0.0.1:{free_port()}/v1"
    async with running_node(dead, upstream_retries=1) as node:
        with pytest.raises(openai.APIStatusError) as caught:
            await sdk(base(node) + "/v1").chat.completions.create(**body)
        assert caught.value.status_code == 502
        assert isinstance(caught.value.body, dict) and caught.value.body.get("code") == "upstream_unreachable"


async def test_upstream_headers_are_built_from_scratch(upstream: RunningUpstream) -> None:
    async with (
        running_node(upstream.url) as node,
        aiohttp.ClientSession() as http,
        http.post(
            base(node) + "/v1/chat/completions",
            json={"model": EPOCH_MODEL, "messages": MESSAGES, "max_tokens": 4},
            headers={"Authorization": "Bearer caller-secret-never-upstream", "X-Caller": "dapi", "Cookie": "a=b"},
        ) as resp,
    ):
        assert resp.status == 200
    headers = dict(upstream.state.stats.received[-1].headers())
    lowered = {k.lower(): v for k, v in headers.items()}
    assert lowered["authorization"] == f"Bearer {upstream.api_key}"
    assert "x-caller" not in lowered and "cookie" not in lowered
    assert "caller-secret" not in repr(headers)


async def test_client_disconnect_closes_the_upstream_stream_within_a_second(upstream: RunningUpstream) -> None:
    upstream.configure(tokens_per_s=4)  # a slow generation: the stream stays open for seconds
    body = {"model": EPOCH_MODEL, "messages": MESSAGES, "max_tokens": 60, "stream": True}
    async with running_node(upstream.url) as node:
        session = aiohttp.ClientSession()
        resp = await session.post(base(node) + "/v1/chat/completions", json=body)
        assert resp.status == 200
        first = await resp.content.readany()
        assert first.startswith(b"data: ")
        stats = upstream.state.stats
        assert len(stats.open_streams) == 1
        resp.close()
        await session.close()
        closed_at = time.monotonic()

        async def upstream_closed() -> bool:
            return not stats.open_streams and stats.streams_by_outcome["client_disconnect"] == 1

        await eventually(upstream_closed, timeout=5.0, interval=0.01, what="upstream stream closed")
        assert time.monotonic() - closed_at < 1.0


async def test_an_upstream_break_mid_stream_breaks_the_client_stream(upstream: RunningUpstream) -> None:
    upstream.inject(Fault(kind="disconnect", after_tokens=3))
    body = {"model": EPOCH_MODEL, "messages": MESSAGES, "max_tokens": 30, "stream": True}
    async with (
        running_node(upstream.url) as node,
        aiohttp.ClientSession() as http,
        http.post(base(node) + "/v1/chat/completions", json=body) as resp,
    ):
        assert resp.status == 200
        with pytest.raises(aiohttp.ClientPayloadError):
            await resp.read()  # no clean end: the stream must not pass for a complete one


@pytest.mark.slow
async def test_long_generations_are_not_cut_by_default_timeouts(upstream: RunningUpstream) -> None:
    # httpx's default is 5 s per phase (inference-proxy.md); a 6 s wait before the first byte must pass.
    upstream.configure(latency_ms=6000)
    async with running_node(upstream.url) as node:
        started = time.monotonic()
        reply = await sdk(base(node) + "/v1").chat.completions.create(
            model=EPOCH_MODEL, messages=MESSAGES, max_tokens=4
        )
        assert reply.choices and time.monotonic() - started >= 6.0


async def test_concurrent_requests_share_one_client(upstream: RunningUpstream) -> None:
    body = {"model": EPOCH_MODEL, "messages": MESSAGES, "max_tokens": 8}
    async with running_node(upstream.url) as node, aiohttp.ClientSession() as http:

        async def one(i: int) -> int:
            async with http.post(base(node) + "/v1/chat/completions", json={**body, "seed": i}) as r:
                await r.read()
                return r.status

        statuses = await asyncio.gather(*(one(i) for i in range(64)))
        assert statuses == [200] * 64
        assert node.upstream.session.connector is not None
        assert node.upstream.session.connector.limit >= 500  # above the dapi's max_concurrent
