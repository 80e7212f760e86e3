"""``python -m sim dapi`` and ``python -m sim mlnode`` run as real processes."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import pytest

from tests.support.net import free_port
from tests.support.procs import ManagedProcess


def get(url: str) -> tuple[int, object]:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status, json.loads(r.read() or b"null")
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"null")


@pytest.mark.timeout(60)
def test_dapi_and_mlnode_processes() -> None:
    public, admin, callback, api = free_port(), free_port(), free_port(), free_port()
    inference = free_port()
    dapi = ManagedProcess(
        [
            "-m",
            "sim",
            "dapi",
            "--public-port",
            str(public),
            "--admin-port",
            str(admin),
            "--callback-port",
            str(callback),
            "--callback-base",
            "http://127.0.0.1:9399",
            "--poc-v2",
        ],
        wait_for_port=public,
    )
    mlnode = ManagedProcess(
        ["-m", "sim", "mlnode", "--port", str(api), "--inference-port", str(inference), "--generation", "v2"],
        wait_for_port=api,
    )
    with dapi, mlnode:
        status, epoch = get(f"http://127.0.0.1:{public}/v1/epochs/latest")
        assert status == 200 and isinstance(epoch, dict) and "block_height" in epoch
        status, params = get(f"http://127.0.0.1:{public}/_sim/params")
        assert isinstance(params, dict) and params["poc_v2_enabled"] is True
        assert params["callback_base"] == "http://127.0.0.1:9399"
        assert get(f"http://127.0.0.1:{admin}/admin/v1/nodes") == (200, [])
        status, state = get(f"http://127.0.0.1:{api}/api/v1/state")
        assert (
            status == 200 and isinstance(state, dict) and state["state"] == "STOPPED" and state["version"] == "3.0.12"
        )
        assert get(f"http://127.0.0.1:{inference}/health")[0] == 503
        assert dapi.alive() and mlnode.alive(), dapi.output() + mlnode.output()
