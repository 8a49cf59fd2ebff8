from __future__ import annotations

import json
import logging

import pytest

from lis_async.telemetry import setup_logging


@pytest.fixture(autouse=True)
def _restore_logging() -> object:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    ours = logging.getLogger("lis_async")
    our_level = ours.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    ours.setLevel(our_level)


def test_json_lines_when_asked(capsys: pytest.CaptureFixture[str]) -> None:
    setup_logging("info", json_lines=True)
    logging.getLogger("lis_async.pipeline").info("job work=%s outcome=%s", "w1", "enriched")
    line = capsys.readouterr().err.strip().splitlines()[-1]
    doc = json.loads(line)
    assert doc["level"] == "info" and doc["name"] == "lis_async.pipeline"
    assert doc["message"] == "job work=w1 outcome=enriched"


def test_human_lines_by_default_and_level_honoured(capsys: pytest.CaptureFixture[str]) -> None:
    setup_logging("warning", json_lines=False)
    logging.getLogger("lis_async.x").info("hidden")
    logging.getLogger("lis_async.x").warning("shown %d", 1)
    err = capsys.readouterr().err
    assert "hidden" not in err and "WARNING" in err and "shown 1" in err
