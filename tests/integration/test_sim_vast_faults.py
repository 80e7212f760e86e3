"""Every injectable fault is observable the way vastai-api.md describes it."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest

from hybrid_common import TEST
from tests.integration.test_sim_vast_helpers import AUTH, MLNODE_IMAGE, http_get_eventually, open_vast

pytestmark = pytest.mark.timeout(120)


async def test_offer_gone_between_search_and_create() -> None:
    async with open_vast() as c:
        first = await c.clean_offer()
        second = await c.clean_offer(exclude={first["id"]})
        await c.fault(kind="offer_gone", offer_id=first["id"])
        await c.fault(kind="offer_gone", offer_id=second["id"], status=410)
        r = await c.create(first["id"])
        assert r.status_code == 404
        assert r.json()["msg"] == f"error 404/3603: no_such_ask Instance type by id {first['id']} is not available."
        r = await c.create(second["id"])
        assert r.status_code == 410 and r.json()["error"] == "no_such_ask"
        available = {o["id"] for o in await c.search(rentable={"eq": True}, limit=1000)}
        assert first["id"] not in available and second["id"] not in available
        assert not (await c.http.get("/_sim/ledger")).json()["instances"], "no instance was created"


async def test_failed_create_that_leaves_an_instance() -> None:
    async with open_vast() as c:
        offer = await c.clean_offer()
        await c.fault(kind="create_leaves_instance", offer_id=offer["id"])
        r = await c.create(offer["id"], label="ghm-orphan")
        body = r.json()
        assert body["success"] is False and isinstance(body["new_contract"], int)
        iid = body["new_contract"]
        row = await c.show(iid)
        assert row is not None
        assert row["cur_state"] == row["intended_status"] == row["next_state"] == "stopped"
        await asyncio.sleep(0.2)
        ledger = await c.ledger_row(iid)
        assert ledger["label"] == "ghm-orphan" and not ledger["destroyed"]
        assert ledger["cost_storage"] > 0 and ledger["billed_gpu_seconds"] == 0, "it bills storage until destroyed"

        # The same trap from a bid below min_bid.
        bid_offer = await c.clean_offer(exclude={offer["id"]})
        r = await c.create(bid_offer["id"], price=bid_offer["min_bid"] / 2)
        assert r.json()["success"] is False and r.json()["new_contract"]
        assert (await c.destroy(iid)).status_code == 200
        assert (await c.destroy(r.json()["new_contract"])).status_code == 200


async def test_pull_failure_unknown_image_and_oci_error() -> None:
    async with open_vast() as c:
        await c.fault(kind="pull_failure", label="pull-fails")
        await c.fault(kind="oci_failure", label="oci-fails")
        failing = await c.rent(label="pull-fails")
        unknown = await c.rent(image="ghcr.io/product-science/mlnode:9.9.9")
        oci = await c.rent(label="oci-fails")
        healthy = await c.rent()
        await c.wait_status(healthy, "running")
        for iid, image in ((failing, MLNODE_IMAGE), (unknown, "ghcr.io/product-science/mlnode:9.9.9")):
            row = await c.wait_for(iid, lambda r: bool(r["status_msg"]) and "manifest" in r["status_msg"])
            assert row["actual_status"] == "created" and row["intended_status"] == "running"
            assert row["status_msg"] == (
                f"Error response from daemon: manifest for {image} not found: manifest unknown: manifest unknown"
            )
        row = await c.wait_for(oci, lambda r: "OCI runtime create failed" in (r["status_msg"] or ""))
        assert row["actual_status"] == "created"
        await asyncio.sleep(0.3)
        for iid in (failing, unknown, oci):
            later = await c.show(iid)
            assert later is not None and later["actual_status"] == "created", "it never gets better by itself"


async def test_stuck_loading_stays_loading() -> None:
    async with open_vast() as c:
        await c.fault(kind="stuck_loading", label="stuck")
        stuck = await c.rent(label="stuck")
        normal = await c.rent(label="normal")
        await c.wait_status(normal, "running")
        await c.wait_status(stuck, "loading")
        await asyncio.sleep(0.5)
        row = await c.show(stuck)
        assert row is not None and row["actual_status"] == "loading" and row["ports"] is None


async def test_host_goes_offline_at_a_given_time() -> None:
    async with open_vast() as c:
        iid = await c.rent(ports=1, env={"-p 8080:8080": "1"}, runtype="args")
        row = await c.wait_status(iid, "running")
        url = f"http://127.0.0.1:{row['ports']['8080/tcp'][0]['HostPort']}/api/v1/state"
        assert (await http_get_eventually(url)).status_code == 200
        machine = row["machine_id"]
        r = await c.http.post("/_sim/faults", json={"kind": "host_offline", "machine_id": machine, "after": 0.3})
        assert r.status_code == 200
        row = await c.wait_status(iid, "offline")
        assert "offline" in row["status_msg"]
        with pytest.raises(httpx.TransportError):
            async with httpx.AsyncClient(timeout=2) as http:
                await http.get(url)
        offers = await c.search(machine_id={"eq": machine}, limit=1000)
        assert offers == [], "an offline host lists nothing"
        frozen = (await c.ledger_row(iid))["wall_gpu_seconds"]
        await asyncio.sleep(0.2)
        assert (await c.ledger_row(iid))["wall_gpu_seconds"] == frozen


async def test_server_error_bursts_and_the_gateways_html_502() -> None:
    async with open_vast() as c:
        iid = await c.rent()
        await c.fault(kind="http_error", route="show", status=503, count=2)
        for _ in range(2):
            r = await c.http.get(f"/api/v0/instances/{iid}/", headers=AUTH)
            assert r.status_code == 503 and r.headers["content-type"] == "application/json"
        assert (await c.http.get(f"/api/v0/instances/{iid}/", headers=AUTH)).status_code == 200

        await c.fault(kind="http_error", status=502)
        r = await c.http.post("/api/v0/bundles/", json={"limit": 1})
        assert r.status_code == 502 and r.headers["content-type"] == "text/html"
        assert "502 Bad Gateway" in r.text
        r = await c.http.post("/api/v0/bundles/", json={"limit": 1})
        assert r.status_code == 200

        await c.fault(kind="search_quota")
        r = await c.http.post("/api/v0/bundles/", json={"limit": 1})
        assert r.status_code == 429 and r.json()["error"] == "search_quota_exceeded"
        assert "X-RateLimit-Reset" in r.headers

        r = await c.http.post("/_sim/faults", json={"kind": "meteor"})
        assert r.status_code == 400


async def test_rate_limits_are_plain_text_429s_and_continuation_pages_are_exempt() -> None:
    # Real-world intervals (acceleration 1) with long overrides: refusals are certain even on a loaded machine.
    async with open_vast(profile=TEST.with_acceleration(1.0), rate_limits=True) as c:
        r = await c.http.post("/_sim/config", json={"rate_limit_overrides": {"create": 0, "list": 60, "show": 60}})
        assert r.status_code == 200
        offers = await c.search(rentable={"eq": True}, limit=30)
        ids = []
        for offer in offers[:26]:
            r = await c.create(offer["id"], image="ubuntu:22.04", disk=10)
            ids.append(r.json()["new_contract"])

        params = {"limit": "25", "select_filters": "{}"}
        first = await c.http.get("/api/v1/instances/", params=params, headers=AUTH)
        assert first.status_code == 200 and first.json()["next_token"]
        second = await c.http.get(
            "/api/v1/instances/", params={**params, "after_token": first.json()["next_token"]}, headers=AUTH
        )
        assert second.status_code == 200 and len(second.json()["instances"]) == 1
        again = await c.http.get("/api/v1/instances/", params=params, headers=AUTH)
        assert again.status_code == 429
        assert again.headers["content-type"].startswith("text/plain")
        assert "Retry-After" not in again.headers
        assert again.text.startswith("API requests too frequent")
        with pytest.raises(json.JSONDecodeError):
            json.loads(again.text)

        assert (await c.http.get(f"/api/v0/instances/{ids[0]}/", headers=AUTH)).status_code == 200
        assert (await c.http.get(f"/api/v0/instances/{ids[1]}/", headers=AUTH)).status_code == 429

        await c.http.post("/_sim/config", json={"rate_limit_overrides": {"create": 60}})
        assert (await c.create(offers[26]["id"], image="ubuntu:22.04")).status_code == 200
        r = await c.create(offers[27]["id"], image="ubuntu:22.04")
        assert r.status_code == 429 and "threshold=60" in r.text

        statuses = [(await c.http.post("/api/v0/bundles/", json={"limit": 1})).status_code for _ in range(11)]
        assert statuses.count(429) >= 1 and statuses[0] == 200, "about ten searches a minute"


async def test_outbid_and_gpu_taken_on_start() -> None:
    async with open_vast() as c:
        offer = await c.clean_offer()
        r = await c.create(offer["id"], price=round(offer["min_bid"] * 1.2, 4), runtype="args")
        spot = r.json()["new_contract"]
        assert r.json()["success"] is True
        await c.wait_status(spot, "running")
        await c.fault(kind="outbid", instance_id=spot)
        row = await c.wait_for(spot, lambda x: x["cur_state"] == "stopped")
        assert row["cur_state"] == row["intended_status"] == row["next_state"] == "stopped"
        assert row["ports"] is None

        plain = await c.rent(target_state="stopped")
        await c.wait_status(plain, "stopped")
        await c.fault(kind="gpu_taken", instance_id=plain)
        assert (await c.put_instance(plain, {"state": "running"})).json()["success"] is True
        await asyncio.sleep(0.3)
        waiting = await c.show(plain)
        assert waiting is not None
        assert waiting["actual_status"] == "stopped" and waiting["intended_status"] == "running"
        assert "scheduling" in waiting["status_msg"]
