"""Change notification: the event-driven ``wait_*`` helpers of the simulated platform.

Every part that changes state (works, connectors, playbook calls, bundle pushes) calls
:meth:`ChangeNotifier.notify`; :meth:`ChangeNotifier.wait_until` re-evaluates its predicate
on each change instead of polling.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

__all__ = ["ChangeNotifier"]


class ChangeNotifier:
    """Wakes the coroutines waiting for a state change (``notify`` works from any thread)."""

    def __init__(self) -> None:
        self._changed = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None

    def bind_loop(self, loop: asyncio.AbstractEventLoop) -> None:
        """The loop the simulator serves on (``notify`` from other threads is sent there)."""
        self._loop = loop

    def notify(self) -> None:
        """Wake every ``wait_until`` coroutine (callable from any thread)."""
        loop = self._loop
        if loop is not None and not loop.is_closed():
            try:
                running = asyncio.get_running_loop()
            except RuntimeError:
                running = None
            if running is not loop:
                loop.call_soon_threadsafe(self._notify_now)
                return
        self._notify_now()

    def _notify_now(self) -> None:
        ev = self._changed
        self._changed = asyncio.Event()
        ev.set()

    async def wait_until(
        self,
        predicate: Callable[[], bool],
        timeout: float,  # noqa: ASYNC109 - public API takes a plain timeout
    ) -> bool:
        """Wait until ``predicate()`` is true; False on timeout."""
        deadline = time.monotonic() + timeout
        while True:
            if predicate():
                return True
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            ev = self._changed
            try:
                await asyncio.wait_for(ev.wait(), remaining)
            except TimeoutError:
                return predicate()
