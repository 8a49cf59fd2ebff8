"""The client-wide rate limit toward LastInfoSec: evenly paced grants (GCRA)."""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Final, Protocol


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


#: How far behind its schedule a paced limiter may run and catch up, as a share of the interval.
#: A waiter wakes a little after its time (the event loop's latency, ~1 ms); without slack every
#: such delay would push the whole schedule back, and at 30 req/s a 2 ms delay per grant costs
#: 6 % of the rate. A quarter interval keeps the busiest one-second window at ``rate + 1`` even
#: with a request reaching LastInfoSec up to three quarters of an interval late
#: (docs/architecture.md, "Design decisions and their trade-offs").
CATCH_UP: Final = 0.25


class PacedLimiter:
    """GCRA (the generic cell rate algorithm): one grant every ``1 / rate_per_s`` seconds, with a
    burst allowance of ``burst`` grants (1: evenly paced); urgent acquisitions first, then first
    come first served.

    A sliding window (what this replaced) hands a whole window's grants out at once as soon as the
    window allows; they leave the loop over tens of milliseconds on a loaded machine, and the tail
    of one burst and the head of the next then land in the same second at LastInfoSec. Pacing
    spreads them: at most ``rate + burst`` requests reach the API in any one second.

    Written here rather than taken from aiolimiter: its leaky bucket starts full and refills
    during any lull (twice the rate within one second), and it has no priority.
    """

    __slots__ = ("_gate", "_interval", "_slack", "_tat", "_tolerance", "granted")

    def __init__(self, rate_per_s: float, burst: int = 1) -> None:
        if rate_per_s <= 0 or burst < 1:
            raise ValueError("rate_per_s must be > 0 and burst >= 1")
        self._interval = 1.0 / rate_per_s
        self._tolerance = (burst - 1) * self._interval
        self._slack = CATCH_UP * self._interval
        self._tat = -float("inf")  # the theoretical time of the next grant (loop clock)
        self._gate = PriorityGate()  # one waiter at a time watches the schedule
        self.granted = 0

    @property
    def interval_s(self) -> float:
        return self._interval

    def hold_until(self, when: float) -> None:
        """Grant nothing before ``when`` (loop clock): cluster mode's failover (one window after
        the last shared grant, see failover in docs/cluster.md)."""
        self._tat = max(self._tat, when + self._tolerance)

    async def pause(self, delay_s: float) -> None:
        """Nothing to share: the client pauses its own requests (``LastInfoSecClient``)."""

    async def acquire(self, urgent: bool = False) -> None:
        await self._gate.acquire(urgent)
        try:
            loop = asyncio.get_running_loop()
            while True:
                now = loop.time()
                tat = max(self._tat, now - self._slack)
                wait = tat - self._tolerance - now
                if wait <= 0:
                    self._tat = tat + self._interval
                    self.granted += 1
                    return
                await asyncio.sleep(wait)
        finally:
            self._gate.release()
