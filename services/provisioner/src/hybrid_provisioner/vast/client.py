"""An async client for the Vast.ai routes the provisioner uses (vastai-api.md), quirks included.

- Bearer auth; base URL ``VAST_URL``.
- Reads and destroys retry on 429, 5xx and connection errors with capped exponential backoff (the 429 body is
  often plain text and carries no ``Retry-After``); a ``search_quota_exceeded`` 429 is a daily quota: no retry.
- A create is sent **once**. A reply carrying ``new_contract`` is an instance that exists, whatever ``success``
  says (a too-low bid answers ``success:false`` with a stopped, storage-billing instance). An answer that leaves the
  outcome unknown raises :class:`CreateOutcomeUnknown`: the caller looks its label up instead of re-sending.
- ``{"instances": null}``, 404 and ``actual_status == "destroyed"`` all mean gone.
- The instance list is the v1 route (v0 answers 410) and is paginated by ``next_token``.
"""

from __future__ import annotations

import asyncio
import logging
import random
from dataclasses import dataclass
from typing import Any

import httpx
import orjson

from hybrid_provisioner.vast.errors import (
    CreateOutcomeUnknown,
    InsufficientCredit,
    OfferUnavailable,
    VastAuthError,
    VastError,
    VastQuotaExceeded,
    VastRateLimited,
    VastUnavailable,
)

log = logging.getLogger("hybrid.provisioner.vast")

_RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})
_LIST_PAGE = 25  # vastai-api.md: limit ≤ 25


@dataclass(frozen=True)
class CreateResult:
    """An instance now exists (``instance_id``); ``accepted`` is False for the ``success:false`` trap."""

    instance_id: int
    accepted: bool
    error: str | None = None
    msg: str | None = None


def _decode(response: httpx.Response) -> Any:
    try:
        return orjson.loads(response.content) if response.content else None
    except orjson.JSONDecodeError:
        return None


def _fields(body: Any) -> tuple[str | None, str | None]:
    if isinstance(body, dict):
        err = body.get("error")
        msg = body.get("msg") or body.get("detail")
        return (str(err) if err is not None else None, str(msg) if msg is not None else None)
    return None, None


def is_gone(instance: dict[str, Any] | None) -> bool:
    return instance is None or instance.get("actual_status") == "destroyed"


