"""Issue #11: the relay's public door — routes, the dapi's answers, the hand-off before the 200, protection — and
malformed bodies of many shapes answered 4xx and never enqueued (property test)."""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime
from typing import Any

import aio_pika
import httpx
import orjson
import pamqp.frame
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from pamqp.body import ContentBody
from pamqp.commands import Basic
from pamqp.header import ContentHeader
from redis.asyncio import Redis

from hybrid_common.bus import Publisher, connect
from hybrid_common.messages import parse
from hybrid_common.messages.commands import ForwardCallback, ForwardCallbackGroup
from hybrid_common.messages.domain import PocWindowHeights
from hybrid_common.messages.events import EpochObserved
from hybrid_common.redis_keys import RedisKeys
from hybrid_common.topology import Topology
from hybrid_relay.service import RelayService
from hybrid_relay.settings import RelaySettings
from hybrid_relay.wire import envelope, new_id, properties, publish_frames
from tests.support.net import free_port
from tests.support.procs import ManagedProcess

pytestmark = [pytest.mark.broker, pytest.mark.redis]

V1 = {"public_key": "pk", "block_hash": "bh", "block_height": 100, "nonces": [1, 2], "dist": [0.1, 0.2], "node_id": 3}
V1_VALIDATED = {
    **V1,
    "received_dist": [0.1, 0.2],
    "r_target": 1.398,
    "fraud_threshold": 1e-7,
    "n_invalid": 0,
    "probability_honest": 1.0,
    "fraud_detected": False,
}
V2 = {
    "public_key": "pk",
    "block_hash": "bh",
    "block_height": 100,
    "node_id": 3,
    "artifacts": [{"nonce": 7, "vector_b64": base64.b64encode(b"\x00\x01" * 12).decode()}],
    "encoding": {"dtype": "f16", "k_dim": 12, "endian": "le"},
}
V2_VALIDATED = {
    "request_id": "9000:abc",
    "public_key": "pk",
    "block_hash": "bh",
    "block_height": 100,
    "node_id": 3,
    "n_total": 10,
    "n_mismatch": 0,
    "mismatch_nonces": [],
    "p_value": 1.0,
    "fraud_detected": False,
}
MODEL_PATH = "Qwen%252FQwen3-235B-A22B-Instruct-2507-FP8"  # escaped twice, as the dapi hands it out (§7)


async def queued(amqp_url: str, namespace: str) -> list[dict[str, Any]]:
    """``callback.forward`` envelopes waiting in ``relay.callbacks`` (left in place), the door's groups opened up:
    each batch of a ``callback.forward_group`` as the envelope it would be alone (its id = the batch id)."""
    out = []
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        channel = await connection.channel()
        queue = await channel.get_queue(f"{namespace}.relay.callbacks", ensure=False)
        while (message := await queue.get(no_ack=False, fail=False)) is not None:
            env = orjson.loads(message.body)
            group = parse(message.body).payload  # every message honours the shared contract
            if isinstance(group, ForwardCallbackGroup):
                assert message.type == "callback.forward_group" and message.message_id == env["id"]
                assert message.delivery_mode == aio_pika.DeliveryMode.PERSISTENT
                for batch in env["payload"]["batches"]:
                    out.append(
                        {
                            **env,
                            "id": batch["batch_id"],
                            "type": "callback.forward",
                            "payload": batch,
                            "group": env["id"],
                        }
                    )
            else:
                out.append({**env, "group": env["id"]})
        await channel.close()
    return out


@pytest.fixture
async def door(amqp_url: str, redis_url: str, namespace: str) -> AsyncIterator[tuple[str, RelayService]]:
    """The door alone (no forwarder): what it accepts stays in the queue for inspection."""
    port = free_port()
    settings = RelaySettings(
        amqp_url=amqp_url,
        redis_url=redis_url,
        namespace=namespace,
        role="door",
        public_host="127.0.0.1",
        public_port=port,
        metrics_port=0,
        max_body_bytes=64 * 1024,
    )
    service = RelayService(settings)
    await service.start()
    try:
        yield f"http://127.0.0.1:{port}", service
    finally:
        await service.stop()


