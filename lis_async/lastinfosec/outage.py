"""LastInfoSec's health as the whole client sees it: an outage is waited out together.

LastInfoSec is *down* once requests fail transiently (5xx, timeout, connection error) and
nothing answered for ``outage_after_s`` (so a flaky but living API, say 20 % of 5xx, never
counts as down: its failures are retried one by one, with back-off). While it is down no
lookup sends anything but one *probe* at a time, every :data:`PROBE_INTERVAL_S`: the
first waiter takes the probe turn, the others wait. The first answer marks it *up* again and
every waiter goes at once: an outage costs LastInfoSec one request per probe interval, not one
per job, and the lookups resume within about one probe interval of its return. One WARNING
when it goes, one INFO when it is back. Each job bounds its own wait
(``lastinfosec.retry_budget_s``, in the client).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Final

log: Final = logging.getLogger("lis_async.lastinfosec")

#: Seconds between probes while LastInfoSec is down: one request a second costs the API nothing
#: and resumes the lookups within a second of its return (no operator needs another value; it
#: was the setting LASTINFOSEC_OUTAGE_PROBE_S, see lis_async/settings/removed.py).
PROBE_INTERVAL_S: Final = 1.0


class OutageGate:
    """Admission to LastInfoSec while it is down (see the module docstring)."""

    def __init__(
        self, probe_interval_s: float = PROBE_INTERVAL_S, outage_after_s: float = 1.0
    ) -> None:
        self._interval = probe_interval_s
        self._after = outage_after_s
        self._cond: asyncio.Condition | None = None  # made on first use, in the loop
        self._last_answer = time.monotonic()
        self._down_since: float | None = None
        self._cause = ""
        self._probing = False
        self._next_probe = 0.0
        self._outages = 0

    @property
    def down(self) -> bool:
        return self._down_since is not None

    @property
    def cause(self) -> str:
        """The last transient failure seen while down ("" before the first outage)."""
        return self._cause

    @property
    def outages(self) -> int:
        """Outages so far."""
        return self._outages

    def _condition(self) -> asyncio.Condition:
        if self._cond is None:
            self._cond = asyncio.Condition()
        return self._cond

    async def admit(self) -> bool:
        """Return at once while up (False). While down, return when it is this caller's turn
        to probe (True): it must then call :meth:`failed`, :meth:`answered` or
        :meth:`release`."""
        if self._down_since is None:
            return False
        cond = self._condition()
        async with cond:
            while self._down_since is not None and self._probing:
                await cond.wait()
            if self._down_since is None:
                return False
            self._probing = True
            delay = self._next_probe - time.monotonic()
        if delay > 0:
            try:
                await asyncio.sleep(delay)
            except asyncio.CancelledError:
                await self.release()
                raise
        return True

    async def failed(self, cause: str, probe: bool) -> None:
        """A request failed transiently: an outage starts when nothing answered lately.
        ``probe``: it was the probe (its turn ends); a request sent before the outage was seen
        leaves the probe turn alone."""
        now = time.monotonic()
        cond = self._condition()
        async with cond:
            if self._down_since is None and now - self._last_answer >= self._after:
                self._down_since = now
                self._outages += 1
                log.warning(
                    "LastInfoSec unreachable (%s): lookups wait, one probe every %.1f s",
                    cause,
                    self._interval,
                )
            if self._down_since is not None:
                self._cause = cause
                if probe or not self._probing:
                    self._next_probe = now + self._interval
            if probe:
                self._probing = False
                cond.notify_all()

    async def answered(self, probe: bool) -> None:
        """LastInfoSec answered (a 429 or an error answer count): it is up. ``probe``: the
        request was the probe (its turn ends)."""
        now = time.monotonic()
        self._last_answer = now
        if not probe and self._down_since is None:
            return  # up, and no probe turn to end (one is only taken while down)
        cond = self._condition()
        async with cond:
            if self._down_since is not None:
                log.info(
                    "LastInfoSec answers again after %.1f s of outage (last cause: %s)",
                    now - self._down_since,
                    self._cause,
                )
                self._down_since = None
            self._probing = False
            cond.notify_all()

    async def release(self) -> None:
        """A probe turn that sent nothing (cancelled): the next waiter takes it."""
        cond = self._condition()
        async with cond:
            self._probing = False
            cond.notify_all()

    def down_for_s(self) -> float:
        since = self._down_since
        return 0.0 if since is None else time.monotonic() - since
