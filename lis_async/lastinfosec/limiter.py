"""The client-wide rate limit toward LastInfoSec: an exact sliding window."""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Protocol


class RateLimiter(Protocol):
    """What the client needs of a rate limit: the local one below, or the cluster's
    (:class:`lis_async.cluster.limiter.ClusterLimiter`)."""

    async def acquire(self) -> None:
        """Return when one more request may start."""
        ...

    async def pause(self, delay_s: float) -> None:
        """LastInfoSec answered 429: no request should start for ``delay_s`` seconds."""
        ...


class SlidingWindowLimiter:
    """At most ``capacity`` acquisitions in any ``window_s`` seconds, first come first served.

    Written here rather than taken from aiolimiter: its leaky bucket starts full and refills
    during any lull, so it lets up to twice the rate through within one second, while users set
    ``rate_per_s`` to stay under a provider's per-second quota. Keeping the times of the last
    ``capacity`` acquisitions gives the exact guarantee and still sustains the full rate.
    """

    __slots__ = ("_capacity", "_lock", "_times", "_window")

    def __init__(self, capacity: int, window_s: float) -> None:
        self._capacity = capacity
        self._window = window_s
        self._times: deque[float] = deque()
        self._lock = asyncio.Lock()  # FIFO: waiters are served in arrival order

    @classmethod
    def per_second(cls, rate_per_s: float, burst: int | None = None) -> SlidingWindowLimiter:
        """``burst`` requests per ``burst / rate_per_s`` seconds; by default one second's worth
        (at least one)."""
        capacity = burst or max(1, round(rate_per_s))
        return cls(capacity, capacity / rate_per_s)

    async def pause(self, delay_s: float) -> None:
        """Nothing to share: the client pauses its own requests (``LastInfoSecClient``)."""

    async def acquire(self) -> None:
        async with self._lock:
            loop = asyncio.get_running_loop()
            times = self._times
            while True:
                now = loop.time()
                while times and times[0] <= now - self._window:
                    times.popleft()
                if len(times) < self._capacity:
                    times.append(now)
                    return
                await asyncio.sleep(times[0] + self._window - now)
