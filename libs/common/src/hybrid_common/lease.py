"""Leases with renewal and fencing tokens (reliability.md, "Redis").

``SET lease:<role> <holder> NX PX ttl`` to acquire, renew at ttl/3 with a compare-and-expire, and ``INCR
fence:<role>`` on every acquisition: side effects carry the token so a stale holder (paused past its TTL) can be
recognised. Good for avoiding duplicate *work*; irreversible actions are also reconciled against the external
system's own list.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

from redis.asyncio import Redis

from hybrid_common.redis_keys import RedisKeys

log = logging.getLogger("hybrid.lease")

_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) else return 0 end
"""
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) else return 0 end
"""


class LeaseLost(RuntimeError):
    pass


class Lease:
    def __init__(self, redis: Redis, keys: RedisKeys, role: str, holder: str, ttl: float = 5.0) -> None:
        self.redis = redis
        self.key = keys.lease(role)
        self.fence_key = keys.fence(role)
        self.role = role
        self.holder = holder
        self.ttl_ms = max(int(ttl * 1000), 100)
        self.token: int | None = None
        self._renewer: asyncio.Task[None] | None = None

    async def try_acquire(self) -> int | None:
        """The new fencing token if acquired, else ``None``. Re-acquiring a lease we hold keeps its token."""
        if await self.redis.set(self.key, self.holder, nx=True, px=self.ttl_ms):
            self.token = int(await self.redis.incr(self.fence_key))
            return self.token
        if self.token is not None and await self.renew():
            return self.token
        return None

    async def renew(self) -> bool:
        return bool(await self.redis.eval(_RENEW, 1, self.key, self.holder, self.ttl_ms))

    async def release(self) -> None:
        await self.stop_renewing()
        with contextlib.suppress(Exception):
            await self.redis.eval(_RELEASE, 1, self.key, self.holder)
        self.token = None

    async def holder_now(self) -> str | None:
        v = await self.redis.get(self.key)
        return v.decode() if isinstance(v, bytes) else v

    def start_renewing(self, on_lost: Callable[[], Awaitable[None]] | None = None) -> None:
        """Renew at ttl/3 in the background; on a failed renewal call ``on_lost`` and stop."""

        async def loop() -> None:
            interval = self.ttl_ms / 3000
            while True:
                await asyncio.sleep(interval)
                try:
                    ok = await self.renew()
                except Exception as exc:  # Redis unreachable: the lease will lapse on its own
                    log.warning("lease %s renewal failed: %r", self.role, exc)
                    ok = False
                if not ok:
                    log.warning("lease %s lost by %s", self.role, self.holder)
                    self.token = None
                    if on_lost is not None:
                        await on_lost()
                    return

        self._renewer = asyncio.create_task(loop(), name=f"lease-{self.role}")

    async def stop_renewing(self) -> None:
        if self._renewer is not None:
            self._renewer.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._renewer
            self._renewer = None
