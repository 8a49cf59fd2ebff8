"""Priority lanes and consumer-timeout safety on the real RabbitMQ: manual and playbook jobs
overtake a deep auto-enrichment backlog, nothing is lost when the worker dies while moving jobs,
replicas share the lane, lanes off is plain FIFO, and no job is held past the broker's
consumer_timeout."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import signal
from collections.abc import AsyncIterator, Iterable, Iterator

import aiohttp
import orjson
import pytest

from lis_async.app import App
from lis_async.broker.lanes import MOVE_PREFETCH
from lis_async.settings.model import load_settings
from lis_async.sim.lastinfosec import LisSimConfig
from lis_async.sim.opencti import PlatformSimConfig
from lis_async.sim.producer import ProducedJob
from lis_async.sim.world import SimWorld
from tests.helpers import (
    FAST_ENV,
    LIGHT_WORKER,
    QUIET_PRODUCER,
    PrivateRabbitMQ,
    app_only,
    free_port,
    jobs_queued,
    poll,
    queue_depth,
    rabbitmqctl,
    ready_count,
    start_worker_process,
    stop_async,
    worker_log,
)

pytestmark = [pytest.mark.rabbitmq, pytest.mark.slow]

#: LastInfoSec answers at once and small: the rate limit is what makes the backlog.
FAST_LIS = LisSimConfig(latency_s=0.005, known_share=0.5, bundle_size=5)


def work_ids(jobs: Iterable[ProducedJob]) -> list[str]:
    return [j.work_id for j in jobs if j.work_id is not None]


def completion_times(world: SimWorld, works: Iterable[str]) -> list[float]:
    out = []
    for w in works:
        t = world.platform.works[w].completed_time
        if t is not None:
            out.append(t)
    return sorted(out)


def completed_by(world: SimWorld, works: Iterable[str], moment: float) -> int:
    return sum(1 for t in completion_times(world, works) if t <= moment)


def playbook_answer_times(world: SimWorld, jobs: Iterable[ProducedJob]) -> list[float]:
    wanted = {j.entity_id for j in jobs}
    return [c["time"] for c in world.platform.playbook_calls if c["data_instance_id"] in wanted]


@contextlib.asynccontextmanager
async def world(**kw: object) -> AsyncIterator[SimWorld]:
    async with SimWorld(
        lis_config=FAST_LIS,
        producer_options=QUIET_PRODUCER,
        worker_options=LIGHT_WORKER,
        **kw,  # type: ignore[arg-type]
    ) as w:
        yield w  # the OpenCTI worker emulation starts once the connector registered


# ------------------------------------------------------------------------------------------
# manual and playbook jobs overtake


async def test_manual_and_playbook_jobs_overtake_a_deep_auto_backlog() -> None:
    """2,500 auto jobs queued, then 10 manual jobs and 3 playbook steps; the worker starts at 5
    requests/s: every manual work completes and every playbook is answered before the 500th
    auto job completes (100 s of lookups: the worker's start and the move into the lane take a
    few seconds, more on a busy machine; in arrival order all 2,500 would come first). The
    backlog sits in the lane, where the lane metric and /readyz show it, and the listen queue
    is empty."""
    async with world() as w:
        async with app_only(w):  # registers: the platform declares the listen queue
            pass
        auto = await w.producer.publish_many(2500, kind="auto_create")
        manual = await w.producer.publish_many(10, kind="manual")
        playbooks = await w.producer.publish_many(3, kind="playbook")
        assert await ready_count(w, "listen") == 2513
        await w.start_worker_emulation()
        health, metrics = free_port(), free_port()
        env = w.env() | FAST_ENV
        env |= {
            "LASTINFOSEC_RATE_PER_S": "5",
            "CONNECTOR_JOBS_IN_FLIGHT": "16",
            "CONNECTOR_HEALTH_PORT": str(health),
            "CONNECTOR_EXPOSE_METRICS": "true",
            "CONNECTOR_METRICS_PORT": str(metrics),
        }
        proc = start_worker_process(env)
        try:
            assert await w.platform.wait_works(work_ids(manual), timeout=120), worker_log(proc)
            assert await poll(lambda: len(playbook_answer_times(w, playbooks)) == 3, 30)
            last_urgent = max(
                max(completion_times(w, work_ids(manual))), *playbook_answer_times(w, playbooks)
            )
            assert completed_by(w, work_ids(auto), last_urgent) < 500
            # The backlog is in the lane, not in the listen queue (what OpenCTI's page shows).
            assert await ready_count(w, "listen") == 0
            assert await ready_count(w, "lane") > 1500
            assert await poll(lambda: _lane_detail(health, 1500), 15)
            text = await _get(metrics, "/metrics")
            assert re.search(r"^lis_lane_messages [1-9]", text, re.M), text
            assert 'lis_jobs_moved_total{lane="urgent"} 13.0' in text
        finally:
            await stop_async(proc)


async def _get(port: int, path: str) -> str:
    async with (
        aiohttp.ClientSession() as http,
        http.get(f"http://127.0.0.1:{port}{path}") as resp,
    ):
        return await resp.text()


async def _lane_detail(port: int, more_than: int) -> bool:
    """The lane's name and a depth over ``more_than`` in /readyz (``null`` until the first
    sample: not yet)."""
    details = orjson.loads(await _get(port, "/readyz"))["details"]
    depth = details["lane_messages"]
    return (
        details["lane"].startswith("lis-async.lanes.") and depth is not None and depth > more_than
    )


# ------------------------------------------------------------------------------------------
# lanes off: FIFO


async def test_lanes_off_is_plain_fifo() -> None:
    """CONNECTOR_PRIORITY_LANES=false: the listen queue is consumed directly, no lane is
    declared, and manual jobs wait their turn (behind all but the prefetch's worth)."""
    env = {
        "CONNECTOR_PRIORITY_LANES": "false",
        "LASTINFOSEC_RATE_PER_S": "100",
        "CONNECTOR_JOBS_IN_FLIGHT": "16",
    }
    async with world() as w, app_only(w, env) as run:
        await w.start_worker_emulation()
        auto = await w.producer.publish_many(400, kind="auto_create")
        manual = await w.producer.publish_many(5, kind="manual")
        assert await w.platform.wait_works(work_ids(manual), timeout=60)
        first_manual = min(completion_times(w, work_ids(manual)))
        assert completed_by(w, work_ids(auto), first_manual) >= 400 - 2 * 16
        assert run.app.mover is None and "lane" not in run.app.details()
        with pytest.raises(LookupError):
            await queue_depth(w.names()["lane"])
        assert "lis_lane_messages" not in run.app.metrics.render().decode()


# ------------------------------------------------------------------------------------------
# at least once through the move


async def test_sigkill_while_moving_loses_nothing() -> None:
    """The worker is killed while it moves a stream of jobs into the lane; after a restart every
    work completes, and the copies a kill can leave (moved, not yet acked in the listen queue)
    stay within the mover's prefetch plus the jobs in flight."""
    async with world() as w:
        env = w.env() | FAST_ENV | {"LASTINFOSEC_RATE_PER_S": "50"}
        proc = start_worker_process(env)
        try:
            assert await w.wait_registration(timeout=30)
            await w.start_worker_emulation()
            assert await poll(lambda: _lane_exists(w), 30)
            publishing = asyncio.create_task(w.producer.publish_many(1500, kind="auto_create"))
            assert await poll(lambda: _lane_at_least(w, 300), 60)
            # the mover still has jobs to move: a stream still coming, or still queued
            assert not publishing.done() or await ready_count(w, "listen") > 0
            proc.send_signal(signal.SIGKILL)
            proc.wait(10)
            jobs = await publishing
            works = work_ids(jobs)
            assert await poll(lambda: _nothing_unacked(w), 30)
            ready, _ = await jobs_queued(w)
            done = sum(w.platform.works[x].processed_time is not None for x in works)
            copies = ready - (len(works) - done)  # jobs in both queues, or processed and kept
            assert 0 <= copies <= MOVE_PREFETCH + 32, copies

            proc = start_worker_process(env | {"LASTINFOSEC_RATE_PER_S": "1000"})
            assert await w.platform.wait_works(works, timeout=180), worker_log(proc)[-2000:]
            assert await w.worker.wait_idle(timeout=30)
        finally:
            await stop_async(proc)
        assert not [x for x in works if w.platform.works[x].in_error]
        assert await ready_count(w) == 0


async def _lane_exists(w: SimWorld) -> bool:
    try:
        await queue_depth(w.names()["lane"])
    except LookupError:
        return False
    return True


async def _lane_at_least(w: SimWorld, n: int) -> bool:
    return await ready_count(w, "lane") >= n


async def _nothing_unacked(w: SimWorld) -> bool:
    return (await jobs_queued(w))[1] == 0


# ------------------------------------------------------------------------------------------
# replicas share the lane


async def test_two_workers_on_one_connector_share_the_lane() -> None:
    """Two workers with one connector id consume one lane: both take jobs, every work completes
    once, and manual jobs still overtake the backlog they share."""
    async with world() as w:
        env = w.env() | FAST_ENV | {"LASTINFOSEC_RATE_PER_S": "20", "CONNECTOR_JOBS_IN_FLIGHT": "8"}
        async with app_only(w, env):  # registers: the platform declares the listen queue
            pass
        auto = await w.producer.publish_many(600, kind="auto_create")
        manual = await w.producer.publish_many(6, kind="manual")
        await w.start_worker_emulation()
        apps = [App(load_settings(env=env)) for _ in range(2)]
        tasks = [await app.start_in_background(timeout_s=30) for app in apps]
        try:
            lane = w.names()["lane"]
            text = await asyncio.to_thread(
                rabbitmqctl, "list_queues", "name", "consumers", "--no-table-headers"
            )
            assert f"{lane}\t2" in text.splitlines()
            assert await w.platform.wait_works(work_ids(manual), timeout=60)
            last_manual = max(completion_times(w, work_ids(manual)))
            # In arrival order all 600 would come first. The auto jobs completed meanwhile are
            # those the two workers (20 lookups/s each) finish while the mover reaches the
            # manual ones: a few seconds' worth, more on a busy machine.
            assert completed_by(w, work_ids(auto), last_manual) < 400
            assert await w.platform.wait_works(work_ids(auto), timeout=120)
        finally:
            for app in apps:
                app.request_stop()
            for task in tasks:
                assert await asyncio.wait_for(task, 60) == 0
        done = [
            sum(a.metrics.jobs.labels(o)._value.get() for o in ("enriched", "not_found", "skipped"))
            for a in apps
        ]
        assert min(done) >= 100, done  # both took a fair part
        assert sum(done) == 606, done
        assert await ready_count(w) == 0


# ------------------------------------------------------------------------------------------
# RabbitMQ's consumer_timeout


@pytest.fixture(scope="module")
def short_timeout_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrivateRabbitMQ]:
    """A private RabbitMQ node whose consumer_timeout is 6 s, checked every second (the
    machine's broker keeps its 30 minutes: lowering it there would close the channels of every
    other test running meanwhile)."""
    node = PrivateRabbitMQ(
        tmp_path_factory.mktemp("rabbit-timeout"),
        "listeners.tcp.default = 127.0.0.1:{port}\nconsumer_timeout = 6000\n",
        advanced="[{rabbit, [{channel_tick_interval, 1000}]}].\n",
    )
    with node:
        yield node