async def test_routes_answers_and_the_hand_off(door: tuple[str, RelayService], amqp_url: str, namespace: str) -> None:
    url, _ = door
    accepted = [
        ("/v1/poc-batches/generated", V1, "/v1/poc-batches/generated"),
        ("/v1/poc-batches/validated", V1_VALIDATED, "/v1/poc-batches/validated"),
        ("/mlnode/v1/poc-batches/generated", {**V1, "node_id": 4}, "/mlnode/v1/poc-batches/generated"),
        ("/v3.0.8/v1/poc-batches/generated", {**V1, "node_id": 5}, "/v1/poc-batches/generated"),
        ("/v2/poc-batches/generated", V2, "/v2/poc-batches/generated"),
        (f"/v2/poc-batches/{MODEL_PATH}/validated", V2_VALIDATED, f"/v2/poc-batches/{MODEL_PATH}/validated"),
        (f"/v3.0.12/v2/poc-batches/{MODEL_PATH}/generated", V2, f"/v2/poc-batches/{MODEL_PATH}/generated"),
    ]
    refused = [
        ("/v1/poc-batches/generated", b"{not json", 400, "invalid JSON"),
        ("/v1/poc-batches/generated", b"[1, 2]", 400, "JSON object"),
        ("/v1/poc-batches/generated", orjson.dumps({**V1, "dist": [0.1]}), 400, "nonces and dist differ"),
        ("/v1/poc-batches/generated", orjson.dumps({**V1, "node_id": "3"}), 400, "node_id"),
        ("/v1/poc-batches/generated", orjson.dumps({k: v for k, v in V1.items() if k != "nonces"}), 400, "nonces"),
        (
            "/v2/poc-batches/generated",
            orjson.dumps({**V2, "artifacts": [{"nonce": 1, "vector_b64": "*"}]}),
            400,
            "base64",
        ),
        ("/v1/poc-batches/generated", b"{" + b" " * 70_000 + b"}", 413, "larger"),
        ("/v1/poc-batches/other", orjson.dumps(V1), 404, "Not Found"),
        ("/v9/poc-batches/generated", orjson.dumps(V1), 404, "Not Found"),
    ]
    async with httpx.AsyncClient(timeout=10) as client:
        for path, body, _ in accepted:
            r = await client.post(url + path, content=orjson.dumps(body))
            assert (r.status_code, r.content) == (200, b""), (path, r.text)  # the dapi's 200 has an empty body
        for path, raw, status, words in refused:
            r = await client.post(url + path, content=raw, headers={"Content-Type": "application/json"})
            assert r.status_code == status, (path, r.text)
            assert words in r.json()["error"], (path, r.text)
        r = await client.get(url + "/v1/poc-batches/generated")
        assert r.status_code == 405
    envelopes = await queued(amqp_url, namespace)
    assert len(envelopes) == len(accepted)  # published (confirmed) before each 200; nothing refused was queued
    for env, (_, body, dapi_path) in zip(envelopes, accepted, strict=True):
        env.pop("group")
        command = parse(orjson.dumps(env)).payload  # the hand-built envelope honours the shared contract
        assert isinstance(command, ForwardCallback)
        assert command.path == dapi_path
        assert orjson.loads(command.body) == body  # the sender's bytes, forwarded unchanged
        assert command.batch_id == env["id"]
    digests = {e["payload"]["digest"] for e in envelopes}
    assert len(digests) == len(accepted)


