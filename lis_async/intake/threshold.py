"""pycti's ``CONNECTOR_QUEUE_THRESHOLD``: no new jobs while OpenCTI reports the connector's
queue at or above it.

The rule is pycti's (``OpenCTIConnectorHelper.check_connector_buffering``, docs/protocol.md
§2.3): read ``connector(id) { connector_queue_details { messages_number messages_size } }``,
turn ``messages_size`` (bytes) into MB by dividing by 1,000,000, and hold while that is **at or
above** ``connector.queue_threshold`` (pycti runs only when it is below). pycti applies it before
each run of a scheduled connector; an enrichment connector has no runs, so here it holds the
consumer's intake (:meth:`lis_async.broker.consumer.Consumer.hold_intake`, reason
``"queue_threshold"``) and jobs in flight finish. There is no second mark: intake resumes at the
first check that finds the queue below the threshold.

Which queue the figure covers depends on the platform's version: the push queue, or the push
queue plus the listen queue (docs/protocol.md §2.3). Holding intake cannot lower a listen
backlog, so the hold needs **some of the connector's output waiting**: while the push queue is
empty (``push_depth``), a size at or above the threshold is not ours to lower and intake goes
on; without that, a platform that counts a deep listen queue would hold intake for good.

The queue is read every ``interval_s`` (the app passes ``connector.heartbeat_interval_s``; the
heartbeat reports the last figures, as pycti's ``ConnectorInfo`` does). A check that gets no
usable answer (the platform unreachable, a GraphQL error, a schema without the field, a
malformed answer) **releases** the hold, like pycti, which runs when its check fails: a
platform that cannot answer never stops the connector, and the push-queue watermarks
(:mod:`lis_async.intake.backpressure`) still guard RabbitMQ meanwhile. One WARNING when the hold
starts, one INFO when it ends; one WARNING when the answers stop, one INFO when they return.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any, Final

from lis_async.intake.hold import IntakeHold
from lis_async.platform.client import QueueDetails

__all__ = ["QueueThreshold"]

log: Final = logging.getLogger("lis_async.queue_threshold")


class QueueThreshold(IntakeHold):
    """The threshold rule (see the module docstring)."""

    reason = "queue_threshold"

    def __init__(
        self,
        read: Callable[[], Awaitable[QueueDetails]],
        threshold_mb: float,
        interval_s: float,
        push_depth: Callable[[], Awaitable[int | None]] | None = None,
    ) -> None:
        super().__init__()
        self._read = read
        self._push_depth = push_depth
        self.threshold_mb = threshold_mb
        self._interval = interval_s
        self.details: QueueDetails | None = None  # the last answer (None: none yet)
        self.unanswered = False  # the last check got no usable answer

    async def run(self) -> None:
        """Forever: one check, then ``interval_s`` of sleep."""
        while True:
            await self.check()
            await asyncio.sleep(self._interval)

    async def check(self) -> None:
        """Read the queue's size and hold or release intake."""
        try:
            details = await self._read()
        except Exception as exc:  # any failure, a bug in the read included, releases
            self._no_answer(exc)
            return
        if self.unanswered:
            self.unanswered = False
            log.info("OpenCTI reports the connector's queue size again")
        self.details = details
        above = details.size_mb >= self.threshold_mb
        if above and self._push_depth is not None and await self._push_depth() == 0:
            above = False  # nothing of ours waits for ingestion: the size is the listen queue's
        if above != self.engaged:
            self._set(above)

    def connector_info(self, extra_mb: float = 0.0) -> dict[str, Any]:
        """What the heartbeat's ``connectorInfo`` says of it (pycti's ``ConnectorInfo``):
        ``queue_messages_size`` is OpenCTI's figure plus ``extra_mb`` (the priority lane's size,
        which the platform does not count: docs/protocol.md §2.2)."""
        size = self.details.size_mb if self.details is not None else 0.0
        return {"buffering": self.engaged, "queue_messages_size": size + extra_mb}

    def _no_answer(self, exc: Exception) -> None:
        if not self.unanswered:
            self.unanswered = True
            log.warning(
                "OpenCTI did not report the connector's queue size (%s: %s): "
                "CONNECTOR_QUEUE_THRESHOLD is not applied until it does",
                type(exc).__name__,
                exc,
            )
        if self.engaged:
            self._set(False)

    def _announce(self, engaged: bool, held_s: float) -> None:
        d = self.details or QueueDetails(0, 0)
        if engaged:
            log.warning(
                "OpenCTI reports the connector's queue at %.4g MB (%d messages), at or above "
                "CONNECTOR_QUEUE_THRESHOLD %g MB: no new jobs until it is below",
                d.size_mb,
                d.messages,
                self.threshold_mb,
            )
        elif self.unanswered:
            log.info("no queue size from OpenCTI after %.0f s of hold: taking jobs again", held_s)
        else:
            log.info(
                "connector's queue down to %.4g MB (%d messages) after %.0f s: taking jobs again",
                d.size_mb,
                d.messages,
                held_s,
            )
