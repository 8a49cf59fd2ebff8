"""The lane mover against the real RabbitMQ (issue #21, item 3): every job moved once, at its
priority, the listen deliveries acked many at a time and none left unacked; a redelivery keeps
its marker; a lane deleted under the mover loses nothing."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import aio_pika
import orjson
import pytest

from lis_async.broker import lanes
from lis_async.broker.lanes import EXPIRE_S, REDELIVERED_HEADER, URGENT, Mover, lane_name
from tests.helpers import job_body, poll

pytestmark = pytest.mark.rabbitmq
AUTO = job_body("auto_create_domain_green.json")
MANUAL = job_body("manual_stixfile_amber_shared.json")
PLAYBOOK = job_body("playbook_url.json")


@pytest.fixture
async def queues(conn: aio_pika.abc.AbstractRobustConnection) -> AsyncIterator[tuple[str, str]]:
    """A listen queue (declared as the platform does: durable) and the name of its lane."""
    connector = str(uuid.uuid4())
    listen, lane = f"listen_{connector}", lane_name(connector)
    async with conn.channel() as channel:
        await channel.declare_queue(listen, durable=True)
    yield listen, lane
    async with conn.channel() as channel:
        await channel.queue_delete(listen)
        await channel.queue_delete(lane)


async def _publish(conn: aio_pika.abc.AbstractRobustConnection, queue: str, *bodies: bytes) -> None:
    async with conn.channel() as channel:
        for body in bodies:
            msg = aio_pika.Message(body, delivery_mode=aio_pika.DeliveryMode.PERSISTENT)
            await channel.default_exchange.publish(msg, queue)


async def _depth(conn: aio_pika.abc.AbstractRobustConnection, queue: str) -> int:
    async with conn.channel() as channel:
        declared = await channel.declare_queue(queue, passive=True)
        return int(declared.declaration_result.message_count or 0)


async def _until(mover: Mover, moved: int) -> None:
    assert await poll(lambda: mover.moved >= moved, 30), f"{mover.moved}/{moved} moved"


async def _drain(
    conn: aio_pika.abc.AbstractRobustConnection, queue: str, n: int
) -> list[aio_pika.abc.AbstractIncomingMessage]:
    out: list[aio_pika.abc.AbstractIncomingMessage] = []
    async with conn.channel() as channel:
        q = await channel.declare_queue(queue, passive=True)
        for _ in range(n):
            message = await q.get(timeout=5)
            assert message is not None
            await message.ack()
            out.append(message)
    return out


async def test_every_job_is_moved_once_at_its_priority(
    conn: aio_pika.abc.AbstractRobustConnection, queues: tuple[str, str]
) -> None:
    listen, lane = queues
    n = 1_500  # many prefetch windows: the grouped acks must cover every delivery
    await _publish(conn, listen, *([AUTO] * n), MANUAL, PLAYBOOK)
    moved: list[int] = []
    mover = Mover(listen, lane, EXPIRE_S, on_moved=moved.append)
    await mover.start(conn)
    await _until(mover, n + 2)
    await mover.stop()  # closes the mover's channel: anything left unacked would come back
    assert await _depth(conn, listen) == 0
    assert await _depth(conn, lane) == n + 2
    assert sorted(moved).count(URGENT) == 2 and mover.moved_bytes == n * len(AUTO) + len(
        MANUAL
    ) + len(PLAYBOOK)
    first = await _drain(conn, lane, 3)
    # the urgent jobs overtake the 1,500 ahead of them; the bodies are moved unchanged
    assert sorted(m.body for m in first[:2]) == sorted([MANUAL, PLAYBOOK])
    assert all(m.priority == URGENT and not m.headers for m in first[:2])
    assert first[2].body == AUTO and first[2].delivery_mode == aio_pika.DeliveryMode.PERSISTENT


async def test_a_redelivered_listen_job_is_marked_in_the_lane(
    conn: aio_pika.abc.AbstractRobustConnection, queues: tuple[str, str]
) -> None:
    listen, lane = queues
    await _publish(conn, listen, AUTO)
    async with conn.channel() as channel:  # a consumer took it, then gave it back
        q = await channel.declare_queue(listen, passive=True)
        taken = await q.get(timeout=5)
        assert taken is not None
        await taken.nack(requeue=True)
    await _publish(conn, listen, MANUAL)
    mover = Mover(listen, lane, EXPIRE_S)
    await mover.start(conn)
    await _until(mover, 2)
    await mover.stop()
    marks = {m.body: (m.headers or {}).get(REDELIVERED_HEADER) for m in await _drain(conn, lane, 2)}
    assert marks == {AUTO: True, MANUAL: None}


async def test_a_lane_deleted_under_the_mover_loses_nothing(
    conn: aio_pika.abc.AbstractRobustConnection, queues: tuple[str, str]
) -> None:
    """The broker returns what it cannot route: each such delivery goes back to the listen
    queue, the lane is declared again and the job moved into it."""
    listen, lane = queues
    mover = Mover(listen, lane, EXPIRE_S)
    await mover.start(conn)
    async with conn.channel() as channel:
        await channel.queue_delete(lane)
    bodies = [orjson.dumps(orjson.loads(AUTO) | {"n": i}) for i in range(50)]
    await _publish(conn, listen, *bodies)
    await _until(mover, 50)
    await mover.stop()
    assert await _depth(conn, listen) == 0
    got = await _drain(conn, lane, await _depth(conn, lane))
    assert sorted(m.body for m in got) == sorted(bodies)  # each job once: none lost, no copy


async def test_the_mover_consumes_again_when_its_listen_queue_comes_back(
    conn: aio_pika.abc.AbstractRobustConnection,
    queues: tuple[str, str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The platform deleted the listen queue (the broker cancels the mover's consumer) and
    declared it again: the mover finds it and moves what arrives."""
    monkeypatch.setattr(lanes, "RECONSUME_S", 0.2)
    listen, lane = queues
    mover = Mover(listen, lane, EXPIRE_S)
    await mover.start(conn)
    async with conn.channel() as channel:
        await channel.queue_delete(listen)
        await asyncio.sleep(0.5)  # the mover looks, finds nothing, waits
        await channel.declare_queue(listen, durable=True)
    await _publish(conn, listen, AUTO, MANUAL)
    await _until(mover, 2)
    await mover.stop()
    assert await _depth(conn, listen) == 0 and await _depth(conn, lane) == 2
