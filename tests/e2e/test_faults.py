"""Faults injected for real: SIGKILL, broker-side connection close, LastInfoSec throttling and
errors, OpenCTI outage, dead works, SIGTERM under load, a full push queue.

"Nothing lost": every work completes (or ends in error with a clear message), and no job is acked
before that.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import logging
import os
import shutil
import signal
import time
from collections.abc import Iterable, Mapping

import pytest

from lis_async.broker.lanes import MOVE_PREFETCH
from lis_async.sim.lastinfosec import LisSimConfig
from lis_async.sim.opencti import PlatformSimConfig
from lis_async.sim.world import SimWorld
from tests.helpers import (
    FAST_ENV,
    LIGHT_WORKER,
    QUIET_PRODUCER,
    WorkerProcess,
    app_only,
    jobs_queued,
    log_records,
    poll,
    queue_depth,
    rabbitmqctl,
    ready_count,
    start_worker_process,
    stop_async,
    work_ids,
    worker_log,
    world_with_worker,
)

pytestmark = [pytest.mark.rabbitmq]


# ------------------------------------------------------------------------------------------
# helpers


def _local_ports_to(pid: int, remote_port: int = 5672) -> set[int]:
    """Local TCP ports of process ``pid``'s sockets connected to ``remote_port`` (Linux /proc)."""
    inodes: set[str] = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            link = os.readlink(f"/proc/{pid}/fd/{fd}")
            if link.startswith("socket:["):
                inodes.add(link[8:-1])
    ports: set[int] = set()
    for table in ("tcp", "tcp6"):
        with contextlib.suppress(OSError), open(f"/proc/{pid}/net/{table}") as fh:
            for line in fh.readlines()[1:]:
                parts = line.split()
                if parts[9] in inodes and int(parts[2].rsplit(":", 1)[1], 16) == remote_port:
                    ports.add(int(parts[1].rsplit(":", 1)[1], 16))
    return ports


def _find_worker_connections(pid: int, names: Iterable[str]) -> dict[str, int]:
    """The connections of process ``pid`` whose client-provided name is one of ``names``, as
    ``{'{"connection_name","<name>"}': <the client's local port>}``. Other connections (the
    test's own, other test runs') are left out: they are told apart by the client's port."""
    ports = _local_ports_to(pid)
    wanted = [f'{{"connection_name","{n}"}}' for n in names]
    found: dict[str, int] = {}
    text = rabbitmqctl("list_connections", "peer_port", "client_properties", "--no-table-headers")
    for line in text.splitlines():
        parts = line.split("\t")
        if len(parts) != 2 or not parts[0].isdigit() or int(parts[0]) not in ports:
            continue
        match = next((w for w in wanted if w in parts[1]), None)
        if match is not None:
            found[match] = int(parts[0])
    return found


async def find_worker_connections(pid: int, names: Iterable[str]) -> dict[str, int]:
    return await asyncio.to_thread(_find_worker_connections, pid, list(names))


async def close_connections(connections: Mapping[str, int]) -> None:
    """Close the given connections (by their client port) from the broker side at the same
    instant: one ``rabbitmqctl eval`` closes them all, so the worker sees one outage. (One
    ``rabbitmqctl close_connection`` per connection, even in parallel, could land a second apart
    on a loaded machine: the first connection was back before the second went, two outages.)"""
    ports = ",".join(str(port) for port in connections.values())
    closed = await asyncio.to_thread(
        rabbitmqctl,
        "eval",
        "Ps = [P || P <- rabbit_networking:connections(), "
        "{peer_port, Port} <- rabbit_networking:connection_info(P, [peer_port]), "
        f"lists:member(Port, [{ports}])], "
        '[rabbit_networking:close_connection(P, "fault injection (test_faults)") || P <- Ps], '
        "length(Ps).",
    )
    assert closed.strip() == str(len(connections)), (closed, connections)


def needs_rabbitmqctl() -> None:
    if shutil.which("rabbitmqctl") is None:
        pytest.skip("rabbitmqctl not available")


def pushes_by_work(world: SimWorld) -> collections.Counter[str | None]:
    return collections.Counter(r.work_id for r in world.worker.messages)


def assert_nothing_lost(world: SimWorld, works: Iterable[str], *, exact: bool = True) -> None:
    """Every work complete and not in error; with ``exact``, every pushed message was expected
    (no job published twice) and every expected one was imported."""
    by_work = pushes_by_work(world)
    for wid in works:
        w = world.platform.works[wid]
        assert w.status == "complete" and not w.in_error, (
            wid,
            w.status,
            w.errors[-1:] or w.messages[-1:],
        )
        if exact:
            assert w.expected == by_work.get(wid, 0) == w.processed, (
                wid,
                w.expected,
                by_work.get(wid),
                w.processed,
            )


def completed(world: SimWorld, works: Iterable[str]) -> int:
    return sum(world.platform.works[w].status == "complete" for w in works)


def _completed_at_least(world: SimWorld, works: Iterable[str], n: int) -> bool:
    return completed(world, works) >= n


def _reconnected(proc: WorkerProcess, times: int) -> bool:
    return worker_log(proc).count("broker connection back after") >= times


def duplicated_works(world: SimWorld, works: Iterable[str]) -> dict[str, int]:
    """work id -> push messages that repeat an object already pushed for that work (a job that
    ran twice: every object of a job goes out in its own message, with a deterministic id)."""
    by_work = pushes_by_work(world)
    out: dict[str, int] = {}
    for wid in works:
        distinct = {o["id"] for o in world.worker.objects_by_work.get(wid, [])}
        extra = by_work.get(wid, 0) - len(distinct)
        if extra > 0:
            out[wid] = extra
    return out


