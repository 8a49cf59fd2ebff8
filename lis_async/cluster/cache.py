"""The answer cache every replica shares, and cross-replica coalescing of identical lookups.

Entries are the in-process cache's compressed form (:class:`CachedAnswer`), with their own TTLs
for found and not-found answers, kept by Redis (so a restart loses nothing). Keys hash the value
(``<prefix>:answer:<endpoint>:<sha256>``): a hostile value cannot shape a key, and keys stay
short. The in-process cache stays in front of this one.

Nothing read from Redis is trusted (docs/security.md#cluster-mode-and-redis): an entry is
authenticated with HMAC-SHA256 under ``REDIS_CACHE_KEY`` (over its key name, its found flag, its
signed expiry and its bundles, so an entry cannot be moved to another value nor replayed past
its life); its size is checked in Redis before it is read; an entry without an expiry or with a
longer one than this worker gives, its decompressed size (capped while inflating, at
``LASTINFOSEC_MAX_ANSWER_BYTES``) and its object count and nesting (the HTTP path's checks) are
checked on every read. An entry that fails any check is deleted, logged (its key, never its
value) and asked again of LastInfoSec.

Coalescing: the replica about to ask LastInfoSec takes a lease (``SET NX PX``); another replica
wanting the same value finds the lease, and polls for the answer instead of asking too, at most
:data:`WAIT_S`; when the lease goes without an answer (the first replica failed or
died) or the wait is over, it asks LastInfoSec itself. A lease with no expiry or a longer one
than ours was not written by a replica: it is dropped.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import time
import zlib
from dataclasses import dataclass, field
from typing import Any, Final

from lis_async.cluster.link import RedisLink
from lis_async.errors import LisError
from lis_async.lastinfosec.cache import CachedAnswer, CacheKey
from lis_async.lastinfosec.wire import parse_answer
from lis_async.redact import redact
from lis_async.settings.model import Settings

log = logging.getLogger("lis_async.cluster")

# KEYS[1] the answer, KEYS[2] its lease; ARGV[1] this replica, ARGV[2] the lease (ms), ARGV[3]
# the largest entry (bytes) a replica writes.
# {1, entry, pttl}: cached; {2}: the lease is now ours; {3}: another replica holds it;
# {4, reason}: the entry was not one of ours (a wrong type, too large): deleted.
FETCH_LUA: Final = """
local kind = redis.call('TYPE', KEYS[1]).ok
if kind == 'string' then
  if redis.call('STRLEN', KEYS[1]) > tonumber(ARGV[3]) then
    redis.call('DEL', KEYS[1])
    return {4, 'larger than any answer'}
  end
  return {1, redis.call('GET', KEYS[1]), redis.call('PTTL', KEYS[1])}
elseif kind ~= 'none' then
  redis.call('DEL', KEYS[1])
  return {4, 'a ' .. kind .. ', not a string'}
end
local lease = redis.call('TYPE', KEYS[2]).ok
if lease ~= 'none' then
  local pttl = redis.call('PTTL', KEYS[2])
  if lease ~= 'string' or pttl < 0 or pttl > tonumber(ARGV[2]) then
    redis.call('DEL', KEYS[2])
  end
end
if redis.call('SET', KEYS[2], ARGV[1], 'NX', 'PX', ARGV[2]) then return {2} end
return {3}
"""
# KEYS[1] the answer, KEYS[2] its lease; ARGV[1] the largest entry. {entry or false, pttl,
# 1 while the lease is held}. Like FETCH_LUA, a wrong type or an oversized entry is deleted.
POLL_LUA: Final = """
local entry, pttl, held = false, -2, 0
local kind = redis.call('TYPE', KEYS[1]).ok
if kind == 'string' and redis.call('STRLEN', KEYS[1]) <= tonumber(ARGV[1]) then
  entry, pttl = redis.call('GET', KEYS[1]), redis.call('PTTL', KEYS[1])
elseif kind ~= 'none' then
  redis.call('DEL', KEYS[1])
