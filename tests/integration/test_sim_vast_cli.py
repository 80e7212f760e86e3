"""Fidelity: the official ``vastai`` CLI (1.9.1) cannot tell the simulator from Vast.ai.

The simulator runs as a real process (``python -m sim vast``); the CLI is pointed at it with ``--url`` and
``VAST_URL`` (one import-time call ignores ``--url``), a throwaway HOME and ``VASTAI_NO_UPDATE_CHECK=1``.
In ``--raw`` mode the CLI exits 0 even on errors, so every step is judged by its output.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support.net import free_port
from tests.support.procs import REPO, ManagedProcess

pytestmark = pytest.mark.timeout(240)

VASTAI = REPO / ".tools" / "vastai" / "bin" / "vastai"
MLNODE_IMAGE = "ghcr.io/product-science/mlnode:3.0.11-post1"


class Cli:
    def __init__(self, url: str, home: Path) -> None:
        self.url = url
        self.env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": str(home),
            "VAST_URL": url,
            "VASTAI_NO_UPDATE_CHECK": "1",
            "COLUMNS": "250",
            "LANG": "C.UTF-8",
        }

    def run(self, *args: str, key: str = "test") -> subprocess.CompletedProcess[str]:
        cmd = [str(VASTAI), "--url", self.url, "--api-key", key, *args]
        done = subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=120, check=False)
        assert "Traceback" not in done.stderr, f"the CLI crashed on {args}:\n{done.stderr}"
        return done

    def raw(self, *args: str) -> Any:
        done = self.run(*args, "--raw")
        assert done.returncode == 0
        assert done.stdout.strip(), f"{args}: no output; stderr: {done.stderr}"
        return json.loads(done.stdout)


@pytest.fixture(scope="module")
def simulator() -> Iterator[str]:
    if not VASTAI.exists():
        pytest.fail(
            f"the official vastai CLI is missing at {VASTAI}: run `make tools` (it installs vastai==1.9.1)",
            pytrace=False,
        )
    port = free_port()
    proc = ManagedProcess(
        ["-m", "sim", "vast", "--port", str(port), "--boot-scale", "0.05", "--seed", "3"],
        env={"HYBRID_TIME_PROFILE": "test"},
        wait_for_port=port,
        name="vast simulator",
    )
    with proc:
        yield f"http://127.0.0.1:{port}"
    assert proc.proc is not None and proc.proc.returncode == 0, f"no clean shutdown:\n{proc.output()}"


def test_official_cli_drives_a_full_rental(simulator: str, tmp_path: Path) -> None:
    cli = Cli(simulator, tmp_path)

    offers = cli.raw("search", "offers", "gpu_name=H100_SXM num_gpus=1 direct_port_count>=2", "-o", "dph_total")
    assert offers, "the default query (verified, rentable, not external) finds H100s"
    assert all(o["gpu_name"] == "H100 SXM" and o["num_gpus"] == 1 and o["direct_port_count"] >= 2 for o in offers)
    assert all(o["verified"] and o["rentable"] and not o["external"] for o in offers)
    prices = [o["dph_total"] for o in offers]
    assert prices == sorted(prices)
    table = cli.run("search", "offers", "gpu_name=H100_SXM num_gpus=1", "--limit", "3")
    assert table.returncode == 0 and "H100_SXM" in table.stdout and "invalid return Content-Type" not in table.stdout

    created = cli.raw(
        "create", "instance", str(offers[0]["id"]),
        "--image", MLNODE_IMAGE,
        "--env", "-p 8080:8080 -p 5000:5000",
        "--disk", "40",
        "--label", "cli-fidelity",
        "--raw",
        "--args",
    )  # fmt: skip
    assert created["success"] is True
    iid = int(created["new_contract"])

    deadline = time.monotonic() + 60
    row: dict[str, Any] = {}
    while time.monotonic() < deadline:
        row = cli.raw("show", "instance", str(iid))
        if row.get("actual_status") == "running":
            break
        assert row.get("ports") is None
        time.sleep(0.2)
    assert row.get("actual_status") == "running", row
    assert row["extra_env"] == {"-p 8080:8080": "1", "-p 5000:5000": "1"}, "the CLI turned the pairs into a dict"
    assert row["public_ipaddr"] == "127.0.0.1 ", "the single view keeps the API's whitespace"
    host_port = row["ports"]["8080/tcp"][0]["HostPort"]
    assert isinstance(host_port, str) and row["ports"]["5000/tcp"][0]["HostPort"].isdigit()

    deadline = time.monotonic() + 60
    while True:
        try:
            state = httpx.get(f"http://{row['public_ipaddr'].strip()}:{host_port}/api/v1/state", timeout=5)
            break
        except httpx.TransportError:
            assert time.monotonic() < deadline, "the MLNode never answered on its mapped port"
            time.sleep(0.1)
    assert state.status_code == 200 and "state" in state.json()

    listed = cli.raw("show", "instances")
    mine = [r for r in listed if r["id"] == iid]
    assert len(mine) == 1 and mine[0]["label"] == "cli-fidelity"
    assert mine[0]["public_ipaddr"] == "127.0.0.1", "the list view strips whitespace"
    shown = cli.run("show", "instances")
    assert shown.returncode == 0 and str(iid) in shown.stdout and "running" in shown.stdout
    assert "cli-fidelity" in shown.stdout

    logs = cli.run("logs", str(iid))
    assert logs.returncode == 0 and "Uvicorn running on http://0.0.0.0:8080" in logs.stdout, logs.stdout

    destroyed = cli.run("destroy", "instance", str(iid), "-y", "--raw")
    assert destroyed.returncode == 0 and destroyed.stdout.strip() == "" and destroyed.stderr.strip() == ""
    assert cli.raw("show", "instance", str(iid)) == {"instances": None}
    again = cli.run("destroy", "instance", str(iid), "-y", "--raw")
    assert again.returncode == 0, "--raw exits 0 on errors"
    error = json.loads(again.stderr.strip().splitlines()[-1])
    assert error["error"] is True and error["status_code"] == 404

    ledger = httpx.get(f"{simulator}/_sim/ledger", timeout=10).json()
    entry = next(r for r in ledger["instances"] if r["id"] == iid)
    assert entry["destroyed"] is True and entry["label"] == "cli-fidelity"
    assert entry["billed_gpu_seconds"] > 0 and entry["cost"] > 0
    assert [h["actual_status"] for h in entry["history"]][-1] == "destroyed"
    assert ledger["instances_live"] == 0


def test_official_cli_reports_errors_from_the_simulator(simulator: str, tmp_path: Path) -> None:
    cli = Cli(simulator, tmp_path)
    bad = cli.run("show", "instances", "--raw", key="wrong")
    assert bad.returncode == 0
    assert json.loads(bad.stderr.strip().splitlines()[-1]) == {
        "error": True,
        "status_code": 401,
        "msg": "Invalid user key",
    }
    gone = cli.run("create", "instance", "1", "--image", MLNODE_IMAGE, "--raw")
    error = json.loads(gone.stderr.strip().splitlines()[-1])
    assert error["status_code"] == 404 and "no_such_ask" in error["msg"]
    assert cli.raw("show", "instance", "999") == {"instances": None}
