"""Priority lanes: manual and playbook jobs overtake the auto-enrichment backlog.

The platform's listen queue is first in, first out, and the connector cannot change it
(docs/protocol.md §1.3). So the :class:`Mover` takes every job from the listen queue and
republishes it, unchanged, into one connector-owned classic priority queue, the lane
(:func:`lane_name`), at priority :data:`URGENT` for a manual or playbook job and
:data:`NORMAL` otherwise; the worker (:class:`lis_async.broker.consumer.Consumer`) consumes the
lane,
where RabbitMQ delivers the highest priority first, however deep the backlog.

At least once: the listen delivery is acked only after the broker confirmed the lane publish
(persistent, ``mandatory``: a lane that has gone returns it instead of dropping it). A crash in
between leaves a copy in each queue: duplicates are bounded by :data:`MOVE_PREFETCH`, and the
copy redelivered from the listen queue carries :data:`REDELIVERED_HEADER` so that the pipeline
treats it as the redelivery it is (it adds only the expectations its work lacks).

Design and trade-offs: docs/architecture.md, "Priority lanes".
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Callable
from typing import Any, Final

import aio_pika
import orjson
from aio_pika.abc import (
    AbstractChannel,
    AbstractIncomingMessage,
    AbstractQueue,
    AbstractRobustConnection,
)

from lis_async.broker.connection import reason, settle

log: Final = logging.getLogger("lis_async.lanes")

NORMAL: Final = 0  # auto enrichment
URGENT: Final = 1  # a manual job (an analyst is waiting) or a playbook step
#: Set on a lane message whose listen delivery was a redelivery (the lane's own flag is not).
REDELIVERED_HEADER: Final = "x-lis-redelivered"
#: The lane deletes itself after this long without a consumer (RabbitMQ's x-expires); the jobs
#: it still holds go with it, so it is long: a week covers any planned stop (it was the setting
#: CONNECTOR_LANES_EXPIRE_S, see lis_async/settings/removed.py).
EXPIRE_S: Final = 604_800.0
#: Listen deliveries being moved at once. Publishes are pipelined (their confirms are awaited
#: together) and a move starts per loop turn (see Mover._move), so a small prefetch keeps the
#: mover at its best while the broker's bursts of deliveries stay small: aiormq reads a burst
#: in one step, and a large step delays everything else on the event loop. It also bounds the
#: duplicates a crash can leave.
MOVE_PREFETCH: Final = 16
#: A lane publish not confirmed within this long (a broker alarm blocks publishers) gives its
#: listen delivery back to the queue rather than hold it toward the consumer timeout.
PUBLISH_TIMEOUT_S: Final = 60.0


def lane_name(connector_id: str) -> str:
    """The lane of a connector. The platform's queues are ``listen_<id>`` and ``push_<id>``
    (docs/protocol.md §1.3): a name with a dot and this prefix cannot be one of them."""
    return f"lis-async.lanes.{connector_id}"


def lane_arguments(expire_s: float) -> dict[str, Any]:
    """The lane's arguments. Every replica declares the lane with the same ones (a different
    set is refused by the broker: see :func:`declare_lane`). A classic queue, named
    explicitly: a vhost whose default queue type is quorum would otherwise ignore the
    priorities."""
    return {
        "x-queue-type": "classic",
        "x-max-priority": URGENT,
        "x-expires": int(expire_s * 1000),
    }


def priority(body: bytes) -> int:
    """:data:`URGENT` for a manual job or a playbook step, else :data:`NORMAL`. A body that
    cannot be read is moved as it is, at the normal priority: the pipeline acks it and marks
    its work in error."""
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError:
        return NORMAL
    internal = doc.get("internal") if isinstance(doc, dict) else None
    if not isinstance(internal, dict):
        return NORMAL
    if internal.get("mode") == "manual" or internal.get("playbook") is not None:
        return URGENT
    return NORMAL


def redelivered(message: AbstractIncomingMessage) -> bool:
    """A lane (or listen) message is a redelivery if the broker says so, or if the listen
    delivery it was moved from was one."""
    return bool(message.redelivered) or bool(
        message.headers and message.headers.get(REDELIVERED_HEADER)
    )


async def declare_lane(
    conn: AbstractRobustConnection, channel: AbstractChannel, name: str, expire_s: float
) -> AbstractQueue:
    """Declare the lane on ``channel`` (idempotent). If it exists with other arguments
    (another expiry, set by an older version on another replica), use it as it
    is, with a warning: refusing to start would strand the jobs it holds. The arguments are
    tried on a throw-away channel first, since a refused declare closes its channel."""
    arguments = lane_arguments(expire_s)
    try:
        async with conn.channel(publisher_confirms=False) as probe:
            await probe.declare_queue(name, durable=True, arguments=arguments)
    except aio_pika.exceptions.ChannelPreconditionFailed as exc:
        log.warning("the lane %s exists with other arguments; using it as it is (%s)", name, exc)
        return await channel.declare_queue(name, passive=True)
    return await channel.declare_queue(name, durable=True, arguments=arguments)


class Mover:
    """Moves every job from the listen queue into the lane (see the module docstring)."""

    def __init__(
        self,
        listen: str,
        lane: str,
        expire_s: float,
        *,
        on_moved: Callable[[int], None] = lambda _priority: None,
        publish_timeout_s: float = PUBLISH_TIMEOUT_S,
    ) -> None:
        self._listen = listen
        self._lane = lane
        self._expire_s = expire_s
        self._on_moved = on_moved
        self._publish_timeout = publish_timeout_s
        self._conn: AbstractRobustConnection | None = None
        self._channel: AbstractChannel | None = None
        self._queue: AbstractQueue | None = None
        self._tag: str | None = None
        self._moving = 0
        self._turn = asyncio.Lock()  # one move starts per loop turn (see _move)
        self._idle = asyncio.Event()
        self._idle.set()
        self.moved = 0  # jobs moved (confirmed in the lane) by this mover
        self.moved_bytes = 0  # ... and the size of their bodies

    @property
    def mean_body_bytes(self) -> float | None:
        """The mean body size of the jobs this mover moved (None before the first)."""
        return self.moved_bytes / self.moved if self.moved else None

    async def start(self, conn: AbstractRobustConnection) -> None:
        """Declare the lane and start moving, on a channel of its own on ``conn``."""
        channel = await conn.channel(publisher_confirms=True, on_return_raises=True)
        self._conn, self._channel = conn, channel
        await channel.set_qos(prefetch_count=MOVE_PREFETCH)
        await declare_lane(conn, channel, self._lane, self._expire_s)
        # Passive: the platform owns the listen queue (see lis_async.broker.consumer).
        self._queue = await channel.declare_queue(self._listen, passive=True)
        self._tag = await self._queue.consume(self._move, no_ack=False)

    async def _move(self, message: AbstractIncomingMessage) -> None:
        # aiormq runs each delivery's callback as a task of its own, so moves overlap (their
        # confirms are awaited together). But they start one per turn of the event loop: a
        # prefetch's worth of deliveries arrives at once, and starting them all in one turn
        # would delay every other task by as much (a LastInfoSec request the rate limiter just
        # granted would leave tens of milliseconds late, and could then fall in the next second
        # at the API with the window's grants).
        self._moving += 1
        self._idle.clear()
        try:
            async with self._turn:
                await asyncio.sleep(0)
            await self._move_one(message)
        finally:
            self._moving -= 1
            if not self._moving:
                self._idle.set()

    async def _move_one(self, message: AbstractIncomingMessage) -> None:
        channel = self._channel
        if channel is None or self._tag is None:
            await settle(message.nack(requeue=True))
            return
        level = priority(message.body)
        out = aio_pika.Message(
            message.body,
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            priority=level,
            # mandatory publishes need an id: the broker's return names the message by it
            message_id=uuid.uuid4().hex,
            headers={REDELIVERED_HEADER: True} if message.redelivered else None,
        )
        try:
            await channel.default_exchange.publish(
                out, self._lane, mandatory=True, timeout=self._publish_timeout
            )
        except Exception as exc:  # not confirmed: the job stays in the listen queue
            log.warning("moving a job into the lane failed (%s); it is requeued", reason(exc))
            await settle(message.nack(requeue=True))
            if isinstance(exc, aio_pika.exceptions.PublishError):  # the lane is gone
                await self._redeclare()
            return
        await settle(message.ack())
        self.moved += 1
        self.moved_bytes += len(message.body)
        self._on_moved(level)

    async def _redeclare(self) -> None:
        conn, channel = self._conn, self._channel
        if conn is not None and channel is not None:
            try:
                await declare_lane(conn, channel, self._lane, self._expire_s)
            except Exception as exc:
                log.warning("declaring the lane %s again failed: %s", self._lane, reason(exc))

    async def stop(self, timeout_s: float = 10.0) -> None:
        """Stop taking listen deliveries and let the moves under way finish (their deliveries
        are requeued by the broker if they do not)."""
        queue, tag, self._tag = self._queue, self._tag, None
        if queue is not None and tag is not None:
            try:
                await queue.cancel(tag)
            except Exception as exc:
                log.info("cancelling the mover failed: %s", reason(exc))
        try:
            await asyncio.wait_for(self._idle.wait(), timeout_s)
        except TimeoutError:
            pass