end
if redis.call('EXISTS', KEYS[2]) == 1 then held = 1 end
return {entry, pttl, held}
"""
_HIT: Final = 1
_HELD: Final = 3
_FOREIGN: Final = 4
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

# An entry: version (2) | HMAC-SHA256 (32) | flag F/N (1) | expiry, epoch ms (8) | bundles_z.
_VERSION: Final = b"L1"
_MAC_LEN: Final = 32
_HEADER: Final = len(_VERSION) + _MAC_LEN + 1 + 8
_MAC_CONTEXT: Final = b"lis-async cached answer v1\0"
# Replicas' clocks and Redis's differ a little: an entry's TTL or signed expiry may exceed what
# this worker gives by this much before the entry is refused.
_TTL_SLACK_MS: Final = 5_000
# An entry larger than this is checked in a thread: inflating and parsing a few MB takes tens of
# milliseconds, which the event loop must not spend (the jobs in flight would stall).
_OFF_LOOP_BYTES: Final = 64 * 1024
# What a replica may write beyond the answer size: zlib's worst-case growth on incompressible
# data (5 bytes per 16 KB block) and the header.
_GROWTH: Final = 1 / 1000


@dataclass(frozen=True, slots=True)
class EntryRules:
    """What an entry must satisfy (docs/security.md#cluster-mode-and-redis)."""

    key: bytes = field(repr=False)  # REDIS_CACHE_KEY: authenticates every entry
    max_answer_bytes: int  # LASTINFOSEC_MAX_ANSWER_BYTES: the inflated bundles at most
    max_answer_objects: int  # LASTINFOSEC_MAX_ANSWER_OBJECTS
    ttl_s: float  # the longest life of a found answer (LASTINFOSEC_CACHE_TTL_S)
    negative_ttl_s: float  # ... of a not-found answer (LASTINFOSEC_CACHE_NEGATIVE_TTL_S)

    @classmethod
    def of(cls, settings: Settings) -> EntryRules:
        key = settings.redis.cache_key
        assert key is not None, "cluster mode needs redis.cache_key (checked at settings load)"
        lis = settings.lastinfosec
        return cls(
            key.get_secret_value().encode("utf-8"),
            lis.max_answer_bytes,
            lis.max_answer_objects,
            lis.cache_ttl_s,
            lis.cache_negative_ttl_s,
        )

    @property
    def max_entry_bytes(self) -> int:
        """The largest entry a replica writes (checked in Redis before one is read)."""
        return _HEADER + self.max_answer_bytes + int(self.max_answer_bytes * _GROWTH) + 64


class BadEntry(Exception):
    """An entry that is not an answer one of the replicas wrote (its text names the check)."""


@dataclass(slots=True)
class SharedCacheStats:
    hits: int = 0  # answers found in Redis
    misses: int = 0
    waits: int = 0  # lookups that waited for another replica's answer
    waits_answered: int = 0  # ... and got it
    rejected: int = 0  # entries that failed a check: deleted, asked again of LastInfoSec


class SharedAnswerCache:
    """Second-level answer cache in Redis, with leases for cross-replica coalescing."""

    def __init__(
        self,
        link: RedisLink,
        rules: EntryRules,
        lease_s: float = LEASE_S,
        wait_s: float = WAIT_S,
    ) -> None:
        self._link = link
        self._lease_ms = max(1, round(lease_s * 1000))
        self._wait_s = wait_s
        self._rules = rules
        self.stats = SharedCacheStats()
        self._fetch_script = link.client.register_script(FETCH_LUA)
        self._poll_script = link.client.register_script(POLL_LUA)

    @classmethod
    def of(cls, link: RedisLink, settings: Settings) -> SharedAnswerCache:
        """The cache with the settings' :class:`EntryRules`."""
        return cls(link, EntryRules.of(settings))

    def _keys(self, key: CacheKey) -> tuple[str, str]:
        endpoint, value = key
        digest = hashlib.sha256(value.encode("utf-8", "surrogatepass")).hexdigest()
        return self._link.key("answer", endpoint, digest), self._link.key("lease", endpoint, digest)

    def _mac(self, answer_key: str, flag: bytes, expiry: bytes, bundles_z: bytes) -> bytes:
        mac = hmac.new(self._rules.key, _MAC_CONTEXT, hashlib.sha256)
        for part in (answer_key.encode("utf-8"), b"\0", flag, expiry, bundles_z):
            mac.update(part)
        return mac.digest()

    def _encode(self, answer_key: str, answer: CachedAnswer, ttl_ms: int) -> bytes:
        flag = _FOUND if answer.found else _NOT_FOUND
        expiry = (_now_ms() + ttl_ms).to_bytes(8, "big")
        mac = self._mac(answer_key, flag, expiry, answer.bundles_z)
        return b"".join((_VERSION, mac, flag, expiry, answer.bundles_z))

    async def _decode(
        self, raw: Any, pttl: Any, key: CacheKey, answer_key: str
    ) -> tuple[CachedAnswer, float]:
        """The answer an entry holds and the seconds it has left, or :class:`BadEntry`."""
        if not isinstance(raw, bytes) or len(raw) < _HEADER or raw[:2] != _VERSION:
            raise BadEntry("not an entry of this version")
        mac, flag, expiry, bundles_z = raw[2:34], raw[34:35], raw[35:_HEADER], raw[_HEADER:]
        if not hmac.compare_digest(mac, self._mac(answer_key, flag, expiry, bundles_z)):
            raise BadEntry("its HMAC does not match REDIS_CACHE_KEY")
        found = flag == _FOUND
        rules = self._rules
        longest_ms = round((rules.ttl_s if found else rules.negative_ttl_s) * 1000)
        if not isinstance(pttl, int) or pttl < 0:
            raise BadEntry("it has no expiry")
        left_ms = min(pttl, int.from_bytes(expiry, "big") - _now_ms())
        if pttl > longest_ms + _TTL_SLACK_MS or left_ms > longest_ms + _TTL_SLACK_MS:
            raise BadEntry("its expiry is further away than this worker's cache TTL")
        if left_ms <= 0:
            raise BadEntry("its signed expiry has passed")
        endpoint, value = key
        if len(bundles_z) > _OFF_LOOP_BYTES:
            await asyncio.to_thread(_check_bundles, bundles_z, found, endpoint, value, rules)
        else:
            _check_bundles(bundles_z, found, endpoint, value, rules)
        return CachedAnswer(found, bundles_z, value, endpoint), left_ms / 1000

    async def _reject(self, answer_key: str, why: str, *, deleted: bool = False) -> None:
        """Delete an entry that failed a check (a good one written since is lost: one more
        LastInfoSec request, no harm); ``deleted``: the script did already."""
        self.stats.rejected += 1
        log.warning(
            "shared cache entry %s rejected (%s): deleted, the value is asked again of "
            "LastInfoSec; is something else writing to this Redis? (docs/security.md)",
            answer_key,
            why,
        )
        if not deleted:
            await self._link.run("cache delete", lambda: self._link.client.delete(answer_key))

    async def put(self, key: CacheKey, answer: CachedAnswer, ttl_s: float) -> None:
        """Store the answer for ``ttl_s`` and release the lease."""
        answer_key, lease_key = self._keys(key)
        ttl_ms = max(1, round(ttl_s * 1000))
        body = self._encode(answer_key, answer, ttl_ms)
        too_big = len(body) > self._rules.max_entry_bytes  # the others would refuse it

        async def op() -> Any:
            pipe = self._link.client.pipeline(transaction=False)
            if not too_big:
                pipe.set(answer_key, body, px=ttl_ms)
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
        Redis is down, the wait is over, the other replica gave up, or the entry failed a check
        twice in a row). One round trip when the answer is there or the lease is free."""
        answer_key, lease_key = self._keys(key)
        args: list[str | int] = [self._link.replica_id, self._lease_ms, self._rules.max_entry_bytes]
        for _ in range(2):  # a rejected entry is deleted, then the lease is taken
            got = await self._link.run(
                "cache read", lambda: self._fetch_script(keys=[answer_key, lease_key], args=args)
            )
            if got is None:
                return None  # Redis down: ask LastInfoSec
            if got[0] == _FOREIGN:
                await self._reject(answer_key, _text(got[1]), deleted=True)
                continue
            if got[0] == _HIT:
                try:
                    hit = await self._decode(got[1], got[2], key, answer_key)
                except BadEntry as exc:
                    await self._reject(answer_key, str(exc))
                    continue
                self.stats.hits += 1
                return hit
            self.stats.misses += 1
            if got[0] != _HELD:
                return None  # the lease is ours
            self.stats.waits += 1
            answer = await self._wait_for(key, answer_key, lease_key)
            if answer is not None:
                self.stats.waits_answered += 1
            return answer
        self.stats.misses += 1
        return None

    async def _wait_for(
        self, key: CacheKey, answer_key: str, lease_key: str
    ) -> tuple[CachedAnswer, float] | None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._wait_s
        delay = _POLL_FIRST_S
        keys, args = [answer_key, lease_key], [self._rules.max_entry_bytes]
        while loop.time() < deadline:
            await asyncio.sleep(min(delay, max(0.0, deadline - loop.time())))
            delay = min(_POLL_MAX_S, delay * 2)
            got = await self._link.run(
                "cache wait", lambda: self._poll_script(keys=keys, args=args)
            )
            if got is None:
                return None  # Redis failed: ask LastInfoSec
            raw, pttl, held = got
            if raw is not None:
                try:
                    return await self._decode(raw, pttl, key, answer_key)
                except BadEntry as exc:
                    await self._reject(answer_key, str(exc))
                    return None
            if not held:
                return None  # the other replica gave up or died
        return None


def _check_bundles(
    bundles_z: bytes, found: bool, endpoint: str, value: str, rules: EntryRules
) -> None:
    """The HTTP path's checks (lis_async/lastinfosec/wire.py) on an entry's bundles, inflated
    at most to ``max_answer_bytes``: raises :class:`BadEntry`."""
    inflater = zlib.decompressobj()
    try:
        data = inflater.decompress(bundles_z, rules.max_answer_bytes + 1)
    except zlib.error:
        raise BadEntry("its bundles do not inflate") from None
    if len(data) > rules.max_answer_bytes or inflater.unconsumed_tail:
        raise BadEntry(
            f"its bundles inflate past LASTINFOSEC_MAX_ANSWER_BYTES ({rules.max_answer_bytes})"
        )
    if not inflater.eof:
        raise BadEntry("its bundles are truncated")
    try:
        result = parse_answer(data, endpoint, value, redact, rules.max_answer_objects)
    except LisError as exc:
        raise BadEntry(str(exc)) from None
    if result.found != found:
        raise BadEntry("its bundles do not match its found flag")


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def _text(value: Any) -> str:
    return value.decode("utf-8", "replace")[:100] if isinstance(value, bytes) else str(value)
