"""Publisher and consumer against the real RabbitMQ on 127.0.0.1:5672."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from typing import Any

import aio_pika
import pytest

from lis_async.broker.connection import AmqpParams
from lis_async.broker.consumer import Consumer
from lis_async.broker.publisher import Publisher
from lis_async.enrichment.delivery import Delivery
from lis_async.errors import FatalError, PublishError
from lis_async.retry import Backoff
from tests.helpers import poll

pytestmark = pytest.mark.rabbitmq
PARAMS = AmqpParams(
    host="127.0.0.1", port=5672, vhost="/", use_ssl=False, user="guest", password="guest"
)
URL = "amqp://guest:guest@127.0.0.1:5672/"


@pytest.fixture
async def broker() -> AsyncIterator[aio_pika.abc.AbstractChannel]:
    conn = await aio_pika.connect(URL)
    channel = await conn.channel()
    yield channel
    await conn.close()


async def _exchange_and_queue(
    channel: aio_pika.abc.AbstractChannel, **queue_args: Any
) -> tuple[str, str, str]:
    name = f"test-{uuid.uuid4()}"
    ex = await channel.declare_exchange(name, aio_pika.ExchangeType.DIRECT, auto_delete=True)
    q = await channel.declare_queue(name, auto_delete=True, arguments=queue_args or None)
    await q.bind(ex, routing_key="rk")
    return name, name, "rk"


async def test_publisher_confirms_persistent_messages(broker: aio_pika.abc.AbstractChannel) -> None:
    ex, qname, rk = await _exchange_and_queue(broker)
    pub = Publisher(PARAMS, ex, rk)
    await pub.start()
    try:
        assert pub.connected
        bodies = [f"m{i}".encode() for i in range(20)]
        await pub.publish(Delivery(tuple(bodies), incompatible=0))
    finally:
        await pub.close()
    queue = await broker.get_queue(qname, ensure=False)
    got = []
    for _ in range(20):
        msg = await queue.get(timeout=5)
        assert msg is not None
        assert msg.delivery_mode == aio_pika.DeliveryMode.PERSISTENT
        assert msg.content_encoding == "utf-8"
        got.append(msg.body)
        await msg.ack()
    assert sorted(got) == sorted(bodies)


async def test_unroutable_publish_is_an_error(broker: aio_pika.abc.AbstractChannel) -> None:
    ex, _, _ = await _exchange_and_queue(broker)
    pub = Publisher(PARAMS, ex, "no-such-binding")
    await pub.start()
    try:
        with pytest.raises(PublishError) as info:
            await pub.publish_once([b"a", b"b"])
        assert info.value.unconfirmed == (b"a", b"b")
    finally:
        await pub.close()


async def test_full_queue_with_reject_publish_names_the_failed_messages(
    broker: aio_pika.abc.AbstractChannel,
) -> None:
    ex, _, rk = await _exchange_and_queue(
        broker, **{"x-max-length": 2, "x-overflow": "reject-publish"}
    )
    pub = Publisher(PARAMS, ex, rk)
    await pub.start()
    try:
        await pub.publish_once([b"1", b"2"])
        with pytest.raises(PublishError) as info:
            await pub.publish_once([b"3"])
        assert info.value.unconfirmed == (b"3",)
    finally:
        await pub.close()


async def test_publish_retries_only_the_unconfirmed_messages_until_confirmed(
    broker: aio_pika.abc.AbstractChannel, caplog: pytest.LogCaptureFixture
) -> None:
    ex, qname, rk = await _exchange_and_queue(
        broker, **{"x-max-length": 2, "x-overflow": "reject-publish"}
    )
    await (await broker.get_exchange(ex)).publish(aio_pika.Message(b"old"), routing_key=rk)
    pub = Publisher(PARAMS, ex, rk, backoff=Backoff(base_s=0.05, max_s=0.2))
    await pub.start()
    queue = await broker.get_queue(qname, ensure=False)
    got: list[bytes] = []
    try:
        # One place left: "1" is confirmed, "2" and "3" are nacked and retried until there is
        # room. Nothing is taken from the queue before the publisher said it retries.
        task = asyncio.create_task(pub.publish(Delivery((b"1", b"2", b"3"), incompatible=0)))
        async with asyncio.timeout(20):
            while not any("retrying 2 message(s)" in r.getMessage() for r in caplog.records):  # noqa: ASYNC110 (a log line, no event to wait on)
                await asyncio.sleep(0.02)
            while len(got) < 4:
                msg = await queue.get(timeout=10, fail=False)
                if msg is None:
                    await asyncio.sleep(0.02)
                    continue
                got.append(msg.body)
                await msg.ack()
            await task
    finally:
        await pub.close()
    assert sorted(got) == [b"1", b"2", b"3", b"old"]  # each once: "1" was not published again
    assert await queue.get(timeout=1, fail=False) is None


async def _listen_queue(channel: aio_pika.abc.AbstractChannel, n: int) -> str:
    name = f"test-listen-{uuid.uuid4()}"
    await channel.declare_queue(name, auto_delete=False, durable=True)
    for i in range(n):
        await channel.default_exchange.publish(
            aio_pika.Message(f"job{i}".encode()), routing_key=name
        )
    return name


async def test_consumer_respects_prefetch_and_acks_after_the_handler(
    broker: aio_pika.abc.AbstractChannel,
) -> None:
    name = await _listen_queue(broker, 10)
    running = 0
    peak = 0
    release = asyncio.Event()
    seen: list[bytes] = []

    async def handler(body: bytes, redelivered: bool) -> None:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        await release.wait()
        seen.append(body)
        running -= 1

    consumer = Consumer(PARAMS, name, 4, handler, on_fatal=lambda _: None)
    await consumer.start()
    try:
        assert await poll(lambda: running == 4, 30), running
        assert consumer.in_flight == 4
        # Prefetch bounds the jobs in flight: a short look finds no fifth handler started, and
        # the broker holds the other 6 back (4 unacked are not counted as ready). The look must
        # stay quiet; a loaded machine can only make it see less, never fail it.
        await asyncio.sleep(0.2)
        assert peak == 4
        queue = await broker.declare_queue(name, durable=True, passive=True)
        assert queue.declaration_result.message_count == 6
        release.set()
        assert await poll(lambda: len(seen) == 10 and consumer.in_flight == 0, 30), (
            len(seen),
            consumer.in_flight,
        )
    finally:
        await consumer.stop_intake()
        await consumer.drain(5)
        await consumer.close()
    queue = await broker.declare_queue(name, durable=True, passive=True)
    assert queue.declaration_result.message_count == 0  # all acked
    await queue.delete(if_unused=False, if_empty=False)


async def test_fatal_error_requeues_and_stops_intake(broker: aio_pika.abc.AbstractChannel) -> None:
    name = await _listen_queue(broker, 1)
    fatal: list[str] = []

    async def handler(body: bytes, redelivered: bool) -> None:
        raise FatalError("LastInfoSec rejected the API key")

    consumer = Consumer(PARAMS, name, 1, handler, on_fatal=fatal.append)
    await consumer.start()
    try:
        assert await poll(lambda: bool(fatal), 30)
        assert fatal == ["LastInfoSec rejected the API key"]
        assert not consumer.accepting
    finally:
        await consumer.stop_intake()
        await consumer.drain(1)
        await consumer.close()
    queue = await broker.declare_queue(name, durable=True, passive=True)
    assert queue.declaration_result.message_count == 1  # back in the queue, not lost
    await queue.delete(if_unused=False, if_empty=False)


async def test_drain_deadline_returns_unfinished_jobs_to_the_queue(
    broker: aio_pika.abc.AbstractChannel,
) -> None:
    name = await _listen_queue(broker, 3)

    async def handler(body: bytes, redelivered: bool) -> None:
        await asyncio.sleep(60)

    consumer = Consumer(PARAMS, name, 3, handler, on_fatal=lambda _: None)
    await consumer.start()
    try:
        assert await poll(lambda: consumer.in_flight == 3, 30), consumer.in_flight
        await consumer.stop_intake()
        # The handlers sleep 60 s: a 0.2 s deadline cuts them short however slow the machine.
        cancelled = await consumer.drain(0.2)
    finally:
        await consumer.close()
    assert cancelled == 3
    queue = await broker.declare_queue(name, durable=True, passive=True)
    assert queue.declaration_result.message_count == 3
    await queue.delete(if_unused=False, if_empty=False)
