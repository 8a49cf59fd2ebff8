"""Publishes in batches with pipelined confirms, on an aiormq channel (the lane mover's).

aiormq's ``basic_publish`` is built for one publish at a time: per message it takes the
channel's lock, enters a timeout and a close-watch context, generates a message id, queues one
frame for the writer and awaits the confirm. The mover publishes thousands a second on a
channel that nothing else publishes on, so :class:`BatchPublisher` does the same bookkeeping
once per loop turn for every copy asked for in it: it numbers them (the channel's publish
sequence, which the broker's confirms name), registers each one's confirm future and message
id with the channel exactly as ``basic_publish`` does (so aiormq's own handling of acks, nacks,
returns and a closed channel settles them), and hands the writer one buffer for the whole
batch (BENCHMARKS.md, "The mover (issue #21)").

It relies on these attributes of ``aiormq.Channel`` (aiormq is pinned in constraints.txt;
tests/integration/test_mover.py runs this path against RabbitMQ): ``delivery_tag``,
``confirmations``, ``message_id_delivery_tag``, ``create_future``, ``write_queue``,
``number``, ``max_content_size``, ``is_closed``.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Iterable
from typing import Any

import aiormq
import aiormq.exceptions
from aiormq.abc import ChannelFrame, ConfirmationFrameType
from pamqp import commands as spec
from pamqp.body import ContentBody
from pamqp.header import ContentHeader


class BatchPublisher:
    """Mandatory publishes to one queue through the default exchange, confirmed one by one,
    written once per loop turn. Nothing else may publish on ``channel``."""

    __slots__ = ("_batch", "_routing_key", "_scheduled", "_tail", "channel")

    def __init__(self, channel: aiormq.Channel, routing_key: str) -> None:
        self.channel = channel
        self._routing_key = routing_key
        self._batch: list[tuple[asyncio.Future[Any], bytes, spec.Basic.Properties]] = []
        self._scheduled = False
        #: the write of an earlier batch that waits for room in the writer's queue: the next
        #: batches go after it (the broker numbers publishes in the order they arrive)
        self._tail: asyncio.Future[None] | None = None

    def publish(
        self, body: bytes, properties: spec.Basic.Properties
    ) -> asyncio.Future[ConfirmationFrameType]:
        """Queue one publish; the future is the broker's confirm: the ack frame, or
        ``PublishError`` (returned: no such queue), ``DeliveryError`` (nacked) or a channel
        error. Cancelling it before the batch is written drops the publish."""
        channel = self.channel
        if channel.is_closed:
            raise aiormq.exceptions.ChannelInvalidStateError(f"{channel!r} closed")
        future: asyncio.Future[ConfirmationFrameType] = channel.create_future()
        self._batch.append((future, body, properties))
        if not self._scheduled:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)
        return future

    def _flush(self) -> None:
        self._scheduled = False
        batch, self._batch = self._batch, []
        channel = self.channel
        frames: list[spec.Basic.Publish | ContentHeader | ContentBody] = []
        if channel.is_closed:
            closed = aiormq.exceptions.ChannelInvalidStateError(f"{channel!r} closed")
            for future, _, _ in batch:
                if not future.done():
                    future.set_exception(closed)
            return
        for future, body, properties in batch:
            if future.done():  # cancelled meanwhile: never sent
                continue
            channel.delivery_tag += 1
            tag = channel.delivery_tag
            # A mandatory publish's return names the message by its id: the sequence number is
            # unique on the channel.
            properties.message_id = message_id = str(tag)
            channel.confirmations[tag] = future
            channel.message_id_delivery_tag[message_id] = tag
            future.add_done_callback(
                functools.partial(_forget, channel.message_id_delivery_tag, message_id, tag)
            )
            frames.append(spec.Basic.Publish(routing_key=self._routing_key, mandatory=True))
            frames.append(ContentHeader(properties=properties, body_size=len(body)))
            frames.extend(_split(body, channel.max_content_size))
        if frames:
            self._write(ChannelFrame.marshall(channel_number=channel.number, frames=frames))

    def _write(self, frame: ChannelFrame) -> None:
        tail = self._tail
        if tail is None or tail.done():
            try:
                self.channel.write_queue.put_nowait(frame)
                return
            except asyncio.QueueFull:  # the writer is behind: wait for room, in order
                pass
        self._tail = asyncio.ensure_future(self._write_after(tail, frame))

    async def _write_after(self, before: asyncio.Future[None] | None, frame: ChannelFrame) -> None:
        if before is not None:
            await before
        await self.channel.write_queue.put(frame)


def _forget(ids: dict[str, int], message_id: str, tag: int, _future: object) -> None:
    if ids.get(message_id) == tag:
        del ids[message_id]


def _split(body: bytes, size: int) -> Iterable[ContentBody]:
    if not body:
        return ()
    return (ContentBody(body[i : i + size]) for i in range(0, len(body), size))
