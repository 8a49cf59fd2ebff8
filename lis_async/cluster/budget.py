"""The daily LastInfoSec budget shared by every replica: blocks of the day's budget reserved
atomically in Redis (:class:`~lis_async.lastinfosec.budget.BlockBudget` spends them).

The day's tally is two counters, ``<prefix>:budget:<YYYY-MM-DD>`` (every request reserved) and
``<prefix>:budget:<YYYY-MM-DD>:auto`` (the auto jobs' part), raised by one Lua script that caps
them at the budget and at its auto part; they expire after two days. While Redis is unreachable a
replica spends only the block it holds (docs/lastinfosec.md, Daily budget).
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import date
from typing import Any, Final

from lis_async.cluster.link import RedisLink
from lis_async.lastinfosec.budget import BlockBudget, Caps, Tally, block_size, utc_day

# Nothing read from Redis is trusted (docs/security.md#cluster-mode-and-redis): a counter that is
# not a whole number from 0 up (another type, text, a fraction, negative) counts as the whole
# budget spent and is overwritten so; a counter above its cap is spent too. A hostile value can
# then stop the day's lookups, never let more requests through.
#
# KEYS[1] the day's requests, KEYS[2] the auto jobs' part; ARGV[1] the budget, ARGV[2] the auto
# cap, ARGV[3] the block asked for, ARGV[4] '1' when urgent, ARGV[5] the keys' life (s).
# Returns {granted, used, auto} (after the grant).
RESERVE_LUA: Final = """
local ttl = tonumber(ARGV[5])
local function read(key, spent)
  local kind = redis.call('TYPE', key).ok
  if kind == 'none' then return 0 end
  local v = nil
  if kind == 'string' then v = tonumber(redis.call('GET', key)) end
  if v == nil or v ~= v or v < 0 or v ~= math.floor(v) or v > spent then
    redis.call('DEL', key)
    redis.call('SET', key, string.format('%d', spent), 'EX', ttl)
    return spent
  end
  return v
end
local budget = tonumber(ARGV[1])
local autocap = tonumber(ARGV[2])
local used = read(KEYS[1], budget)
local auto = read(KEYS[2], autocap)
local left = budget - used
if ARGV[4] ~= '1' then left = math.min(left, autocap - auto) end
local n = math.max(0, math.min(tonumber(ARGV[3]), left))
if n > 0 then
  used = used + n
  redis.call('SET', KEYS[1], string.format('%d', used), 'EX', ttl)
  if ARGV[4] ~= '1' then
    auto = auto + n
    redis.call('SET', KEYS[2], string.format('%d', auto), 'EX', ttl)
  end
end
return {n, used, auto}
"""

#: How long a day's counters live: two days, so the day is over everywhere before they go.
KEY_TTL_S: Final = 2 * 86_400


def _int(value: Any, low: int, high: int, default: int) -> int:
    """A count read from Redis within ``low..high`` (``default`` when it is none)."""
    if isinstance(value, bool) or not isinstance(value, int):
        return default
    return min(high, max(low, value))


class RedisLedger:
    """:class:`~lis_async.lastinfosec.budget.Ledger` in Redis (see the module docstring)."""

    def __init__(self, link: RedisLink) -> None:
        self._link = link
        self._script = link.client.register_script(RESERVE_LUA)

    def keys(self, day: str) -> list[str]:
        return [self._link.key("budget", day), self._link.key("budget", day, "auto")]

    async def reserve(self, day: str, n: int, urgent: bool, caps: Caps) -> tuple[int, Tally] | None:
        keys = self.keys(day)
        args: list[int | str] = [caps.total, caps.auto, n, "1" if urgent else "0", KEY_TTL_S]
        got = await self._link.run("daily budget", lambda: self._script(keys=keys, args=args))
        if got is None:
            return None
        if not isinstance(got, list) or len(got) != 3:
            return 0, Tally(caps.total, caps.auto)  # not our script's answer: spent
        granted = _int(got[0], 0, n, 0)
        tally = Tally(
            _int(got[1], 0, caps.total, caps.total), _int(got[2], 0, caps.auto, caps.auto)
        )
        return granted, tally


def cluster_budget(
    link: RedisLink,
    budget: int,
    urgent_share: float,
    rate_per_s: float,
    *,
    block: int | None = None,
    day: Callable[[], date] = utc_day,
) -> BlockBudget:
    """The daily budget every replica on ``link`` shares (``rate_per_s``: the cluster's rate;
    a block is one second of it unless ``block`` is given, see
    :func:`~lis_async.lastinfosec.budget.block_size`)."""
    size = block or block_size(budget, rate_per_s)
    return BlockBudget(RedisLedger(link), budget, urgent_share, size, day=day)