# ------------------------------------------------------------------------------------------
# 1. SIGKILL mid-run: nothing lost, duplicates bounded by the jobs in flight


@pytest.mark.slow
async def test_sigkill_mid_run_duplicates_only_jobs_in_flight() -> None:
    in_flight = 200
    lis = LisSimConfig(latency_s=0.3, known_share=1.0, bundle_size=5)
    async with SimWorld(
        lis_config=lis, producer_options=QUIET_PRODUCER, worker_options=LIGHT_WORKER
    ) as world:
        env = (
            world.env()
            | FAST_ENV
            | {"CONNECTOR_JOBS_IN_FLIGHT": str(in_flight), "LASTINFOSEC_CONCURRENCY": "64"}
        )
        proc = start_worker_process(env)
        try:
            assert await world.wait_registration(timeout=30)
            await world.start_worker_emulation()
            jobs = await world.producer.publish_many(400, kind="manual")
            works = work_ids(jobs)
            assert await poll(lambda: completed(world, works) >= 50 or proc.poll() is not None, 60)
            assert proc.poll() is None, worker_log(proc)[-2000:]
            proc.send_signal(signal.SIGKILL)
            proc.wait(10)

            # The jobs wait in the priority lane (moved there at once) or in the listen queue.
            names = world.names()
            queues = (names["listen"], names["lane"])
            assert await poll(lambda: _unacked_zero(*queues), 30)
            ready = sum([(await queue_depth(q))[0] for q in queues])
            w = world.platform.works
            started_not_processed = {
                x for x in works if w[x].received_time is not None and w[x].processed_time is None
            }
            processed = sum(w[x].processed_time is not None for x in works)
            # Jobs whose toProcessed went through but whose ack was lost with the process.
            processed_not_acked = ready - (len(works) - processed)
            assert 0 <= processed_not_acked <= in_flight
            assert 100 <= len(started_not_processed) <= in_flight  # hundreds of jobs in flight
            assert processed < len(works)

            proc = start_worker_process(env)
            assert await world.platform.wait_works(works, timeout=120)
            assert await world.worker.wait_idle(timeout=30)
        finally:
            await stop_async(proc)

        assert_nothing_lost(world, works, exact=False)
        dups = duplicated_works(world, works)
        # Only jobs in flight at the kill ran twice...
        assert len(dups) <= in_flight, len(dups)
        assert len(set(dups) - started_not_processed) <= processed_not_acked, (
            dups,
            processed_not_acked,
        )
        # ...and each of them published its messages at most twice.
        for wid, extra in dups.items():
            assert extra <= len({o["id"] for o in world.worker.objects_by_work[wid]}), wid
        # No work ever read "complete" while it expected fewer objects than it finally imported
        # (a redelivered job asks its work whether the first attempt added its expectations).
        distinct = {
            w: len({o["id"] for o in world.worker.objects_by_work.get(w, [])}) for w in works
        }
        early = world.platform.early_completions(works, imported=distinct)
        assert early == [], "\n".join(str(e) for e in early[:5])


async def _unacked_zero(*queues: str) -> bool:
    return all([(await queue_depth(q))[1] == 0 for q in queues])


# ------------------------------------------------------------------------------------------
# 2. RabbitMQ closes the worker's connections mid-run


@pytest.mark.slow
@pytest.mark.xdist_group("broker_connections")  # lists every connection, closes some
async def test_broker_side_connection_close_mid_run_loses_nothing() -> None:
    needs_rabbitmqctl()
    # LastInfoSec answers in 0.5 s: with 32 lookups at a time the worker cannot do more than
    # 64 jobs/s however fast the machine, so the run lasts at least ~4 s after the first 30
    # jobs, well past the cut (one rabbitmqctl call, ~0.5 s idle, a few seconds when loaded).
    lis = LisSimConfig(latency_s=0.5, known_share=1.0, bundle_size=5)
    async with world_with_worker(
        lis=lis, producer_options=QUIET_PRODUCER, worker_options=LIGHT_WORKER
    ) as run:
        world, app = run.world, run.app
        # Found before the run (rabbitmqctl is slow): the cut itself is then one call.
        connections = await find_worker_connections(
            os.getpid(), ["lis-async consumer", "lis-async publisher"]
        )
        assert sorted(connections) == [
            '{"connection_name","lis-async consumer"}',
            '{"connection_name","lis-async publisher"}',
        ]
        jobs = await world.producer.publish_many(300, kind="manual")
        works = work_ids(jobs)
        assert await world.platform.wait_until(lambda: completed(world, works) >= 30, 60)
        assert app.checks()["consumer"] and app.checks()["publisher"]

        # Readiness is sampled at every turn of the loop from just before the cut: aio-pika
        # reconnects at once, so the outage may last only a few milliseconds.
        seen_down: set[str] = set()
        completed_at_cut: list[int] = []
        stop_sampling = asyncio.Event()

        async def sample() -> None:
            while not stop_sampling.is_set():
                checks = app.checks()
                down = {k for k in ("consumer", "publisher") if not checks[k]}
                if down and not completed_at_cut:
                    completed_at_cut.append(completed(world, works))
                seen_down.update(down)
                await asyncio.sleep(0)

        sampler = asyncio.create_task(sample())
        try:
            await close_connections(connections)
            assert await poll(lambda: seen_down == {"consumer", "publisher"}, 30), seen_down
        finally:
            stop_sampling.set()
            await sampler
        # The cut really hit a run with jobs left (counted when it was first seen).
        assert completed_at_cut[0] < len(works), completed_at_cut

        # The worker reconnects by itself, resumes consuming and publishing, and loses nothing.
        ok = await world.platform.wait_works(works, timeout=120)
        assert ok, (
            world.platform.works_by_status(),
            app.checks(),
            app.consumer and app.consumer.in_flight,
        )
        assert await poll(lambda: app.checks()["consumer"] and app.checks()["publisher"], 30), (
            app.checks()
        )
        assert await world.worker.wait_idle(timeout=30)
        assert_nothing_lost(world, works, exact=False)
        # Jobs in flight when the consumer connection went down could not be acked: they are
        # redelivered and published again, no more than that; so are the moves whose listen ack
        # was lost with the connection (in the lane, and redelivered from the listen queue).
        dups = duplicated_works(world, works)
        assert len(dups) <= int(FAST_ENV["CONNECTOR_JOBS_IN_FLIGHT"]) + MOVE_PREFETCH, dups
        assert await ready_count(world) == 0
        assert app.consumer is not None and app.consumer.accepting
        assert await run.stop() == 0


