"""Inbound protection: only the configured sources (the dapi's addresses) may call the node.

The dapi sends no credentials to its nodes (gonka-protocol.md §1–§3: plain HTTP, no auth), so the only thing that
tells the dapi from anyone else who finds the port is the source address. An empty list allows everyone, which the
service warns about once at start. A refusal is a 403 and a log line (at most one a minute per source).
"""

from __future__ import annotations

import ipaddress
import logging
import time
from collections.abc import Awaitable, Callable

from aiohttp import web

from hybrid_proxy.node import metrics
from hybrid_proxy.node.errors import openai_error

log = logging.getLogger("hybrid.proxy.inbound")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
_LOG_EVERY = 60.0

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class SourceGuard:
    def __init__(self, allowed: list[str]) -> None:
        self.exact: set[str] = set()
        self.networks: list[IPNetwork] = []
        for entry in allowed:
            entry = entry.strip()
            if not entry:
                continue
            if "/" in entry:
                self.networks.append(ipaddress.ip_network(entry, strict=False))
            else:
                self.exact.add(str(ipaddress.ip_address(entry)))
        self._logged: dict[str, float] = {}

    @property
    def open(self) -> bool:
        return not self.exact and not self.networks

    def allows(self, remote: str | None) -> bool:
        if remote is None:
            return False
        if remote in self.exact:
            return True
        try:
            address = ipaddress.ip_address(remote)
        except ValueError:
            return False
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
            if str(address) in self.exact:
                return True
        return any(address in net for net in self.networks)

    def describe(self) -> str:
        return ", ".join(sorted(self.exact) + [str(n) for n in self.networks]) or "everyone"

    def _refuse(self, request: web.Request) -> web.Response:
        remote = request.remote or "unknown"
        metrics.REFUSED_SOURCES.inc()
        now = time.monotonic()
        if now - self._logged.get(remote, float("-inf")) >= _LOG_EVERY:
            self._logged[remote] = now
            log.warning(
                "refused %s %s from %s: not in PROXY_ALLOWED_SOURCES (%s)",
                request.method,
                request.path,
                remote,
                self.describe(),
            )
        return openai_error(403, "this node accepts requests only from its network node", code="source_not_allowed")

    def wrap(self, handler: Handler) -> Handler:
        """``handler`` behind the allowlist (or ``handler`` itself when everyone is allowed: no cost at all)."""
        if self.open:
            return handler

        async def guarded(request: web.Request) -> web.StreamResponse:
            if not self.allows(request.remote):
                return self._refuse(request)
            return await handler(request)

        return guarded
