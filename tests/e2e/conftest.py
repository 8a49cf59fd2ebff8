"""End-to-end tests: the real worker (App) + simulated platform, LastInfoSec, OpenCTI worker, all
on the real RabbitMQ. The harness itself lives in tests/helpers.py."""

from __future__ import annotations

import pytest


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"