# ------------------------------------------------------------------------------------------
# 3. LastInfoSec throttling and errors

LIS_RETRY_ENV = {
    "LASTINFOSEC_RETRY_BUDGET_S": "120",
    "LASTINFOSEC_BACKOFF_BASE_S": "0.1",
    "LASTINFOSEC_BACKOFF_MAX_S": "2",  # >= Retry-After: the header is honoured, not capped
    "LASTINFOSEC_CONCURRENCY": "16",
    "CONNECTOR_JOBS_IN_FLIGHT": "64",
}


def in_error(world: SimWorld, works: Iterable[str]) -> list[str]:
    return [w for w in works if world.platform.works[w].in_error]


@pytest.mark.slow
@pytest.mark.parametrize("retry_after_s", [1.0, None], ids=["retry-after", "no-retry-after"])
async def test_429_storm_slows_the_whole_client_and_fails_no_job(
    retry_after_s: float | None,
) -> None:
    concurrency = int(LIS_RETRY_ENV["LASTINFOSEC_CONCURRENCY"])
    # "Not found" answers: the 429 handling is the same, and without bundles to publish the worker
    # runs as fast as LastInfoSec lets it, which makes the unthrottled rate visible.
    lis = LisSimConfig(latency_s=0.02, known_share=0.0, retry_after_s=retry_after_s)
    async with world_with_worker(
        env=LIS_RETRY_ENV, lis=lis, producer_options=QUIET_PRODUCER, worker_options=LIGHT_WORKER
    ) as run:
        world = run.world
        stats = world.lis.stats
        # Unthrottled, the worker sends as fast as jobs come: its rate (requests per second),
        # from the arrival times the simulator recorded. A rate over the whole warm-up, not the
        # busiest one-second window: a warm-up shorter than two seconds straddles windows, and
        # a loaded machine stretches it over more of them.
        warm = await world.producer.publish_many(200, kind="manual", entity_type="Domain-Name")
        assert await world.platform.wait_works(work_ids(warm), timeout=60)
        arrivals = [r.time for r in stats.requests]
        assert len(arrivals) >= len(warm)
        baseline = len(arrivals) / max(arrivals[-1] - arrivals[0], 1e-3)

        world.lis.config.force_429 = True
        t0 = time.time()
        jobs = await world.producer.publish_many(100, kind="manual", entity_type="Domain-Name")
        await asyncio.sleep(3.5)  # the storm itself: a fault that lasts, not a wait for a result
        world.lis.config.force_429 = False
        t1 = time.time()
        works = work_ids(jobs)
        assert await world.platform.wait_works(works, timeout=90)
        failed = in_error(world, works)
        assert not failed, [
            world.platform.works[w].errors[-1:] for w in failed
        ]  # no job failed while retries remained

        throttled = stats.by_status.get(429, 0)
        assert throttled >= concurrency
        # While throttled, the whole client slows down: a 429 pauses every request, so about one
        # round of `concurrency` requests goes out per pause, far below the unthrottled rate.
        first = int(t0) + (1 if retry_after_s is not None else 2)  # back-off grows from ~0.1 s
        storm = [stats.per_window.get(s, 0) for s in range(first, int(t1))]
        # At most about one round per pause: a client retrying each request on its own back-off
        # (from 0.1 s, 16 at a time, 20 ms answers) would send well over a hundred a second.
        # Not compared with the warm-up's rate: that one falls with the machine's load.
        assert storm and max(storm) <= 3 * concurrency, (storm, baseline)


