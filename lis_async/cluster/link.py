"""The Redis connection of one replica: bounded commands, shared / fallback state, replicas.

Every command goes through :meth:`RedisLink.run`, which bounds it by ``redis.timeout_s`` and
turns any failure into ``None``: the caller then takes its local path. The first failure flips
the link to *fallback* (one warning); :meth:`RedisLink.maintain` probes Redis every
:data:`PROBE_INTERVAL_S` while it is down and flips it back to *shared* (one info line) when it
answers. While up, the same loop registers this replica, so that every replica knows how many
share the quota (the default fallback share is 1 / that count).
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Final, TypeVar

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from lis_async.redact import mask_url, redact, url_secrets
from lis_async.settings.model import Settings

log = logging.getLogger("lis_async.cluster")
T = TypeVar("T")

# A replica counts as alive while it refreshed its registry entry within this many seconds.
REPLICA_TTL_S: Final = 30.0
REGISTRY_INTERVAL_S: Final = 1.0
# Internal timings, once the settings REDIS_PROBE_INTERVAL_S and REDIS_CONNECT_TIMEOUT_S
# (lis_async/settings/removed.py): seconds between probes while Redis is down (tests pass their
# own), and the bound of one connection attempt.
PROBE_INTERVAL_S: Final = 2.0
CONNECT_TIMEOUT_S: Final = 1.0
# The most replicas a count read from Redis may say (a planted count of 1,000,000 would set each
# replica's fallback rate to a millionth). A cluster larger than this sets
# REDIS_FALLBACK_RATE_SHARE itself.
MAX_REPLICAS: Final = 64

# KEYS[1] the registry (a sorted set of replica ids scored by their last refresh, Redis's clock,
# s), KEYS[2] the peak count; ARGV[1] this replica, ARGV[2] REPLICA_TTL_S, ARGV[3] MAX_REPLICAS.
# Returns {replicas seen, peak}. What no replica writes is dropped: a key of another type,
# refreshes stamped in the future, a peak that is not a count up to MAX_REPLICAS or that has no
# expiry (docs/security.md#cluster-mode-and-redis).
REGISTER_LUA: Final = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local ttl = tonumber(ARGV[2])
local kind = redis.call('TYPE', KEYS[1]).ok
if kind ~= 'none' and kind ~= 'zset' then redis.call('DEL', KEYS[1]) end
redis.call('ZADD', KEYS[1], now, ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - ttl)
redis.call('ZREMRANGEBYSCORE', KEYS[1], string.format('(%f', now + 5), '+inf')
redis.call('EXPIRE', KEYS[1], math.ceil(ttl * 4))
local seen = math.min(redis.call('ZCARD', KEYS[1]), tonumber(ARGV[3]))
local peak = 0
kind = redis.call('TYPE', KEYS[2]).ok
if kind == 'string' then
  peak = tonumber(redis.call('GET', KEYS[2]))
  local pttl = redis.call('PTTL', KEYS[2])
  if peak == nil or peak ~= math.floor(peak) or peak < 1 or peak > tonumber(ARGV[3])
      or pttl < 0 or pttl > 600000 then
    redis.call('DEL', KEYS[2])
    peak = 0
  end
elseif kind ~= 'none' then
  redis.call('DEL', KEYS[2])
end
if seen > peak then
  redis.call('SET', KEYS[2], seen, 'EX', 600)
  peak = seen
end
return {seen, peak}
"""


@dataclass(slots=True)
class LinkStats:
    """Counters for metrics (read at scrape time)."""

    errors: int = 0  # commands that failed or timed out
    transitions: int = 0  # shared <-> fallback
    replicas_seen: int = 1


