"""The cluster-wide LastInfoSec rate limit: one paced schedule (GCRA) in Redis for every replica.

``LASTINFOSEC_RATE_PER_S`` is then the cluster's rate: one grant every ``1 / rate`` seconds over
all replicas together (with ``LASTINFOSEC_RATE_BURST``, that many may come at once), the same
pacing as the local :class:`~lis_async.lastinfosec.limiter.PacedLimiter`. The check and the
grant are one Lua script (atomic), on Redis's clock (the replicas' clocks do not matter). A 429
sets a shared pause-until that the script honours, so every replica waits it out.

Urgent requests (manual and playbook jobs) go first, cluster-wide: an urgent acquire marks its
replica in a sorted set while it waits (each mark expires on its own, so a replica that dies
leaves none behind), and the script refuses ordinary grants while any mark is live.

Within a replica, waiters queue behind one gate (urgent first, then in arrival order), so one
request per replica polls Redis at a time; a refused acquire sleeps until its turn in the
schedule (plus jitter, so the replicas do not wake in lock step).

Failover keeps the quota (see failover in docs/cluster.md): while Redis is
unreachable the replica paces itself at ``redis.fallback_rate_share`` of the rate (by default
1 / the replicas seen), starting one window (one second) after it saw Redis fail, when every
grant the cluster made before the failure has left the one-second window (its own last shared
grant will not do: the other replicas' may be later, and a replica idle or starved on the
shared schedule may have had none for seconds). When Redis answers again it grants nothing for
the link's probe interval plus one window. Another replica may see Redis back up to one probe
interval later (its last probe failed just before the return) and grants on its fallback share
until then; the window covers that probe's round trip, a busy loop's lag and the fallback
grant already waited for, and lets those last fallback grants leave the window. Each
transition costs the replica up to that much idle time.
"""

from __future__ import annotations

import asyncio
import functools
import random
from typing import Final

from lis_async.cluster.link import RedisLink
from lis_async.lastinfosec.limiter import CATCH_UP, PacedLimiter, PriorityGate

# Nothing read from Redis is trusted (docs/security.md#cluster-mode-and-redis): a key of
# another type is deleted, a pause further away than the back-off maximum is cut to it, a
# non-numeric pause is no pause, a schedule further ahead than ours can be (one interval and the
# burst allowance, plus a second's margin) is reset to now, and urgent marks stamped in the
# future are dropped. At worst a hostile value then holds the replicas one back-off maximum,
# never for good.
#
# KEYS[1] the schedule: the theoretical time of the next grant (µs); KEYS[2] the pause-until
# (µs); KEYS[3] the urgent waiters (a sorted set of replica ids scored by when their mark
# expires, µs); KEYS[4] this second's grant count (a hash: s = the second, n = the count).
# ARGV[1] the interval (µs), ARGV[2] the burst tolerance (µs), ARGV[3] how far behind the
# schedule may run and catch up (µs), ARGV[4] this replica's id when the acquire is urgent,
# else '', ARGV[5] how long an urgent mark lives (µs), ARGV[6] the longest pause (µs).
# Returns -n when granted (n: the grants made cluster-wide in this second), else the µs to wait
# before asking again.
ACQUIRE_LUA: Final = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval = tonumber(ARGV[1])
local urgent = ARGV[4] ~= ''
local longest = tonumber(ARGV[6])
local expected = {
  [KEYS[1]] = 'string', [KEYS[2]] = 'string', [KEYS[3]] = 'zset', [KEYS[4]] = 'hash'}
for key, want in pairs(expected) do
  local kind = redis.call('TYPE', key).ok
  if kind ~= 'none' and kind ~= want then redis.call('DEL', key) end
end
redis.call('ZREMRANGEBYSCORE', KEYS[3],
  string.format('(%d', now + tonumber(ARGV[5]) + 1000000), '+inf')
if urgent then
  redis.call('ZADD', KEYS[3], now + tonumber(ARGV[5]), ARGV[4])
  redis.call('PEXPIRE', KEYS[3], math.ceil(tonumber(ARGV[5]) / 1000) + 1000)