@pytest.mark.slow
async def test_5xx_timeouts_and_refused_connections_are_retried() -> None:
    env = LIS_RETRY_ENV | {
        "LASTINFOSEC_TIMEOUT_S": "0.5",
        "LASTINFOSEC_BACKOFF_MAX_S": "0.5",
        "LASTINFOSEC_RETRY_BUDGET_S": "120",
    }
    lis = LisSimConfig(
        latency_s=0.01,
        known_share=0.7,
        bundle_size=5,
        error_rate=0.2,
        timeout_rate=0.05,
        hang_s=3.0,
        seed=7,
    )
    async with world_with_worker(
        env=env, lis=lis, producer_options=QUIET_PRODUCER, worker_options=LIGHT_WORKER
    ) as run:
        world, app = run.world, run.app
        assert app.lis is not None
        jobs = await world.producer.publish_many(120, kind="manual")
        works = work_ids(jobs)
        assert await world.platform.wait_works(works, timeout=90)
        assert not in_error(world, works)
        assert world.lis.stats.by_status.get(500, 0) > 0 and app.lis.stats.timeouts > 0

        # LastInfoSec goes away (connection refused), then comes back on the same port.
        world.lis.config.error_rate = world.lis.config.timeout_rate = 0.0
        port = world.lis.port
        assert port is not None
        await world.lis.close()
        stats = app.lis.stats
        refused_before = stats.connection_errors
        more = await world.producer.publish_many(40, kind="manual")
        assert await poll(lambda: stats.connection_errors >= refused_before + 5, 30)
        await world.lis.start("127.0.0.1", port)
        more_works = work_ids(more)
        assert await world.platform.wait_works(more_works, timeout=60)
        assert not in_error(world, more_works)
        assert await world.worker.wait_idle(timeout=30)
        assert_nothing_lost(world, works + more_works)


LIS_KEY = "lis-KEY-5ec2e7-do-not-log"


@pytest.mark.parametrize("fault", ["http-500", "connection-refused", "timeout"])
async def test_after_the_retry_budget_the_work_ends_in_error_with_a_redacted_message(
    fault: str,
) -> None:
    env = {"LASTINFOSEC_RETRY_BUDGET_S": "1", "LASTINFOSEC_TIMEOUT_S": "0.3"}
    lis = LisSimConfig(
        api_key=LIS_KEY,
        error_rate=1.0 if fault == "http-500" else 0.0,
        timeout_rate=1.0 if fault == "timeout" else 0.0,
        hang_s=2.0,
    )
    async with SimWorld(lis_config=lis, producer_options=QUIET_PRODUCER) as world:
        if fault == "connection-refused":
            port = world.lis.port
            await world.lis.close()  # nothing listens on that port any more
            env["LASTINFOSEC_BASE_URL"] = f"http://127.0.0.1:{port}/v2"
        async with app_only(world, env) as run:
            await world.start_worker_emulation()
            jobs = await world.producer.publish_many(6, kind="manual", entity_type="Domain-Name")
            works = work_ids(jobs)
            assert await world.platform.wait_works(works, timeout=60)
            expected_cause = {
                "http-500": "HTTP 500",
                "connection-refused": "Cannot connect",
                "timeout": "timeout after 0.3 s",
            }[fault]
            for wid in works:
                w = world.platform.works[wid]
                assert w.in_error, w
                (error,) = [e["message"] for e in w.errors]
                assert error.startswith(
                    "LastInfoSec lookup failed: LastInfoSec search_host lookup gave up after "
                ), error
                assert "(budget 1 s, " in error and "; last cause: " in error, error
                assert expected_cause in error, error
                assert LIS_KEY not in error and "api_key=" not in error
            assert run.app.consumer is not None and run.app.consumer.accepting  # not fatal
            assert await ready_count(world) == 0


# ------------------------------------------------------------------------------------------
# 4. OpenCTI GraphQL outage, dead works


def _failed_calls(world: SimWorld, operation: str, since: float) -> int:
    return sum(
        r.operation == operation and r.outcome == "http_503" and r.time >= since
        for r in list(world.platform.requests)
    )


