"""pycti's CONNECTOR_QUEUE_THRESHOLD rule (lis_async/intake/threshold.py): hold intake while the
platform reports the connector's queue at or above the threshold (MB = 10^6 bytes), release
below it, and release (never hold) while the platform gives no usable answer."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest

from lis_async.errors import PlatformError, PlatformUnavailable
from lis_async.intake.threshold import QueueThreshold
from lis_async.platform.client import Platform, QueueDetails
from lis_async.settings.model import load_settings

LOGGER = "lis_async.queue_threshold"


class Script:
    """The platform's answers, one per check: a QueueDetails or an exception to raise."""

    def __init__(self) -> None:
        self.answer: QueueDetails | Exception = QueueDetails(0, 0)
        self.reads = 0

    async def read(self) -> QueueDetails:
        self.reads += 1
        if isinstance(self.answer, Exception):
            raise self.answer
        return self.answer


def threshold(script: Script, mb: float) -> tuple[QueueThreshold, list[bool]]:
    holds: list[bool] = []

    async def listener(hold: bool) -> None:
        holds.append(hold)

    qt = QueueThreshold(script.read, mb, interval_s=0.01)
    qt.add_listener(listener)
    return qt, holds


async def test_holds_at_or_above_the_threshold_in_decimal_mb_and_releases_below() -> None:
    script = Script()
    qt, holds = threshold(script, 0.01)  # 0.01 MB = 10,000 bytes
    script.answer = QueueDetails(3, 9_999)
    await qt.check()
    assert not qt.engaged
    script.answer = QueueDetails(4, 10_000)  # pycti: buffering unless size < threshold
    await qt.check()
    assert qt.engaged
    assert qt.connector_info() == {"buffering": True, "queue_messages_size": 0.01}
    script.answer = QueueDetails(40, 2_000_000)
    await qt.check()  # still above: no new transition
    script.answer = QueueDetails(3, 9_999)  # no second mark: released at once below
    await qt.check()
    assert not qt.engaged and qt.transitions == 2
    await asyncio.sleep(0)
    assert holds == [True, False]
    assert qt.connector_info() == {"buffering": False, "queue_messages_size": 0.009999}


async def test_no_hold_while_the_push_queue_is_empty() -> None:
    """A platform that counts the listen queue too reports a deep listen backlog above the
    threshold; holding intake could never lower it. With nothing in the push queue there is
    no hold, and it starts once the connector's output waits there."""
    script = Script()
    push = [0]

    async def push_depth() -> int | None:
        return push[0]

    qt = QueueThreshold(script.read, 0.01, interval_s=0.01, push_depth=push_depth)
    script.answer = QueueDetails(5000, 15_000_000)
    await qt.check()
    assert not qt.engaged
    push[0] = 12
    await qt.check()
    assert qt.engaged
    push[0] = 0  # ingested: what is left is the listen queue's
    await qt.check()
    assert not qt.engaged


async def test_the_default_threshold_is_500_mb_not_500_mib() -> None:
    script = Script()
    qt, _ = threshold(script, 500.0)
    script.answer = QueueDetails(1, 499_999_999)
    await qt.check()
    assert not qt.engaged
    script.answer = QueueDetails(1, 500_000_000)  # 476.8 MiB: already 500 MB
    await qt.check()
    assert qt.engaged


