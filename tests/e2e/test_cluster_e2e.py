"""Cluster mode end to end: two worker processes on one connector id share one LastInfoSec rate
and one cache through Redis; Redis dies mid-run and comes back."""

from __future__ import annotations

import asyncio
import functools
import time

import aiohttp
import pytest

from lis_async.sim.lastinfosec import LisSimConfig
from lis_async.sim.world import SimWorld
from tests.helpers import (
    CACHE_KEY,
    FAST_ENV,
    LIGHT_WORKER,
    QUIET_PRODUCER,
    PrivateRedis,
    busiest_window,
    free_port,
    log_records,
    poll,
    record_time,
    start_worker_process,
    stop_process,
    work_ids,
    worker_log,
)

pytestmark = [pytest.mark.rabbitmq, pytest.mark.slow]

RATE = 20
#: How much later than its grant a request's log line may be stamped, seconds.
LOG_LAG_S = 0.1


async def readiness(port: int) -> dict[str, object]:
    async with (
        aiohttp.ClientSession() as http,
        http.get(f"http://127.0.0.1:{port}/readyz") as resp,
    ):
        body: dict[str, object] = await resp.json()
        return body


async def test_two_workers_outlive_a_redis_outage_within_the_quota() -> None:
    lis = LisSimConfig(latency_s=0.05, known_share=1.0, bundle_size=5)
    async with SimWorld(
        lis_config=lis, producer_options=QUIET_PRODUCER, worker_options=LIGHT_WORKER
    ) as world:
        with PrivateRedis() as redis:
            ports = [free_port(), free_port()]
            procs = [
                start_worker_process(
                    world.env()
                    | FAST_ENV
                    | {
                        "LASTINFOSEC_RATE_PER_S": str(RATE),
                        "REDIS_URL": redis.url,
                        "REDIS_CACHE_KEY": CACHE_KEY,
                        # The outage is Redis stopped (refused at once): no command may time
                        # out on a busy machine (0.25 s by default) and add a fallback of its own.
                        "REDIS_TIMEOUT_S": "2",
                        "CONNECTOR_HEALTH_PORT": str(port),
                        # Each request is logged as it is sent: the times the limiters hold to
                        # (the double's own stamps lag under this test process's load).
                        "CONNECTOR_LOG_LEVEL": "debug",
                    }
                )
                for port in ports
            ]
            try:
                assert await world.wait_registration(timeout=30)
                await world.start_worker_emulation()
                for port in ports:
                    assert await poll(functools.partial(_ready, port), 30)
                jobs = await world.producer.publish_many(400, kind="manual")
                works = work_ids(jobs)
                await asyncio.sleep(4)  # shared mode
                stopped_at = time.time()
                redis.stop()
                await asyncio.sleep(5)  # fallback mode: each worker at RATE / 2
                restarted_at = time.time()
                redis.start()
                for port in ports:  # shared mode resumes (within the link's probe interval)
                    back = functools.partial(_shared, port)
                    assert await poll(back, 30), worker_log(procs[0])[-3000:]
                resumed_at = time.time()  # both seen shared again (2 s or so, more if busy)
                assert await world.platform.wait_works(works, timeout=120)
                for wid in works:
                    w = world.platform.works[wid]
                    assert w.status == "complete" and not w.in_error, (wid, w.errors)
            finally:
                for proc in procs:
                    stop_process(proc)
        logs = [worker_log(p) for p in procs]

    times = sorted(t for log in logs for t in _request_times(log))
    assert len(times) >= len(world.lis.stats.requests) * 0.99  # every request was logged
    shared = [t for t in times if t < stopped_at]
    fallback = [t for t in times if stopped_at + 1 <= t < restarted_at]
    after = [t for t in times if t >= resumed_at + 1]  # the last fallback window has passed
    assert len(shared) > 2 * RATE and len(fallback) > RATE  # both phases did real work
    # The cluster's rate in shared mode, and the fallback shares (1 / the 2 replicas seen)
    # keep the sum within it. Paced grants: at most rate + 1 in any second, where LastInfoSec
    # counts them. The log line of a request comes a little after its grant (up to LOG_LAG_S on
    # a busy machine): a window of 1 - LOG_LAG_S seconds of log lines holds only grants of one
    # second.
    width = 1.0 - LOG_LAG_S
    assert busiest_window(shared, width) <= RATE + 1, "shared"
    assert busiest_window(fallback, width) <= RATE + 1, "fallback"
    if after:
        assert busiest_window(after, width) <= RATE + 1, "after"
    for log in logs:  # one line per transition, not one per job
        cluster = "\n".join(line for line in log.splitlines() if "lis_async.cluster" in line)
        assert log.count("falling back to the local rate limit") == 1, cluster
        assert log.count("shared mode resumed") == 1, cluster


def _request_times(log: str) -> list[float]:
    """Epoch times of the "LastInfoSec request" debug lines of a worker's log."""
    return [
        record_time(r)
        for r in log_records(log)
        if r["name"] == "lis_async.lastinfosec" and r["message"].startswith("LastInfoSec request ")
    ]


async def _ready(port: int) -> bool:
    try:
        return (await readiness(port)).get("status") == "ready"
    except aiohttp.ClientError:
        return False


async def _shared(port: int) -> bool:
    try:
        details = (await readiness(port)).get("details")
    except aiohttp.ClientError:
        return False
    return isinstance(details, dict) and details.get("redis") == "shared"
