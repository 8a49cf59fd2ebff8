"""AMQP intake: consume the listen queue, run each job as an owned task, settle it in one place.

Ack policy (the only place that acks, nacks or requeues):

* the handler returned a result -> ack (the job's work was reported processed, or its body was
  unreadable and is acked so it can never loop);
* the handler raised ``FatalError`` -> requeue, and tell the app to stop taking jobs;
* the task was cancelled (shutdown deadline) -> requeue;
* anything unexpected -> requeue once; a message that was already redelivered is rejected
  without requeue (logged loudly) so a bug can never loop;
* held longer than ``max_hold_s`` (the watchdog, :meth:`Consumer.watch`) -> cancelled, so
  requeued, before RabbitMQ's ``consumer_timeout`` closes the channel on every job in flight.

It consumes the platform's listen queue, or with priority lanes the connector's lane
(:mod:`lis_async.broker.lanes`): ``declare`` says which.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

from aio_pika.abc import (
    AbstractChannel,
    AbstractIncomingMessage,
    AbstractQueue,
    AbstractRobustChannel,
    AbstractRobustConnection,
)

from lis_async.broker.connection import AmqpParams, BrokerWatch, connect, queue_depth, settle
from lis_async.broker.lanes import redelivered
from lis_async.errors import FatalError

log = logging.getLogger("lis_async.consumer")

Handler = Callable[[bytes, bool], Awaitable[object]]
#: Declares the consumed queue on the consuming channel (the lane); None: a passive declare
#: of the platform's listen queue.
Declare = Callable[[AbstractRobustConnection, AbstractChannel], Awaitable[AbstractQueue]]


class Consumer:
    """Consumes the listen queue with manual acks and ``prefetch`` jobs in flight; runs each
    delivery as an owned task and settles it by the ack policy above. ``stop_intake`` then
    ``drain`` stop it in order; the broker redelivers whatever was not acked."""

    def __init__(
        self,
        params: AmqpParams,
        queue_name: str,
        prefetch: int,
        handler: Handler,
        on_fatal: Callable[[str], None],
        *,
        watch: BrokerWatch | None = None,
        declare: Declare | None = None,
    ) -> None:
        self._watch = watch
        self._declare = declare
        self._params = params
        self._queue_name = queue_name
        self._prefetch = prefetch
        self._handler = handler
        self._on_fatal = on_fatal
        self._conn: AbstractRobustConnection | None = None
        self._channel: AbstractRobustChannel | None = None
        self._queue: AbstractQueue | None = None
        self._tag: str | None = None
        self._tasks: dict[asyncio.Task[None], float] = {}  # -> monotonic time of delivery
        self._idle = asyncio.Event()
        self._idle.set()
        self.accepting = False
        self._holds: set[str] = set()  # reasons intake is paused (hold_intake)
        self._intake_lock = asyncio.Lock()

    @property
    def in_flight(self) -> int:
        return len(self._tasks)

    @property
    def prefetch(self) -> int:
        """Deliveries taken at once (the channel's QoS)."""
        return self._prefetch

    @property
    def connection(self) -> AbstractRobustConnection | None:
        """The broker connection (the lane mover opens its channel on it)."""
        return self._conn

    @property
    def queue_name(self) -> str:
        return self._queue_name

    @property
    def connected(self) -> bool:
        conn, channel = self._conn, self._channel
        return (
            conn is not None
            and conn.connected.is_set()
            and channel is not None
            and not channel.is_closed
        )

    async def queue_depth(self) -> int | None:
        """Messages waiting in the consumed queue. A passive declare on a throw-away channel: it
        never changes the queue, and an error cannot close the consuming channel."""
        return await queue_depth(self._conn, self._queue_name)

    async def start(self) -> None:
        self._conn = await connect(self._params, "lis-async consumer")
        if self._watch is not None:
            self._watch.watch(self._conn, "consumer")
        channel = await self._conn.channel(publisher_confirms=False)
        self._channel = channel  # type: ignore[assignment]
        channel.close_callbacks.add(self._channel_closed)
        await channel.set_qos(prefetch_count=self._prefetch)
        # The listen queue is never declared: the platform owns it and its arguments
        # (docs/protocol.md §1.3). A passive declare only checks that it exists, and registers it
        # with the robust channel: without that, aio-pika does not restore the consumer after a
        # reconnection (it would stay connected and idle forever).
        if self._declare is not None:
            self._queue = await self._declare(self._conn, channel)
        else:
            self._queue = await channel.declare_queue(self._queue_name, passive=True)
        self.accepting = True
        async with self._intake_lock:
            if not self._holds:
                self._tag = await self._queue.consume(self._on_message, no_ack=False)

    def _channel_closed(self, sender: object, exc: BaseException | None = None) -> None:
        """The broker closed the consuming channel alone (the connection lives on: a lost
        connection is :class:`BrokerWatch`'s to report), e.g. at RabbitMQ's consumer_timeout.
        aio-pika reopens it; the broker redelivers every job that was in flight."""
        conn = self._conn
        if exc is None or isinstance(exc, asyncio.CancelledError) or conn is None:
            return
        if conn.is_closed or not conn.connected.is_set():
            return
        log.warning(
            "the broker closed the consuming channel (%s): reopening it; its %d job(s) in "
            "flight are redelivered",
            str(exc)[:300] or type(exc).__name__,
            len(self._tasks),
        )

    async def _on_message(self, message: AbstractIncomingMessage) -> None:
        if not self.accepting:
            await message.nack(requeue=True)
            return
        task = asyncio.create_task(self._settle(message))
        self._tasks[task] = time.monotonic()
        self._idle.clear()
        task.add_done_callback(self._forget)

    def _forget(self, task: asyncio.Task[None]) -> None:
        self._tasks.pop(task, None)
        if not self._tasks:
            self._idle.set()

    async def _settle(self, message: AbstractIncomingMessage) -> None:
        try:
            await self._handler(message.body, redelivered(message))
        except FatalError as exc:
            self.accepting = False
            await settle(message.nack(requeue=True))
            self._on_fatal(str(exc))
            return
        except asyncio.CancelledError:
            await asyncio.shield(settle(message.nack(requeue=True)))
            raise
        except Exception:
            requeue = not redelivered(message)
            log.exception(
                "unexpected error while processing a job; %s",
                "requeued once" if requeue else "rejected (already redelivered)",
            )
            await settle(message.nack(requeue=requeue))
            return
        # Shielded: once the work is processed, the ack must go out even during shutdown.
        await asyncio.shield(settle(message.ack()))

    async def watch(self, max_hold_s: float) -> None:
        """Forever: requeue (by cancelling) every job held longer than ``max_hold_s``. A job
        that waits that long waits on an outage or a slow rate; RabbitMQ would otherwise close
        the channel at its ``consumer_timeout`` and redeliver every job in flight at once."""
        every = min(5.0, max_hold_s / 10)
        while True:
            await asyncio.sleep(every)
            limit = time.monotonic() - max_hold_s
            old = [task for task, since in self._tasks.items() if since < limit]
            for task in old:
                task.cancel()
            if old:
                log.warning(
                    "%d job(s) held for more than %.0f s requeued, before RabbitMQ's "
                    "consumer_timeout (CONNECTOR_CONSUMER_TIMEOUT_S) closes the channel",
                    len(old),
                    max_hold_s,
                )

    async def hold_intake(self, reason: str, hold: bool) -> None:
        """Stop taking deliveries while any ``reason`` holds intake (the platform is down, the
        push queue is full: :mod:`lis_async.intake.hold`); jobs in flight go on. Take them
        again once none holds it."""
        async with self._intake_lock:
            if hold:
                self._holds.add(reason)
            else:
                self._holds.discard(reason)
            queue = self._queue
            if queue is None:
                return
            if self._holds and self._tag is not None:
                tag, self._tag = self._tag, None
                try:
                    await queue.cancel(tag)
                except Exception as exc:  # the channel is gone: nothing is delivered anyway
                    log.info("pausing intake failed: %s", exc)
            elif not self._holds and self._tag is None and self.accepting:
                self._tag = await queue.consume(self._on_message, no_ack=False)

    async def switch(self, queue_name: str, declare: Declare | None) -> None:
        """Consume ``queue_name`` instead (declared by ``declare``, else passively), on the same
        channel: the jobs in flight from the old queue go on and are settled as usual. Nothing
        changes if the declare fails. The priority lanes use it to leave a lane whose name a
        foreign queue holds for the listen queue, and to come back (lis_async.app)."""
        conn, channel = self._conn, self._channel
        if conn is None or channel is None:
            raise RuntimeError("the consumer is not started")
        if declare is not None:
            queue = await declare(conn, channel)
        else:
            queue = await channel.declare_queue(queue_name, passive=True)
        async with self._intake_lock:
            old, tag, self._tag = self._queue, self._tag, None
            if old is not None and tag is not None:
                try:
                    await old.cancel(tag)
                except Exception as exc:
                    log.info("cancelling the consumer of %s failed: %s", self._queue_name, exc)
            self._queue, self._queue_name, self._declare = queue, queue_name, declare
            if not self._holds and self.accepting:
                self._tag = await queue.consume(self._on_message, no_ack=False)

    @property
    def paused(self) -> bool:
        """True while something holds intake (see :meth:`hold_intake`)."""
        return bool(self._holds)

    async def stop_intake(self) -> None:
        """Stop taking jobs at once; jobs in flight go on."""
        self.accepting = False
        queue, tag, self._tag = self._queue, self._tag, None
        if queue is not None and tag is not None:
            try:
                await queue.cancel(tag)
            except Exception as exc:
                log.info("cancelling the consumer failed: %s", exc)

    async def drain(self, timeout_s: float) -> int:
        """Wait for jobs in flight up to ``timeout_s``; cancel the rest (they are requeued).
        Returns how many were cancelled."""
        if self._tasks:
            try:
                await asyncio.wait_for(self._idle.wait(), timeout_s)
            except TimeoutError:
                pass
        left = list(self._tasks)
        for task in left:
            task.cancel()
        if left:
            await asyncio.gather(*left, return_exceptions=True)
        return len(left)

    async def close(self) -> None:
        conn, self._conn = self._conn, None
        self._channel = None
        self._queue = None
        if conn is not None:
            await conn.close()
