"""Whose queue holds the lane's name (issue #20, finding 4), against the real RabbitMQ: a lane is
recognised, another replica's expiry too, and anything else is named, argument by argument."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from typing import Any

import aio_pika
import pytest

from lis_async.broker.connection import throwaway_channel
from lis_async.broker.lanes import EXPIRE_S, check_lane, lane_arguments, lane_name
from tests.integration.conftest import AMQP_URL

pytestmark = pytest.mark.rabbitmq
OURS = lane_arguments(EXPIRE_S)


@pytest.fixture
async def name(conn: aio_pika.abc.AbstractRobustConnection) -> AsyncIterator[str]:
    """A lane name of a connector id of its own; the queue is deleted after the test."""
    lane = lane_name(str(uuid.uuid4()))
    yield lane
    async with conn.channel() as channel:
        await channel.queue_delete(lane)


async def _declare(
    conn: aio_pika.abc.AbstractRobustConnection, name: str, durable: bool = True, **args: Any
) -> None:
    async with conn.channel() as channel:
        await channel.declare_queue(name, durable=durable, arguments=args)


async def test_no_queue_becomes_a_lane(
    conn: aio_pika.abc.AbstractRobustConnection, name: str
) -> None:
    check = await check_lane(conn, name, EXPIRE_S)
    assert check.foreign == () and check.arguments == OURS
    assert await check_lane(conn, name, EXPIRE_S) == check  # it exists now, as ours


async def test_a_lane_of_an_older_replica_with_another_expiry_is_ours(
    conn: aio_pika.abc.AbstractRobustConnection, name: str
) -> None:
    await _declare(conn, name, **{**OURS, "x-expires": 60_000})
    check = await check_lane(conn, name, EXPIRE_S)
    assert check.foreign == () and check.arguments == {**OURS, "x-expires": 60_000}


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (
            {"x-dead-letter-exchange": "", "x-dead-letter-routing-key": "stolen"},
            ["x-dead-letter-exchange=''", "x-dead-letter-routing-key='stolen'"],
        ),
        ({"x-message-ttl": 0}, ["x-message-ttl=0"]),
        ({"x-max-length": 5, "x-overflow": "reject-publish"}, ["x-max-length=5", "x-overflow="]),
        ({"x-max-priority": 9}, ["x-max-priority=9"]),
        ({"x-queue-type": "quorum", "x-max-priority": None}, ["x-queue-type='quorum'"]),
        ({"x-max-priority": None, "x-expires": None}, ["x-max-priority missing"]),
    ],
)
async def test_a_foreign_queue_is_named_argument_by_argument(
    conn: aio_pika.abc.AbstractRobustConnection, name: str, args: dict[str, Any], named: list[str]
) -> None:
    declared = {k: v for k, v in {**OURS, **args}.items() if v is not None}
    if declared.get("x-queue-type") == "quorum":
        declared.pop("x-expires", None)
    await _declare(conn, name, **declared)
    check = await check_lane(conn, name, EXPIRE_S)
    assert check.foreign, check
    text = ", ".join(check.foreign)
    for part in named:
        assert part in text, text
    async with conn.channel() as channel:  # the probes changed nothing
        queue = await channel.declare_queue(name, passive=True)
        assert queue.declaration_result.message_count == 0


async def test_a_transient_or_exclusive_queue_is_foreign(
    conn: aio_pika.abc.AbstractRobustConnection, name: str
) -> None:
    await _declare(conn, name, durable=False, **OURS)
    assert (await check_lane(conn, name, EXPIRE_S)).foreign == ("durable differs",)
    async with conn.channel() as channel:
        await channel.queue_delete(name)
    other = await aio_pika.connect_robust(AMQP_URL)
    try:
        channel = await other.channel()
        await channel.declare_queue(name, exclusive=True)
        check = await check_lane(conn, name, EXPIRE_S)
        assert check.foreign == ("exclusive to another connection",)
    finally:
        await other.close()


class _DeletedFirst:
    """A throw-away channel that deletes ``name`` (on another channel) before it opens: the
    operator's delete landing between two probes."""

    def __init__(self, conn: aio_pika.abc.AbstractRobustConnection, name: str) -> None:
        self._conn, self._name = conn, name
        self._inner = aio_pika.Channel(conn, publisher_confirms=False)

    async def __aenter__(self) -> aio_pika.abc.AbstractChannel:
        async with self._conn.channel() as channel:
            await channel.queue_delete(self._name)
        return await self._inner.__aenter__()

    async def __aexit__(self, *exc: object) -> None:
        await self._inner.__aexit__(*exc)  # type: ignore[arg-type]


async def test_a_foreign_queue_deleted_between_two_probes_gives_way_to_the_lane(
    conn: aio_pika.abc.AbstractRobustConnection, name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The operator deletes the foreign queue while the check probes it: the next probe, with
    the foreign queue's arguments, must not create a queue of mixed arguments under the name
    (the lane would then be refused for good); the lane is declared, ours."""
    foreign: dict[str, Any] = {"x-message-ttl": 0, "x-dead-letter-exchange": ""}
    await _declare(conn, name, **foreign)
    calls = 0
    real = throwaway_channel

    def second_after_a_delete(c: aio_pika.abc.AbstractRobustConnection) -> Any:
        nonlocal calls
        calls += 1
        return _DeletedFirst(c, name) if calls == 2 else real(c)

    monkeypatch.setattr("lis_async.broker.lanes.throwaway_channel", second_after_a_delete)
    check = await check_lane(conn, name, EXPIRE_S)
    assert calls >= 3  # refused, then gone, then declared
    assert check.foreign == () and check.arguments == OURS
    monkeypatch.setattr("lis_async.broker.lanes.throwaway_channel", real)
    assert await check_lane(conn, name, EXPIRE_S) == check  # the queue under the name is ours