async def test_one_warning_when_the_hold_starts_and_one_info_when_it_ends(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    script = Script()
    qt, _ = threshold(script, 1.0)
    for size in (0, 1_500_000, 1_200_000, 1_000_000, 900_000, 0):
        script.answer = QueueDetails(size // 1000, size)
        await qt.check()
    lines = [r for r in caplog.records if r.name == LOGGER]
    assert [r.levelno for r in lines] == [logging.WARNING, logging.INFO]
    assert "1.5 MB (1500 messages)" in lines[0].getMessage()
    assert "CONNECTOR_QUEUE_THRESHOLD 1 MB" in lines[0].getMessage()
    assert "0.9 MB" in lines[1].getMessage() and "taking jobs again" in lines[1].getMessage()


async def test_no_answer_releases_the_hold_and_is_logged_once_per_streak(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    script = Script()
    qt, holds = threshold(script, 1.0)
    script.answer = QueueDetails(10, 5_000_000)
    await qt.check()
    assert qt.engaged
    script.answer = PlatformUnavailable("OpenCTI answered HTTP 503")
    for _ in range(3):  # pycti runs when its check fails: released, not held for ever
        await qt.check()
        assert not qt.engaged and qt.unanswered
    script.answer = QueueDetails(10, 5_000_000)  # answers again, still above: held again
    await qt.check()
    assert qt.engaged and not qt.unanswered
    await asyncio.sleep(0)
    assert holds == [True, False, True]
    lines = [(r.levelno, r.getMessage()) for r in caplog.records if r.name == LOGGER]
    assert [level for level, _ in lines] == [
        logging.WARNING,  # held
        logging.WARNING,  # no answer (once for three failed checks)
        logging.INFO,  # released because of it
        logging.INFO,  # answers again
        logging.WARNING,  # held again
    ]
    assert "HTTP 503" in lines[1][1] and "not applied until it does" in lines[1][1]
    assert "no queue size from OpenCTI" in lines[2][1]


async def test_an_old_schema_or_a_bug_in_the_read_never_holds_nor_stops_the_checks() -> None:
    script = Script()
    qt, holds = threshold(script, 0.5)
    script.answer = PlatformError(
        'GRAPHQL_VALIDATION_FAILED: Cannot query field "connector_queue_details" on type '
        '"Connector".',
        code="GRAPHQL_VALIDATION_FAILED",
        retriable=False,
    )
    task = asyncio.create_task(qt.run())
    try:
        await asyncio.sleep(0.05)
        assert not qt.engaged and qt.unanswered
        script.answer = TypeError("a bug")  # anything the read raises: the loop goes on
        await asyncio.sleep(0.05)
        assert not task.done()
        script.answer = QueueDetails(1, 600_000)
        reads = script.reads
        assert await _until(lambda: qt.engaged)
        assert script.reads > reads
    finally:
        task.cancel()
    await asyncio.sleep(0)
    assert holds == [True]


async def _until(predicate: Any, timeout_s: float = 2.0) -> bool:
    for _ in range(int(timeout_s / 0.01)):
        if predicate():
            return True
        await asyncio.sleep(0.01)
    return False


@pytest.mark.parametrize(
    "answer",
    [
        {"connector": None},  # no such connector (deleted)
        {"connector": {"id": "c", "connector_queue_details": None}},
        {"connector": {"id": "c", "connector_queue_details": {"messages_number": 1}}},
        {
            "connector": {
                "id": "c",
                "connector_queue_details": {"messages_number": "1", "messages_size": 2},
            }
        },
        {
            "connector": {
                "id": "c",
                "connector_queue_details": {"messages_number": True, "messages_size": 2},
            }
        },
        None,
    ],
)
async def test_an_answer_without_two_numbers_is_a_platform_error(answer: Any) -> None:
    async def query(*_: Any) -> Any:
        return answer

    platform = platform_answering(query)
    with pytest.raises(PlatformError):
        await platform.queue_details()


async def test_the_platforms_figures_are_read_as_pycti_reads_them() -> None:
    sent: list[Any] = []

    async def query(document: str, variables: Any) -> Any:
        sent.append((document, variables))
        details = {"messages_number": 12, "messages_size": 34_567.0}
        return {"connector": {"id": "c", "connector_queue_details": details}}

    platform = platform_answering(query)
    assert await platform.queue_details() == QueueDetails(12, 34_567)
    ((document, variables),) = sent
    assert "connector(id: $id)" in document and "$id: String!" in document
    assert "connector_queue_details { messages_number messages_size }" in document
    assert variables == {"id": CONNECTOR_ID}


CONNECTOR_ID = "0b3c1f2e-6d7a-4b8c-9d0e-1f2a3b4c5d6e"


def platform_answering(query: Any) -> Platform:
    """A Platform whose GraphQL calls ``query`` answers (nothing started, no network)."""
    env = {
        "OPENCTI_URL": "http://127.0.0.1:1",
        "OPENCTI_TOKEN": "octi-token-secret",
        "CONNECTOR_ID": CONNECTOR_ID,
        "CONFIG_LIS_APIKEY_CTI": "lis-key-secret",
    }
    platform = Platform(load_settings(env=env))
    platform.query = query  # type: ignore[method-assign]
    return platform
