"""The cluster-wide LastInfoSec rate limit: one exact sliding window in Redis for every replica.

``LASTINFOSEC_RATE_PER_S`` is then the cluster's rate: at most ``burst`` requests in any
``burst / rate`` seconds (one second's worth by default) over all replicas together, the same
guarantee as the local :class:`~lis_async.lastinfosec.limiter.SlidingWindowLimiter`. The check
and the grant are one Lua script (atomic), on Redis's clock (the replicas' clocks do not matter).
A 429 sets a shared pause-until that the script honours, so every replica waits it out.

Urgent requests (manual and playbook jobs) go first, cluster-wide: an urgent acquire marks its
replica in a sorted set while it waits (each mark expires on its own, so a replica that dies
leaves none behind), and the script refuses ordinary grants while any mark is live.

Within a replica, waiters queue behind one gate (urgent first, then in arrival order), so one
request per replica polls Redis at a time; a refused acquire sleeps until the oldest grant
leaves the window (plus jitter, so the replicas do not wake in lock step). While Redis is
unreachable the replica falls back to a local sliding window at ``redis.fallback_rate_share``
of the rate (by default 1 / the replicas seen).
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import random
from typing import Final

from lis_async.cluster.link import RedisLink
from lis_async.lastinfosec.limiter import PriorityGate, SlidingWindowLimiter

# Nothing read from Redis is trusted (docs/security.md#cluster-mode-and-redis): a key of
# another type is deleted, a pause further away than the back-off maximum is cut to it, a
# non-numeric pause is no pause, and grants or urgent marks stamped in the future (none of ours
# is) are dropped. At worst a hostile value then holds the replicas one window or one back-off
# maximum, never for good.
#
# KEYS[1] the window (a sorted set of grant times, µs), KEYS[2] the pause-until (µs), KEYS[3]
# the urgent waiters (a sorted set of replica ids scored by when their mark expires, µs).
# ARGV[1] capacity, ARGV[2] window (µs), ARGV[3] a unique member for this grant, ARGV[4] this
# replica's id when the acquire is urgent, else '', ARGV[5] how long an urgent mark lives (µs),
# ARGV[6] the longest pause (µs).
# Returns -n when granted (n: the grants now in the window, this one included), else the µs to
# wait before asking again.
ACQUIRE_LUA: Final = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local window = tonumber(ARGV[2])
local longest = tonumber(ARGV[6])
for _, key in ipairs({KEYS[1], KEYS[3]}) do
  local kind = redis.call('TYPE', key).ok
  if kind ~= 'none' and kind ~= 'zset' then redis.call('DEL', key) end
end
redis.call('ZREMRANGEBYSCORE', KEYS[1], string.format('(%d', now + 1000000), '+inf')
redis.call('ZREMRANGEBYSCORE', KEYS[3],
  string.format('(%d', now + tonumber(ARGV[5]) + 1000000), '+inf')
local urgent = ARGV[4] ~= ''
if urgent then
  redis.call('ZADD', KEYS[3], now + tonumber(ARGV[5]), ARGV[4])
  redis.call('PEXPIRE', KEYS[3], math.ceil(tonumber(ARGV[5]) / 1000) + 1000)
end
local pause = 0
local kind = redis.call('TYPE', KEYS[2]).ok
if kind == 'string' then
  pause = tonumber(redis.call('GET', KEYS[2])) or 0
elseif kind ~= 'none' then
  redis.call('DEL', KEYS[2])
end
if pause ~= pause then pause = 0 end
if pause > now + longest then
  pause = now + longest
  redis.call('SET', KEYS[2], string.format('%d', pause), 'PX', math.ceil(longest / 1000) + 1)
end
if pause > now then return pause - now end
if not urgent then
  redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', string.format('%d', now))
  if redis.call('ZCARD', KEYS[3]) > 0 then
    return math.max(1000, math.floor(window / tonumber(ARGV[1])))
  end
end
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', '(' .. string.format('%d', now - window))
if redis.call('ZCARD', KEYS[1]) < tonumber(ARGV[1]) then
  redis.call('ZADD', KEYS[1], now, ARGV[3])
  redis.call('PEXPIRE', KEYS[1], math.ceil(window / 1000) + 1000)
  if urgent then redis.call('ZREM', KEYS[3], ARGV[4]) end
  return -redis.call('ZCARD', KEYS[1])
end
local oldest = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
return math.max(1, tonumber(oldest[2]) + window - now + 1)
"""

# KEYS[1] the pause-until (µs); ARGV[1] the pause (µs), ARGV[2] the longest pause (µs). Extends,
# never shortens, a pause of ours; a value that is no pause of ours (not a number, further away
# than the longest pause) is replaced. Returns the µs left.
PAUSE_LUA: Final = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local target = now + tonumber(ARGV[1])
local current = 0
local kind = redis.call('TYPE', KEYS[1]).ok
if kind == 'string' then
  current = tonumber(redis.call('GET', KEYS[1])) or 0
elseif kind ~= 'none' then
  redis.call('DEL', KEYS[1])
end
if current ~= current or current > now + tonumber(ARGV[2]) then current = 0 end
if target > current then
  local ttl_ms = math.ceil(tonumber(ARGV[1]) / 1000) + 1
  redis.call('SET', KEYS[1], string.format('%d', target), 'PX', ttl_ms)
  return target - now
end
return current - now
"""

# KEYS[1] the window; ARGV[1] a grant's member. Moves the grant to now (Redis's clock), if it is
# still in the window: see ClusterLimiter._restamp.
RESTAMP_LUA: Final = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
return redis.call('ZADD', KEYS[1], 'XX', now, ARGV[1])
"""