async def test_answers_the_dapis_refusal_at_the_door(
    door: tuple[str, RelayService], amqp_url: str, namespace: str
) -> None:
    url, service = door
    connection = await connect(amqp_url, name="test-scheduler")
    publisher = Publisher(connection, Topology(namespace), "test-scheduler")

    async def observe(height: int, v2: bool) -> None:
        window = PocWindowHeights(
            poc_start=100,
            generation_end=120,
            exchange_end=124,
            validation_start=128,
            validation_end=147,
            set_new_validators=163,
            next_poc_start=340,
        )
        event = EpochObserved(
            epoch_index=1,
            block_height=height,
            phase="Inference",
            window=window,
            block_seconds=1000.0,  # the clock stands still for the test
            poc_v2_enabled=v2,
            mlnode_version="v3.0.12",
            source="public",
            stale_seconds=0,
        )
        await publisher.publish(event)
        deadline = asyncio.get_running_loop().time() + 20
        while service.windows.view is None or service.windows.view.block_height != height:
            assert asyncio.get_running_loop().time() < deadline
            await asyncio.sleep(0.05)

    try:
        async with httpx.AsyncClient(timeout=10) as client:
            await observe(110, v2=True)
            r = await client.post(url + "/v1/poc-batches/generated", content=orjson.dumps(V1))
            assert r.status_code == 503 and "poc_v2_enabled" in r.json()["error"]
            r = await client.post(url + "/v2/poc-batches/generated", content=orjson.dumps(V2))
            assert r.status_code == 200  # window open
            await observe(200, v2=True)  # past the exchange deadline (124) and the validation end (147)
            r = await client.post(url + "/v2/poc-batches/generated", content=orjson.dumps({**V2, "node_id": 9}))
            assert (r.status_code, r.json()) == (503, {"error": "not in PoC generate phase"})
            r = await client.post(url + "/v2/poc-batches/validated", content=orjson.dumps(V2_VALIDATED))
            assert r.status_code == 503
            r = await client.post(url + "/v2/poc-batches/generated", content=orjson.dumps({**V2, "block_height": 7}))
            assert r.status_code == 200  # a window the relay never heard of: the dapi decides
    finally:
        await connection.close()
    assert len(await queued(amqp_url, namespace)) == 2


async def test_protection_secret_path_token_and_sources(amqp_url: str, redis_url: str, namespace: str) -> None:
    common: dict[str, Any] = {
        "amqp_url": amqp_url,
        "redis_url": redis_url,
        "namespace": namespace,
        "role": "door",
        "public_host": "127.0.0.1",
        "metrics_port": 0,
    }
    body = orjson.dumps(V1)
    cases = [
        (
            {"secret_path": "s3cr3t"},
            [
                ("/v1/poc-batches/generated", {}, 404),
                ("/s3cr3t/v1/poc-batches/generated", {}, 200),
                ("/wrong/v1/poc-batches/generated", {}, 404),
            ],
        ),
        (
            {"token": "tok-123456"},
            [
                ("/v1/poc-batches/generated", {}, 401),
                ("/v1/poc-batches/generated", {"X-Relay-Token": "tok-123456"}, 200),
                ("/v1/poc-batches/generated", {"Authorization": "Bearer tok-123456"}, 200),
            ],
        ),
        ({"allow_sources": "10.0.0.0/8"}, [("/v1/poc-batches/generated", {}, 403)]),
        ({"allow_sources": "10.0.0.0/8,127.0.0.1/32"}, [("/v1/poc-batches/generated", {}, 200)]),
    ]
    for extra, probes in cases:
        port = free_port()
        service = RelayService(RelaySettings(**common, public_port=port, **extra))
        await service.start()
        try:
            async with httpx.AsyncClient(timeout=10) as client:
                for path, headers, status in probes:
                    r = await client.post(f"http://127.0.0.1:{port}{path}", content=body, headers=headers)
                    assert r.status_code == status, (extra, path, headers, r.text)
                    assert "s3cr3t" not in r.text and "tok-123456" not in r.text
        finally:
            await service.stop()


