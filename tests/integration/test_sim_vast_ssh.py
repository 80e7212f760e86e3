"""Runtype semantics (vastai-api.md "runtype"): real SSH for ssh runtypes, none for ``args``; the image's
service runs from its entrypoint (args) or from ``onstart``; the ComfyUI image's traps (comfyui.md)."""

from __future__ import annotations

import asyncio
from typing import Any

import asyncssh
import httpx
import pytest

from sim.workloads import COMFY_ENTRYPOINT, MLNODE_START_COMMAND
from tests.integration.test_sim_vast_helpers import AUTH, VastClient, http_get_eventually, open_vast

pytestmark = pytest.mark.timeout(120)


def _keypair() -> tuple[asyncssh.SSHKey, str]:
    key = asyncssh.generate_private_key("ssh-ed25519")
    return key, key.export_public_key().decode().strip()


async def _connect(row: dict[str, Any], key: asyncssh.SSHKey, user: str = "root") -> asyncssh.SSHClientConnection:
    # The official CLI's rule (ssh-url): jupyter runtypes answer SSH on ssh_port + 1.
    port = row["ssh_port"] + 1 if "jupyter" in row["image_runtype"] else row["ssh_port"]
    return await asyncssh.connect(
        row["ssh_host"], port, username=user, client_keys=[key], known_hosts=None, connect_timeout=10
    )


async def test_ssh_runtype_tunnels_to_the_mlnode_with_the_attached_key() -> None:
    async with open_vast() as c:
        account_key, account_pub = _keypair()
        assert (await c.http.post("/api/v0/ssh/", json={"ssh_key": account_pub}, headers=AUTH)).status_code == 200
        iid = await c.rent(
            ports=1,
            env={"-p 5000:5000": "1"},
            runtype="ssh_direc ssh_proxy",
            onstart=MLNODE_START_COMMAND,
        )
        key, pub = _keypair()
        r = await c.http.post(f"/api/v0/instances/{iid}/ssh/", json={"ssh_key": pub}, headers=AUTH)
        assert r.status_code == 200 and r.json()["success"] is True
        row = await c.wait_status(iid, "running")
        assert row["status_msg"].endswith("/ssh")
        assert set(row["ports"]) == {"5000/tcp", "22/tcp"}, "8080 is not published: SSH only"
        assert row["ports"]["22/tcp"][0]["HostPort"] == str(row["ssh_port"]), "ssh_direc publishes 22"

        async with await _connect(row, key) as conn:
            result = await conn.run("printenv VAST_TCP_PORT_5000", check=True)
            assert str(result.stdout).strip() == row["ports"]["5000/tcp"][0]["HostPort"]
            listener = await conn.forward_local_port("127.0.0.1", 0, "localhost", 8080)
            r = await http_get_eventually(f"http://127.0.0.1:{listener.get_port()}/api/v1/state")
            assert r.status_code == 200 and "state" in r.json()

            # Remote forward: a process in the instance calling localhost:<port> reaches our side.
            async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
                writer.write(b"callback reached the client\n")
                await writer.drain()
                writer.close()

            local = await asyncio.start_server(answer, "127.0.0.1", 0)
            try:
                remote = await conn.forward_remote_port("localhost", 0, "127.0.0.1", local.sockets[0].getsockname()[1])
                reader, writer = await asyncio.open_connection("127.0.0.1", remote.get_port())
                assert await asyncio.wait_for(reader.readline(), 10) == b"callback reached the client\n"
                writer.close()
                remote.close()
            finally:
                local.close()
                await local.wait_closed()

            # Nothing listens on container port 7777; the internet is out of reach.
            with pytest.raises(asyncssh.ChannelOpenError):
                await conn.open_connection("localhost", 7777)
            with pytest.raises(asyncssh.ChannelOpenError):
                await conn.open_connection("example.com", 80)

        async with await _connect(row, account_key) as conn:
            assert (await conn.run("true")).exit_status == 0, "account keys are installed at creation"
        with pytest.raises(asyncssh.PermissionDenied):
            await _connect(row, _keypair()[0])
        with pytest.raises(asyncssh.PermissionDenied):
            await _connect(row, key, user="ubuntu")

        await c.destroy(iid)
        with pytest.raises(OSError):
            await _connect(row, key)