_JITTER_S: Final = 0.003
_MARGIN: Final = 0.025


class ClusterLimiter:
    """The rate limit shared by every replica (see the module docstring)."""

    def __init__(
        self,
        link: RedisLink,
        rate_per_s: float,
        burst: int | None = None,
        fallback_share: float | None = None,
        *,
        max_pause_s: float = 30.0,
    ) -> None:
        """``max_pause_s``: the longest 429 pause (LASTINFOSEC_BACKOFF_MAX_S); a longer one
        read from Redis is cut to it."""
        self._link = link
        self._rate = rate_per_s
        self._capacity = burst or max(1, round(rate_per_s))
        # The window is kept a little longer than burst / rate: a grant reaches LastInfoSec a few
        # milliseconds after Redis made it (network, event loops), and that jitter must not fit
        # one request more into a one-second window at the API (seen: up to 7 ms under load; 25 ms
        # covers it). It costs 2.5 % of the rate.
        self._window_us = round(self._capacity / rate_per_s * 1_000_000 * (1 + _MARGIN))
        self._fallback_share = fallback_share
        self._max_pause_us = max(1, round(max_pause_s * 1_000_000))
        # The longest wait the script can ask for: a pause, or the window (plus the margin the
        # script allows grants stamped slightly ahead).
        self._max_wait_us = max(self._max_pause_us, self._window_us) + 1_000_000
        self._fallback: tuple[float, SlidingWindowLimiter] | None = None
        self._gate = PriorityGate()
        # An urgent waiter renews its mark at every poll, at least every window: two windows
        # of life (plus a margin) keep it live while it waits and gone soon after a crash.
        self._mark_us = 2 * self._window_us + 250_000
        self._keys = [
            link.key("rate", "window"),
            link.key("rate", "pause"),
            link.key("rate", "urgent"),
        ]
        self._serial = itertools.count()
        self._acquire_script = link.client.register_script(ACQUIRE_LUA)
        self._restamp_script = link.client.register_script(RESTAMP_LUA)
        # A grant whose answer took longer than this to reach us is moved to the time its
        # request leaves (see _restamp): half the margin.
        self._late_s = self._capacity / rate_per_s * _MARGIN / 2
        self._restamps: set[asyncio.Task[None]] = set()
        self.restamped = 0
        self._pause_script = link.client.register_script(PAUSE_LUA)
        self.granted_shared = 0  # grants from the Redis window (metrics)
        self.last_window = 0  # cluster-wide grants in the window at this replica's last grant

    @property
    def fallback_share(self) -> float:
        """The share of the rate this replica takes while Redis is down."""
        return self._fallback_share or 1.0 / max(1, self._link.stats.replicas_seen)

    def _fallback_limiter(self) -> SlidingWindowLimiter:
        share = self.fallback_share
        if self._fallback is None or self._fallback[0] != share:
            rate = self._rate * share
            burst = max(1, round(self._capacity * share))
            # The same margin as the shared window: several replicas' local windows add up at
            # the API, each with its own jitter.
            window_s = burst / rate * (1 + _MARGIN)
            self._fallback = (share, SlidingWindowLimiter(burst, window_s))
        return self._fallback[1]

    async def acquire(self, urgent: bool = False) -> None:
        await self._gate.acquire(urgent)
        loop = asyncio.get_running_loop()
        try:
            while True:
                if not self._link.shared:
                    await self._fallback_limiter().acquire(urgent)
                    return
                member = f"{self._link.replica_id}:{next(self._serial)}"
                asked = loop.time()
                attempt = functools.partial(self._try_acquire, member, urgent)
                wait_us = await self._link.run("rate limit", attempt)
                if wait_us is None:
                    continue  # Redis failed: the link is in fallback mode now
                if wait_us <= 0:
                    self.granted_shared += 1
                    self.last_window = -wait_us
                    if loop.time() - asked > self._late_s:
                        self._restamp(member)
                    return
                if urgent:  # renew the mark before it lapses (a 429 pause can be long)
                    wait_us = min(wait_us, self._mark_us // 2)
                await asyncio.sleep(wait_us / 1_000_000 + random.uniform(0, _JITTER_S))
        finally:
            self._gate.release()

    async def _try_acquire(self, member: str, urgent: bool) -> int:
        replica = self._link.replica_id
        args: list[int | str] = [
            self._capacity,
            self._window_us,
            member,
            replica if urgent else "",
            self._mark_us,
            self._max_pause_us,
        ]
        got = await self._acquire_script(keys=self._keys, args=args)
        # A bounded wait whatever comes back (docs/security.md): never longer than a pause.
        return min(self._max_wait_us, int(got)) if isinstance(got, int) else self._max_wait_us

    def _restamp(self, member: str) -> None:
        """The grant reached this replica late (a busy event loop): its request leaves about
        now, later than Redis recorded it, and could then share a one-second window at the API
        with the grants of the next window (the margin covers a few milliseconds, not tens).
        Move the grant to the time it is actually used, so the other replicas wait for it.
        Started at once, not awaited: the request goes out meanwhile."""
        self.restamped += 1
        task = asyncio.ensure_future(
            self._link.run(
                "rate restamp",
                lambda: self._restamp_script(keys=self._keys[:1], args=[member]),
            )
        )
        self._restamps.add(task)
        task.add_done_callback(self._restamps.discard)

    async def pause(self, delay_s: float) -> None:
        """Every replica waits ``delay_s`` before its next request (a 429 was answered)."""
        delay_us = min(self._max_pause_us, max(1, round(delay_s * 1_000_000)))
        args = [delay_us, self._max_pause_us]
        await self._link.run(
            "rate pause", lambda: self._pause_script(keys=self._keys[1:2], args=args)
        )