class VastClient:
    def __init__(
        self,
        base_url: str,
        api_key: str,
        *,
        timeout: float = 120.0,
        retries: int = 6,
        backoff: float = 0.15,
        backoff_cap: float = 8.0,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.retries = retries
        self.backoff = backoff
        self.backoff_cap = backoff_cap
        self._http = httpx.AsyncClient(
            base_url=self.base_url,
            headers={"Authorization": f"Bearer {api_key}", "Accept": "application/json"},
            timeout=httpx.Timeout(timeout, connect=min(timeout, 10.0)),
            transport=transport,
        )
        self.calls = 0
        self.retried = 0

    async def close(self) -> None:
        await self._http.aclose()

    # ---- plumbing

    def _error(self, what: str, response: httpx.Response, body: Any) -> VastError:
        error, msg = _fields(body)
        text = None if body is not None else response.text[:300]
        status = response.status_code
        kwargs: dict[str, Any] = {"status": status, "error": error, "msg": msg or text, "body": body}
        if status == 429:
            if error == "search_quota_exceeded":
                return VastQuotaExceeded(f"{what}: daily search quota exceeded", **kwargs)
            return VastRateLimited(f"{what}: rate limited", **kwargs)
        if status == 401 or error == "auth_error":
            return VastAuthError(f"{what}: the API key was refused", **kwargs)
        if status == 402:
            return InsufficientCredit(f"{what}: insufficient credit", **kwargs)
        if status >= 500:
            return VastUnavailable(f"{what}: server error", **kwargs)
        return VastError(f"{what}: refused", **kwargs)

    async def _send(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        self.calls += 1
        return await self._http.request(method, path, **kwargs)

    async def _retrying(self, what: str, method: str, path: str, *, ok_404: bool = False, **kwargs: Any) -> Any:
        """A read or a destroy: retried on 429, 5xx and connection errors. ``ok_404`` returns ``None`` on 404."""
        delay = self.backoff
        attempt = 0
        while True:
            try:
                response = await self._send(method, path, **kwargs)
            except (httpx.TransportError, httpx.TimeoutException) as exc:
                failure: VastError = VastUnavailable(f"{what}: {type(exc).__name__}: {exc}")
            else:
                body = _decode(response)
                if response.status_code < 400:
                    return body
                if ok_404 and response.status_code == 404:
                    error, _ = _fields(body)
                    if error != "auth_error":
                        return None
                failure = self._error(what, response, body)
                if response.status_code not in _RETRY_STATUSES or isinstance(failure, VastQuotaExceeded):
                    raise failure
            if attempt >= self.retries:
                raise failure
            attempt += 1
            self.retried += 1
            log.info("vast %s failed (%s); retry %d/%d in %.2fs", what, failure, attempt, self.retries, delay)
            await asyncio.sleep(delay * (0.75 + random.random() / 2))
            delay = min(delay * 1.5 if attempt < 3 else delay * 2, self.backoff_cap)

    # ---- offers

    async def search_offers(self, query: dict[str, Any]) -> list[dict[str, Any]]:
        body = await self._retrying("search", "POST", "/api/v0/bundles/", json=query)
        offers = body.get("offers") if isinstance(body, dict) else None
        return [o for o in offers or [] if isinstance(o, dict)]

    # ---- create (never retried)

    async def create_instance(self, offer_id: int, payload: dict[str, Any]) -> CreateResult:
        what = f"create on offer {offer_id}"
        try:
            response = await self._send("PUT", f"/api/v0/asks/{offer_id}/", json=payload)
        except httpx.ConnectError as exc:
            # Nothing reached the server: the create did not happen.
            raise VastUnavailable(f"{what}: {exc}") from exc
        except (httpx.TransportError, httpx.TimeoutException) as exc:
            raise CreateOutcomeUnknown(f"{what}: {type(exc).__name__}: {exc}") from exc
        body = _decode(response)
        if isinstance(body, dict) and body.get("new_contract") is not None:
            # vastai-api.md "Trap": success:false *with* new_contract is an instance that exists.
            error, msg = _fields(body)
            return CreateResult(int(body["new_contract"]), bool(body.get("success", True)), error, msg)
        if response.status_code < 400:
            raise CreateOutcomeUnknown(f"{what}: a {response.status_code} without new_contract", body=body)
        error, msg = _fields(body)
        if response.status_code in (404, 410) and (error == "no_such_ask" or "no_such_ask" in (msg or "")):
            raise OfferUnavailable(f"{what}: offer gone", status=response.status_code, error=error, msg=msg, body=body)
        failure = self._error(what, response, body)
        if isinstance(failure, VastUnavailable):
            raise CreateOutcomeUnknown(str(failure), status=failure.status, error=error, msg=failure.msg, body=body)
        raise failure

    # ---- instances

    async def show_instance(self, instance_id: int) -> dict[str, Any] | None:
        """The instance, or ``None`` once it is gone."""
        body = await self._retrying(
            f"show {instance_id}", "GET", f"/api/v0/instances/{instance_id}/", ok_404=True, params={"owner": "me"}
        )
        if not isinstance(body, dict):
            return None
        inst = body.get("instances")
        if isinstance(inst, list):  # tolerate the list form some versions send
            inst = inst[0] if inst else None
        if not isinstance(inst, dict) or is_gone(inst):
            return None
        return inst

    async def list_instances(self, select_filters: dict[str, Any] | None = None) -> list[dict[str, Any]]:
        """Every instance of the account (v1 list, all pages)."""
        out: list[dict[str, Any]] = []
        token: str | None = None
        while True:
            params: dict[str, Any] = {"limit": _LIST_PAGE}
            if select_filters:
                params["select_filters"] = orjson.dumps(select_filters).decode()
            if token:
                params["after_token"] = token
            body = await self._retrying("list", "GET", "/api/v1/instances/", params=params)
            if not isinstance(body, dict):
                raise VastError("list: unexpected reply", body=body)
            out.extend(i for i in body.get("instances") or [] if isinstance(i, dict))
            token = body.get("next_token")
            if not token:
                return out

    async def destroy_instance(self, instance_id: int) -> bool:
        """True when this call destroyed it, False when it was already gone."""
        body = await self._retrying(
            f"destroy {instance_id}", "DELETE", f"/api/v0/instances/{instance_id}/", ok_404=True, json={}
        )
        return body is not None

    async def set_state(self, instance_id: int, state: str) -> dict[str, Any]:
        body = await self._retrying(
            f"set state {instance_id}", "PUT", f"/api/v0/instances/{instance_id}/", json={"state": state}
        )
        return body if isinstance(body, dict) else {}

    async def attach_ssh_key(self, instance_id: int, public_key: str) -> None:
        await self._retrying(
            f"attach ssh key {instance_id}",
            "POST",
            f"/api/v0/instances/{instance_id}/ssh/",
            json={"ssh_key": public_key},
        )

    async def request_logs(self, instance_id: int, tail: int = 200, *, polls: int = 30, poll_every: float = 0.3) -> str:
        """The instance's log tail: ``request_logs`` gives a ``result_url`` the client polls until it answers 200."""
        body = await self._retrying(
            f"logs {instance_id}", "PUT", f"/api/v0/instances/request_logs/{instance_id}/", json={"tail": str(tail)}
        )
        url = body.get("result_url") if isinstance(body, dict) else None
        if not url:
            raise VastError(f"logs {instance_id}: no result_url", body=body)
        async with httpx.AsyncClient(timeout=10.0) as plain:
            for _ in range(polls):
                try:
                    response = await plain.get(url)
                    if response.status_code == 200:
                        return response.text
                except httpx.HTTPError:
                    pass
                await asyncio.sleep(poll_every)
        raise VastError(f"logs {instance_id}: result not ready after {polls} polls")

    # ---- account

    async def current_user(self) -> dict[str, Any]:
        body = await self._retrying("users/current", "GET", "/api/v0/users/current")
        return body if isinstance(body, dict) else {}

    async def credit(self) -> float | None:
        """The account's credit balance (vastai-api.md: ``users/current`` carries it)."""
        user = await self.current_user()
        value = user.get("credit")
        return float(value) if isinstance(value, (int, float)) else None
