"""The answer cache every replica shares, and cross-replica coalescing of identical lookups.

Entries are the in-process cache's compressed form (:class:`CachedAnswer`), with their own TTLs
for found and not-found answers, kept by Redis (so a restart loses nothing). Keys hash the value
(``<prefix>:answer:<endpoint>:<sha256>``): a hostile value cannot shape a key, and keys stay
short. The in-process cache stays in front of this one.

Coalescing: the replica about to ask LastInfoSec takes a lease (``SET NX PX``); another replica
wanting the same value finds the lease, and polls for the answer instead of asking too, at most
:data:`WAIT_S`; when the lease goes without an answer (the first replica failed or
died) or the wait is over, it asks LastInfoSec itself.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from dataclasses import dataclass
from typing import Any, Final

from lis_async.cluster.link import RedisLink
from lis_async.lastinfosec.cache import CachedAnswer, CacheKey

log = logging.getLogger("lis_async.cluster")

# KEYS[1] the answer, KEYS[2] its lease; ARGV[1] this replica, ARGV[2] the lease (ms).
# {1, answer, pttl}: cached; {2}: the lease is now ours; {3}: another replica holds it.
FETCH_LUA: Final = """
local v = redis.call('GET', KEYS[1])
if v then return {1, v, redis.call('PTTL', KEYS[1])} end
if redis.call('SET', KEYS[2], ARGV[1], 'NX', 'PX', ARGV[2]) then return {2} end
return {3}
"""
_HIT: Final = 1
_HELD: Final = 3
_FOUND: Final = b"F"
_NOT_FOUND: Final = b"N"
_POLL_FIRST_S: Final = 0.02
_POLL_MAX_S: Final = 0.25
# The lease a replica's lookup holds, and the longest wait of the others for its answer. Both
# longer than a lookup may queue under a backlog (jobs in flight / rate: 64 jobs at 10/s wait up
# to 6.4 s for the rate limit), or the waiting replica gives up and asks too (BENCHMARKS.md,
# cluster). They were the settings REDIS_LEASE_S and REDIS_COALESCE_WAIT_S
# (lis_async/settings/removed.py); tests pass their own.
LEASE_S: Final = 30.0
WAIT_S: Final = 30.0


@dataclass(slots=True)
class SharedCacheStats:
    hits: int = 0  # answers found in Redis
    misses: int = 0
    waits: int = 0  # lookups that waited for another replica's answer
    waits_answered: int = 0  # ... and got it


class SharedAnswerCache:
    """Second-level answer cache in Redis, with leases for cross-replica coalescing."""

    def __init__(self, link: RedisLink, lease_s: float = LEASE_S, wait_s: float = WAIT_S) -> None:
        self._link = link
        self._lease_ms = max(1, round(lease_s * 1000))
        self._wait_s = wait_s
        self.stats = SharedCacheStats()
        self._fetch_script = link.client.register_script(FETCH_LUA)

    def _keys(self, key: CacheKey) -> tuple[str, str]:
        endpoint, value = key
        digest = hashlib.sha256(value.encode("utf-8", "surrogatepass")).hexdigest()
        return self._link.key("answer", endpoint, digest), self._link.key("lease", endpoint, digest)

    @staticmethod
    def _encode(answer: CachedAnswer) -> bytes:
        return (_FOUND if answer.found else _NOT_FOUND) + answer.bundles_z

    @staticmethod
    def _decode(raw: Any, key: CacheKey) -> CachedAnswer | None:
        if not isinstance(raw, bytes) or raw[:1] not in (_FOUND, _NOT_FOUND):
            return None
        endpoint, value = key
        return CachedAnswer(raw[:1] == _FOUND, raw[1:], value, endpoint)

    async def put(self, key: CacheKey, answer: CachedAnswer, ttl_s: float) -> None:
        """Store the answer for ``ttl_s`` and release the lease."""
        answer_key, lease_key = self._keys(key)
        body = self._encode(answer)

        async def op() -> Any:
            pipe = self._link.client.pipeline(transaction=False)
            pipe.set(answer_key, body, px=max(1, round(ttl_s * 1000)))
            pipe.delete(lease_key)
            return await pipe.execute()

        await self._link.run("cache write", op)

    async def release(self, key: CacheKey) -> None:
        """Give the lease up without an answer (the lookup failed): waiters stop waiting."""
        _, lease_key = self._keys(key)
        await self._link.run("lease release", lambda: self._link.client.delete(lease_key))

    async def fetch(self, key: CacheKey) -> tuple[CachedAnswer, float] | None:
        """The answer and the seconds it has left: from Redis, or from the replica that holds
        the lease (after waiting for it). None: the caller asks LastInfoSec (it took the lease,
        Redis is down, the wait is over or the other replica gave up). One round trip when the
        answer is there or the lease is free."""
        answer_key, lease_key = self._keys(key)
        args: list[str | int] = [self._link.replica_id, self._lease_ms]
        got = await self._link.run(
            "cache read", lambda: self._fetch_script(keys=[answer_key, lease_key], args=args)
        )
        if got is None:
            return None  # Redis down: ask LastInfoSec
        if got[0] == _HIT:
            hit = self._decode(got[1], key)
            if hit is not None:
                self.stats.hits += 1
                return hit, _ttl_s(got[2])
        self.stats.misses += 1
        if got[0] != _HELD:
            return None  # the lease is ours
        self.stats.waits += 1
        answer = await self._wait_for(key, answer_key, lease_key)
        if answer is not None:
            self.stats.waits_answered += 1
        return answer

    async def _wait_for(
        self, key: CacheKey, answer_key: str, lease_key: str
    ) -> tuple[CachedAnswer, float] | None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._wait_s
        delay = _POLL_FIRST_S
        while loop.time() < deadline:
            await asyncio.sleep(min(delay, max(0.0, deadline - loop.time())))
            delay = min(_POLL_MAX_S, delay * 2)
            got = await self._link.run("cache wait", lambda: self._poll(answer_key, lease_key))
            if got is None:
                return None  # Redis failed: ask LastInfoSec
            raw, ttl_ms, lease = got
            hit = self._decode(raw, key)
            if hit is not None:
                return hit, _ttl_s(ttl_ms)
            if lease is None:
                return None  # the other replica gave up or died
        return None

    async def _poll(self, answer_key: str, lease_key: str) -> Any:
        pipe = self._link.client.pipeline(transaction=False)
        pipe.get(answer_key)
        pipe.pttl(answer_key)
        pipe.get(lease_key)
        return await pipe.execute()


def _ttl_s(pttl_ms: Any) -> float:
    """Redis's PTTL in seconds (0 when the key has no expiry or is gone)."""
    return max(0.0, int(pttl_ms) / 1000) if isinstance(pttl_ms, int) else 0.0
