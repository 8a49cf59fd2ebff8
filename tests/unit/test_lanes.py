"""Priority lanes: what goes first, the lane's name and arguments, the rate-bounded lookahead."""

from __future__ import annotations

import asyncio

import aiormq.abc
import orjson
import pytest
from pamqp import commands as spec
from pamqp.header import ContentHeader

from lis_async.app import lookahead
from lis_async.broker.lanes import (
    NORMAL,
    URGENT,
    Mover,
    _Acks,
    lane_arguments,
    lane_name,
    priority,
)
from lis_async.enrichment.job import MAX_BODY_BYTES
from tests.helpers import job_body


@pytest.mark.parametrize(
    ("body", "level"),
    [
        (job_body("manual_stixfile_amber_shared.json"), URGENT),
        (job_body("manual_url_stix_objects_string.json"), URGENT),
        (job_body("playbook_url.json"), URGENT),
        (job_body("auto_create_domain_green.json"), NORMAL),
        (job_body("auto_update_hostname_red_draft.json"), NORMAL),
        (job_body("malformed_not_json.txt"), NORMAL),
        (b"[1, 2]", NORMAL),
        (orjson.dumps({"internal": "manual"}), NORMAL),
        (orjson.dumps({"internal": {"mode": "MANUAL"}}), NORMAL),  # the platform sends "manual"
        (orjson.dumps({"internal": {"mode": "auto", "playbook": None}}), NORMAL),
        (orjson.dumps({"internal": {"mode": "auto", "playbook": {}}}), URGENT),
    ],
)
def test_manual_and_playbook_jobs_are_urgent(body: bytes, level: int) -> None:
    assert priority(body) == level


def test_the_lane_never_takes_a_platform_queue_name() -> None:
    cid = "0b3c1f2e-6d7a-4b8c-9d0e-1f2a3b4c5d6e"
    name = lane_name(cid)
    assert name == f"lis-async.lanes.{cid}"
    assert not name.startswith(("listen_", "push_")) and cid in name


def test_lane_arguments() -> None:
    assert lane_arguments(604_800) == {
        "x-queue-type": "classic",
        "x-max-priority": URGENT,
        "x-expires": 604_800_000,
    }


@pytest.mark.parametrize(
    ("in_flight", "rate", "timeout", "expected"),
    [
        (64, 20.0, 1800.0, 64),  # the usual case: not bound
        (64, 0.05, 1800.0, 45),  # 0.05/s x 900 s
        (64, 0.0001, 1800.0, 1),  # always at least one
        (64, 0.05, 0.0, 64),  # consumer timeout safety off
    ],
)
def test_lookahead_fits_half_the_consumer_timeout(
    in_flight: int, rate: float, timeout: float, expected: int
) -> None:
    assert lookahead(in_flight, rate, timeout) == expected


# ------------------------------------------------------------------------------------------
# the mover reads only what it needs (issue #20, finding 9)


def test_the_mover_reads_internal_only() -> None:
    """A manual job is urgent whatever follows ``internal``: the rest of the body is not read
    (here it is not even JSON)."""
    head = b'{"internal": {"work_id": "w", "mode": "manual"}, "event": '
    assert priority(head + b"\xff" * (4 * 1024 * 1024)) == URGENT
    assert priority(head.replace(b"manual", b"auto") + b"[" * 100_000) == NORMAL


def test_a_body_over_the_limit_is_never_parsed() -> None:
    """It goes to the normal lane, where the pipeline refuses it (and ends its work in error)."""
    body = orjson.dumps({"internal": {"mode": "manual"}, "event": "x" * MAX_BODY_BYTES})
    assert priority(body) == NORMAL


def test_a_small_body_that_does_not_open_with_internal_is_read_whole() -> None:
    body = orjson.dumps({"configuration": {}, "internal": {"mode": "manual"}, "event": {}})
    assert priority(body) == URGENT
    padded = orjson.dumps({"event": {"x": "a" * 100_000}, "internal": {"mode": "manual"}})
    assert priority(padded) == NORMAL  # large and out of the platform's order: not parsed


# ------------------------------------------------------------------------------------------
# the mover's grouped acks and its publish deadline (the real broker: tests/integration)


class _Channel:
    """An AMQP channel as the mover uses it, and its publisher: a future per copy."""

    def __init__(self) -> None:
        self.confirms: dict[bytes, asyncio.Future[None]] = {}
        self.acks: list[int] = []
        self.nacks: list[int] = []

    def publish(self, body: bytes, _properties: object) -> asyncio.Future[None]:
        self.confirms[body] = asyncio.get_running_loop().create_future()
        return self.confirms[body]

    async def basic_ack(self, tag: int, multiple: bool = False, wait: bool = True) -> None:
        assert multiple
        self.acks.append(tag)

    async def basic_nack(self, tag: int, requeue: bool = True, wait: bool = True) -> None:
        assert requeue
        self.nacks.append(tag)


def _delivery(channel: _Channel, tag: int) -> aiormq.abc.DeliveredMessage:
    deliver = spec.Basic.Deliver(consumer_tag="c", delivery_tag=tag, routing_key="listen")
    header = ContentHeader(properties=spec.Basic.Properties(), body_size=1)
    return aiormq.abc.DeliveredMessage(deliver, header, b"%d" % tag, channel)  # type: ignore[arg-type]


def _mover(channel: _Channel, timeout_s: float = 60.0) -> Mover:
    mover = Mover("listen", "lane", 60.0, publish_timeout_s=timeout_s)
    mover._acks = acks = _Acks(channel, "lane")  # type: ignore[arg-type]
    acks.publisher = channel  # type: ignore[assignment]
    return mover


async def _turns(n: int = 5) -> None:
    for _ in range(n):
        await asyncio.sleep(0)


async def test_an_ack_never_covers_a_job_still_being_moved() -> None:
    channel = _Channel()
    mover = _mover(channel)
    moves = [asyncio.create_task(mover._move(_delivery(channel, t))) for t in range(1, 6)]
    await _turns()
    for t in (1, 2, 4, 5):  # the copy of job 3 is not confirmed yet
        channel.confirms[b"%d" % t].set_result(None)
    await _turns()
    assert channel.acks == [2]  # one ack for 1 and 2; 4 and 5 wait for 3
    channel.confirms[b"3"].set_result(None)
    await asyncio.gather(*moves)
    await _turns()
    assert channel.acks == [2, 5] and channel.nacks == [] and mover.moved == 5


async def test_a_job_whose_copy_failed_goes_back_alone() -> None:
    channel = _Channel()
    mover = _mover(channel)
    moves = [asyncio.create_task(mover._move(_delivery(channel, t))) for t in range(1, 4)]
    await _turns()
    channel.confirms[b"2"].set_exception(ConnectionError("channel closed"))
    channel.confirms[b"1"].set_result(None)
    channel.confirms[b"3"].set_result(None)
    await asyncio.gather(*moves)
    await _turns()
    assert channel.nacks == [2] and channel.acks[-1] == 3 and mover.moved == 2


async def test_a_copy_never_confirmed_goes_back_after_the_publish_deadline() -> None:
    channel = _Channel()
    mover = _mover(channel, timeout_s=0.2)
    watch = asyncio.create_task(mover._expire())
    try:
        async with asyncio.timeout(5):
            await mover._move(_delivery(channel, 1))  # the broker never confirms
    finally:
        watch.cancel()
    assert channel.nacks == [1] and channel.acks == [] and mover.moved == 0
