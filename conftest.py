"""Test harness shared by every test in the repository (issue #2)."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import pytest

from tests.support.infra import InfraUnavailable, PrivateRabbit, PrivateRedis, resolve_url


def _need(kind: str) -> Iterator[str]:
    try:
        url, container = resolve_url(kind)
    except InfraUnavailable as exc:
        if os.environ.get("CI"):
            pytest.fail(f"CI needs a real {kind}: {exc}", pytrace=False)
        pytest.skip(str(exc))
    try:
        yield url
    finally:
        if container is not None:
            container.stop()  # type: ignore[attr-defined]


@pytest.fixture(scope="session")
def amqp_url() -> Iterator[str]:
    yield from _need("amqp")


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    yield from _need("redis")


@pytest.fixture
def namespace() -> str:
    """A unique prefix for exchanges, queues and Redis keys: tests never see each other's messages."""
    return f"t{uuid.uuid4().hex[:10]}"


@pytest.fixture
def private_redis() -> Iterator[PrivateRedis]:
    r = PrivateRedis().start()
    try:
        yield r
    finally:
        r.cleanup()


@pytest.fixture
def private_rabbit() -> Iterator[PrivateRabbit]:
    r = PrivateRabbit().start()
    try:
        yield r
    finally:
        r.cleanup()