@pytest.mark.slow
async def test_opencti_outage_jobs_wait_unacked_and_complete_when_it_returns() -> None:
    """An 8 s platform outage (longer if the checks below take longer): jobs wait unacked on one
    health gate (one probe a second, not one retry loop per job), intake pauses, readiness says
    why, and when the platform is back every job completes within 3 s; the heartbeat waits it
    out too."""
    prefetch = 16
    outage_s = 8.0
    lis = LisSimConfig(latency_s=0.01, known_share=1.0, bundle_size=5)
    # The app's own heartbeat loop, at the shortest interval the setting allows (1 s; 40 s by
    # default). Readiness counts the last successful ping as fresh for three intervals.
    env = {"CONNECTOR_JOBS_IN_FLIGHT": str(prefetch), "CONNECTOR_HEARTBEAT_INTERVAL_S": "1"}
    async with world_with_worker(
        env=env, lis=lis, producer_options=QUIET_PRODUCER, worker_options=LIGHT_WORKER
    ) as run:
        world, app = run.world, run.app
        consumer = app.consumer
        assert consumer is not None and app.platform.last_heartbeat is not None
        rec = world.platform.connectors[world.connector_id]
        # A second ping within 30 s: the interval setting is honoured (40 s would not make it).
        assert await poll(lambda: len(rec.pings) >= 2, 30)
        assert await poll(lambda: app.checks()["heartbeat"], 30)

        world.platform.config.outage = True
        down_at = time.time()
        jobs = await world.producer.publish_many(40, kind="manual")
        works = work_ids(jobs)

        # While down: the jobs in flight wait unacked, intake is paused (so the prefetch does
        # not fill up: the jobs delivered before the first failed report are all it holds),
        # one probe a second.
        assert await poll(lambda: consumer.paused and not app.checks()["platform"], 30)
        assert await poll(lambda: _failed_calls(world, "healthCheck", down_at) >= 3, 30)
        held = consumer.in_flight
        assert 1 <= held <= prefetch, held
        ready, unacked = await jobs_queued(world)
        assert (ready, unacked) == (len(works) - held, held)
        assert completed(world, works) == 0
        # Each job tried its first report once at most; then it waited on the gate.
        assert _failed_calls(world, "workToReceived", down_at) <= prefetch
        # The heartbeat keeps trying; failed pings do not count, and readiness drops once the
        # last good one is three intervals old.
        assert await poll(lambda: _failed_calls(world, "PingConnector", down_at) >= 1, 30)
        hb_before = app.platform.last_heartbeat
        assert hb_before is not None
        assert await poll(lambda: not app.checks()["heartbeat"], 30)
        await asyncio.sleep(max(0.0, down_at + outage_s - time.time()))
        assert app.platform.last_heartbeat == hb_before
        assert completed(world, works) == 0 and world.platform.in_outage
        assert _failed_calls(world, "workToReceived", down_at) <= prefetch  # still no retry loops

        # Back up: every job completes within 3 s, nothing was published twice, the heartbeat
        # and intake resume.
        world.platform.config.outage = False
        up_at = time.time()
        assert await world.platform.wait_works(works, timeout=60)
        # The jobs that were waiting on the gate (their first report failed in the outage)
        # complete within 3 s of the platform's return; the queued ones follow.
        waiting = {
            str(r.variables.get("id"))
            for r in list(world.platform.requests)
            if r.operation == "workToReceived" and r.outcome == "http_503" and r.time >= down_at
        }
        assert 0 < len(waiting) <= held, waiting
        last_done = max(t for w in waiting if (t := world.platform.works[w].completed_time))
        print(f"platform outage: {len(waiting)} waiting jobs done {last_done - up_at:.2f} s after")
        assert last_done - up_at <= 3.0, last_done - up_at
        assert await world.worker.wait_idle(timeout=30)
        assert_nothing_lost(world, works)
        assert not consumer.paused and app.checks()["platform"]
        assert await poll(lambda: any(t >= up_at for t in rec.pings), 30)
        assert await poll(
            lambda: (hb := app.platform.last_heartbeat) is not None and hb > hb_before, 30
        )
        assert await poll(lambda: app.checks()["heartbeat"], 30)
        assert await poll(lambda: consumer.in_flight == 0, 30), consumer.in_flight
        assert await ready_count(world) == 0


async def test_dead_work_is_acked_and_dropped_not_retried(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="lis_async")
    lis = LisSimConfig(latency_s=1.0, known_share=1.0, bundle_size=5)
    async with world_with_worker(
        lis=lis, producer_options=QUIET_PRODUCER, worker_options=LIGHT_WORKER
    ) as run:
        world, app = run.world, run.app
        # Killed before the job is taken: toReceived answers WORK_NOT_ALIVE.
        before = world.producer.make_job(
            world.producer.next_index(), kind="manual", entity_type="Domain-Name"
        )
        assert before.work_id
        world.platform.kill_work(before.work_id)
        # Killed while the job is in flight (during the 1 s LastInfoSec lookup).
        during = world.producer.make_job(
            world.producer.next_index(), kind="manual", entity_type="Domain-Name"
        )
        during_id = during.work_id
        assert during_id
        for job in (before, during):
            await world.producer.publish(job)
        assert await world.platform.wait_until(
            lambda: world.platform.works[during_id].received_time is not None, 10
        )
        world.platform.kill_work(during_id)

        dead = [before.work_id, during.work_id]
        assert await poll(
            lambda: all(f"work {w} is no longer alive" in caplog.text for w in dead), 15
        ), caplog.text
        consumer = app.consumer
        assert consumer is not None and await poll(lambda: consumer.in_flight == 0, 30)
        assert await ready_count(world) == 0  # acked, not requeued
        # Would a retry loop show up? A quiet period that must stay quiet, not a wait for a
        # result: a loaded machine can only make it see less, never fail it.
        await asyncio.sleep(1.0)
        calls = collections.Counter(
            (r.operation, r.variables.get("id"))
            for r in world.platform.requests
            if r.variables.get("id") in dead
        )
        assert calls[("workToReceived", before.work_id)] == 1
        assert (
            sum(
                n
                for (op, wid), n in calls.items()
                if wid == during.work_id and op != "workToReceived"
            )
            == 1
        ), calls
        assert await ready_count(world) == 0


# ------------------------------------------------------------------------------------------
# 5. Graceful stop under load (SIGTERM to the real process)


def _processed_at(world: SimWorld, works: Iterable[str]) -> set[str]:
    return {w for w in works if world.platform.works[w].processed_time is not None}


