"""Readiness probes: is the workload on a rented GPU answering, and does the node front reach it?

A probe is one short HTTP request; the job driver repeats it every ``PROVISIONER_PROBE_INTERVAL`` (0.25 s by
default), so a service is seen well within a second of answering. Probe targets are pluggable: the GPU directly
(``public_ip`` + mapped port — vastai-api.md: never ``ssh_host`` for HTTP) or the node front
(``http://{NODE_FRONT_PROBE_HOST}:{gateway_poc_port}/{version}/api/v1/state``; the front answers 503 until its
route to the slot is up).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import httpx
import orjson

from hybrid_provisioner.profiles import Readiness


@dataclass(frozen=True)
class ProbeResult:
    ok: bool
    detail: str
    body: Any = None


def _json(response: httpx.Response) -> Any:
    if "json" not in response.headers.get("content-type", ""):
        return None
    try:
        return orjson.loads(response.content)
    except orjson.JSONDecodeError:
        return None


class ReadinessProbe:
    """HTTP probes with one shared client; every method answers instead of raising."""

    def __init__(self, timeout: float = 3.0) -> None:
        self._http = httpx.AsyncClient(timeout=httpx.Timeout(timeout, connect=min(timeout, 2.0)))

    async def close(self) -> None:
        await self._http.aclose()

    async def _get(self, url: str, headers: dict[str, str] | None = None) -> httpx.Response | str:
        try:
            return await self._http.get(url, headers=headers)
        except httpx.HTTPError as exc:
            return f"{type(exc).__name__}: {exc}"

    async def mlnode_state(self, base_url: str) -> ProbeResult:
        """``GET /api/v1/state`` → 200 ``{"state": ...}`` (gonka-protocol.md §1)."""
        r = await self._get(f"{base_url}/api/v1/state")
        if isinstance(r, str):
            return ProbeResult(False, r)
        body = _json(r)
        if r.status_code == 200 and isinstance(body, dict) and "state" in body:
            return ProbeResult(True, f"state {body['state']}", body)
        return ProbeResult(False, f"HTTP {r.status_code}", body)

    async def comfyui(self, base_url: str, password: str | None) -> ProbeResult:
        """comfyui.md: ready = ``/system_stats`` answers JSON with a CUDA device through the auth proxy (a
        provisioning log viewer answers 200 HTML meanwhile; a wrong password answers 401 or a login redirect)."""
        headers = {"Authorization": f"Bearer {password}"} if password else None
        r = await self._get(f"{base_url}/system_stats", headers)
        if isinstance(r, str):
            return ProbeResult(False, r)
        body = _json(r)
        if r.status_code != 200 or not isinstance(body, dict):
            return ProbeResult(False, f"HTTP {r.status_code} {r.headers.get('content-type', '')}".strip())
        devices = body.get("devices") or []
        if any(isinstance(d, dict) and d.get("type") == "cuda" for d in devices):
            return ProbeResult(True, "system_stats with a CUDA device", body)
        return ProbeResult(False, "system_stats without a CUDA device", body)

    async def tcp(self, host: str, port: int) -> ProbeResult:
        r = await self._get(f"http://{host}:{port}/")
        if isinstance(r, str):
            return ProbeResult(False, r)
        return ProbeResult(True, f"HTTP {r.status_code}")

    async def model_up(self, base_url: str, readiness: Readiness, timeout: float) -> ProbeResult:
        """``POST /api/v1/inference/up``: blocks until vLLM serves (gonka-protocol.md §1, §7)."""
        body = {"model": readiness.model, "dtype": readiness.dtype, "additional_args": readiness.model_args}
        try:
            r = await self._http.post(f"{base_url}/api/v1/inference/up", json=body, timeout=timeout)
        except httpx.HTTPError as exc:
            return ProbeResult(False, f"{type(exc).__name__}: {exc}")
        return ProbeResult(r.status_code < 300, f"HTTP {r.status_code}", _json(r))

    async def front(self, probe_host: str, gateway_poc_port: int, version: str) -> ProbeResult:
        """Through the node front, as the dapi will call it (version prefix included)."""
        prefix = f"/{version.strip('/')}" if version else ""
        return await self.mlnode_state(f"http://{probe_host}:{gateway_poc_port}{prefix}")


def model_served(state: dict[str, Any], model: str | None) -> bool:
    """3.0.12+ ``/api/v1/state`` reports ``inference_healthy`` and ``loaded_model`` (gonka-protocol.md §9)."""
    return bool(state.get("inference_healthy")) and (model is None or state.get("loaded_model") == model)
