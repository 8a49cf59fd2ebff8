"""One benchmark phase: a fresh world, one connector subprocess, its jobs, its figures.

:meth:`PhaseRunner.run` takes a :class:`PhaseSpec` through these steps:

1. build the world (fresh connector id, hence fresh queues), pre-register the connector id,
   start the OpenCTI worker emulation;
2. ``feed.before_start``: publish what must be waiting (queued phases);
3. start the connector and wait until it is ready (took its first job when jobs are waiting,
   consumes its queue otherwise);
4. start the CPU stopwatch (import and start-up excluded) and, with ``--profile``, py-spy;
5. ``feed.while_running`` (paced phases) while waiting until every job's work completed;
6. stop the stopwatch, derive the figures from the platform double's works and the LastInfoSec
   double's counters, stop the connector.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import aio_pika
import psutil

from lis_async.bench.config import BenchConfig
from lis_async.bench.feed import Feed, Jobs, build_world, preregister
from lis_async.bench.measure import Child, Stopwatch, busiest_window, find_rabbitmq, summary_ms
from lis_async.bench.processes import Profiler, connector_child
from lis_async.bench.progress import Progress, bar
from lis_async.bench.results import BenchError, Connector, PhaseResult
from lis_async.sim.lastinfosec import LisSimStats
from lis_async.sim.opencti import Work
from lis_async.sim.world import SimWorld

READY_TIMEOUT_S = 120.0
STALL_TIMEOUT_S = 60.0
#: A phase may last this long, plus a time per job that depends on the connector.
PHASE_BASE_TIMEOUT_S = 120.0
PER_JOB_TIMEOUT_S = 0.25
CLASSIC_PER_JOB_TIMEOUT_S = 2.0
#: How long to wait, once every job is done, for py-spy to finish and write its output.
PROFILER_WRITE_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class PhaseSpec:
    """What one phase runs: which connector, how many jobs in flight, fed how."""

    name: str
    connector: Connector
    feed: Feed
    in_flight: int = 1
    profile: str | None = None
    #: what the phase sets in the worker's environment (on top of the bench's settings)
    overrides: Mapping[str, str] = field(default_factory=dict)


class PhaseRunner:
    """Runs phases one after the other; what they share: the options, the working directory
    (connector logs), the progress line and the other processes whose CPU is measured."""

    def __init__(self, cfg: BenchConfig, workdir: Path) -> None:
        self.cfg = cfg
        self.workdir = workdir
        self.progress = Progress()
        self.rabbitmq = find_rabbitmq()
        self.me = psutil.Process()

    async def run(self, spec: PhaseSpec) -> PhaseResult:
        """Run one phase in a fresh world; the connector is stopped whatever happens."""
        result = PhaseResult(
            name=spec.name,
            connector=spec.connector,
            jobs=0,
            in_flight=spec.in_flight,
            mode=spec.feed.mode,
        )
        world = build_world(self.cfg)
        result.connector_id = world.connector_id
        async with world:
            await preregister(world)
            await world.start_worker_emulation()
            jobs = Jobs()
            await spec.feed.before_start(world, jobs, self.progress, spec.name)
            result.jobs = jobs.total
            result.offered_jobs_per_s = spec.feed.offered_jobs_per_s
            self.progress.update(f"{spec.name:<16} starting {spec.connector}")
            log_path = self.workdir / f"{spec.name}.log"
            child = connector_child(
                self.cfg, world, spec.connector, spec.in_flight, log_path, spec.overrides
            )
            try:
                await child.start()
                result.worker_pid = child.pid
                await self._measure(spec, world, child, jobs, result)
            finally:
                result.exit_code = await child.stop()
                if child.peak_rss:
                    result.peak_rss_mb = child.peak_rss / 2**20
                result.rss_mb_per_second = [round(b / 2**20, 1) for b in child.rss_series]
        return result

    # -- measuring -------------------------------------------------------------------------
    async def _measure(
        self, spec: PhaseSpec, world: SimWorld, child: Child, jobs: Jobs, result: PhaseResult
    ) -> None:
        """From the connector ready to every job done: CPU, then the figures into ``result``."""
        await self.wait_ready(world, [child], backlog=spec.feed.backlog)
        assert child.ps is not None
        watch = Stopwatch({"worker": child.ps, "bench": self.me, "rabbitmq": self.rabbitmq})
        watch.start()
        profiler: Profiler | None = None
        try:
            if spec.profile:
                seconds = min(10.0, max(1.0, jobs.total / 200))
                profiler = Profiler(child.pid, spec.profile, seconds, self.workdir / "py-spy.log")
                result.profile = spec.profile
            await self.feed_and_wait(spec.name, spec.feed, world, [child], jobs)
            cpu = watch.stop()
            if profiler is not None:
                await asyncio.to_thread(profiler.wait, PROFILER_WRITE_TIMEOUT_S)
        finally:
            if profiler is not None:
                profiler.stop()
        result.worker_cpu_s = cpu.get("worker", math.nan)
        result.bench_cpu_s = cpu.get("bench", math.nan)
        result.rabbitmq_cpu_s = cpu.get("rabbitmq")
        ours = sum(v for k, v in cpu.items() if k != "machine")
        result.other_cpu_s = max(0.0, cpu.get("machine", math.nan) - ours)
        result.peak_rss_mb = child.peak_rss / 2**20
        job_figures(result, world, jobs)
        lastinfosec_figures(result, world.lis.stats)

    async def feed_and_wait(
        self, label: str, feed: Feed, world: SimWorld, children: Sequence[Child], jobs: Jobs
    ) -> None:
        """``feed.while_running`` while waiting until every job's work completed."""
        coro = feed.while_running(world, jobs)
        publishing = asyncio.create_task(coro) if coro is not None else None
        try:
            await self._wait_done(label, world, children, jobs, publishing)
        finally:
            if publishing is not None and not publishing.done():
                publishing.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await publishing

    # -- waiting ---------------------------------------------------------------------------
    @staticmethod
    async def _consumers(conn: aio_pika.abc.AbstractConnection, queue: str) -> int:
        channel = await conn.channel()
        try:
            q = await channel.declare_queue(queue, passive=True)
            return int(q.declaration_result.consumer_count or 0)
        finally:
            if not channel.is_closed:
                await channel.close()

    async def wait_ready(self, world: SimWorld, children: Sequence[Child], backlog: bool) -> None:
        """Until the connector took its first job (backlog) or every one of ``children``
        consumes the queue."""
        deadline = time.monotonic() + READY_TIMEOUT_S
        listen = world.names()["listen"]
        calls = world.platform.calls
        async with await aio_pika.connect(self.cfg.amqp_url) as conn:
            polls = 0
            while True:
                if backlog and calls["workToReceived"] > 0:
                    return
                if (
                    not backlog
                    and polls % 10 == 0
                    and await self._consumers(conn, listen) >= len(children)
                ):
                    return
                for child in children:
                    if not child.running:
                        raise BenchError(
                            f"{child.name} exited with code "
                            f"{child.proc and child.proc.returncode} before taking a job; "
                            f"its log ({child.log_path}):\n{child.log_tail()}"
                        )
                if time.monotonic() > deadline:
                    names = ", ".join(c.name for c in children)
                    raise BenchError(f"{names} did not start within {READY_TIMEOUT_S:.0f} s")
                polls += 1
                await asyncio.sleep(0.005)

    async def _wait_done(
        self,
        label: str,
        world: SimWorld,
        children: Sequence[Child],
        jobs: Jobs,
        publishing: asyncio.Task[None] | None,
    ) -> None:
        """Until every job's work completed and publishing is over; BenchError on a connector
        exit, a stall or the phase's time limit."""
        works, total = world.platform.works, jobs.total
        started = time.monotonic()
        last_done, last_change = -1, started
        seen = 0
        pending: list[Work] = []
        while True:
            if seen < len(jobs.work_ids):
                pending.extend(works[w] for w in jobs.work_ids[seen:])
                seen = len(jobs.work_ids)
            pending = [w for w in pending if w.status != "complete"]
            done = seen - len(pending)
            now = time.monotonic()
            rate = done / (now - started) if now > started else 0.0
            line = f"{label:<16} {bar(done, total)} {done}/{total} jobs  {rate:7.1f} jobs/s"
            self.progress.update(line)
            if publishing is not None and publishing.done():
                publishing.result()  # raise a publishing error here
                publishing = None
            if publishing is None and done >= total:
                self.progress.done(f"{line} in {now - started:.1f} s")
                return
            if done != last_done:
                last_done, last_change = done, now
            self._check_progress(label, children, done, total, now - last_change, now - started)
            await asyncio.sleep(0.25)

    def _check_progress(
        self,
        label: str,
        children: Sequence[Child],
        done: int,
        total: int,
        idle_s: float,
        elapsed_s: float,
    ) -> None:
        """BenchError when a connector exited, or they stalled or overran the phase's time
        limit (which grows with the jobs, and with ``--rate``: jobs / rate)."""
        classic = any(c.name == "classic" for c in children)
        per_job_s = CLASSIC_PER_JOB_TIMEOUT_S if classic else PER_JOB_TIMEOUT_S
        timeout = PHASE_BASE_TIMEOUT_S + total * per_job_s
        if self.cfg.rate:
            timeout += total / self.cfg.rate
        for child in children:
            if not child.running:
                self.progress.done("")
                raise BenchError(
                    f"{child.name} exited (code {child.proc and child.proc.returncode}) with "
                    f"{done}/{total} jobs done; its log:\n{child.log_tail()}"
                )
        if idle_s > STALL_TIMEOUT_S or elapsed_s > timeout:
            self.progress.done("")
            logs = "\n".join(f"{c.name} log:\n{c.log_tail()}" for c in children)
            raise BenchError(
                f"{label}: {done}/{total} jobs done, no progress for {idle_s:.0f} s; {logs}"
            )


