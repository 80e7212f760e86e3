"""Issue #9 acceptance: requests generated from the proxy node's OpenAPI document find no 5xx.

schemathesis is not a dependency of this workspace, so this is the property test the issue allows: hypothesis builds
requests from the served ``/openapi.json`` — schema-shaped bodies, bodies with one field of the wrong type, arbitrary
JSON, raw bytes, empty bodies, wrong methods, with and without a version prefix — and every answer must be below 500,
except the one documented refusal: a validation request (``enforced_tokens``) with no GPU node is a 503.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Iterator
from concurrent.futures import Future
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from hybrid_common import TEST
from hybrid_proxy.node import InferenceNode
from hybrid_proxy.node.openapi import document
from sim.upstream import DEFAULT_MODELS, start_upstream
from tests.integration.test_proxy_kit import proxy_settings

DOC = document()
SCHEMAS: dict[str, Any] = DOC["components"]["schemas"]
PREFIXES = ("", "/v3.0.8", "/v3.0.12-post1")
MODELS = st.sampled_from([*DEFAULT_MODELS[:2], "no/such-model"]) | st.text(max_size=12)

JSON_LEAF = st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False) | st.text(max_size=16)
ANY_JSON = st.recursive(
    JSON_LEAF,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)


def from_schema(schema: dict[str, Any], name: str = "") -> st.SearchStrategy[Any]:
    """A strategy for values of a JSON schema (the subset the document uses)."""
    if "$ref" in schema:
        return from_schema(SCHEMAS[schema["$ref"].rsplit("/", 1)[-1]], name)
    if name == "model":
        return MODELS
    if "enum" in schema:
        return st.sampled_from(schema["enum"])
    kinds = schema.get("type", ["string", "integer", "object", "array", "boolean", "null"])
    if isinstance(kinds, str):
        kinds = [kinds]
    options: list[st.SearchStrategy[Any]] = []
    for kind in kinds:
        if kind == "object":
            props: dict[str, Any] = schema.get("properties", {})
            required = [p for p in schema.get("required", []) if p in props]
            optional = [p for p in props if p not in required]
            options.append(
                st.fixed_dictionaries(
                    {p: from_schema(props[p], p) for p in required},
                    optional={p: from_schema(props[p], p) for p in optional},
                )
            )
        elif kind == "array":
            item = from_schema(schema["items"]) if "items" in schema else JSON_LEAF
            options.append(st.lists(item, min_size=schema.get("minItems", 0), max_size=3))
        elif kind == "integer":
            options.append(st.integers(schema.get("minimum", -(2**40)), schema.get("maximum", 2**40)))
        elif kind == "number":
            options.append(st.floats(schema.get("minimum", -1e6), schema.get("maximum", 1e6), allow_nan=False))
        elif kind == "boolean":
            options.append(st.booleans())
        elif kind == "null":
            options.append(st.none())
        else:
            options.append(st.text(max_size=24))
    return st.one_of(options)


def with_a_wrong_field(schema: dict[str, Any]) -> st.SearchStrategy[Any]:
    """A schema-shaped object with one property replaced by arbitrary JSON (often the wrong type)."""
    resolved = SCHEMAS[schema["$ref"].rsplit("/", 1)[-1]] if "$ref" in schema else schema
    props = list(resolved.get("properties", {}))
    if not props:
        return ANY_JSON
    return st.tuples(from_schema(schema), st.sampled_from(props), ANY_JSON).map(
        lambda t: {**t[0], t[1]: t[2]} if isinstance(t[0], dict) else t[0]
    )


def bodies(op: dict[str, Any]) -> st.SearchStrategy[bytes | None]:
    schema = (op.get("requestBody") or {}).get("content", {}).get("application/json", {}).get("schema")
    encoded: list[st.SearchStrategy[bytes | None]] = [
        ANY_JSON.map(lambda v: json.dumps(v).encode()),
        st.binary(max_size=64),
        st.just(b""),
        st.none(),
    ]
    if schema is not None:
        encoded += [
            from_schema(schema).map(lambda v: json.dumps(v).encode()),
            from_schema(schema).map(lambda v: json.dumps(v).encode()),
            with_a_wrong_field(schema).map(lambda v: json.dumps(v).encode()),
            from_schema(schema).map(lambda v: json.dumps(v).encode()[:-3]),  # truncated JSON
        ]
    return st.one_of(encoded)


OPERATIONS = [(path, method.upper(), op) for path, item in DOC["paths"].items() for method, op in item.items()]


@st.composite
def requests(draw: st.DrawFn) -> tuple[str, str, bytes | None, dict[str, str]]:
    path, method, op = draw(st.sampled_from(OPERATIONS))
    if draw(st.integers(0, 9)) == 0:
        method = draw(st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH"]))  # often not allowed
    prefix = draw(st.sampled_from(PREFIXES))
    body = draw(bodies(op))
    ctype = draw(st.sampled_from(["application/json", "text/plain", "application/x-www-form-urlencoded", ""]))
    headers = {"Content-Type": ctype} if ctype else {}
    return method, prefix + path, body, headers


class BackgroundProxy:
    """Upstream simulator + proxy node on an event loop in a thread, so hypothesis drives plain sync calls."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="proxy-under-test", daemon=True)
        self.thread.start()
        self.node: InferenceNode | None = None
        self.upstream: Any = None

    def run(self, coro: Any, timeout: float = 30.0) -> Any:
        future: Future[Any] = asyncio.run_coroutine_threadsafe(coro, self.loop)
        return future.result(timeout)

    async def _start(self) -> None:
        self.upstream = await start_upstream(profile=TEST, seed=9)
        self.node = InferenceNode(proxy_settings(self.upstream.url, max_request_bytes=64 * 1024))
        await self.node.start()

    async def _stop(self) -> None:
        if self.node is not None:
            await self.node.stop()
        if self.upstream is not None:
            await self.upstream.close()

    def close(self) -> None:
        self.run(self._stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)
        self.loop.close()


@pytest.fixture(scope="module")
def proxy() -> Iterator[httpx.Client]:
    bg = BackgroundProxy()
    try:
        bg.run(bg._start())
        assert bg.node is not None
        with httpx.Client(base_url=f"http://127.0.0.1:{bg.node.port}", timeout=30) as client:
            served = client.get("/openapi.json")
            assert served.status_code == 200 and served.json() == json.loads(json.dumps(DOC))
            yield client
    finally:
        bg.close()


def documented_refusal(body: bytes | None, response: httpx.Response) -> bool:
    """The one 5xx the document promises: a validation request with no GPU node to run it."""
    if response.status_code != 503 or not body:
        return False
    try:
        parsed = json.loads(body)
    except ValueError:
        return False
    code = response.json().get("error", {}).get("code")
    return isinstance(parsed, dict) and parsed.get("enforced_tokens") is not None and code == "no_validating_node"


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(case=requests())
def test_no_5xx_on_generated_and_malformed_requests(
    proxy: httpx.Client, case: tuple[str, str, bytes | None, dict[str, str]]
) -> None:
    method, path, body, headers = case
    response = proxy.request(method, path, content=body, headers=headers)
    event(f"HTTP {response.status_code}")
    assert response.status_code < 500 or documented_refusal(body, response), (
        f"{method} {path} {body!r:.300} -> {response.status_code} {response.text[:300]}"
    )
    if response.status_code >= 400:
        assert response.headers["Content-Type"].startswith("application/json")
        response.json()  # every refusal is JSON (OpenAI-style or the image's {"detail": ...})
