"""Test harness shared by every test in the repository (issue #2)."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import pytest

from tests.support.infra import (
    InfraUnavailable,
    PrivateRabbit,
    PrivateRedis,
    delete_broker_objects,
    namespace_objects,
    resolve_url,
    sweep_test_queues,
)


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
    for url in _need("amqp"):
        if os.environ.get("CI"):
            # What killed runs left behind. Only in CI, where this is the one test session on the broker: a sweep
            # during development would delete the queues of a colleague's session running beside this one.
            sweep_test_queues(url)
        yield url


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    yield from _need("redis")


@pytest.fixture
def namespace(request: pytest.FixtureRequest) -> Iterator[str]:
    """A unique prefix for exchanges, queues and Redis keys: tests never see each other's messages.

    At teardown the namespace's standard queues and exchanges are deleted: quorum queues are heavy, and hundreds of
    them left behind stall a small broker (seen on this machine's RabbitMQ 3.10).
    """
    ns = f"t{uuid.uuid4().hex[:10]}"
    yield ns
    if "amqp_url" in request.fixturenames:
        queues, exchanges = namespace_objects(ns)
        delete_broker_objects(request.getfixturevalue("amqp_url"), queues, exchanges)


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
