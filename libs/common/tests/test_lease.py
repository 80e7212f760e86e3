"""Lease with renewal and fencing tokens, on the real Redis."""

from __future__ import annotations

import asyncio

from redis.asyncio import Redis

from hybrid_common.lease import Lease
from hybrid_common.redis_keys import RedisKeys


async def test_one_holder_fencing_grows_and_a_lapsed_lease_is_taken_over(redis_url: str, namespace: str) -> None:
    redis = Redis.from_url(redis_url)
    keys = RedisKeys(namespace)
    a = Lease(redis, keys, "scheduler", "a", ttl=0.6)
    b = Lease(redis, keys, "scheduler", "b", ttl=0.6)
    t1 = await a.try_acquire()
    assert t1 is not None and await b.try_acquire() is None
    a.start_renewing()
    await asyncio.sleep(1.0)  # past the TTL: renewal keeps it
    assert await b.try_acquire() is None and await a.holder_now() == "a"
    await a.stop_renewing()  # a "pauses": its lease lapses
    await asyncio.sleep(0.8)
    t2 = await b.try_acquire()
    assert t2 is not None and t2 > t1
    assert not await a.renew(), "a stale holder cannot renew someone else's lease"
    await b.release()
    assert await a.try_acquire() is not None
    await a.release()
    await redis.aclose()
