"""What an operator's tools read from a running worker: pycti's connector metrics on /metrics,
log lines that outside texts cannot forge, and a health port that cannot be exhausted."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

import aiohttp
import orjson
import pytest

from lis_async.ops.logs import setup_logging
from lis_async.sim.lastinfosec import LisSimConfig
from lis_async.sim.opencti import PlatformSimConfig
from lis_async.sim.world import SimWorld
from tests.helpers import (
    FAST_ENV,
    LIGHT_WORKER,
    QUIET_PRODUCER,
    WorkerProcess,
    app_only,
    free_port,
    poll,
    stop_async,
    work_ids,
    worker_log,
    world_with_worker,
)

pytestmark = [pytest.mark.rabbitmq]


def sample(text: str, name: str, labels: str = "") -> float:
    pattern = re.escape(name) + (re.escape("{" + labels + "}") if labels else "") + r" ([0-9.e+-]+)"
    m = re.search(r"^" + pattern + "$", text, re.M)
    assert m, f"{name}{{{labels}}} not in metrics"
    return float(m.group(1))


async def scrape(port: int) -> str:
    async with aiohttp.ClientSession() as http, http.get(f"http://127.0.0.1:{port}/metrics") as r:
        assert r.status == 200
        return await r.text()


# ------------------------------------------------------------------------------------------
# pycti's connector metrics


async def test_pyctis_connector_metrics_count_what_the_worker_did() -> None:
    """bundles_sent_total, records_sent_total, runs_total, ping_api_total, errors_total,
    client_errors_total and the state enum, with pycti's names under the namespace and
    subsystem prefix, after real jobs (some of which meet LastInfoSec 500s)."""
    port = free_port()
    env = {
        "CONNECTOR_EXPOSE_METRICS": "true",
        "CONNECTOR_METRICS_PORT": str(port),
        "CONNECTOR_METRICS_NAMESPACE": "opencti",
        "CONNECTOR_METRICS_SUBSYSTEM": "lis",
        "CONNECTOR_HEARTBEAT_INTERVAL_S": "1",
    }
    lis = LisSimConfig(latency_s=0.01, known_share=0.7, error_rate=0.2, seed=7)
    async with world_with_worker(env=env, lis=lis) as run:
        world = run.world
        works = work_ids(await world.producer.publish_many(30, kind="manual"))
        assert await world.platform.wait_works(works, timeout=90)
        assert await world.worker.wait_idle(timeout=30)
        consumer = run.app.consumer
        assert consumer is not None and await poll(lambda: consumer.in_flight == 0, 30)
        assert await poll(lambda: run.app.platform.pings >= 2, 30)
        text = await scrape(port)
        p = "opencti_lis_"
        jobs = sum(
            sample(text, p + "lis_jobs_total", f'outcome="{o}"')
            for o in ("enriched", "not_found", "skipped", "failed")
            if f'{p}lis_jobs_total{{outcome="{o}"}}' in text
        )
        assert sample(text, p + "runs_total") == jobs == len(works)
        # bundles: the push messages the OpenCTI worker emulation received; records: objects
        assert sample(text, p + "bundles_sent_total") == world.worker.counters.received > 0
        assert sample(text, p + "records_sent_total") == sample(
            text, p + "lis_objects_published_total"
        )
        assert sample(text, p + "records_sent_total") > 0
        assert sample(text, p + "ping_api_total") >= 2
        assert sample(text, p + "ping_api_errors_total") == 0
        failed = sum(world.platform.works[w].in_error for w in works)
        assert sample(text, p + "errors_total") == failed
        # every 500 the simulator answered is a client error (retried, or ending in error)
        assert sample(text, p + "client_errors_total") == world.lis.stats.by_status.get(500, 0) > 0
        assert sample(text, p + "state", f'{p}state="idle"') == 1
        assert sample(text, p + "state", f'{p}state="running"') == 0
        assert "# TYPE opencti_lis_bundles_sent_total counter" in text

        run.app.request_stop()
        await asyncio.wait_for(asyncio.shield(run.task), 60)
        assert sample(run.app.metrics.render().decode(), p + "state", f'{p}state="stopped"') == 1


# ------------------------------------------------------------------------------------------
# log lines that outside texts cannot forge

HOSTILE_LIS = "\x1b[2J\x1b[1;32mkey accepted\x08\x08\x08\u202etxt.exe"
HOSTILE_OPENCTI = "DATABASE_ERROR\r2026-12-07 01:02:03,456 INFO    lis_async.app: all good"


@pytest.mark.parametrize("json_lines", [True, False], ids=["json", "plain"])
async def test_error_texts_from_lastinfosec_and_opencti_reach_the_log_escaped(
    capsys: pytest.CaptureFixture[str], json_lines: bool
) -> None:
    """OpenCTI answers a work call with an error code carrying a carriage return (the job
    retries it, logging the error), then LastInfoSec refuses the key with an error body
    carrying ANSI escapes, backspaces and U+202E (the worker stops, logging the body): both
    lines are written escaped, in JSON and in plain lines."""
    setup_logging("info", json_lines=json_lines)
    body = orjson.dumps({"detail": {"details": [{"error": HOSTILE_LIS}]}})
    lis = LisSimConfig(body_override=(401, body, "application/json"))
    platform = PlatformSimConfig(error_rate=1.0, error_scope="work", error_code=HOSTILE_OPENCTI)
    async with (
        SimWorld(
            lis_config=lis,
            platform_config=platform,
            producer_options=QUIET_PRODUCER,
            worker_options=LIGHT_WORKER,
        ) as world,
        app_only(world) as run,
    ):
        written: list[str] = []

        def logged(text: str) -> bool:
            written.append(capsys.readouterr().err)
            return text in "".join(written)

        await world.producer.publish_many(1, kind="manual")
        assert await poll(lambda: logged("all good"), 30)  # the retry of a work call
        world.platform.config.error_rate = 0.0  # OpenCTI answers: the lookup meets the 401
        assert await asyncio.wait_for(asyncio.shield(run.task), 60) == 3  # EXIT_FATAL
    logged("")
    err = "".join(written)
    for raw in ("\x1b", "\x08", "\u202e", "\r"):
        assert raw not in err
    if json_lines:
        messages = [json.loads(line)["message"] for line in err.splitlines()]
    else:
        messages = err.splitlines()
    fatal = [m for m in messages if "FATAL" in m]
    assert fatal and r"\x1b[2J\x1b[1;32mkey accepted\x08\x08\x08\u202etxt.exe" in fatal[0]
    assert not any(m.startswith("2026-12-07 01:02:03,456") for m in messages)


# ------------------------------------------------------------------------------------------
# a health port that cannot be exhausted

IDLE_CONNECTIONS = 1_100


def _worker_with_1024_files(env: dict[str, str]) -> WorkerProcess:
    """``lis-async run`` with the open files limit a container often has (1,024 soft and
    hard: the worker cannot raise it)."""
    full = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("OPENCTI_", "CONNECTOR_", "LASTINFOSEC_", "REDIS_"))
    } | env
    fd, name = tempfile.mkstemp(prefix="lis-worker-", suffix=".log")
    os.close(fd)

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (1024, 1024))

    with open(name, "ab") as out:
        proc = WorkerProcess(
            [sys.executable, "-m", "lis_async.cli", "run"],
            env=full,
            stdout=out,
            stderr=subprocess.STDOUT,
            preexec_fn=limit,
        )
    proc.log_path = Path(name)
    return proc


async def _hold(port: int, opened: list[asyncio.StreamWriter]) -> asyncio.StreamReader | None:
    with contextlib.suppress(OSError, TimeoutError):
        reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 20)
        opened.append(writer)
        return reader
    return None


async def _until_closed(reader: asyncio.StreamReader | None) -> None:
    if reader is None:
        return
    with contextlib.suppress(ConnectionError):
        while await reader.read(1024):
            pass


@pytest.mark.slow
async def test_1100_idle_connections_to_the_health_port_do_not_starve_the_worker() -> None:
    """1,100 idle connections to the health port of a worker limited to 1,024 open files: it
    keeps enriching jobs while they are held (those over the cap are closed at once, the others
    when idle too long) and every one of them is closed within 30 s."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 4 * IDLE_CONNECTIONS:
        pytest.skip(f"this test process may open only {hard} files")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 4 * IDLE_CONNECTIONS), hard))
    health = free_port()
    lis = LisSimConfig(latency_s=0.05, known_share=1.0, bundle_size=5)
    async with SimWorld(
        lis_config=lis, producer_options=QUIET_PRODUCER, worker_options=LIGHT_WORKER
    ) as world:
        env = world.env() | FAST_ENV | {"CONNECTOR_HEALTH_PORT": str(health)}
        proc = _worker_with_1024_files(env)
        opened: list[asyncio.StreamWriter] = []
        try:
            assert await world.wait_registration(timeout=60), worker_log(proc)[-3000:]
            await world.start_worker_emulation()

            async def up() -> bool:
                with contextlib.suppress(OSError):
                    _, w = await asyncio.open_connection("127.0.0.1", health)
                    w.close()
                    return True
                return False

            assert await poll(up, 30), worker_log(proc)[-3000:]
            readers = await asyncio.gather(
                *(_hold(health, opened) for _ in range(IDLE_CONNECTIONS))
            )
            assert len(opened) > IDLE_CONNECTIONS // 2  # most got through the listen backlog
            works = work_ids(await world.producer.publish_many(60, kind="manual"))
            closing = [asyncio.ensure_future(_until_closed(r)) for r in readers]
            assert await world.platform.wait_works(works, timeout=60), worker_log(proc)[-3000:]
            # every one closed by the worker
            assert await poll(lambda: all(c.done() for c in closing), 30), (
                sum(not c.done() for c in closing),
                [x for x in worker_log(proc).splitlines() if "ERROR" in x or "open files" in x][:5],
            )
            assert proc.poll() is None
            async with (
                aiohttp.ClientSession() as http,
                http.get(f"http://127.0.0.1:{health}/healthz") as resp,
            ):
                assert resp.status == 200
        finally:
            for writer in opened:
                writer.close()
            await stop_async(proc)
        log_text = worker_log(proc)
        assert "Too many open files" not in log_text, log_text[-3000:]
        assert '"level":"ERROR"' not in log_text, log_text[-3000:]
