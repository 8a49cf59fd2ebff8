"""The push-queue publisher: persistent messages, publisher confirms, retries until confirmed.

Implements :class:`~lis_async.enrichment.ports.PublisherPort`. The messages themselves are built by
:mod:`lis_async.enrichment.delivery` (pycti's splitter and envelope).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence

import aiormq
import aiormq.abc
from aio_pika.abc import AbstractRobustChannel, AbstractRobustConnection
from pamqp import commands as spec

from lis_async.broker.connection import AmqpParams, BrokerWatch, connect, queue_depth
from lis_async.enrichment.delivery import Delivery
from lis_async.errors import PublishError
from lis_async.retry import Backoff

log = logging.getLogger("lis_async.publisher")


class Publisher:
    """Publishes deliveries to the push exchange and returns once the broker confirmed them.

    One long-lived channel with confirms, on its own connection: RabbitMQ's flow control blocks
    publishing connections, and keeping it apart from the consumer's keeps acks flowing. The
    messages of one delivery go out concurrently and each is confirmed; a nack, an unroutable
    message (``mandatory``) or a missing confirm is a failure, and just those messages are
    published again after a back-off, for as long as it takes.
    """

    def __init__(
        self,
        params: AmqpParams,
        exchange: str,
        routing_key: str,
        *,
        confirm_timeout_s: float = 60.0,
        backoff: Backoff | None = None,
        watch: BrokerWatch | None = None,
        on_published: Callable[[int], None] | None = None,
    ) -> None:
        self._watch = watch
        self._on_published = on_published  # messages confirmed (backpressure's estimate)
        self._params = params
        self._exchange_name = exchange
        self._routing_key = routing_key
        self._timeout = confirm_timeout_s
        self._backoff = backoff or Backoff()
        self._conn: AbstractRobustConnection | None = None
        self._channel: AbstractRobustChannel | None = None

    async def start(self) -> None:
        if self._conn is not None:
            return
        self._conn = await connect(self._params, "lis-async publisher")
        if self._watch is not None:
            self._watch.watch(self._conn, "publisher")
        channel = await self._conn.channel(publisher_confirms=True, on_return_raises=True)
        self._channel = channel  # type: ignore[assignment]

    async def close(self) -> None:
        conn, self._conn = self._conn, None
        self._channel = None
        if conn is not None:
            await conn.close()

    async def queue_depth(self, queue_name: str) -> int | None:
        """Messages waiting in the push queue ``queue_name`` (None when it cannot be read)."""
        return await queue_depth(self._conn, queue_name)

    @property
    def connected(self) -> bool:
        return (
            self._conn is not None
            and not self._conn.is_closed
            and self._channel is not None
            and not self._channel.is_closed
        )

    async def publish(self, delivery: Delivery) -> None:
        """Every message of ``delivery`` confirmed; what failed is retried with back-off."""
        pending: Sequence[bytes] = delivery.bodies
        attempt = 0
        while pending:
            try:
                await self.publish_once(pending)
                if self._on_published is not None:
                    self._on_published(len(delivery.bodies))
                return
            except PublishError as exc:
                pending = exc.unconfirmed
                attempt += 1
                delay = self._backoff.delay(attempt)
                # While the broker connection is down BrokerWatch said so once: no line per job.
                quiet = self._watch is not None and self._watch.down
                log.log(
                    logging.DEBUG if quiet else logging.WARNING,
                    "work %s: %s; retrying %d message(s) in %.1fs",
                    delivery.work_id,
                    exc,
                    len(pending),
                    delay,
                )
                await asyncio.sleep(delay)

    async def publish_once(self, bodies: Sequence[bytes]) -> None:
        """One try: publish ``bodies`` concurrently, each confirmed. Raises
        :class:`~lis_async.errors.PublishError` holding the messages that were not confirmed."""
        channel = self._channel
        if channel is None or channel.is_closed:
            raise PublishError(bodies, "publisher channel is not open")
        try:
            # aio-pika's Exchange.publish builds a Message object per body only to hand its
            # body and properties to this same aiormq call, and a job publishes one message per
            # STIX object: the hot path calls aiormq directly. The robust channel's current
            # underlying channel is asked for at every delivery (reconnections).
            underlay = await channel.get_underlay_channel()
            # One deadline for the whole delivery rather than a timer per message.
            async with asyncio.timeout(self._timeout):
                results = await asyncio.gather(
                    *(self._publish_one(underlay, body) for body in bodies),
                    return_exceptions=True,
                )
        except TimeoutError:
            raise PublishError(bodies, f"no confirm within {self._timeout:.0f}s") from None
        except aiormq.exceptions.AMQPError as exc:
            raise PublishError(bodies, f"{type(exc).__name__}: {exc}"[:300]) from None
        failed = [b for b, r in zip(bodies, results, strict=True) if isinstance(r, BaseException)]
        if failed:
            first = next(r for r in results if isinstance(r, BaseException))
            if isinstance(first, asyncio.CancelledError):
                raise first
            raise PublishError(failed, f"{type(first).__name__}: {first}"[:300])

    async def _publish_one(self, channel: aiormq.abc.AbstractChannel, body: bytes) -> None:
        result = await channel.basic_publish(
            body,
            exchange=self._exchange_name,
            routing_key=self._routing_key,
            properties=spec.Basic.Properties(delivery_mode=2, content_encoding="utf-8"),
            mandatory=True,  # unroutable -> Basic.Return -> an error, never a silent drop
        )
        # A confirm channel answers Basic.Ack; a nack raises, anything else is a failure.
        if not isinstance(result, spec.Basic.Ack):
            raise RuntimeError(f"broker answered {type(result).__name__}")
