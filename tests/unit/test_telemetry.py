from __future__ import annotations

import asyncio
import json
import logging

import pytest

from lis_async.ops.logs import setup_logging


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