end
local pause = tonumber(redis.call('GET', KEYS[2]) or '0') or 0
if pause ~= pause then pause = 0 end
if pause > now + longest then
  pause = now + longest
  redis.call('SET', KEYS[2], string.format('%d', pause), 'PX', math.ceil(longest / 1000) + 1)
end
if pause > now then return pause - now end
if not urgent then
  redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', string.format('%d', now))
  if redis.call('ZCARD', KEYS[3]) > 0 then return math.max(1000, interval) end
end
local tat = tonumber(redis.call('GET', KEYS[1]) or '0') or 0
if tat ~= tat or tat > now + interval + tonumber(ARGV[2]) + 1000000 then tat = now end
if tat < now - tonumber(ARGV[3]) then tat = now - tonumber(ARGV[3]) end
local wait = tat - tonumber(ARGV[2]) - now
if wait > 0 then return math.max(1, wait) end
local nxt = tat + interval
redis.call('SET', KEYS[1], string.format('%d', nxt), 'PX',
  math.ceil((nxt - now + tonumber(ARGV[2])) / 1000) + 1000)
if urgent then redis.call('ZREM', KEYS[3], ARGV[4]) end
local second = math.floor(now / 1000000)
local seen = redis.call('HMGET', KEYS[4], 's', 'n')
local n = 1
if tonumber(seen[1]) == second then n = (tonumber(seen[2]) or 0) + 1 end
if n ~= n or n < 1 or n > 1000000 then n = 1 end
redis.call('HSET', KEYS[4], 's', second, 'n', n)
redis.call('PEXPIRE', KEYS[4], 5000)
return -n
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

# KEYS[1] the schedule; ARGV[1] the interval (µs). The next grant no sooner than one interval
# from now (Redis's clock): see ClusterLimiter._restamp.
RESTAMP_LUA: Final = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local nxt = now + tonumber(ARGV[1])
local tat = tonumber(redis.call('GET', KEYS[1]) or '0') or 0
if tat ~= tat or nxt > tat then
  local ttl_ms = math.ceil(tonumber(ARGV[1]) / 1000) + 1000
  redis.call('SET', KEYS[1], string.format('%d', nxt), 'PX', ttl_ms)