@pytest.mark.slow
async def test_sigterm_under_load_finishes_jobs_in_flight_and_requeues_the_rest() -> None:
    in_flight = 16
    lis = LisSimConfig(latency_s=0.5, known_share=1.0, bundle_size=5)
    async with SimWorld(
        lis_config=lis, producer_options=QUIET_PRODUCER, worker_options=LIGHT_WORKER
    ) as world:
        env = (
            world.env()
            | FAST_ENV
            | {"CONNECTOR_JOBS_IN_FLIGHT": str(in_flight), "CONNECTOR_SHUTDOWN_TIMEOUT_S": "20"}
        )
        proc = start_worker_process(env)
        try:
            assert await world.wait_registration(timeout=30)
            await world.start_worker_emulation()
            jobs = await world.producer.publish_many(200, kind="manual")
            works = work_ids(jobs)
            assert await poll(
                lambda: len(_processed_at(world, works)) >= 20 or proc.poll() is not None, 60
            )
            assert proc.poll() is None, worker_log(proc)[-2000:]
            proc.send_signal(signal.SIGTERM)
            signalled_at = time.time()
            code = await asyncio.to_thread(proc.wait, 40)
        finally:
            await stop_async(proc)
        log_text = worker_log(proc)
        assert code == 0, log_text[-3000:]
        assert "stop requested" in log_text and "returned to the queue" not in log_text

        # Intake stopped at once: nothing was started after the signal... Counted without a
        # clock first: a job can begin after the signal was sent only if it was delivered
        # before the worker handled it, and no more than `in_flight` jobs are delivered at a
        # time. Then by the clock, with a margin for a loaded machine (signal delivery, and a
        # job delivered just before it reaching the platform): a worker that kept taking jobs
        # would go on starting them until the 20 s deadline, since new jobs keep the drain
        # from finishing.
        w = world.platform.works
        received = {x: t for x in works if (t := w[x].received_time) is not None}
        after_signal = [x for x, t in received.items() if t > signalled_at]
        assert len(after_signal) <= in_flight, len(after_signal)
        started_late = [x for x, t in received.items() if t > signalled_at + 3.0]
        assert not started_late
        # ...every job in flight finished (processed), and the rest are back in the queue.
        processed = _processed_at(world, works)
        assert all(w[x].processed_time is not None for x in works if w[x].received_time is not None)
        assert await ready_count(world) == len(works) - len(processed)
        assert 20 <= len(processed) < len(works)
        assert await world.worker.wait_idle(timeout=30)
        assert_nothing_lost(world, processed)


@pytest.mark.slow
async def test_sigterm_with_a_deadline_too_short_requeues_slow_jobs_for_the_next_worker() -> None:
    in_flight = 8
    # Lookups far longer than the deadline plus any plausible closing time, so that the bound
    # on the stop time below can be generous and still tell "cut short" from "waited".
    lis = LisSimConfig(latency_s=30.0, known_share=1.0, bundle_size=5)
    async with SimWorld(
        lis_config=lis, producer_options=QUIET_PRODUCER, worker_options=LIGHT_WORKER
    ) as world:
        env = (
            world.env()
            | FAST_ENV
            | {"CONNECTOR_JOBS_IN_FLIGHT": str(in_flight), "CONNECTOR_SHUTDOWN_TIMEOUT_S": "1"}
        )
        proc = start_worker_process(env)
        try:
            assert await world.wait_registration(timeout=30)
            await world.start_worker_emulation()
            jobs = await world.producer.publish_many(20, kind="manual")
            works = work_ids(jobs)
            # Every job in flight is inside its 30 s LastInfoSec lookup.
            assert await poll(
                lambda: world.lis.stats.concurrent == in_flight or proc.poll() is not None, 30
            ), world.lis.stats.concurrent
            assert proc.poll() is None, worker_log(proc)[-2000:]
            proc.send_signal(signal.SIGTERM)
            t0 = time.monotonic()
            code = await asyncio.to_thread(proc.wait, 30)
            took = time.monotonic() - t0
        finally:
            await stop_async(proc)
        log_text = worker_log(proc)
        assert code == 0, log_text[-3000:]
        # Deadline 1 s + closing (connections, thread pool, interpreter exit): well under 10 s
        # even on a loaded machine, and far from the 30 s a worker waiting for its lookups would
        # take.
        assert took < 10, took
        assert f"{in_flight} job(s) unfinished after 1s: returned to the queue" in log_text
        assert not _processed_at(world, works)
        assert await ready_count(world) == len(works)

        # A new worker (LastInfoSec fast again) completes all of them.
        world.lis.config.latency_s = 0.01
        proc = start_worker_process(env | {"CONNECTOR_SHUTDOWN_TIMEOUT_S": "10"})
        try:
            assert await world.platform.wait_works(works, timeout=60), worker_log(proc)[-2000:]
        finally:
            code = await stop_async(proc)
        assert code == 0, worker_log(proc)[-3000:]
        assert await world.worker.wait_idle(timeout=30)
        assert_nothing_lost(world, works, exact=False)
        assert not duplicated_works(world, works)


# ------------------------------------------------------------------------------------------
# 6. Back-pressure: the push queue is full (x-max-length + reject-publish)


@pytest.mark.slow
async def test_full_push_queue_slows_the_worker_down_and_drops_nothing(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="lis_async")
    in_flight, max_length = 16, 30
    lis = LisSimConfig(latency_s=0.01, known_share=1.0, bundle_size=5)
    platform = PlatformSimConfig(push_queue_max_length=max_length)
    async with SimWorld(
        lis_config=lis,
        platform_config=platform,
        producer_options=QUIET_PRODUCER,
        worker_options=LIGHT_WORKER,
    ) as world:
        async with app_only(world, {"CONNECTOR_JOBS_IN_FLIGHT": str(in_flight)}) as run:
            app = run.app
            assert app.consumer is not None
            jobs = await world.producer.publish_many(60, kind="manual")
            works = work_ids(jobs)
            # Nobody consumes the push queue: it fills up to its limit and the broker nacks the
            # rest; the worker keeps its jobs unacked (prefetch-bounded) and retries.
            push = world.names()["push"]
            assert await poll(lambda: _push_full(push, max_length), 30)
            nacked = "push message(s) not confirmed: DeliveryError"
            assert await poll(lambda: caplog.text.count(nacked) >= in_flight, 30)
            # Only jobs whose messages all fit in the queue were processed (and acked)...
            done = _processed_at(world, works)
            assert sum(world.platform.works[w].expected for w in done) <= max_length
            # ...the others wait, unacked, as many as the prefetch allows, however long it lasts.
            retries = caplog.text.count(nacked)
            assert await poll(lambda: caplog.text.count(nacked) >= retries + 2 * in_flight, 30)
            assert _processed_at(world, works) == done
            ready, unacked = await jobs_queued(world)
            assert unacked == in_flight == app.consumer.in_flight
            assert ready == len(works) - in_flight - len(done)

            # The OpenCTI worker starts consuming: everything goes through, nothing was dropped.
            await world.start_worker_emulation()
            assert await world.platform.wait_works(works, timeout=90)
            assert await world.worker.wait_idle(timeout=30)
            assert_nothing_lost(world, works)
            assert not world.worker.rejections
            assert await ready_count(world) == 0 and await ready_count(world, "push") == 0


