"""Backpressure toward the platform: no new jobs while the push queue is full.

Each job turns into about a dozen push messages. If OpenCTI's workers fall behind, the push queue
would grow without bound, and a RabbitMQ memory or disk alarm then blocks every publisher on the
broker, the platform included. So intake is held
(:meth:`lis_async.broker.consumer.Consumer.hold_intake`)
while the push queue holds more than ``connector.push_high_watermark`` messages, and released
below ``connector.push_low_watermark``; jobs in flight finish.

The depth is sampled every ``interval_s`` (a passive declare) and, between samples, estimated
from what this worker published since: the hold starts at the publish that crosses the mark, not
up to a sample later, so the queue passes the high watermark by at most the jobs already in
flight (other replicas' publishes show at the next sample). One WARNING when the hold starts,
one INFO when it ends.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Final

from lis_async.intake.hold import IntakeHold

log: Final = logging.getLogger("lis_async.backpressure")


class Backpressure(IntakeHold):
    """Push-queue watermarks (see the module docstring)."""

    reason = "backpressure"

    def __init__(
        self,
        depth: Callable[[], Awaitable[int | None]],
        high: int,
        low: int,
        interval_s: float = 1.0,
    ) -> None:
        super().__init__()
        self._depth = depth
        self._high, self._low = high, low
        self._interval = interval_s
        self.sampled = 0  # depth at the last sample
        self._since_sample = 0  # messages this worker published since

    @property
    def estimate(self) -> int:
        return self.sampled + self._since_sample

    def published(self, messages: int) -> None:
        """The publisher's hook: ``messages`` more are in the push queue."""
        self._since_sample += messages
        if not self.engaged and self.estimate > self._high:
            self._set(True)

    async def run(self) -> None:
        """Forever: sample the depth and hold or release intake."""
        while True:
            depth = await self._depth()
            if depth is not None:
                self.sampled, self._since_sample = depth, 0
                if not self.engaged and depth > self._high:
                    self._set(True)
                elif self.engaged and depth < self._low:
                    self._set(False)
            await asyncio.sleep(self._interval)

    def _announce(self, engaged: bool, held_s: float) -> None:
        if engaged:
            log.warning(
                "push queue holds about %d messages (high watermark %d): no new jobs until "
                "OpenCTI's workers bring it below %d",
                self.estimate,
                self._high,
                self._low,
            )
        else:
            log.info(
                "push queue down to %d messages after %.0f s: taking jobs again",
                self.sampled,
                held_s,
            )
