"""The mover's batch publisher (lis_async/broker/batches.py) on a stand-in for aiormq's channel:
what it registers for aiormq's confirm handling, one write per loop turn, and the order of the
writes when the writer is behind. The real channel: tests/integration/test_mover.py."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

import aiormq.exceptions
import pytest
from pamqp import commands as spec
from pamqp import frame as amqp_frame

from lis_async.broker.batches import BatchPublisher


def _channel(queue_size: int = 0, max_content: int = 1_000) -> Any:
    loop = asyncio.get_running_loop()
    return SimpleNamespace(
        delivery_tag=0,
        confirmations={},
        message_id_delivery_tag={},
        create_future=loop.create_future,
        write_queue=asyncio.Queue(maxsize=queue_size),
        number=7,
        max_content_size=max_content,
        is_closed=False,
    )


def _frames(payload: bytes) -> list[Any]:
    """The AMQP frames in a written buffer."""
    out = []
    while payload:
        used, channel, value = amqp_frame.unmarshal(payload)
        assert channel == 7
        out.append(value)
        payload = payload[used:]
    return out


def _props() -> spec.Basic.Properties:
    return spec.Basic.Properties(delivery_mode=2, priority=1)


async def test_a_turns_publishes_go_out_in_one_write_each_registered_for_its_confirm() -> None:
    channel = _channel()
    publisher = BatchPublisher(channel, "the-lane")
    futures = [publisher.publish(b"job-%d" % i, _props()) for i in range(3)]
    await asyncio.sleep(0)
    assert channel.write_queue.qsize() == 1  # one buffer for the turn
    frames = _frames(channel.write_queue.get_nowait().payload)
    publishes = [f for f in frames if isinstance(f, spec.Basic.Publish)]
    assert [(p.routing_key, p.mandatory, p.exchange) for p in publishes] == [
        ("the-lane", True, "")
    ] * 3
    headers = [f for f in frames if hasattr(f, "properties")]
    assert [h.properties.message_id for h in headers] == ["1", "2", "3"]
    assert [h.properties.priority for h in headers] == [1, 1, 1]
    assert [f.value for f in frames if hasattr(f, "value")] == [b"job-0", b"job-1", b"job-2"]
    assert channel.delivery_tag == 3
    assert channel.confirmations == {1: futures[0], 2: futures[1], 3: futures[2]}
    assert channel.message_id_delivery_tag == {"1": 1, "2": 2, "3": 3}
    futures[1].set_result(spec.Basic.Ack(delivery_tag=2))  # aiormq settles it...
    await asyncio.sleep(0)
    assert channel.message_id_delivery_tag == {"1": 1, "3": 3}  # ... and the id is forgotten


async def test_a_body_over_the_frame_size_is_split() -> None:
    channel = _channel(max_content=4)
    BatchPublisher(channel, "lane").publish(b"0123456789", _props())
    await asyncio.sleep(0)
    bodies = [
        f.value for f in _frames(channel.write_queue.get_nowait().payload) if hasattr(f, "value")
    ]
    assert bodies == [b"0123", b"4567", b"89"]


async def test_writes_keep_their_order_while_the_writer_is_behind() -> None:
    channel = _channel(queue_size=1)
    publisher = BatchPublisher(channel, "lane")
    for turn in range(4):  # the first fills the writer's queue; three wait, in order
        publisher.publish(b"turn-%d" % turn, _props())
        await asyncio.sleep(0)
    written: list[str] = []
    async with asyncio.timeout(5):
        while len(written) < 4:
            frame = await channel.write_queue.get()
            written += [
                f.properties.message_id for f in _frames(frame.payload) if hasattr(f, "properties")
            ]
    assert written == ["1", "2", "3", "4"]


async def test_a_cancelled_publish_is_never_sent_and_a_closed_channel_refuses() -> None:
    channel = _channel()
    publisher = BatchPublisher(channel, "lane")
    kept, dropped = publisher.publish(b"a", _props()), publisher.publish(b"b", _props())
    dropped.cancel()
    await asyncio.sleep(0)
    frames = _frames(channel.write_queue.get_nowait().payload)
    assert [f.value for f in frames if hasattr(f, "value")] == [b"a"]
    assert channel.confirmations == {1: kept}
    pending = publisher.publish(b"c", _props())
    channel.is_closed = True  # closed before the turn's write
    await asyncio.sleep(0)
    with pytest.raises(aiormq.exceptions.ChannelInvalidStateError):
        await pending
    with pytest.raises(aiormq.exceptions.ChannelInvalidStateError):
        publisher.publish(b"d", _props())