class RedisLink:
    """One replica's view of Redis. ``shared`` is True while Redis answers."""

    def __init__(
        self,
        settings: Settings,
        *,
        replica_id: str | None = None,
        probe_interval_s: float = PROBE_INTERVAL_S,
    ) -> None:
        r = settings.redis
        assert r.url is not None, "RedisLink needs redis.url"
        self.prefix = settings.redis_key_prefix
        self.replica_id = replica_id or uuid.uuid4().hex
        self.where = mask_url(r.url)
        self._secrets = url_secrets(r.url)
        self._timeout_s = r.timeout_s
        # The bound of one call: the command's own timeout (redis-py's socket_timeout) plus,
        # when the pool has to open a connection first, the connect timeout.
        self._bound_s = r.timeout_s + CONNECT_TIMEOUT_S
        self.probe_interval_s = probe_interval_s
        self.stats = LinkStats()
        self.shared = True  # optimistic: the first failure says otherwise
        self._down_since: float | None = None
        # No retries inside redis-py: a slow or dead Redis must cost one bounded timeout, and
        # the caller has a local path.
        self.client: aioredis.Redis = aioredis.from_url(
            r.url,
            socket_timeout=r.timeout_s,
            socket_connect_timeout=CONNECT_TIMEOUT_S,
            retry=Retry(NoBackoff(), 0),
            health_check_interval=0,
            client_name="lis-async",
        )
        self._register_script = self.client.register_script(REGISTER_LUA)

    def key(self, *parts: str) -> str:
        return ":".join((self.prefix, *parts))

    def redact(self, text: str) -> str:
        return redact(text, self._secrets)

    async def run(self, what: str, op: Callable[[], Awaitable[T]]) -> T | None:
        """``op()`` bounded by the command timeout; None (and fallback mode) when it fails.
        While in fallback mode nothing is sent: only the probe tries Redis."""
        if not self.shared:
            return None
        try:
            async with asyncio.timeout(self._bound_s):
                return await op()
        except (RedisError, TimeoutError, OSError) as exc:
            self._failed(what, exc)
            await self._drop_connections()
            return None

    async def _drop_connections(self) -> None:
        """Forget every pooled connection: after a failure or a Redis restart they are dead,
        and redis-py (no retries here) would fail the next command on each of them."""
        try:
            await self.client.connection_pool.disconnect()
        except (RedisError, OSError) as exc:
            log.debug("dropping Redis connections: %s", self.redact(str(exc)))

    def _failed(self, what: str, exc: BaseException) -> None:
        self.stats.errors += 1
        if self.shared:
            self.shared = False
            self._down_since = time.monotonic()
            self.stats.transitions += 1
            detail = self.redact(f"{type(exc).__name__}: {exc}")[:300] or type(exc).__name__
            log.warning(
                "Redis %s unreachable (%s failed: %s): falling back to the local rate limit "
                "and cache until it answers again",
                self.where,
                what,
                detail,
            )

    async def _probe(self) -> bool:
        try:
            async with asyncio.timeout(self._timeout_s * 4):
                await self.client.ping()
        except (RedisError, TimeoutError, OSError):
            self.stats.errors += 1
            return False
        down_for = time.monotonic() - (self._down_since or time.monotonic())
        await self._drop_connections()  # opened during the outage, maybe to the old server
        self.shared = True
        self._down_since = None
        self.stats.transitions += 1
        log.info("Redis %s answers again after %.1f s: shared mode resumed", self.where, down_for)
        return True

    async def warm_up(self, connections: int) -> None:
        """Before the first job: register (so the fallback share knows the cluster) and open
        ``connections`` pooled connections. Otherwise the first burst of jobs opens one
        connection per command at once, on a loop busy starting up, and some of them time out
        into fallback mode for nothing."""
        await self.register_replica()
        if not self.shared:
            return
        await asyncio.gather(
            *(self.run("warm-up", self.client.ping) for _ in range(connections)),
            return_exceptions=True,
        )

    async def register_replica(self) -> None:
        """Refresh this replica's entry and count the replicas seen lately. The largest count
        of the last ten minutes is kept too: a replica that (re)starts alone first still falls
        back to its share of a cluster it belongs to. Both counts are bounded by
        :data:`MAX_REPLICAS` (docs/security.md#cluster-mode-and-redis)."""
        keys = [self.key("replicas"), self.key("replicas", "peak")]
        args: list[str | int | float] = [self.replica_id, REPLICA_TTL_S, MAX_REPLICAS]
        result = await self.run(
            "replica registry", lambda: self._register_script(keys=keys, args=args)
        )
        if result is None:
            return
        seen, peak = (_count(v) for v in [*result, None, None][:2])
        self.stats.replicas_seen = max(seen, peak)

    async def maintain(self) -> None:
        """Forever: register this replica while Redis is up, probe it while it is down."""
        last_registry = 0.0
        while True:
            if not self.shared:
                if not await self._probe():
                    await asyncio.sleep(self.probe_interval_s)
                    continue
                last_registry = 0.0
            if time.monotonic() - last_registry >= REGISTRY_INTERVAL_S:
                await self.register_replica()
                last_registry = time.monotonic()
            await asyncio.sleep(min(self.probe_interval_s, REGISTRY_INTERVAL_S))

    async def check(self) -> str:
        """One PING for ``lis-async check``; raises a redacted RuntimeError when it fails."""
        try:
            async with asyncio.timeout(max(self._timeout_s, 2.0)):
                await self.client.ping()
                info = await self.client.info("server")
        except (RedisError, TimeoutError, OSError) as exc:
            text = self.redact(f"{type(exc).__name__}: {exc}")[:300]
            raise RuntimeError(text) from None
        return str(info.get("redis_version", "?"))

    async def close(self) -> None:
        try:
            await self.client.aclose()
        except (RedisError, OSError) as exc:  # closing a dead connection
            log.debug("closing Redis: %s", self.redact(str(exc)))


def _count(value: Any) -> int:
    """A replica count read from Redis, within 1..MAX_REPLICAS (1 when it is no number)."""
    try:
        count = int(value)
    except (TypeError, ValueError, OverflowError):
        return 1
    return min(MAX_REPLICAS, max(1, count))
