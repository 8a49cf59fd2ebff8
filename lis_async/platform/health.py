"""One shared view of "OpenCTI is down", instead of every job backing off on its own.

The first call that finds the platform unavailable (:class:`~lis_async.errors.PlatformUnavailable`:
unreachable, timeout, HTTP 5xx) closes the gate, with one WARNING. While it is closed every job
waits on it, intake is paused (the listeners: the consumer stops taking deliveries, so the
prefetch does not fill with jobs that cannot report), and a single probe asks the platform every
:data:`PROBE_INTERVAL_S`. The probe's first success opens the gate (one INFO line with the
outage's length): every waiting job goes on at once and intake resumes. GraphQL errors (the
platform answered) never close it: those calls are retried one by one with back-off.

Toward intake it is one of the holds (:class:`lis_async.intake.hold.Hold`, reason
``"platform"``): ``engaged`` while the gate is closed, its listeners told ``True`` when it
closes and ``False`` when it opens.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Final

from lis_async.errors import PlatformAuthError, PlatformError

log: Final = logging.getLogger("lis_async.platform")

#: Seconds between probes while OpenCTI is down: every waiting job goes on within about this
#: long of its return, for one cheap query a second (it was the setting
#: CONNECTOR_PLATFORM_PROBE_S, see lis_async/settings/removed.py).
PROBE_INTERVAL_S: Final = 1.0

Listener = Callable[[bool], Awaitable[None]]  # True: hold intake (down), False: release it (up)


class PlatformHealth:
    """The gate (see the module docstring). ``probe`` is a cheap call that raises
    :class:`~lis_async.errors.PlatformError` while the platform is down."""

    reason = "platform"

    def __init__(
        self, probe: Callable[[], Awaitable[object]], probe_interval_s: float = PROBE_INTERVAL_S
    ) -> None:
        self._probe = probe
        self._interval = probe_interval_s
        self._up: asyncio.Event | None = None
        self._down_since: float | None = None
        self._prober: asyncio.Task[None] | None = None
        self._listeners: list[Listener] = []

    @property
    def up(self) -> bool:
        return self._down_since is None

    @property
    def engaged(self) -> bool:
        """The intake hold's view: True while the platform is down."""
        return self._down_since is not None

    def _event(self) -> asyncio.Event:
        if self._up is None:
            self._up = asyncio.Event()
            self._up.set()
        return self._up

    def add_listener(self, listener: Listener) -> None:
        self._listeners.append(listener)

    async def wait_up(self) -> None:
        """Return at once while up; while down, when the platform is back."""
        if self._down_since is not None:
            await self._event().wait()

    def unavailable(self, what: str, exc: BaseException) -> None:
        """``what`` found the platform unavailable: close the gate (once) and start probing."""
        if self._down_since is not None:
            return
        self._down_since = time.monotonic()
        self._event().clear()
        log.warning(
            "OpenCTI unavailable (%s: %s): jobs wait, intake paused, one probe every %.1f s",
            what,
            exc,
            self._interval,
        )
        self._prober = asyncio.get_running_loop().create_task(self._probe_until_up())
        self._prober.set_name("platform-probe")

    async def _probe_until_up(self) -> None:
        await self._notify(True)
        while True:
            await asyncio.sleep(self._interval)
            try:
                await self._probe()
            except PlatformAuthError:
                break  # it answers: the pipeline will meet the refusal and stop the worker
            except PlatformError:
                continue
            except Exception:  # a bug must not leave the gate closed for good: probe again
                log.exception("OpenCTI probe failed unexpectedly; probing again")
                continue
            break
        down_for = time.monotonic() - (self._down_since or time.monotonic())
        self._down_since = None
        self._event().set()
        log.info("OpenCTI answers again after %.1f s: jobs resume, intake resumed", down_for)
        await self._notify(False)

    async def _notify(self, hold: bool) -> None:
        for listener in self._listeners:
            try:
                await listener(hold)
            except Exception:  # a listener must never stop the probe
                log.exception("platform health listener failed")

    async def close(self) -> None:
        prober, self._prober = self._prober, None
        if prober is not None:
            prober.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await prober
