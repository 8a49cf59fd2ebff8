"""The client-wide rate limit toward LastInfoSec: an exact sliding window."""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Protocol


class RateLimiter(Protocol):
    """What the client needs of a rate limit: the local one below, or the cluster's
    (:class:`lis_async.cluster.limiter.ClusterLimiter`)."""

    async def acquire(self, urgent: bool = False) -> None:
        """Return when one more request may start; ``urgent`` requests go first."""
        ...

    async def pause(self, delay_s: float) -> None:
        """LastInfoSec answered 429: no request should start for ``delay_s`` seconds."""
        ...


class PriorityGate:
    """A lock whose waiters are served urgent first, then in arrival order.

    asyncio.Lock serves strictly in arrival order; an analyst's request would wait behind every
    auto-enrichment request already queued (docs/architecture.md, Priority lanes). There is no
    priority lock in asyncio, and this one is a dozen lines.
    """

    __slots__ = ("_held", "_normal", "_urgent")

    def __init__(self) -> None:
        self._held = False
        self._urgent: deque[asyncio.Future[None]] = deque()
        self._normal: deque[asyncio.Future[None]] = deque()

    async def acquire(self, urgent: bool = False) -> None:
        if not self._held:
            self._held = True
            return
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        line = self._urgent if urgent else self._normal
        line.append(waiter)
        try:
            await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self.release()  # handed the gate just as it was cancelled: pass it on
            elif waiter in line:  # release() drops cancelled waiters it meets
                line.remove(waiter)
            raise

    def release(self) -> None:
        """Hand the gate to the next waiter (urgent first), or free it."""
        for line in (self._urgent, self._normal):
            while line:
                waiter = line.popleft()
                if not waiter.done():
                    waiter.set_result(None)
                    return
        self._held = False


class SlidingWindowLimiter:
    """At most ``capacity`` acquisitions in any ``window_s`` seconds; urgent acquisitions first,
    then first come first served.

    Written here rather than taken from aiolimiter: its leaky bucket starts full and refills
    during any lull, so it lets up to twice the rate through within one second, while users set
    ``rate_per_s`` to stay under a provider's per-second quota. Keeping the times of the last
    ``capacity`` acquisitions gives the exact guarantee and still sustains the full rate.
    """

    __slots__ = ("_capacity", "_gate", "_times", "_window")

    def __init__(self, capacity: int, window_s: float) -> None:
        self._capacity = capacity
        self._window = window_s
        self._times: deque[float] = deque()
        self._gate = PriorityGate()  # one waiter at a time watches the window

    @classmethod
    def per_second(cls, rate_per_s: float, burst: int | None = None) -> SlidingWindowLimiter:
        """``burst`` requests per ``burst / rate_per_s`` seconds; by default one second's worth
        (at least one)."""
        capacity = burst or max(1, round(rate_per_s))
        return cls(capacity, capacity / rate_per_s)

    async def pause(self, delay_s: float) -> None:
        """Nothing to share: the client pauses its own requests (``LastInfoSecClient``)."""

    async def acquire(self, urgent: bool = False) -> None:
        await self._gate.acquire(urgent)
        try:
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
        finally:
            self._gate.release()
