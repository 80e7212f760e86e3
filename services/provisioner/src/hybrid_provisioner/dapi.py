"""The dapi admin API for GPU slots (gonka-protocol.md §3): upsert, enable, disable, delete, list.

A slot is always registered under its stable slot id with the node front's host and the slot's gateway ports:
upserting an existing id keeps its ``node_num`` (delete + re-add would change it and orphan in-flight callbacks).
``DELETE`` can block until the node's in-flight command ends (up to 15 minutes, §10): it is sent with a short
timeout and a timeout counts as sent.
"""

from __future__ import annotations

from typing import Any

import httpx
import orjson


class DapiError(Exception):
    """The admin API could not be reached or answered 5xx (worth retrying)."""


class DapiRejected(Exception):
    """A 4xx with the dapi's ``error`` (validation failed: not worth retrying as is)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"HTTP {status}: {message}")
        self.status = status
        self.message = message


class DapiAdmin:
    def __init__(self, base_url: str, timeout: float = 10.0) -> None:
        self.base_url = base_url.rstrip("/")
        self._http = httpx.AsyncClient(base_url=self.base_url, timeout=timeout)

    async def close(self) -> None:
        await self._http.aclose()

    async def _call(self, method: str, path: str, *, ok_404: bool = False, **kwargs: Any) -> Any:
        try:
            r = await self._http.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            raise DapiError(f"{method} {path}: {type(exc).__name__}: {exc}") from exc
        if ok_404 and r.status_code == 404:
            return None
        if r.status_code >= 500:
            raise DapiError(f"{method} {path}: HTTP {r.status_code}: {r.text[:300]}")
        if r.status_code >= 400:
            try:
                body = orjson.loads(r.content)
                message = str(body.get("error") or body.get("message") or body) if isinstance(body, dict) else r.text
            except orjson.JSONDecodeError:
                message = r.text
            raise DapiRejected(r.status_code, message[:500])
        try:
            return orjson.loads(r.content) if r.content else None
        except orjson.JSONDecodeError:
            return r.text

    async def upsert(self, node: dict[str, Any]) -> dict[str, Any]:
        body = await self._call("POST", "/admin/v1/nodes", json=node)
        return body if isinstance(body, dict) else {}

    async def enable(self, node_id: str) -> bool:
        return await self._call("POST", f"/admin/v1/nodes/{node_id}/enable", ok_404=True) is not None

    async def disable(self, node_id: str) -> bool:
        return await self._call("POST", f"/admin/v1/nodes/{node_id}/disable", ok_404=True) is not None

    async def delete(self, node_id: str, timeout: float = 5.0) -> bool | None:
        """True/False as the dapi answers; ``None`` when it did not answer in time (the delete is under way)."""
        try:
            body = await self._call("DELETE", f"/admin/v1/nodes/{node_id}", ok_404=True, timeout=timeout)
        except DapiError as exc:
            if isinstance(exc.__cause__, httpx.TimeoutException):
                return None
            raise
        return bool(body)

    async def nodes(self) -> list[dict[str, Any]]:
        body = await self._call("GET", "/admin/v1/nodes")
        return [n for n in body or [] if isinstance(n, dict)]