CLOSED = "the broker closed the consuming channel"
REQUEUED = "before RabbitMQ's consumer_timeout"


@pytest.mark.xdist_group("short_timeout_broker")  # one private node for both cases
@pytest.mark.parametrize("watchdog", [True, False], ids=["watchdog", "no-watchdog"])
async def test_jobs_waiting_past_the_consumer_timeout(
    watchdog: bool, short_timeout_broker: PrivateRabbitMQ, caplog: pytest.LogCaptureFixture
) -> None:
    """LastInfoSec is down for 14 s while the broker's consumer_timeout is 6 s. With
    CONNECTOR_CONSUMER_TIMEOUT_S=6 the worker requeues its waiting jobs before the broker
    acts; with 0 the broker closes the channel (logged once per close), the channel is
    reopened and the jobs are redelivered. Either way every work completes, none in error."""
    caplog.set_level(logging.INFO, "lis_async")
    env = {
        "CONNECTOR_CONSUMER_TIMEOUT_S": "6" if watchdog else "0",
        "LASTINFOSEC_RETRY_BUDGET_S": "120",
        "CONNECTOR_JOBS_IN_FLIGHT": "8",
    }
    node = short_timeout_broker
    platform = PlatformSimConfig(amqp_url=node.url, rabbit_port=node.port, queue_details="off")
    async with world(amqp_url=node.url, platform_config=platform) as w:
        w.lis.config.error_rate = 1.0  # down before the first job
        async with app_only(w, env):
            await w.start_worker_emulation()
            jobs = await w.producer.publish_many(20, kind="auto_create")
            await asyncio.sleep(14)
            w.lis.config.error_rate = 0.0
            assert await w.platform.wait_works(work_ids(jobs), timeout=60)
        assert not [x for x in work_ids(jobs) if w.platform.works[x].in_error]
        assert await ready_count(w) == 0
    if watchdog:
        assert REQUEUED in caplog.text
        assert CLOSED not in caplog.text
    else:
        assert CLOSED in caplog.text
        assert REQUEUED not in caplog.text
