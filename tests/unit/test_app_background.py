"""No background loop of the worker dies silently: a failure (or an unexpected end) is logged
at ERROR with its traceback, and the loop is started again (issue #20, finding 1)."""

from __future__ import annotations

import asyncio
import logging

import pytest

from lis_async import app as app_module
from lis_async.app import App
from lis_async.retry import Backoff
from lis_async.settings.model import load_settings
from tests.helpers import OFFLINE_ENV


async def test_a_failing_background_loop_is_logged_and_restarted(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(app_module, "_SUPERVISE_BACKOFF", Backoff(base_s=0.01, max_s=0.01))
    caplog.set_level(logging.INFO, "lis_async")
    app = App(load_settings(env=OFFLINE_ENV))
    runs: list[int] = []
    third = asyncio.Event()

    async def registry() -> None:
        runs.append(1)
        if len(runs) == 1:
            raise ValueError("invalid literal for int() with base 10: b'abc'")
        if len(runs) == 2:
            return  # a loop meant to last that ends is restarted too
        third.set()
        await asyncio.Event().wait()

    app._spawn(registry, "redis")
    await asyncio.wait_for(third.wait(), 10)
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert [r.getMessage() for r in errors] == [
        "background task redis failed: restarting it",
        "background task redis ended unexpectedly: restarting it",
    ]
    assert errors[0].exc_info is not None  # the traceback is logged
    assert app.background_restarts == {"redis": 2}
    assert app.details()["background_restarts"] == {"redis": 2}
    await app._cancel_tasks()
    assert not app._tasks