def test_relay_envelopes_match_the_contract() -> None:
    """The hand-built envelopes (wire.py) parse with the shared registry, payload by payload."""
    samples = {
        "callback.accepted": {
            "batch_id": "b",
            "path": "/v1/poc-batches/generated",
            "generation": "v1",
            "kind": "generated",
            "node_id": 1,
            "block_height": 5,
            "items": 3,
        },
        "callback.forwarded": {"batch_id": "b", "attempts": 2, "status": 200, "lag_ms": 12.5},
        "callback.duplicate": {"batch_id": "b", "path": "/v1/poc-batches/generated"},
        "callback.dead": {
            "batch_id": "b",
            "path": "/v2/poc-batches/generated",
            "reason": "window_closed",
            "last_status": None,
            "attempts": 0,
        },
        "callback.forward": {
            "batch_id": "b",
            "digest": "d" * 64,
            "path": "/v1/poc-batches/generated",
            "body": "{}",
            "generation": "v1",
            "kind": "generated",
            "node_id": 1,
            "block_height": 5,
            "received_at": datetime.now(UTC),
            "source_ip": "127.0.0.1",
        },
    }
    samples["callback.forward_group"] = {
        "batches": [samples["callback.forward"], {**samples["callback.forward"], "items": 3}]
    }
    for type_, payload in samples.items():
        env_id, message = envelope(type_, payload, correlation_id="poc:5")
        parsed = parse(message.body)
        assert (parsed.type, str(parsed.id), message.message_id) == (type_, env_id, env_id)
        assert message.delivery_mode == aio_pika.DeliveryMode.PERSISTENT


def test_publish_frames_are_pamqps() -> None:
    """The hand-built basic.publish frames (wire.py) are byte for byte what pamqp (aiormq's encoder) writes."""
    now = datetime.now(UTC)
    cases = [
        properties("callback.forward_group", new_id(), now, correlation_id=None),
        properties("callback.forwarded", new_id(), now, correlation_id="poc:12"),
        properties("callback.forward", "b", now, headers={"x-relay-dead-reason": "window_closed"}),  # via pamqp
        Basic.Properties(message_id="x", timestamp=datetime(2026, 3, 1, 12, 0, 0, 999_999)),  # naive = UTC
        Basic.Properties(),
    ]
    for props in cases:
        for body in (b"", b"x" * 5, b"y" * 131_064, b"z" * 300_000):
            for mandatory in (True, False):
                ours = publish_frames(3, "ns.commands", "callback.forward_group", mandatory, props, body, 131_064)
                frames: list[Any] = [
                    Basic.Publish(exchange="ns.commands", routing_key="callback.forward_group", mandatory=mandatory),
                    ContentHeader(0, len(body), props),
                    *(ContentBody(body[i : i + 131_064]) for i in range(0, len(body), 131_064)),
                ]
                assert ours == b"".join(pamqp.frame.marshal(f, 3) for f in frames), (props, len(body), mandatory)