end
return 1
"""

_JITTER_S: Final = 0.003
#: One window: how long a grant counts against the per-second quota at LastInfoSec.
WINDOW_S: Final = 1.0


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
        self._burst = burst or 1
        self._interval_s = 1.0 / rate_per_s
        self._interval_us = max(1, round(1_000_000 / rate_per_s))
        self._tolerance_us = (self._burst - 1) * self._interval_us
        self._slack_us = round(CATCH_UP * self._interval_us)
        self._max_pause_us = max(1, round(max_pause_s * 1_000_000))
        # The longest wait the script can ask for: a pause, or the schedule (plus the margin the
        # script allows before it resets a schedule too far ahead).
        self._max_wait_us = max(self._max_pause_us, self._interval_us + self._tolerance_us)
        self._max_wait_us += 1_000_000
        self._fallback_share = fallback_share
        self._fallback: tuple[float, PacedLimiter] | None = None
        self._gate = PriorityGate()
        # An urgent waiter renews its mark at every poll, at least every second: two seconds of
        # life (plus a margin) keep it live while it waits and gone soon after a crash.
        self._mark_us = 2 * max(self._interval_us, 1_000_000) + 250_000
        self._keys = [
            link.key("rate", "schedule"),
            link.key("rate", "pause"),
            link.key("rate", "urgent"),
            link.key("rate", "second"),
        ]
        self._acquire_script = link.client.register_script(ACQUIRE_LUA)
        self._restamp_script = link.client.register_script(RESTAMP_LUA)
        # A grant whose answer took longer than this to reach us is counted from when its
        # request leaves (see _restamp): a quarter interval, what the catch-up slack allows for,
        # and never less than 10 ms (a Redis round trip per grant at high rates is not worth it).
        self._late_s = max(CATCH_UP * self._interval_s, 0.01)
        self._restamps: set[asyncio.Task[None]] = set()
        self.restamped = 0
        self._pause_script = link.client.register_script(PAUSE_LUA)
        # Failover (module docstring): which side granted last, and when (loop clock).
        self._return_hold_s = link.probe_interval_s + WINDOW_S
        self._was_shared = True
        self._last_shared_grant = -float("inf")
        self._failed_at = -float("inf")  # when this limiter saw Redis fail, last
        self._shared_hold_until = 0.0
        self.granted_shared = 0  # grants from the Redis schedule (metrics)
        self.last_window = 0  # cluster-wide grants in the second of this replica's last grant

    @property
    def fallback_share(self) -> float:
        """The share of the rate this replica takes while Redis is down."""
        return self._fallback_share or 1.0 / max(1, self._link.stats.replicas_seen)

    def _fallback_limiter(self) -> PacedLimiter:
        share = self.fallback_share
        if self._fallback is None or self._fallback[0] != share:
            burst = max(1, round(self._burst * share))
            # Paced independently, each replica's grants can put one more in a second than its
            # rate (the phases do not line up): n replicas at share * (rate + 1) - 1 each add up
            # to at most rate + 1. Never below half the plain share.
            rate = max(share * (self._rate + 1) - 1, share * self._rate / 2)
            limiter = PacedLimiter(rate, burst)
            # No grant on the fallback share until every shared grant of the cluster has left
            # the window: they were all made before Redis failed, hence before this limiter
            # saw it fail.
            limiter.hold_until(max(self._last_shared_grant, self._failed_at) + WINDOW_S)
            self._fallback = (share, limiter)
        return self._fallback[1]

    def _mode_changed(self, shared: bool, now: float) -> None:
        """Redis just failed (``shared`` False) or came back (True): see the module docstring."""
        self._was_shared = shared
        if shared:
            self._shared_hold_until = now + self._return_hold_s
        else:
            self._failed_at = now
            self._fallback = None  # a fresh one, held a window after the failure

    async def acquire(self, urgent: bool = False) -> None:
        await self._gate.acquire(urgent)
        loop = asyncio.get_running_loop()
        try:
            while True:
                shared = self._link.shared
                if shared != self._was_shared:
                    self._mode_changed(shared, loop.time())
                if not shared:
                    await self._fallback_limiter().acquire(urgent)
                    return
                hold = self._shared_hold_until - loop.time()
                if hold > 0:
                    await asyncio.sleep(min(hold, self._return_hold_s))
                    continue
                asked = loop.time()
                attempt = functools.partial(self._try_acquire, urgent)
                wait_us = await self._link.run("rate limit", attempt)
                if wait_us is None:
                    continue  # Redis failed: the link is in fallback mode now
                if wait_us <= 0:
                    self.granted_shared += 1
                    self.last_window = -wait_us
                    self._last_shared_grant = loop.time()
                    if self._last_shared_grant - asked > self._late_s:
                        self._restamp()
                    return
                if urgent:  # renew the mark before it lapses (a 429 pause can be long)
                    wait_us = min(wait_us, self._mark_us // 2)
                await asyncio.sleep(wait_us / 1_000_000 + random.uniform(0, _JITTER_S))
        finally:
            self._gate.release()

    async def _try_acquire(self, urgent: bool) -> int:
        replica = self._link.replica_id
        args: list[int | str] = [
            self._interval_us,
            self._tolerance_us,
            self._slack_us,
            replica if urgent else "",
            self._mark_us,
            self._max_pause_us,
        ]
        got = await self._acquire_script(keys=self._keys, args=args)
        # A bounded wait whatever comes back (docs/security.md): never longer than a pause.
        return min(self._max_wait_us, int(got)) if isinstance(got, int) else self._max_wait_us

    def _restamp(self) -> None:
        """The grant reached this replica late (a busy event loop): its request leaves about
        now, later than Redis scheduled it, and the next replica's grant could follow it closer
        than one interval (the catch-up slack covers a quarter interval, not a loop that lags).
        Push the schedule to one interval from now, so the other replicas count from the time
        the grant is used. Started at once, not awaited: the request goes out meanwhile."""
        self.restamped += 1
        task = asyncio.ensure_future(
            self._link.run(
                "rate restamp",
                lambda: self._restamp_script(keys=self._keys[:1], args=[self._interval_us]),
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
