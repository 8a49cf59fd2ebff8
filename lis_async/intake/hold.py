"""The reasons to hold the consumer's intake, behind one interface.

:class:`Hold` is what every hold implements and all :mod:`lis_async.app` knows of one: a
``reason`` (the consumer's name for it), whether it is ``engaged``, and listeners told
``True`` when it starts to hold intake and ``False`` when it releases it. The app subscribes
:meth:`lis_async.broker.consumer.Consumer.hold_intake` to every hold in one place. The holds:

- the platform health gate (:class:`lis_async.platform.health.PlatformHealth`, reason
  ``"platform"``): OpenCTI is down;
- the push-queue watermarks (:class:`lis_async.intake.backpressure.Backpressure`,
  ``"backpressure"``);
- pycti's queue threshold (:class:`lis_async.intake.threshold.QueueThreshold`,
  ``"queue_threshold"``).

:class:`IntakeHold` is the part the last two share: each decides when to hold by its own rule and
calls :meth:`IntakeHold._set` on a change; the listeners are told in the order the changes
happened, and the subclass writes its one log line per change.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import ClassVar, Protocol

__all__ = ["Hold", "IntakeHold", "Listener"]

Listener = Callable[[bool], Awaitable[None]]  # True: hold intake, False: release it

log = logging.getLogger("lis_async.intake")


class Hold(Protocol):
    """One reason to hold intake (see the module docstring)."""

    @property
    def reason(self) -> str:
        """The consumer's name for this hold (one per kind of hold)."""
        ...

    @property
    def engaged(self) -> bool:
        """True while it holds intake."""
        ...

    def add_listener(self, listener: Listener) -> None:
        """``listener(True)`` when the hold starts, ``listener(False)`` when it ends."""
        ...


class IntakeHold:
    """Engaged or not, the transitions counted, the listeners told (see the module docstring)."""

    reason: ClassVar[str]

    def __init__(self) -> None:
        self._listeners: list[Listener] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self.engaged = False
        self._engaged_at = 0.0
        self.transitions = 0

    def add_listener(self, listener: Listener) -> None:
        self._listeners.append(listener)

    async def run(self) -> None:
        """Forever: watch what the rule depends on and hold or release intake."""
        raise NotImplementedError

    def _set(self, engaged: bool) -> None:
        """Record a change (the caller checked it is one), log it, tell the listeners."""
        now = time.monotonic()
        held_s = now - self._engaged_at
        self.engaged = engaged
        self.transitions += 1
        if engaged:
            self._engaged_at = now
        self._announce(engaged, held_s)
        for listener in self._listeners:
            task = asyncio.ensure_future(listener(engaged))
            self._tasks.add(task)
            task.add_done_callback(self._listener_done)

    def _listener_done(self, task: asyncio.Task[None]) -> None:
        """A listener that failed is logged at ERROR (never silent): intake may then not follow
        this hold until its next change."""
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("intake hold listener failed", exc_info=task.exception())

    def _announce(self, engaged: bool, held_s: float) -> None:
        """The subclass's log line for a change (``held_s``: how long the hold lasted)."""
        raise NotImplementedError