async def _exchange(port: int, raw: bytes, answers: int) -> list[tuple[int, dict[str, str], bytes]]:
    """Send raw bytes on one connection; read ``answers`` HTTP responses (status, headers, body) in order."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(raw)
    out = []
    try:
        for _ in range(answers):
            status_line = await asyncio.wait_for(reader.readline(), 10)
            headers: dict[str, str] = {}
            while (line := await reader.readline()) not in (b"\r\n", b""):
                name, _, value = line.decode().partition(":")
                headers[name.strip().lower()] = value.strip()
            if status_line.split()[1] == b"100":
                out.append((100, headers, b""))
                continue
            body = await reader.readexactly(int(headers.get("content-length", "0")))
            out.append((int(status_line.split()[1]), headers, body))
    finally:
        writer.close()
    return out


async def test_the_door_speaks_http_1_1(door: tuple[str, RelayService], amqp_url: str, namespace: str) -> None:
    """The hand-written server: keep-alive, pipelined answers in order, chunked bodies, Expect: 100-continue,
    HTTP/1.0, an oversized chunked body, garbage — and concurrent batches share hand-off messages (group commit)."""
    url, _ = door
    port = int(url.rsplit(":", 1)[1])

    def post(body: bytes, path: str = "/v1/poc-batches/generated", extra: str = "") -> bytes:
        return (f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n{extra}\r\n").encode() + body

    bodies = [orjson.dumps({**V1, "node_id": 100 + i}) for i in range(3)]
    pipelined = post(bodies[0]) + post(b"{bad", "/v1/poc-batches/generated") + post(bodies[1]) + post(b"", "/nope")
    answers = await _exchange(port, pipelined, 4)
    assert [a[0] for a in answers] == [200, 400, 200, 404]  # in request order, the invalid one in its place
    chunked = (
        b"POST /v1/poc-batches/generated HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
        + b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in (bodies[2][:10], bodies[2][10:]))
        + b"0\r\n\r\n"
    )
    assert [a[0] for a in await _exchange(port, chunked, 1)] == [200]
    expect = post(orjson.dumps({**V1, "node_id": 200}), extra="Expect: 100-continue\r\n")
    assert [a[0] for a in await _exchange(port, expect, 2)] == [100, 200]
    http10 = post(orjson.dumps({**V1, "node_id": 201})).replace(b"HTTP/1.1", b"HTTP/1.0", 1)
    [(status, headers, _)] = await _exchange(port, http10, 1)
    assert status == 200 and headers.get("connection") == "close"
    big = b"{" + b" " * 70_000 + b"}"
    chunked_big = (
        b"POST /v1/poc-batches/generated HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
        + b"%x\r\n%s\r\n0\r\n\r\n" % (len(big), big)
    )
    [(status, _, body)] = await _exchange(port, chunked_big, 1)
    assert status == 413 and b"larger" in body
    [(status, headers, _)] = await _exchange(port, b"NOT HTTP AT ALL\r\n\r\n", 1)
    assert status == 400 and headers.get("connection") == "close"

    # 40 senders at once: every batch answered 200 after its confirm, carried by fewer hand-off messages.
    async with httpx.AsyncClient(timeout=10, limits=httpx.Limits(max_connections=40)) as client:
        many = [orjson.dumps({**V1, "node_id": 300 + i}) for i in range(40)]
        replies = await asyncio.gather(*(client.post(url + "/v1/poc-batches/generated", content=b) for b in many))
    assert all(r.status_code == 200 for r in replies)
    batches = await queued(amqp_url, namespace)
    assert len(batches) == 3 + 1 + 1 + 40  # pipelined 2, chunked 1, expect 1, HTTP/1.0 1, concurrent 40
    messages = len({b["group"] for b in batches})
    print(f"45 batches in {messages} hand-off messages")
    assert messages < len(batches)


# --- malformed bodies, many shapes (property test) ------------------------------------------------------------------

_INT_FIELDS = ("block_height", "node_id")
_STR_FIELDS = ("public_key", "block_hash")
_not_int = st.one_of(
    st.floats(allow_nan=False, allow_infinity=False).filter(lambda f: not f.is_integer()),
    st.text(max_size=5),
    st.booleans(),
    st.none(),
    st.lists(st.integers(), max_size=2),
    st.integers(min_value=2**63),
)
_not_str = st.one_of(
    st.integers(), st.floats(allow_nan=False), st.booleans(), st.none(), st.lists(st.text(), max_size=2)
)
_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=8,
)


@st.composite
def malformed(draw: st.DrawFn) -> tuple[str, bytes]:
    """A (route, body) pair the dapi would refuse: every strategy breaks the body for certain."""
    route, valid = draw(
        st.sampled_from(
            [
                ("/v1/poc-batches/generated", V1),
                ("/v1/poc-batches/validated", V1_VALIDATED),
                ("/v2/poc-batches/generated", V2),
                ("/v2/poc-batches/validated", V2_VALIDATED),
            ]
        )
    )
    shape = draw(
        st.sampled_from(["bytes", "not-object", "missing", "int-type", "str-type", "lengths", "list-item", "base64"])
    )
    body: Any = dict(valid)
    if shape == "bytes":
        raw = draw(st.binary(max_size=64))
        try:
            assume(not isinstance(json.loads(raw), dict))
        except ValueError:
            pass
        return route, raw
    if shape == "not-object":
        body = draw(_json.filter(lambda v: not isinstance(v, dict)))
    elif shape == "missing":
        body.pop(draw(st.sampled_from(sorted(valid))))
    elif shape == "int-type":
        body[draw(st.sampled_from(_INT_FIELDS))] = draw(_not_int)
    elif shape == "str-type":
        body[draw(st.sampled_from(_STR_FIELDS))] = draw(_not_str)
    elif shape == "lengths" and "dist" in body:
        body["dist"] = body["dist"] + draw(st.lists(st.floats(0, 1), min_size=1, max_size=3))
    elif shape == "list-item" and "nonces" in body:
        body["nonces"] = [
            *body["nonces"],
            draw(_not_int.filter(lambda v: not isinstance(v, list | int) or isinstance(v, bool))),
        ]
    elif shape == "base64" and "artifacts" in body:
        body["artifacts"] = [{"nonce": 1, "vector_b64": draw(st.text(min_size=1, max_size=6).filter(_bad_b64))}]
    else:
        body = draw(st.sampled_from([None, [], "x", 1]))  # shape not applicable to this route: a non-object
    return route, json.dumps(body).encode()  # stdlib: integers beyond int64 too


def _bad_b64(text: str) -> bool:
    try:
        base64.b64decode(text, validate=True)
        return False
    except ValueError:
        return True


@pytest.fixture
def door_process(amqp_url: str, redis_url: str, namespace: str) -> Iterator[str]:
    port = free_port()
    proc = ManagedProcess(
        ["-m", "hybrid_relay"],
        env={
            "AMQP_URL": amqp_url,
            "REDIS_URL": redis_url,
            "HYBRID_NAMESPACE": namespace,
            "RELAY_ROLE": "door",
            "RELAY_PUBLIC_HOST": "127.0.0.1",
            "RELAY_PUBLIC_PORT": str(port),
            "RELAY_METRICS_PORT": "0",
        },
        wait_for_port=port,
        timeout=60,
    ).start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.stop()


def test_malformed_bodies_get_4xx_and_are_never_enqueued(door_process: str, amqp_url: str, namespace: str) -> None:
    answers: dict[int, int] = {}
    with httpx.Client(timeout=10) as client:

        @settings(max_examples=250, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        @given(malformed())
        def probe(case: tuple[str, bytes]) -> None:
            route, raw = case
            r = client.post(door_process + route, content=raw, headers={"Content-Type": "application/json"})
            answers[r.status_code] = answers.get(r.status_code, 0) + 1
            assert 400 <= r.status_code < 500, (route, raw[:200], r.status_code, r.text)
            assert "error" in r.json()

        probe()
        # A valid batch through the same door is queued: the queue was reachable all along.
        assert client.post(door_process + "/v1/poc-batches/generated", content=orjson.dumps(V1)).status_code == 200
    print("malformed bodies, answers by status:", answers)
    assert len(asyncio.run(queued(amqp_url, namespace))) == 1


async def test_only_instances_the_provisioner_owns(amqp_url: str, redis_url: str, namespace: str) -> None:
    """RELAY_ALLOW_OWNED_INSTANCES: sources are the public IPs in the provisioner's ``instances`` view."""
    redis = Redis.from_url(redis_url)
    key = RedisKeys(namespace).instances()
    port = free_port()
    service = RelayService(
        RelaySettings(
            amqp_url=amqp_url,
            redis_url=redis_url,
            namespace=namespace,
            role="door",
            public_host="127.0.0.1",
            public_port=port,
            metrics_port=0,
            allow_owned_instances=True,
        )
    )
    await service.start()
    try:
        async with httpx.AsyncClient(timeout=10) as client:
            url = f"http://127.0.0.1:{port}/v1/poc-batches/generated"
            assert (await client.post(url, content=orjson.dumps(V1))).status_code == 403
            await redis.hset(key, "4242", orjson.dumps({"state": "running", "public_ip": "127.0.0.1"}))
            await service.guard.refresh_owned()  # the background refresh runs every 5 s
            assert (await client.post(url, content=orjson.dumps(V1))).status_code == 200
            await redis.hdel(key, "4242")
            await service.guard.refresh_owned()
            assert (await client.post(url, content=orjson.dumps(V1))).status_code == 403
    finally:
        await service.stop()
        await redis.aclose()