# -- figures ---------------------------------------------------------------------------------
def job_figures(r: PhaseResult, world: SimWorld, jobs: Jobs) -> None:
    """Completed jobs, span, throughput, service time and latency, from the works' times."""
    works = [world.platform.works[w] for w in jobs.work_ids]
    done = [w for w in works if w.status == "complete" and w.completed_time is not None]
    r.completed = len(done)
    r.in_error = sum(1 for w in works if w.in_error)
    received = [w.received_time for w in works if w.received_time is not None]
    if done and received:
        r.span_s = max(w.completed_time or 0.0 for w in done) - min(received)
        r.jobs_per_s = r.completed / r.span_s if r.span_s > 0 else math.nan
    r.service_ms = summary_ms(
        [
            w.completed_time - w.received_time
            for w in done
            if w.completed_time is not None and w.received_time is not None
        ]
    )
    if jobs.sent_at:
        r.latency_ms = summary_ms(
            [w.completed_time - jobs.sent_at[w.id] for w in done if w.completed_time is not None]
        )
    r.worker_cpu_ms_per_job = r.per_job(r.worker_cpu_s)
    r.push_messages = world.worker.counters.received - world.worker.counters.republished


def lastinfosec_figures(r: PhaseResult, stats: LisSimStats) -> None:
    """Requests the LastInfoSec double answered: count, concurrency, per one-second window."""
    r.lis_requests = stats.total
    r.lis_max_concurrent = stats.max_concurrent
    r.lis_max_per_window = stats.max_per_window()
    r.lis_max_sliding_1s = busiest_window([q.time for q in stats.requests])
    r.lis_by_status = {str(k): v for k, v in sorted(stats.by_status.items())}
    r.lis_sustained_per_s = sustained_rate(stats.per_window, stats.total, r.span_s)
    if stats.per_window:
        first, last = min(stats.per_window), max(stats.per_window)
        r.lis_per_second = [stats.per_window.get(k, 0) for k in range(first, last + 1)]


def sustained_rate(per_window: dict[int, int], total: int, span_s: float) -> float:
    """Mean requests per one-second window, leaving out the first and last (partial) windows."""
    if len(per_window) >= 3:
        first, last = min(per_window), max(per_window)
        inner = range(first + 1, last)
        return sum(per_window.get(k, 0) for k in inner) / len(inner)
    return total / span_s if span_s and span_s > 0 else math.nan
