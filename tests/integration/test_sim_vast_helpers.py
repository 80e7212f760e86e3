"""Shared plumbing for the Vast simulator's tests (issue #3): a small async client and polling helpers.

No tests here; the helpers talk to the simulator over real HTTP like any client would.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx

from hybrid_common import TEST
from sim.vast import RunningVast, start_vast

MLNODE_IMAGE = "ghcr.io/product-science/mlnode:3.0.11-post1"
KEY = "test"
AUTH = {"Authorization": f"Bearer {KEY}"}
# Generous: other engineers' tests load the same two cores.
DEADLINE = 30.0


class VastClient:
    """Thin wrapper over the public API (what a provisioner does, minus policy)."""

    def __init__(self, vast: RunningVast) -> None:
        self.vast = vast
        self.http = httpx.AsyncClient(base_url=vast.url, timeout=15.0)

    async def aclose(self) -> None:
        await self.http.aclose()

    async def search(self, **query: Any) -> list[dict[str, Any]]:
        r = await self.http.post("/api/v0/bundles/", json=query)
        assert r.status_code == 200, r.text
        return list(r.json()["offers"])

    async def clean_offer(self, ports: int = 2, exclude: set[int] | None = None) -> dict[str, Any]:
        offers = await self.search(
            verified={"eq": True},
            rentable={"eq": True},
            rented={"eq": False},
            external={"eq": False},
            direct_port_count={"gte": ports},
            order=[["dph_total", "asc"]],
            limit=400,
        )
        for offer in offers:
            if offer["id"] not in (exclude or set()):
                return offer
        raise AssertionError("no rentable offer left in the catalogue")

    async def create(self, offer_id: int, **payload: Any) -> httpx.Response:
        body = {"client_id": "me", "image": MLNODE_IMAGE, "env": {}, "price": None, "disk": 40, **payload}
        return await self.http.put(f"/api/v0/asks/{offer_id}/", json=body, headers=AUTH)

    async def rent(self, ports: int = 2, **payload: Any) -> int:
        offer = await self.clean_offer(ports)
        r = await self.create(offer["id"], **payload)
        assert r.status_code == 200 and r.json()["success"] is True, r.text
        return int(r.json()["new_contract"])

    async def show(self, instance_id: int) -> dict[str, Any] | None:
        r = await self.http.get(f"/api/v0/instances/{instance_id}/", params={"owner": "me"}, headers=AUTH)
        assert r.status_code == 200, r.text
        assert r.headers["content-type"] == "application/json"
        result: dict[str, Any] | None = r.json()["instances"]
        return result

    async def wait_for(
        self, instance_id: int, predicate: Callable[[dict[str, Any]], bool], timeout: float = DEADLINE
    ) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        row: dict[str, Any] | None = None
        while time.monotonic() < deadline:
            row = await self.show(instance_id)
            assert row is not None, f"instance {instance_id} vanished"
            if predicate(row):
                return row
            await asyncio.sleep(0.05)
        raise AssertionError(f"instance {instance_id} never satisfied the condition; last: {row}")

    async def wait_status(self, instance_id: int, status: str, timeout: float = DEADLINE) -> dict[str, Any]:
        return await self.wait_for(instance_id, lambda r: r["actual_status"] == status, timeout)

    async def put_instance(self, instance_id: int, body: dict[str, Any]) -> httpx.Response:
        return await self.http.put(f"/api/v0/instances/{instance_id}/", json=body, headers=AUTH)

    async def destroy(self, instance_id: int) -> httpx.Response:
        return await self.http.request("DELETE", f"/api/v0/instances/{instance_id}/", json={}, headers=AUTH)

    async def ledger_row(self, instance_id: int) -> dict[str, Any]:
        r = await self.http.get("/_sim/ledger")
        rows = [row for row in r.json()["instances"] if row["id"] == instance_id]
        assert rows, f"{instance_id} missing from the ledger"
        return dict(rows[0])

    async def fault(self, **spec: Any) -> dict[str, Any]:
        r = await self.http.post("/_sim/faults", json=spec)
        assert r.status_code == 200, r.text
        return dict(r.json()["faults"][0])


async def http_get_eventually(url: str, timeout: float = DEADLINE, **kw: Any) -> httpx.Response:
    """GET ``url`` until something answers (a service coming up after its instance is running)."""
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    async with httpx.AsyncClient(timeout=5.0) as http:
        while time.monotonic() < deadline:
            try:
                return await http.get(url, **kw)
            except httpx.TransportError as exc:
                last = exc
                await asyncio.sleep(0.05)
    raise AssertionError(f"{url} never answered: {last!r}")


@contextlib.asynccontextmanager
async def open_vast(**overrides: Any) -> AsyncIterator[VastClient]:
    """A simulator in this event loop (TEST profile, fast boots, no rate limits unless overridden)."""
    settings: dict[str, Any] = {"profile": TEST, "boot_scale": 0.05, "rate_limits": False, "seed": 7}
    settings.update(overrides)
    running = await start_vast(**settings)
    client = VastClient(running)
    try:
        yield client
    finally:
        await client.aclose()
        await running.close()
