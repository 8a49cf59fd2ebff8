"""The worker's shutdown is bounded: a part whose close never returns (a broker or a server
that stops answering) is logged by name and left behind, and the other parts still close."""

from __future__ import annotations

import asyncio
import logging
import time
from types import SimpleNamespace

import pytest

from lis_async import app as app_module
from lis_async.app import App
from lis_async.settings.model import load_settings
from tests.helpers import OFFLINE_ENV


async def test_a_close_that_hangs_is_left_behind_and_the_rest_still_close(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(app_module, "STEP_TIMEOUT_S", 0.2)
    app = App(load_settings(env=OFFLINE_ENV))
    closed: list[str] = []

    async def hang() -> None:
        await asyncio.Event().wait()

    async def close_redis() -> None:
        closed.append("redis")

    async def fail() -> None:
        raise ConnectionError("amqp://user:hunter2@broker/ refused")

    app.lis = SimpleNamespace(close=hang)  # type: ignore[assignment]
    app.redis = SimpleNamespace(close=close_redis)  # type: ignore[assignment]
    app.publisher = SimpleNamespace(close=fail)  # type: ignore[assignment]

    release = asyncio.Event()

    async def stuck_task() -> None:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            await release.wait()  # ignores its cancellation

    app._spawn(stuck_task, "stuck")
    caplog.set_level(logging.INFO, "lis_async")
    started = time.monotonic()
    await asyncio.wait_for(app.stop(), 5)
    assert time.monotonic() - started < 2
    release.set()
    assert closed == ["redis"]  # after the LastInfoSec client that hung
    text = caplog.text
    assert "closing the LastInfoSec client took more than 0.2 s; going on" in text
    assert "closing the publisher connection failed (ConnectionError); going on" in text
    assert "background task(s) stuck still running" in text
    assert "hunter2" not in text
    assert text.rstrip().endswith("stopped")