async def _push_full(queue: str, max_length: int) -> bool:
    return (await queue_depth(queue))[0] == max_length


@pytest.mark.slow
@pytest.mark.xdist_group("broker_connections")  # lists every connection, closes some
async def test_broker_connection_closed_twice_logs_two_quiet_pairs() -> None:
    """On-call engineers read tracebacks as incidents: an expected reconnection logs one
    WARNING when the connections go and one INFO when they are back, nothing else."""
    needs_rabbitmqctl()
    lis = LisSimConfig(latency_s=0.3, known_share=1.0, bundle_size=5)
    async with SimWorld(
        lis_config=lis, producer_options=QUIET_PRODUCER, worker_options=LIGHT_WORKER
    ) as world:
        proc = start_worker_process(world.env() | FAST_ENV)
        try:
            assert await world.wait_registration(timeout=30)
            await world.start_worker_emulation()
            jobs = await world.producer.publish_many(400, kind="manual")
            works = work_ids(jobs)
            for cut in (1, 2):
                assert await poll(
                    functools.partial(_completed_at_least, world, works, 40 * cut), 60
                )
                names = ["lis-async consumer", "lis-async publisher"]
                connections = await find_worker_connections(proc.pid, names)
                assert len(connections) == 2, connections
                await close_connections(connections)
                assert await poll(functools.partial(_reconnected, proc, cut), 60), worker_log(proc)[
                    -3000:
                ]
            assert await world.platform.wait_works(works, timeout=120)
        finally:
            await stop_async(proc)
        log = worker_log(proc)
    records = [r for r in log_records(log) if r["name"] == "lis_async.amqp"]

    def count(level: str, start: str) -> int:
        return sum(r["level"] == level and r["message"].startswith(start) for r in records)

    assert count("WARNING", "broker connection lost") == 2, log[-4000:]
    assert count("INFO", "broker connection back after") == 2, log[-4000:]
    assert "Traceback" not in log, log[-4000:]
    assert not [r for r in log_records(log) if r["level"] == "ERROR"], log[-4000:]


@pytest.mark.slow
async def test_a_10_s_lastinfosec_outage_is_waited_out_by_one_probe_a_second() -> None:
    lis = LisSimConfig(latency_s=0.05, known_share=1.0, bundle_size=5)
    async with world_with_worker(
        lis=lis, producer_options=QUIET_PRODUCER, worker_options=LIGHT_WORKER
    ) as run:
        world = run.world
        jobs = await world.producer.publish_many(300, kind="manual")
        works = work_ids(jobs)
        assert await world.platform.wait_until(lambda: completed(world, works) >= 20, 60)
        world.lis.config.error_rate = 1.0  # every request answered 500
        down_at = time.time()
        await asyncio.sleep(10)  # the outage itself: a fault that lasts, not a wait
        world.lis.config.error_rate = 0.0
        up_at = time.time()
        assert await world.platform.wait_works(works, timeout=120)
        assert in_error(world, works) == []  # nothing failed: the outage was waited out
    requests = list(world.lis.stats.requests)
    during = [r for r in requests if down_at + 2 <= r.time < up_at]
    # Once the outage is seen (about a second), one probe a second for the whole worker, not
    # one retry loop per job (32 lookups at a time would send hundreds).
    assert len(during) <= 1.5 * (up_at - down_at - 2) + 5, len(during)
    resumed = min(r.time for r in requests if r.time >= up_at and r.status == 200)
    print(
        f"LastInfoSec outage: {len(during)} requests while down, resumed {resumed - up_at:.2f} s after"
    )
    assert resumed - up_at <= 2.0, resumed - up_at


@pytest.mark.slow
async def test_an_outage_longer_than_the_budget_ends_the_works_in_error_and_stops() -> None:
    env = {"LASTINFOSEC_RETRY_BUDGET_S": "3"}
    lis = LisSimConfig(latency_s=0.01, known_share=1.0, error_rate=1.0, api_key=LIS_KEY)
    async with world_with_worker(
        env=env, lis=lis, producer_options=QUIET_PRODUCER, worker_options=LIGHT_WORKER
    ) as run:
        world = run.world
        jobs = await world.producer.publish_many(10, kind="manual", entity_type="Domain-Name")
        works = work_ids(jobs)
        assert await world.platform.wait_works(works, timeout=60)
        for wid in works:
            w = world.platform.works[wid]
            assert w.in_error, w
            (error,) = [e["message"] for e in w.errors]
            assert "gave up after 3 s (budget 3 s, " in error, error
            assert "LastInfoSec down for" in error and "last cause: HTTP 500" in error, error
            assert LIS_KEY not in error
        # Nothing loops: with no job waiting, nothing is sent any more.
        sent = world.lis.stats.total
        await asyncio.sleep(3)
        assert world.lis.stats.total == sent
        assert run.app.consumer is not None and run.app.consumer.accepting


