"""Optional protection of the public door (issue #11): a secret path segment, a token, a source allow-list.

The dapi's own callback server has no auth at all (gonka-protocol.md §2); the relay is public, so the operator may
close it. MLNodes cannot send headers on callbacks: the secret path segment is the form they can carry (it is part of
``DAPI_API__POC_CALLBACK_URL``). Source addresses: a static CIDR list and/or the public IPs of the instances the
provisioner owns (its ``instances`` view in Redis, refreshed in the background). Refusals are counted and logged
with method, path (secret removed) and source — never the body.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import ipaddress
import logging
from collections.abc import Iterable
from typing import Any

import orjson
from redis.asyncio import Redis

from hybrid_common.redis_keys import RedisKeys
from hybrid_relay.metrics import REFUSED
from hybrid_relay.settings import Network, RelaySettings

log = logging.getLogger("hybrid.relay.guard")

_IP_FIELDS = ("public_ip", "public_ipaddr", "ip", "host_ip")


class Refusal(Exception):
    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


class DoorGuard:
    def __init__(self, settings: RelaySettings, redis: Redis | None = None, keys: RedisKeys | None = None) -> None:
        self.secret = settings.secret_path.get_secret_value().strip("/") if settings.secret_path else ""
        self.token = settings.token.get_secret_value() if settings.token else ""
        self.networks: tuple[Network, ...] = settings.allowed_networks
        self.owned_only = settings.allow_owned_instances
        self.owned: frozenset[str] = frozenset()
        self.redis = redis
        self.keys = keys
        self._task: asyncio.Task[None] | None = None

    @property
    def source_check(self) -> bool:
        return bool(self.networks) or self.owned_only

    def check(self, raw_path: str, source: str | None, headers: Iterable[tuple[bytes, bytes]]) -> str:
        """The path with the secret segment removed, or :class:`Refusal`."""
        if self.source_check and not self._source_allowed(source):
            raise self._refuse(403, "source", raw_path, source)
        path = raw_path
        if self.secret:
            head, sep, rest = raw_path.lstrip("/").partition("/")
            if not (sep and hmac.compare_digest(head.encode(), self.secret.encode())):
                raise self._refuse(404, "secret_path", "/<redacted>", source)  # 404: the door does not exist
            path = "/" + rest
        if self.token and not self._token_ok(headers):
            raise self._refuse(401, "token", path, source)
        return path

    def _token_ok(self, headers: Iterable[tuple[bytes, bytes]]) -> bool:
        for name, value in headers:
            if name == b"x-relay-token":
                given = value
            elif name == b"authorization" and value[:7].lower() == b"bearer ":
                given = value[7:]
            else:
                continue
            if hmac.compare_digest(given.strip(), self.token.encode()):
                return True
        return False

    def _source_allowed(self, source: str | None) -> bool:
        if source is None:
            return False
        if source in self.owned:
            return True
        try:
            addr = ipaddress.ip_address(source)
        except ValueError:
            return False
        return any(addr in net for net in self.networks)

    def _refuse(self, status: int, reason: str, path: str, source: str | None) -> Refusal:
        REFUSED.labels(reason).inc()
        log.warning(
            "refused callback: %s", reason, extra={"fields": {"path": path, "source": source, "status": status}}
        )
        return Refusal(status, reason)

    # --- the provisioner's instances (Redis view ``instances``) ------------------------------------------------

    async def refresh_owned(self) -> None:
        if self.redis is None or self.keys is None:
            return
        views: dict[Any, Any] = await self.redis.hgetall(self.keys.instances())
        found: set[str] = set()
        for value in views.values():
            with contextlib.suppress(ValueError, TypeError):
                found.update(_ips(orjson.loads(value)))
        self.owned = frozenset(found)

    def start(self, every: float = 5.0) -> None:
        if not self.owned_only or self.redis is None:
            return

        async def loop() -> None:
            while True:
                try:
                    await self.refresh_owned()
                except Exception as exc:  # Redis away: keep the last known list
                    log.warning("could not refresh owned instances: %r", exc)
                await asyncio.sleep(every)

        self._task = asyncio.create_task(loop(), name="relay-owned-instances")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task


def _ips(view: Any) -> set[str]:
    """Public IPs anywhere in an instance view (its exact shape is the provisioner's)."""
    out: set[str] = set()
    if isinstance(view, dict):
        for key, value in view.items():
            if key in _IP_FIELDS and isinstance(value, str) and value.strip():
                out.add(value.strip())
            elif isinstance(value, dict | list):
                out |= _ips(value)
    elif isinstance(view, list):
        for item in view:
            out |= _ips(item)
    return out
