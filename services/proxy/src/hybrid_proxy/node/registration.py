"""The proxy registers its own node in the dapi admin API and keeps it registered (gonka-protocol.md §3).

The proxy is the only owner of this node's registration (architecture: "dapi admin API → proxy for its own node").
At start it upserts the node (``POST /admin/v1/nodes``: an upsert by id keeps ``node_num``); then it re-reads the
node list on an interval and upserts again whenever the node is missing — a restarted dapi that forgot it — or its
registration differs from the configuration. It never deletes itself: the node stays registered across PoCs,
answering the PoC routes as a node without a GPU (§9). An operator's admin *disable* is respected, not undone.
While the dapi is unreachable it says so in the log, then retries.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import orjson

from hybrid_common.messages import Event
from hybrid_common.messages.events import NodeFailed, ProxyNodeRegistered
from hybrid_proxy.node import metrics
from hybrid_proxy.node.record import NodeRecord

log = logging.getLogger("hybrid.proxy.registration")

Publish = Callable[[Event], Awaitable[None]]
_COMPARED = ("host", "inference_port", "poc_port", "inference_segment", "poc_segment", "max_concurrent")


class RegistrationRefused(Exception):
    """The dapi answered the upsert with an error (validation failed: a non-governance model, a duplicate port...)."""


class SelfRegistration:
    def __init__(
        self,
        *,
        admin_url: str,
        desired: dict[str, Any],
        record: NodeRecord,
        interval: float,
        publish: Publish | None = None,
        request_timeout: float = 10.0,
    ) -> None:
        self.admin_url = admin_url.rstrip("/")
        self.desired = desired
        self.node_id: str = desired["id"]
        self.record = record
        self.interval = interval
        self.publish = publish
        self.request_timeout = request_timeout
        self.registered = asyncio.Event()
        self.upserts = 0
        self._task: asyncio.Task[None] | None = None
        self._session: aiohttp.ClientSession | None = None
        self._dapi_reachable: bool | None = None
        self._last_status: str | None = None
        self._publishing: set[asyncio.Task[None]] = set()

    # --- lifecycle ------------------------------------------------------------------------------------------

    def start(self) -> None:
        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=self.request_timeout), trust_env=False
        )
        self._task = asyncio.create_task(self._run(), name="proxy-self-registration")

    async def stop(self) -> None:
        for task in [t for t in (self._task, *self._publishing) if t is not None]:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._task = None
        if self._session is not None:
            await self._session.close()
            self._session = None

    # --- the loop -------------------------------------------------------------------------------------------

    async def _run(self) -> None:
        delay = min(1.0, self.interval)
        while True:
            try:
                await self.reconcile()
                self._reachable(True, "")
                delay = self.interval
            except (aiohttp.ClientError, TimeoutError, OSError) as exc:
                self._reachable(False, f"{type(exc).__name__}: {exc}")
                await self.record.save()
                metrics.REGISTRATIONS.labels("unreachable").inc()
                delay = min(max(delay * 2, 0.5), self.interval)
            except RegistrationRefused as exc:
                log.error(
                    "the dapi refused the registration of %s: %s (retrying in %.0fs)", self.node_id, exc, self.interval
                )
                self.record.view["last_error"] = str(exc)
                await self.record.save()
                metrics.REGISTRATIONS.labels("refused").inc()
                delay = self.interval
            except Exception:
                log.exception("self-registration check failed")
                delay = self.interval
            await asyncio.sleep(delay)

    def _reachable(self, ok: bool, error: str) -> None:
        if ok and self._dapi_reachable is False:
            log.info("dapi admin API at %s answers again", self.admin_url)
        elif not ok:
            # Every failed attempt is logged: an operator reading the log must see the node is not registered.
            log.warning(
                "dapi admin API at %s unreachable (%s); node %s will be registered when it answers",
                self.admin_url,
                error,
                self.node_id,
            )
            self.record.view["last_error"] = f"dapi admin API unreachable: {error}"
        self._dapi_reachable = ok

    async def reconcile(self) -> None:
        """One check: read the node list, upsert when needed, record what the dapi says about the node."""
        nodes = await self._list()
        mine = next((n for n in nodes if isinstance(n, dict) and (n.get("node") or {}).get("id") == self.node_id), None)
        if mine is None:
            if self.upserts:
                log.warning("the dapi no longer lists node %s (restarted?): registering it again", self.node_id)
            await self._upsert("missing")
            return
        node, state = mine.get("node") or {}, mine.get("state") or {}
        drift = self._drift(node)
        admin = state.get("admin_state") or {}
        if drift and admin.get("enabled", True) is not False:
            log.info("node %s registration differs from the configuration (%s): upserting", self.node_id, drift)
            await self._upsert("drift")
            return
        if not self.registered.is_set():
            log.info("node %s is registered in the dapi (node_num %s)", self.node_id, node.get("node_num"))
        self.registered.set()
        await self._observe(node, state)

    def _drift(self, node: dict[str, Any]) -> str:
        diffs = [k for k in _COMPARED if node.get(k) != self.desired.get(k)]
        if set((node.get("models") or {}).keys()) != set(self.desired["models"]):
            diffs.append("models")
        hardware = node.get("hardware") or []
        if [(h.get("type"), h.get("count")) for h in hardware if isinstance(h, dict)] != [
            (h["type"], h["count"]) for h in self.desired["hardware"]
        ]:
            diffs.append("hardware")
        return ", ".join(diffs)

    async def _observe(self, node: dict[str, Any], state: dict[str, Any]) -> None:
        status = state.get("current_status")
        self.record.view["dapi"] = {
            "node_num": node.get("node_num"),
            "current_status": status,
            "intended_status": state.get("intended_status"),
            "poc_current_status": state.get("poc_current_status"),
            "failure_reason": state.get("failure_reason") or None,
            "admin_enabled": (state.get("admin_state") or {}).get("enabled"),
            "checked_at": time.time(),
        }
        self.record.view["last_error"] = None
        await self.record.save()
        if status != self._last_status:
            if status == "FAILED":
                reason = state.get("failure_reason") or "no reason given"
                log.warning("the dapi reports node %s FAILED: %s", self.node_id, reason)
                await self._emit(NodeFailed(node_id=self.node_id, failure_reason=reason, observed_by="proxy"))
            elif self._last_status == "FAILED":
                log.info("the dapi reports node %s %s again", self.node_id, status)
            self._last_status = status

    # --- HTTP -----------------------------------------------------------------------------------------------

    async def _list(self) -> list[Any]:
        assert self._session is not None
        async with self._session.get(f"{self.admin_url}/admin/v1/nodes") as resp:
            raw = await resp.read()
            if resp.status != 200:
                raise aiohttp.ClientResponseError(
                    resp.request_info, resp.history, status=resp.status, message=raw[:200].decode(errors="replace")
                )
        try:
            parsed = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            raise aiohttp.ClientPayloadError(f"GET /admin/v1/nodes is not JSON: {exc}") from None
        return parsed if isinstance(parsed, list) else []

    async def _upsert(self, why: str) -> None:
        assert self._session is not None
        async with self._session.post(
            f"{self.admin_url}/admin/v1/nodes",
            data=orjson.dumps(self.desired),
            headers={"Content-Type": "application/json"},
        ) as resp:
            raw = await resp.read()
            status = resp.status
        if status != 200:  # 400 on a failed create, 500 on a failed update (the real handlers' quirk)
            raise RegistrationRefused(f"HTTP {status}: {raw[:300].decode(errors='replace')}")
        self.upserts += 1
        metrics.REGISTRATIONS.labels("upserted").inc()
        d = self.desired
        log.info(
            "registered node %s in the dapi (%s): %s poc_port %d inference_port %d models %s",
            self.node_id,
            why,
            d["host"],
            d["poc_port"],
            d["inference_port"],
            list(d["models"]),
        )
        self.record.view["registration"] = {**d, "registered_at": time.time(), "why": why}
        self.record.view["last_error"] = None
        await self.record.save()
        self.registered.set()
        await self._emit(
            ProxyNodeRegistered(
                node_id=self.node_id,
                host=d["host"],
                poc_port=d["poc_port"],
                inference_port=d["inference_port"],
                models=list(d["models"]),
            )
        )

    async def _emit(self, event: Event) -> None:
        """Publish in the background: a broker that is down or slow must not hold up the registration checks."""
        if self.publish is None:
            return
        task = asyncio.create_task(self._publish(self.publish, event), name=f"publish-{event.TYPE}")
        self._publishing.add(task)
        task.add_done_callback(self._publishing.discard)

    @staticmethod
    async def _publish(publish: Publish, event: Event) -> None:
        try:
            await publish(event)
        except Exception as exc:
            log.warning("could not publish %s: %r", event.TYPE, exc)


def desired_registration(
    *,
    node_id: str,
    host: str,
    poc_port: int,
    inference_port: int,
    models: list[str],
    max_concurrent: int,
    hardware_type: str,
    hardware_count: int,
) -> dict[str, Any]:
    """The admin API body (gonka-protocol.md §3), segments empty: the node strips any version prefix itself."""
    return {
        "id": node_id,
        "host": host,
        "inference_port": inference_port,
        "inference_segment": "",
        "poc_port": poc_port,
        "poc_segment": "",
        "max_concurrent": max_concurrent,
        "models": {m: {"args": []} for m in models},
        "hardware": [{"type": hardware_type, "count": hardware_count}],
    }