# ------------------------------------------------------------------------------------------
# Backpressure toward the platform


@pytest.mark.slow
async def test_a_full_push_queue_holds_intake_until_opencti_catches_up(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """OpenCTI's workers stopped (the worker emulation is not started): the push queue never
    exceeds the high watermark by more than the jobs in flight; once they import again, intake
    resumes and every work completes."""
    caplog.set_level(logging.INFO, logger="lis_async.backpressure")
    high, low, in_flight = 150, 50, 8
    env = {
        "CONNECTOR_PUSH_HIGH_WATERMARK": str(high),
        "CONNECTOR_PUSH_LOW_WATERMARK": str(low),
        "CONNECTOR_JOBS_IN_FLIGHT": str(in_flight),
    }
    lis = LisSimConfig(latency_s=0.02, known_share=1.0, bundle_size=5)
    async with (
        SimWorld(
            lis_config=lis, producer_options=QUIET_PRODUCER, worker_options=LIGHT_WORKER
        ) as world,
        app_only(world, env) as run,
    ):
        push = world.names()["push"]
        peak = 0

        async def push_depth() -> int:
            async with world.admin_channel() as channel:
                queue = await channel.declare_queue(push, passive=True)
                return int(queue.declaration_result.message_count or 0)

        jobs = await world.producer.publish_many(100, kind="manual")
        works = work_ids(jobs)
        deadline = time.monotonic() + 60
        while not (run.app.backpressure and run.app.backpressure.engaged):
            assert time.monotonic() < deadline
            peak = max(peak, await push_depth())
            await asyncio.sleep(0.05)
        for _ in range(40):  # held for 2 s: jobs in flight finish, nothing new starts
            peak = max(peak, await push_depth())
            await asyncio.sleep(0.05)
        assert run.app.consumer is not None and run.app.consumer.paused
        assert completed(world, works) < len(works)
        # One job makes at most bundle_size + its relationships and the observable: < 12.
        assert high < peak <= high + in_flight * 12, peak
        assert run.app.checks()["accepting"]  # held, not stopped: readiness stays green

        await world.start_worker_emulation()  # OpenCTI imports again
        assert await world.platform.wait_works(works, timeout=120)
        bp = run.app.backpressure
        assert await poll(lambda: not bp.engaged, 30)  # the next sample sees it drained
    lines = [r for r in caplog.records if r.name == "lis_async.backpressure"]
    assert [r.levelno for r in lines][:2] == [logging.WARNING, logging.INFO]


@pytest.mark.slow
async def test_a_queue_above_the_queue_threshold_holds_intake_until_it_drains(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """CONNECTOR_QUEUE_THRESHOLD (pycti's, in MB of the connector's queue as the platform
    reports it): OpenCTI's workers stopped, the double reports the push queue's real bytes; at
    or above 0.01 MB intake is held (jobs in flight finish, none starts), readiness stays green
    and the heartbeat says "buffering"; once the workers import again the next check finds it
    below, intake resumes and every work completes."""
    logger = "lis_async.queue_threshold"
    caplog.set_level(logging.INFO, logger=logger)
    env = {
        "CONNECTOR_QUEUE_THRESHOLD": "0.01",  # 10,000 bytes: a few push messages
        "CONNECTOR_HEARTBEAT_INTERVAL_S": "1",  # the pace of the check
        "CONNECTOR_JOBS_IN_FLIGHT": "2",
    }
    lis = LisSimConfig(latency_s=0.3, known_share=1.0, bundle_size=5)
    async with (
        SimWorld(
            lis_config=lis, producer_options=QUIET_PRODUCER, worker_options=LIGHT_WORKER
        ) as world,
        app_only(world, env) as run,
    ):
        works = work_ids(await world.producer.publish_many(30, kind="manual"))
        qt, consumer = run.app.queue_threshold, run.app.consumer
        assert qt is not None and consumer is not None
        assert await poll(lambda: qt.engaged, 30)
        assert qt.details is not None and qt.details.size_bytes >= 10_000
        assert consumer.paused and run.app.checks()["accepting"]

        def processed() -> int:  # jobs the connector finished (toProcessed)
            return sum(world.platform.works[w].processed_time is not None for w in works)

        await asyncio.sleep(1.5)  # the jobs in flight finish
        ready, done = await ready_count(world), processed()
        await asyncio.sleep(3.0)  # three more checks, all above the threshold
        assert (await ready_count(world), processed()) == (ready, done)
        assert 0 < done < len(works) and ready > 0
        assert qt.engaged and run.app.details()["queue_threshold"] is True
        assert run.app.details()["connector_queue_bytes"] >= 10_000
        assert "\nlis_queue_threshold_hold 1.0\n" in run.app.metrics.render().decode()
        connector = world.platform.connectors[run.app.settings.connector.id]
        assert await poll(lambda: (connector.connector_info or {}).get("buffering") is True, 10)

        await world.start_worker_emulation()  # OpenCTI imports again: the queue drains
        assert await world.platform.wait_works(works, timeout=120)
        assert await poll(lambda: not qt.engaged, 30)
        assert await poll(lambda: processed() == len(works), 30)
    lines = [r for r in caplog.records if r.name == logger]
    assert [r.levelno for r in lines][:2] == [logging.WARNING, logging.INFO], lines
