from __future__ import annotations

import asyncio
import json
import logging
import time
from datetime import UTC, datetime

import pytest

from lis_async.ops.logs import setup_logging
from lis_async.settings.model import load_settings


def test_json_lines_in_pycti_format(capsys: pytest.CaptureFixture[str]) -> None:
    """pycti 7's JSON lines (pycti/utils/opencti_logger.py): timestamp in UTC with
    microseconds and Z, upper-case level, name, message; extra fields (pycti's ``meta``) and the
    exception text under ``attributes``."""
    setup_logging("info", json_lines=True)
    log = logging.getLogger("lis_async.pipeline")
    before = time.time()
    log.info("job work=%s outcome=%s", "w1", "enriched")
    log.warning("as pycti logs", extra={"attributes": {"port": 9095}, "work_id": "w2"})
    try:
        raise ValueError("boom")
    except ValueError:
        log.exception("it failed")
    first, second, third = (json.loads(x) for x in capsys.readouterr().err.splitlines()[-3:])
    assert list(first) == ["timestamp", "level", "name", "message"]
    assert first["level"] == "INFO" and first["name"] == "lis_async.pipeline"
    assert first["message"] == "job work=w1 outcome=enriched"
    stamp = datetime.strptime(first["timestamp"], "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)
    assert before - 1 <= stamp.timestamp() <= time.time() + 1
    assert second["level"] == "WARNING"
    assert second["attributes"] == {"port": 9095, "work_id": "w2"}
    assert third["level"] == "ERROR" and third["message"] == "it failed"
    assert third["attributes"]["exc_info"].startswith("Traceback (most recent call last)")
    assert "ValueError: boom" in third["attributes"]["exc_info"]


def test_json_lines_are_the_default_as_in_pycti_7() -> None:
    env = {
        "OPENCTI_URL": "http://opencti:8080",
        "OPENCTI_TOKEN": "t",
        "CONNECTOR_ID": "0b3c1f2e-6d7a-4b8c-9d0e-1f2a3b4c5d6e",
        "CONFIG_LIS_APIKEY_CTI": "k",
    }
    assert load_settings(env=env).opencti.json_logging is True
    off = env | {"OPENCTI_JSON_LOGGING": "false"}
    assert load_settings(env=off).opencti.json_logging is False


def test_plain_lines_when_asked_and_level_honoured(capsys: pytest.CaptureFixture[str]) -> None:
    setup_logging("warning", json_lines=False)
    logging.getLogger("lis_async.x").info("hidden")
    logging.getLogger("lis_async.x").warning("shown %d", 1)
    err = capsys.readouterr().err
    assert "hidden" not in err and "WARNING" in err and "shown 1" in err


HOSTILE = "LastInfoSec said \x1b[2J\x1b[31mOK\x08\x08\u202egnp.exe\r\nFAKE INFO line"
HOSTILE_ESCAPED = r"LastInfoSec said \x1b[2J\x1b[31mOK\x08\x08\u202egnp.exe\r\nFAKE INFO line"


@pytest.mark.parametrize("json_lines", [True, False])
def test_control_characters_are_escaped_in_every_message_and_field(
    capsys: pytest.CaptureFixture[str], json_lines: bool
) -> None:
    """ANSI escapes, backspaces, CR/LF and bidirectional overrides from outside reach the log
    escaped, in the message, an argument, an extra field and an exception's text; a
    traceback keeps its own line breaks."""
    setup_logging("info", json_lines=json_lines)
    log = logging.getLogger("lis_async.lastinfosec")
    log.warning("answer: %s", HOSTILE, extra={"detail": HOSTILE, "attributes": {"d": [HOSTILE]}})
    try:
        raise RuntimeError(HOSTILE)
    except RuntimeError:
        log.exception("lookup failed")
    err = capsys.readouterr().err
    for raw in ("\x1b", "\x08", "\u202e", "\r"):
        assert raw not in err
    if json_lines:
        warning, error = (json.loads(line) for line in err.splitlines())
        assert warning["message"] == "answer: " + HOSTILE_ESCAPED
        assert warning["attributes"] == {"detail": HOSTILE_ESCAPED, "d": [HOSTILE_ESCAPED]}
        trace = error["attributes"]["exc_info"]
        assert trace.startswith("Traceback") and trace.count("\n") >= 2
        assert trace.splitlines()[-1] == "RuntimeError: " + HOSTILE_ESCAPED
    else:
        lines = err.splitlines()
        assert lines[0].endswith("lis_async.lastinfosec: answer: " + HOSTILE_ESCAPED)
        assert lines[-1] == "RuntimeError: " + HOSTILE_ESCAPED
        assert not any(line.startswith("FAKE") for line in lines)


async def test_backpressure_holds_at_the_publish_that_crosses_and_releases_below_low() -> None:
    from lis_async.intake.backpressure import Backpressure

    depths = [0]
    holds: list[bool] = []

    async def depth() -> int:
        return depths[-1]

    async def listener(hold: bool) -> None:
        holds.append(hold)

    bp = Backpressure(depth, high=100, low=40, interval_s=0.01)
    bp.add_listener(listener)
    task = asyncio.create_task(bp.run())
    try:
        await asyncio.sleep(0.03)
        for _ in range(9):  # 99 messages published since the last sample: not yet
            bp.published(11)
        assert not bp.engaged
        bp.published(11)  # 110 > 100: held at once, not at the next sample
        assert bp.engaged
        depths.append(120)  # the sample agrees; OpenCTI's workers drain it
        await asyncio.sleep(0.05)
        assert bp.engaged
        depths.append(60)  # between the watermarks: still held
        await asyncio.sleep(0.05)
        assert bp.engaged
        depths.append(30)
        await asyncio.sleep(0.05)
        assert not bp.engaged
    finally:
        task.cancel()
    await asyncio.sleep(0)
    assert holds == [True, False] and bp.transitions == 2