async def test_args_instance_refuses_ssh_and_ssh_without_onstart_runs_no_service() -> None:
    async with open_vast() as c:
        key, pub = _keypair()
        args_id = await c.rent(ports=2, env={"-p 8080:8080": "1"}, runtype="args")
        bare_id = await c.rent(ports=0, runtype="ssh_proxy")
        for iid in (args_id, bare_id):
            await c.http.post(f"/api/v0/instances/{iid}/ssh/", json={"ssh_key": pub}, headers=AUTH)
        args_row = await c.wait_status(args_id, "running")
        bare_row = await c.wait_status(bare_id, "running")

        with pytest.raises(OSError):
            await _connect(args_row, key)
        r = await http_get_eventually(f"http://127.0.0.1:{args_row['ports']['8080/tcp'][0]['HostPort']}/api/v1/state")
        assert r.status_code == 200, "args keeps the image entrypoint: the MLNode runs"

        assert "22/tcp" not in bare_row["ports"], "proxy-only SSH publishes no 22"
        async with await _connect(bare_row, key) as conn:
            with pytest.raises(asyncssh.ChannelOpenError):
                await conn.open_connection("localhost", 8080)
        internals = (await c.http.get(f"/_sim/instances/{bare_id}")).json()
        assert internals["container"]["service_state"] == "absent"
        assert any("entrypoint replaced" in line for line in internals["logs"])


async def test_jupyter_runtype_holds_port_8080_so_the_mlnode_cannot_bind() -> None:
    async with open_vast() as c:
        key, pub = _keypair()
        iid = await c.rent(ports=0, runtype="jupyter_proxy ssh_proxy", onstart=MLNODE_START_COMMAND)
        await c.http.post(f"/api/v0/instances/{iid}/ssh/", json={"ssh_key": pub}, headers=AUTH)
        row = await c.wait_status(iid, "running")
        async with await _connect(row, key) as conn:
            listener = await conn.forward_local_port("127.0.0.1", 0, "localhost", 8080)
            r = await http_get_eventually(f"http://127.0.0.1:{listener.get_port()}/")
            assert r.status_code == 302 and "/login" in r.headers["location"], "Jupyter answers on 8080"

        async def failed() -> dict[str, Any]:
            while True:
                data: dict[str, Any] = (await c.http.get(f"/_sim/instances/{iid}")).json()
                if data["container"]["service_state"] == "failed":
                    return data
                await asyncio.sleep(0.05)

        data = await asyncio.wait_for(failed(), 30)
        assert any("address already in use" in line for line in data["logs"])


async def _comfy(c: VastClient, **payload: Any) -> dict[str, Any]:
    iid = await c.rent(ports=1, image="vastai/comfy:v0.3.60-cuda-12.9-py312", **payload)
    return await c.wait_status(iid, "running")


async def test_comfyui_image_needs_portal_config_and_guards_8188() -> None:
    portal = "localhost:1111:11111:/:Instance Portal|localhost:8188:18188:/:ComfyUI"
    async with open_vast() as c:
        row = await _comfy(
            c, runtype="args", env={"-p 8188:8188": "1", "PORTAL_CONFIG": portal, "WEB_PASSWORD": "s3cret"}
        )
        assert "18188/tcp" not in row["ports"]
        url = f"http://127.0.0.1:{row['ports']['8188/tcp'][0]['HostPort']}/system_stats"
        r = await http_get_eventually(url)
        assert r.status_code == 401
        async with httpx.AsyncClient() as http:
            r = await http.get(url, headers={"Authorization": "Bearer s3cret"})
            assert r.status_code == 200 and r.json()["devices"][0]["type"] == "cuda"
            assert (await http.get(url, auth=("vastai", "s3cret"))).status_code == 200
            assert (await http.get(url, params={"token": "s3cret"})).status_code == 200

        silent = await _comfy(c, runtype="args", env={"-p 8188:8188": "1", "WEB_PASSWORD": "s3cret"})
        internals = (await c.http.get(f"/_sim/instances/{silent['id']}")).json()
        assert internals["container"]["service_state"] == "absent", "no PORTAL_CONFIG, no ComfyUI"
        with pytest.raises(httpx.ConnectError):
            async with httpx.AsyncClient() as http:
                await http.get(f"http://127.0.0.1:{silent['ports']['8188/tcp'][0]['HostPort']}/system_stats")

        # ssh runtype: the entrypoint must be the onstart; tunnel to ComfyUI itself (18188, no auth).
        key, pub = _keypair()
        iid = await c.rent(
            ports=0,
            image="vastai/comfy:v0.3.60-cuda-12.9-py312",
            runtype="ssh_proxy",
            onstart=COMFY_ENTRYPOINT,
            env={"PORTAL_CONFIG": portal},
        )
        await c.http.post(f"/api/v0/instances/{iid}/ssh/", json={"ssh_key": pub}, headers=AUTH)
        row = await c.wait_status(iid, "running")
        async with await _connect(row, key) as conn:
            listener = await conn.forward_local_port("127.0.0.1", 0, "localhost", 18188)
            r = await http_get_eventually(f"http://127.0.0.1:{listener.get_port()}/system_stats")
            assert r.status_code == 200 and r.json()["devices"]
