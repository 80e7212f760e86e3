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


def pytest_sessionstart(session: pytest.Session) -> None:
    """Sweep what killed runs left on the shared broker, once, before any test (and any xdist worker) starts.

    Only in CI, where this is the one test session on the broker: a sweep during development would delete the queues
    of a colleague's session running beside this one. Only in the controller: a worker sweeping would delete the
    queues its sibling workers had just declared.
    """
    if not os.environ.get("CI") or hasattr(session.config, "workerinput"):
        return
    try:
        url, container = resolve_url("amqp")
    except InfraUnavailable:
        return  # the amqp_url fixture fails the run with the reason
    if container is None:
        sweep_test_queues(url)
    else:
        container.stop()  # type: ignore[attr-defined]


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


# Wall seconds per file, measured with `pytest --durations` (2 cores, loaded). Under `make test` the files run on
# xdist workers, a file per worker at a time: starting the longest first keeps one long file from running alone at the
# end. Unlisted files count as short; a stale figure costs only balance, never correctness.
_FILE_SECONDS = {
    "test_e2e_faults.py": 180,
    "test_e2e_epochs.py": 150,
    "test_operator_run.py": 160,
    "test_scheduler_halt.py": 135,
    "test_operator_cli.py": 105,
    "test_scheduler_epochs.py": 108,
    "test_scheduler_plan.py": 90,
    "test_relay_faults.py": 72,
    "test_provisioner_lifecycle.py": 50,
    "test_comfy_cli.py": 45,
    "test_scheduler_faults.py": 42,
    "test_scheduler_missed.py": 38,
    "test_provisioner_replicas.py": 39,
    "test_provisioner_faults.py": 36,
    "test_node_front_poc.py": 36,
}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    items.sort(key=lambda item: -_FILE_SECONDS.get(item.path.name, 0))
