"""End-to-end harness: the real worker (App) + simulated platform, LastInfoSec, OpenCTI worker,
all on the real RabbitMQ."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from lis_async.app import App
from lis_async.config import load_settings
from lis_async.sim.lastinfosec import LisSimConfig
from lis_async.sim.opencti import PlatformSimConfig
from lis_async.sim.world import SimWorld

FAST_ENV = {
    "CONNECTOR_LOG_LEVEL": "info",
    "CONNECTOR_HEALTH_PORT": "0",
    "CONNECTOR_JOBS_IN_FLIGHT": "32",
    "LASTINFOSEC_CONCURRENCY": "32",
    "LASTINFOSEC_RATE_PER_S": "1000",
    "LASTINFOSEC_BACKOFF_BASE_S": "0.05",
    "LASTINFOSEC_BACKOFF_MAX_S": "0.5",
    "CONNECTOR_PLATFORM_RETRY_MAX_S": "1",
    "CONNECTOR_SHUTDOWN_TIMEOUT_S": "10",
}


@dataclass
class Running:
    world: SimWorld
    app: App
    task: asyncio.Task[int]

    async def stop(self) -> int:
        self.app.request_stop()
        return await asyncio.wait_for(self.task, 60)


@contextlib.asynccontextmanager
async def app_only(world: SimWorld, env: Mapping[str, str] | None = None) -> AsyncIterator[Running]:
    """The real worker App in-process, WITHOUT starting the OpenCTI worker emulation."""
    app = App(load_settings(env=world.env() | FAST_ENV | dict(env or {})))
    task = await app.start_in_background(timeout_s=30)
    try:
        yield Running(world, app, task)
    finally:
        if not task.done():
            app.request_stop()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(task, 60)


@contextlib.asynccontextmanager
async def world_with_worker(
    env: Mapping[str, str] | None = None,
    lis: LisSimConfig | None = None,
    platform: PlatformSimConfig | None = None,
    **world_kw: Any,
) -> AsyncIterator[Running]:
    """A simulated world with the real worker App in-process and the OpenCTI worker emulation."""
    async with (
        SimWorld(lis_config=lis, platform_config=platform, **world_kw) as world,
        app_only(world, env) as run,
    ):
        await world.start_worker_emulation()
        yield run


def start_worker_process(
    env: Mapping[str, str], log_path: Path | None = None
) -> subprocess.Popen[bytes]:
    """``lis-async run`` as a real process (for kill and signal tests). Its output goes to a file
    (a pipe nobody reads would block the worker once full)."""
    full = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("OPENCTI_", "CONNECTOR_", "LASTINFOSEC_"))
    }
    full |= dict(env)
    if log_path is None:
        fd, name = tempfile.mkstemp(prefix="lis-worker-", suffix=".log")
        os.close(fd)
        log_path = Path(name)
    with log_path.open("ab") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "lis_async.cli", "run"],
            env=full,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    proc.log_path = log_path  # type: ignore[attr-defined]
    return proc


def worker_log(proc: subprocess.Popen[bytes]) -> str:
    return Path(proc.log_path).read_text(errors="replace")  # type: ignore[attr-defined]


def stop_process(
    proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM, timeout: float = 30
) -> int:
    if proc.poll() is None:
        proc.send_signal(sig)
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait(10)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"
