"""Child processes for tests: the simulators and services as real processes, killed for sure at the end."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.support.net import wait_port

REPO = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class CliRun:
    """What one CLI invocation (``hybridctl ...``) gave: its exit code and output."""

    code: int
    out: str
    err: str
    args: tuple[str, ...] = ()

    def json(self) -> Any:
        return json.loads(self.out)

    def __str__(self) -> str:
        return f"hybridctl {' '.join(self.args)} -> {self.code}\n{self.out[-3000:]}\n{self.err[-3000:]}"


def default_sigint() -> None:
    """``preexec_fn`` for a child a test interrupts with SIGINT (Ctrl-C). A suite started in the background by a
    shell without job control (``.ci/run &``, as CI may) inherits SIGINT *ignored*; an ignored signal stays ignored
    across exec, and Python then installs no KeyboardInterrupt handler, so the child would never see the Ctrl-C."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


class ManagedProcess:
    """A child started with the venv's python; its output goes to a temp log shown on failure."""

    def __init__(
        self,
        args: Sequence[str],
        *,
        env: dict[str, str] | None = None,
        wait_for_port: int | None = None,
        timeout: float = 30.0,
        name: str | None = None,
    ) -> None:
        self.args = [sys.executable, *args] if args[0] in {"-m", "-c"} else list(args)
        self.name = name or " ".join(args[:3])
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self.log = tempfile.NamedTemporaryFile(prefix="proc-", suffix=".log", delete=False)  # noqa: SIM115
        self.proc: subprocess.Popen[bytes] | None = None
        self.wait_for_port = wait_for_port
        self.timeout = timeout

    def start(self) -> ManagedProcess:
        self.proc = subprocess.Popen(
            self.args,
            env=self.env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            cwd=REPO,
            start_new_session=True,
        )
        if self.wait_for_port is not None:
            try:
                wait_port(self.wait_for_port, timeout=self.timeout)
            except TimeoutError:
                self.stop()
                raise RuntimeError(f"{self.name} did not listen on {self.wait_for_port}:\n{self.output()}") from None
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.alive():
            assert self.proc is not None
            os.killpg(self.proc.pid, sig)
            self.proc.wait(timeout=10)

    def stop(self, timeout: float = 10.0) -> None:
        if not self.alive():
            return
        assert self.proc is not None
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=timeout)
        except (subprocess.TimeoutExpired, ProcessLookupError):
            self.kill()

    def output(self) -> str:
        self.log.flush()
        return Path(self.log.name).read_text(errors="replace")[-8000:]

    def wait_for_output(self, text: str, timeout: float = 90.0) -> ManagedProcess:
        """Until the child has logged ``text`` (a service's "up" line: its consumers are on their queues)."""
        deadline = time.monotonic() + timeout
        while text not in Path(self.log.name).read_text(errors="replace"):
            if not self.alive() or time.monotonic() > deadline:
                raise RuntimeError(f"{self.name} did not log {text!r} within {timeout}s:\n{self.output()}")
            time.sleep(0.1)
        return self

    def __enter__(self) -> ManagedProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
