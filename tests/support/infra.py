"""Real RabbitMQ and Redis for tests.

Order of preference (issue #2): the URLs in ``AMQP_URL`` / ``REDIS_URL`` (default: the machine's local ones),
else testcontainers when a Docker engine answers, else a hard failure when ``CI`` is set (a skip elsewhere).
Tests that stop or restart a broker or Redis use :class:`PrivateRedis` / :class:`PrivateRabbit`: the machine's
binaries on free ports with a private data dir, never the shared instances.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from pathlib import Path
from urllib.parse import urlparse

from tests.support.net import free_port, port_open

_RABBIT_SBIN = Path(os.path.realpath(shutil.which("rabbitmq-server") or "/usr/sbin/rabbitmq-server")).parent
if not (_RABBIT_SBIN / "rabbitmqctl").exists() or Path("/usr/sbin") == _RABBIT_SBIN:
    _RABBIT_SBIN = next(iter(sorted(Path("/usr/lib/rabbitmq/lib").glob("rabbitmq_server-*/sbin"))), _RABBIT_SBIN)
DEFAULT_AMQP = "amqp://guest:guest@127.0.0.1:5672/"
DEFAULT_REDIS = "redis://127.0.0.1:6379/0"


def _reachable(url: str) -> bool:
    u = urlparse(url)
    try:
        with socket.create_connection((u.hostname or "127.0.0.1", u.port or 0), timeout=1.0):
            return True
    except OSError:
        return False


def docker_answers() -> bool:
    if not shutil.which("docker"):
        return False
    try:
        return subprocess.run(["docker", "info"], capture_output=True, timeout=5).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


class InfraUnavailable(RuntimeError):
    pass


def resolve_url(kind: str) -> tuple[str, object | None]:
    """(url, container-or-None) for ``kind`` in {"amqp", "redis"}."""
    env_name, default = ("AMQP_URL", DEFAULT_AMQP) if kind == "amqp" else ("REDIS_URL", DEFAULT_REDIS)
    url = os.environ.get(env_name, default)
    if _reachable(url):
        return url, None
    if docker_answers():
        if kind == "amqp":
            from testcontainers.rabbitmq import RabbitMqContainer

            rc = RabbitMqContainer("rabbitmq:3.13-management").start()
            host, p = rc.get_container_host_ip(), rc.get_exposed_port(5672)
            return f"amqp://guest:guest@{host}:{p}/", rc
        from testcontainers.redis import RedisContainer

        dc = RedisContainer("redis:7").start()
        host, p = dc.get_container_host_ip(), dc.get_exposed_port(6379)
        return f"redis://{host}:{p}/0", dc
    raise InfraUnavailable(f"{env_name} ({url}) does not answer and no Docker engine is available")


class PrivateRedis:
    """A redis-server of our own on a free port (AOF on, like compose), restartable."""

    def __init__(self, appendonly: bool = True) -> None:
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="redis-"))
        self.appendonly = appendonly
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> PrivateRedis:
        args = [
            "redis-server",
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--dir",
            str(self.dir),
            "--save",
            "",
            "--appendonly",
            "yes" if self.appendonly else "no",
            "--appendfsync",
            "always",
        ]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        _wait(lambda: port_open(self.port), 10, f"private redis on {self.port}")
        return self

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=10)

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)

    def restart(self) -> None:
        self.stop()
        self.start()

    def cleanup(self) -> None:
        self.kill()
        shutil.rmtree(self.dir, ignore_errors=True)


class PrivateRabbit:
    """A rabbitmq-server node of our own: own node name, ports, data and log dirs; restartable."""

    def __init__(self) -> None:
        self.port = free_port()
        self.dist_port = free_port()
        self.node = f"priv{uuid.uuid4().hex[:8]}@localhost"
        self.base = Path(tempfile.mkdtemp(prefix="rabbit-"))
        (self.base / "enabled_plugins").write_text("[].\n")
        (self.base / "rabbitmq.conf").write_text(f"loopback_users = none\nlisteners.tcp.default = {self.port}\n")

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.port}/"

    def _env(self) -> dict[str, str]:
        return {
            **os.environ,
            "RABBITMQ_NODENAME": self.node,
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "RABBITMQ_MNESIA_BASE": str(self.base / "mnesia"),
            "RABBITMQ_LOG_BASE": str(self.base / "log"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(self.base / "enabled_plugins"),
            "RABBITMQ_CONFIG_FILE": str(self.base / "rabbitmq"),
            "RABBITMQ_PID_FILE": str(self.base / "pid"),
        }

    def start(self, timeout: float = 60.0) -> PrivateRabbit:
        # The Debian wrapper (/usr/sbin/rabbitmq-server) switches user and drops our environment;
        # the scripts it wraps honour RABBITMQ_* and run fine as root with a private data dir.
        subprocess.run(
            [str(_RABBIT_SBIN / "rabbitmq-server"), "-detached"],
            env=self._env(),
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        _wait(lambda: port_open(self.port), timeout, f"private rabbit on {self.port}")
        subprocess.run(
            [
                str(_RABBIT_SBIN / "rabbitmqctl"),
                "-n",
                self.node,
                "await_startup",
                "--timeout",
                str(int(timeout)),
            ],
            env=self._env(),
            check=True,
            capture_output=True,
            timeout=timeout + 5,
        )
        return self

    def stop(self) -> None:
        subprocess.run(
            [str(_RABBIT_SBIN / "rabbitmqctl"), "-n", self.node, "stop", str(self.base / "pid")],
            env=self._env(),
            capture_output=True,
            timeout=60,
        )

    def restart(self) -> None:
        self.stop()
        self.start()

    def cleanup(self) -> None:
        with contextlib.suppress(Exception):
            self.stop()
        shutil.rmtree(self.base, ignore_errors=True)


def _wait(pred: object, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():  # type: ignore[operator]
            return
        time.sleep(0.1)
    raise TimeoutError(f"{what} did not come up within {timeout}s")


_TEST_NAMESPACE = re.compile(r"^t[0-9a-f]{10}[.:]")


def _list_queue_names() -> list[str]:
    try:
        out = subprocess.run(
            ["rabbitmqctl", "list_queues", "name", "-q", "--no-table-headers"],
            capture_output=True,
            text=True,
            timeout=60,
        )
    except (OSError, subprocess.TimeoutExpired):
        return []
    return [line.strip() for line in out.stdout.splitlines() if line.strip()]


async def _delete(amqp_url: str, queues: list[str], exchanges: list[str]) -> None:
    import aio_pika

    conn = await aio_pika.connect(amqp_url, timeout=10)
    async with conn:
        for name in queues:
            ch = await conn.channel()
            with contextlib.suppress(Exception):
                await ch.queue_delete(name)
        for name in exchanges:
            ch = await conn.channel()
            with contextlib.suppress(Exception):
                await ch.exchange_delete(name)


def delete_broker_objects(amqp_url: str, queues: list[str], exchanges: list[str] = ()) -> None:  # type: ignore[assignment]
    """Delete test queues/exchanges (quorum queues are heavy: hundreds left behind can stall a small broker)."""
    import asyncio
    import threading

    def run() -> None:
        with contextlib.suppress(Exception):
            asyncio.run(_delete(amqp_url, list(queues), list(exchanges)))

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(60)


def namespace_objects(namespace: str) -> tuple[list[str], list[str]]:
    from hybrid_common.topology import OWNER_QUEUES, SUBSCRIPTIONS

    queues = [f"{namespace}.{s.name}{suffix}" for s in (*OWNER_QUEUES, *SUBSCRIPTIONS) for suffix in ("", ".dead")]
    exchanges = [f"{namespace}.{e}" for e in ("events", "commands", "dlx")]
    return queues, exchanges


def sweep_test_queues(amqp_url: str) -> int:
    """Delete every queue a test namespace left on the broker (killed runs, test-only queue names)."""
    names = [n for n in _list_queue_names() if _TEST_NAMESPACE.match(n)]
    if names:
        delete_broker_objects(amqp_url, names)
    return len(names)
