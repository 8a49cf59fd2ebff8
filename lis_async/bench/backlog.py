"""The backlog phases of ``lis-async bench --backlog N``: manual jobs queued behind N auto jobs.

Two phases, each on a fresh connector id (fresh queues) with one ``lis-async run`` worker:
``backlog-lanes`` (the worker's defaults: priority lanes) and ``backlog-fifo`` (the same with
``CONNECTOR_PRIORITY_LANES=false``). :meth:`BacklogRunner.run` takes a :class:`BacklogSpec`
through these steps:

1. build the world with :data:`BACKLOG_MIX` (no job above TLP:AMBER, no file without a hash:
   every job costs a LastInfoSec request), pre-register the connector id, start the OpenCTI
   worker emulation, start the worker and wait until it consumes its queue;
2. make the ``--backlog`` auto-mode jobs (``internal.mode == "auto"``, auto-create and
   auto-update kinds, each a file of its own random content, so no two share a lookup value
   and the answer cache never saves a request), then publish them at once, as fast as the
   broker confirms them (a burst: the listen queue floods); then the ``--manual`` manual-mode
   jobs (``internal.mode == "manual"``) behind them, each one's publish confirm timed. All the
   while :class:`ListenWatch` samples the listen queue, for how fast the worker takes jobs off
   it while it is flooded (with lanes: the mover);
3. wait until every job's work completed, or ``--backlog-seconds`` after the last manual job
   was confirmed (the time cap), whichever comes first;
4. derive the figures from the platform double's works (:func:`backlog_figures`): each manual
   job's latency (publish confirmed -> work completed; those still waiting at the end count as
   lower bounds), and the auto works completed per second.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import statistics
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Final

import aiohttp

from lis_async.bench.backlog_table import MOVER_PHASE
from lis_async.bench.config import PRIORITY_LANES_SETTING
from lis_async.bench.double import LisDouble
from lis_async.bench.feed import build_world, preregister
from lis_async.bench.measure import (
    Child,
    Stopwatch,
    busiest_window,
    censored_percentile,
    slope,
    slope_per_s,
)
from lis_async.bench.phase import STALL_TIMEOUT_S, PhaseRunner, lastinfosec_figures
from lis_async.bench.processes import connector_child
from lis_async.bench.progress import bar
from lis_async.bench.results import (
    BacklogPhaseResult,
    BenchError,
    Bound,
    MoverPhaseResult,
    PhaseResult,
)
from lis_async.sim.opencti import Work
from lis_async.sim.producer import ProducedJob
from lis_async.sim.world import SimWorld

#: The job producer's options in a backlog phase: no job is held back by the max-TLP gate, no
#: file lacks a hash, no draft (the rest of the mix is the producer's).
BACKLOG_MIX: Final[Mapping[str, float]] = {
    "red_share": 0.0,
    "no_hash_share": 0.0,
    "draft_share": 0.0,
}
#: The auto jobs' kinds, alternating per publishing batch, and their entity type (a file's
#: hashes come from its own random content: distinct lookup values by construction).
AUTO_KINDS: Final = ("auto_create", "auto_update")
AUTO_ENTITY_TYPE: Final = "StixFile"
MANUAL_KIND: Final = "manual"
#: Auto jobs are made in batches of this size, the kinds alternating per batch.
PUBLISH_BATCH: Final = 100
POLL_S: Final = 0.25
#: The listen queue is sampled this often while a phase runs (:class:`ListenWatch`).
LISTEN_POLL_S: Final = 0.1
#: A listen queue with at least this many jobs ready is flooded: the jobs taken off it per
#: second then measure the worker's intake (with lanes, the mover), not the producer's pace.
FLOODED: Final = 1_000


@dataclass(frozen=True)
class BacklogSpec:
    """One backlog phase: its name, and whether the worker keeps its priority lanes."""

    name: str
    lanes: bool

    @property
    def overrides(self) -> dict[str, str]:
        """What the phase sets in the worker's environment."""
        return {} if self.lanes else {PRIORITY_LANES_SETTING: "false"}


#: The phases of a backlog run, in order (before them, :meth:`BacklogRunner.run_mover`).
BACKLOG_SPECS: Final = (BacklogSpec("backlog-lanes", True), BacklogSpec("backlog-fifo", False))
#: The mover phase's rate: the worker hardly processes while it moves (its CPU is the move's).
MOVER_RATE_PER_S: Final = 1.0
#: The mover phase gives up when the listen queue does not start draining within this long.
MOVER_START_TIMEOUT_S: Final = 60.0


@dataclass
class Published:
    """A backlog phase's jobs, as published."""

    #: when the first auto job was published (epoch seconds)
    first_at: float = 0.0
    auto_ids: list[str] = field(default_factory=list)
    auto_values: set[str] = field(default_factory=set)
    #: the manual jobs' work ids, in publishing order, and when each publish was confirmed
    manual_ids: list[str] = field(default_factory=list)
    sent_at: dict[str, float] = field(default_factory=dict)

    @property
    def manual_done_at(self) -> float:
        """When the last manual publish was confirmed."""
        return max(self.sent_at.values(), default=self.first_at)


class BacklogRunner:
    """Runs backlog phases with what a :class:`PhaseRunner` shares (options, working directory,
    progress line, waiting for the worker)."""

    def __init__(self, runner: PhaseRunner) -> None:
        self.runner = runner
        self.cfg = runner.cfg

    @property
    def auto_jobs(self) -> int:
        return self.cfg.backlog or 0

    @property
    def manual_jobs(self) -> int:
        return self.cfg.manual or 0

    async def run(self, spec: BacklogSpec) -> BacklogPhaseResult:
        """Run one backlog phase in a fresh world; the worker is stopped whatever happens."""
        cfg = self.cfg
        result = BacklogPhaseResult(
            name=spec.name,
            connector="lis_async",
            jobs=0,
            in_flight=cfg.in_flight,
            mode="backlog",
            lanes=spec.lanes,
            worker_overrides=spec.overrides,
        )
        world = build_world(cfg, producer=BACKLOG_MIX)
        result.connector_id = world.connector_id
        async with world:
            await preregister(world)
            await world.start_worker_emulation()
            async with self._worker(spec.name, world, spec.overrides, result) as (child, double):
                await self._measure(spec, world, child, double, result)
        return result

    @contextlib.asynccontextmanager
    async def _worker(
        self, name: str, world: SimWorld, overrides: Mapping[str, str], result: PhaseResult
    ) -> AsyncIterator[tuple[Child, LisDouble]]:
        """A lis_async worker (``overrides`` in its environment) and the LastInfoSec double it
        is pointed at, both started; both stopped on the way out, the worker's exit code and
        peak RSS in ``result``."""
        cfg, workdir = self.cfg, self.runner.workdir
        double = LisDouble.of(cfg, world, workdir / f"{name}-lastinfosec.log")
        env = {**overrides, "LASTINFOSEC_BASE_URL": double.base_url}
        child = connector_child(
            cfg, world, "lis_async", cfg.in_flight, workdir / f"{name}.log", env
        )
        self.runner.progress.update(f"{name:<16} starting lis_async")
        try:
            await double.start()
            await child.start()
            result.worker_pid = child.pid
            yield child, double
        finally:
            result.exit_code = await child.stop()
            await double.child.stop()
            if child.peak_rss:
                result.peak_rss_mb = child.peak_rss / 2**20

    async def run_mover(self) -> MoverPhaseResult:
        """The ``backlog-mover`` phase: the auto jobs published before the worker starts, then
        how fast it moves them into its lane (from the first taken off the listen queue until
        none is ready), with its CPU and RabbitMQ's per job moved."""
        cfg = self.cfg
        result = MoverPhaseResult(MOVER_PHASE, "lis_async", 0, cfg.in_flight, "backlog")
        world = build_world(cfg, producer=BACKLOG_MIX)
        result.connector_id = world.connector_id
        async with world:
            await preregister(world)
            await world.start_worker_emulation()
            autos = self._make_autos(world)
            self.runner.progress.update(f"{MOVER_PHASE:<16} publishing {len(autos)} auto jobs")
            await world.producer.publish_all(autos)
            result.jobs = len(autos)
            overrides = {"LASTINFOSEC_RATE_PER_S": f"{MOVER_RATE_PER_S:g}"}
            async with self._worker(MOVER_PHASE, world, overrides, result) as (child, _):
                await self._measure_moves(world, child, result)
        self.runner.progress.done(
            f"{MOVER_PHASE:<16} {result.jobs:,} jobs moved at {result.moves_per_s:,.0f}/s"
        )
        return result

    async def _measure_moves(self, world: SimWorld, child: Child, r: MoverPhaseResult) -> None:
        """From the first job taken off the listen queue until none is ready."""
        name, total = world.names()["listen"], r.jobs
        listen = ListenWatch(world)
        deadline = time.monotonic() + MOVER_START_TIMEOUT_S
        while await listen.ready(name) >= total:
            if not child.running or time.monotonic() > deadline:
                raise BenchError(
                    f"{MOVER_PHASE}: the worker took no job off the listen queue; its log:\n"
                    f"{child.log_tail()}"
                )
            await asyncio.sleep(0.01)
        assert child.ps is not None
        watch = Stopwatch({"worker": child.ps, "rabbitmq": self.runner.rabbitmq})
        watch.start()
        started = time.monotonic()
        while True:
            ready = await listen.sample(name)
            self.runner.progress.update(f"{MOVER_PHASE:<16} {bar(total - ready, total)} moving")
            if ready == 0:
                break
            if not child.running:
                raise BenchError(f"{MOVER_PHASE}: the worker exited; its log:\n{child.log_tail()}")
            await asyncio.sleep(LISTEN_POLL_S)
        cpu = watch.stop()
        r.span_s = time.monotonic() - started
        r.completed = total  # moved (none is left ready in the listen queue)
        r.moves_mean_per_s = total / r.span_s if r.span_s > 0 else math.nan
        _, r.moves_per_s = listen.figures()
        r.worker_cpu_s = cpu.get("worker", math.nan)
        r.rabbitmq_cpu_s = cpu.get("rabbitmq")
        r.worker_cpu_ms_per_move = r.worker_cpu_s / total * 1000
        if r.rabbitmq_cpu_s is not None:
            r.rabbitmq_cpu_ms_per_move = r.rabbitmq_cpu_s / total * 1000

    async def _measure(
        self,
        spec: BacklogSpec,
        world: SimWorld,
        child: Child,
        double: LisDouble,
        result: BacklogPhaseResult,
    ) -> None:
        """From the worker consuming to the phase's end: publish, wait, then the figures."""
        await self.runner.wait_ready(world, [child], backlog=False)
        assert child.ps is not None
        autos = self._make_autos(world)
        watch = Stopwatch({"worker": child.ps})
        listen = ListenWatch(world)
        sampling = asyncio.create_task(listen.run())
        watch.start()
        try:
            published = await self._publish(spec.name, world, autos, result)
            end, result.stopped_at_cap = await self._wait(spec.name, world, child, published)
        finally:
            sampling.cancel()
        if sampling.done() and not sampling.cancelled() and sampling.exception() is not None:
            raise BenchError(f"sampling the listen queue failed: {sampling.exception()!r}")
        result.worker_cpu_s = watch.stop().get("worker", math.nan)
        result.listen_peak, result.listen_taken_per_s = listen.figures()
        backlog_figures(result, world.platform.works, published, end)
        async with aiohttp.ClientSession() as session:
            stats = await double.stats(session)
        lastinfosec_figures(result, stats)
        flood_end = published.first_at + result.auto_publish_s + 1.0
        later = [q.time for q in stats.requests if q.time >= flood_end]
        result.lis_max_sliding_after_flood = busiest_window(later)

    # -- publishing ------------------------------------------------------------------------
    def _make_autos(self, world: SimWorld) -> list[ProducedJob]:
        """The auto jobs, made before the burst (their works registered with the double)."""
        producer, total, jobs = world.producer, self.auto_jobs, []
        for batch_no, start in enumerate(range(0, total, PUBLISH_BATCH)):
            kind = AUTO_KINDS[batch_no % len(AUTO_KINDS)]
            for _ in range(min(PUBLISH_BATCH, total - start)):
                i = producer.next_index()
                jobs.append(producer.make_job(i, kind=kind, entity_type=AUTO_ENTITY_TYPE))
        return jobs

    async def _publish(
        self, label: str, world: SimWorld, autos: list[ProducedJob], result: BacklogPhaseResult
    ) -> Published:
        """The auto jobs at once, as fast as they are confirmed; then the manual jobs."""
        producer, total = world.producer, len(autos)
        out = Published(first_at=time.time())
        out.auto_ids = [j.work_id for j in autos if j.work_id]
        out.auto_values = {j.value for j in autos if j.value}
        before = producer.published

        async def progress() -> None:
            while True:
                line = f"{label:<16} publishing {producer.published - before}/{total} auto jobs"
                self.runner.progress.update(line)
                await asyncio.sleep(POLL_S)

        ticker = asyncio.create_task(progress())
        try:
            await producer.publish_all(autos)
        finally:
            ticker.cancel()
        autos_done = time.time()
        result.auto_publish_s = autos_done - out.first_at
        await publish_manual(world, self.manual_jobs, out)
        result.manual_publish_s = out.manual_done_at - autos_done
        result.auto_distinct_values = len(out.auto_values)
        return out

    # -- waiting ---------------------------------------------------------------------------
    async def _wait(
        self, label: str, world: SimWorld, child: Child, published: Published
    ) -> tuple[float, bool]:
        """Until every work completed (False) or the time cap (True); the end (epoch seconds).
        BenchError when the worker exits or nothing completes for a while."""
        works = world.platform.works
        auto = [works[w] for w in published.auto_ids]
        manual = [works[w] for w in published.manual_ids]
        cap_at = published.manual_done_at + (self.cfg.backlog_seconds or 0.0)
        last_done, last_change = -1, time.monotonic()
        while True:
            auto = [w for w in auto if w.status != "complete"]
            manual = [w for w in manual if w.status != "complete"]
            now = time.time()
            line = self._line(label, len(auto), len(manual), cap_at - now)
            self.runner.progress.update(line)
            if not auto and not manual:
                self.runner.progress.done(line)
                return now, False
            if now >= cap_at:
                self.runner.progress.done(line + " (time cap)")
                return now, True
            done = self.auto_jobs + self.manual_jobs - len(auto) - len(manual)
            if done != last_done:
                last_done, last_change = done, time.monotonic()
            problem = _worker_problem(label, child, done, time.monotonic() - last_change)
            if problem:
                self.runner.progress.done("")
                raise BenchError(problem)
            await asyncio.sleep(POLL_S)

    def _line(self, label: str, auto_left: int, manual_left: int, left_s: float) -> str:
        auto_done = self.auto_jobs - auto_left
        manual_done = self.manual_jobs - manual_left
        return (
            f"{label:<16} {bar(auto_done, self.auto_jobs)} auto {auto_done}/{self.auto_jobs}"
            f"  manual {manual_done}/{self.manual_jobs}  cap in {max(0.0, left_s):.0f} s"
        )


class ListenWatch:
    """Samples the listen queue every :data:`LISTEN_POLL_S`: its jobs ready, and the jobs
    published so far (the producer's confirms). Published minus ready is what the worker has
    taken off the queue (give or take its unacknowledged prefetch, which stays full while the
    queue is flooded)."""

    def __init__(self, world: SimWorld) -> None:
        self._world = world
        #: (monotonic time, jobs published, jobs ready in the listen queue)
        self.samples: list[tuple[float, int, int]] = []

    async def run(self) -> None:
        """Sample until cancelled."""
        name = self._world.names()["listen"]
        while True:
            await self.sample(name)
            await asyncio.sleep(LISTEN_POLL_S)

    async def sample(self, name: str) -> int:
        """One sample (the jobs ready, returned)."""
        ready = await self.ready(name)
        self.samples.append((time.monotonic(), self._world.producer.published, ready))
        return ready

    async def ready(self, name: str) -> int:
        """The jobs ready in the queue ``name``: a passive declare on a fresh channel of the
        world's own connection (repeated on one channel, it read 0 all along here)."""
        async with self._world.admin_channel() as channel:
            queue = await channel.declare_queue(name, passive=True)
            return int(queue.declaration_result.message_count or 0)

    def figures(self) -> tuple[int, float]:
        """The listen queue's peak depth, and the jobs taken off it per second while it held
        at least :data:`FLOODED` (least-squares slope; NaN: it never flooded for long)."""
        peak = max((ready for _, _, ready in self.samples), default=0)
        flooded = [
            (t, published - ready) for t, published, ready in self.samples if ready >= FLOODED
        ]
        if len(flooded) < 3:
            return peak, math.nan
        return peak, slope([t for t, _ in flooded], [taken for _, taken in flooded])


async def publish_manual(world: SimWorld, count: int, out: Published) -> None:
    """``count`` manual-mode jobs, published at once; each one's confirm time into ``out``."""
    producer = world.producer
    jobs = [producer.make_job(producer.next_index(), kind=MANUAL_KIND) for _ in range(count)]

    async def one(job: ProducedJob, work_id: str) -> None:
        await producer.publish(job)
        out.sent_at[work_id] = time.time()

    pending = []
    for job in jobs:
        assert job.work_id is not None  # manual jobs always carry a work
        out.manual_ids.append(job.work_id)
        pending.append(one(job, job.work_id))
    await asyncio.gather(*pending)


def _worker_problem(label: str, child: Child, done: int, idle_s: float) -> str | None:
    """Why the phase cannot go on: the worker exited, or nothing completed for
    :data:`STALL_TIMEOUT_S` (None: it goes on)."""
    if not child.running:
        return (
            f"{label}: the worker exited (code {child.proc and child.proc.returncode}) with "
            f"{done} jobs done; its log:\n{child.log_tail()}"
        )
    if idle_s > STALL_TIMEOUT_S:
        return (
            f"{label}: {done} jobs done, none for {idle_s:.0f} s; the worker's log:\n"
            f"{child.log_tail()}"
        )
    return None


# -- figures ---------------------------------------------------------------------------------
def completed_at(work: Work, end: float) -> float | None:
    """When ``work`` completed, if it did by ``end`` (epoch seconds)."""
    t = work.completed_time
    if work.status != "complete" or t is None or t > end:
        return None
    return t


def backlog_figures(
    r: BacklogPhaseResult, works: Mapping[str, Work], published: Published, end: float
) -> None:
    """Every figure of a backlog phase that ended at ``end``, from the platform double's works
    (their completion times) and the publish times."""
    auto = [works[w] for w in published.auto_ids]
    manual = [works[w] for w in published.manual_ids]
    r.auto_jobs, r.manual_jobs = len(auto), len(manual)
    r.jobs = r.auto_jobs + r.manual_jobs
    r.span_s = end - published.first_at
    auto_times = sorted(t for w in auto if (t := completed_at(w, end)) is not None)
    r.auto_completed = len(auto_times)
    auto_rate_figures(r, auto_times)
    manual_figures(r, manual, published.sent_at, end)
    r.completed = r.auto_completed + r.manual_completed
    r.in_error = sum(1 for w in (*auto, *manual) if w.in_error)
    r.jobs_per_s = r.completed / r.span_s if r.span_s > 0 else math.nan
    r.worker_cpu_ms_per_job = r.per_job(r.worker_cpu_s)


def auto_rate_figures(r: BacklogPhaseResult, times: Sequence[float]) -> None:
    """Auto works completed per second, over their completion times (sorted): the
    least-squares slope of the running count, and the mean from the first to the last."""
    if len(times) < 2:
        return
    r.auto_window_s = times[-1] - times[0]
    r.auto_jobs_per_s = slope_per_s(times)
    if r.auto_window_s > 0:
        r.auto_mean_per_s = (len(times) - 1) / r.auto_window_s


def manual_figures(
    r: BacklogPhaseResult, manual: Sequence[Work], sent_at: Mapping[str, float], end: float
) -> None:
    """Each manual job's latency, publish confirmed -> work completed (None: not completed by
    ``end``, and how long it had waited then); p50, p99 and max, lower bounds when they need a
    job that had not completed."""
    r.manual_latency_s, r.manual_waited_s = [], []
    for w in manual:
        t = completed_at(w, end)
        if t is None:
            r.manual_latency_s.append(None)
            r.manual_waited_s.append(end - sent_at[w.id])
        else:
            r.manual_latency_s.append(t - sent_at[w.id])
    known = [s for s in r.manual_latency_s if s is not None]
    r.manual_completed = len(known)
    waited = r.manual_waited_s
    r.manual_p50_s = Bound(*censored_percentile(known, waited, 50))
    r.manual_p99_s = Bound(*censored_percentile(known, waited, 99))
    r.manual_max_s = Bound(*censored_percentile(known, waited, 100))
    r.manual_stages_s = manual_stages(manual, sent_at, end)


def manual_stages(
    manual: Sequence[Work], sent_at: Mapping[str, float], end: float
) -> dict[str, float]:
    """Medians of the completed manual jobs' stages (see ``BacklogPhaseResult``)."""
    stages: dict[str, list[float]] = {"taken": [], "processed": [], "imported": []}
    for w in manual:
        done = completed_at(w, end)
        if done is None or w.received_time is None or w.processed_time is None:
            continue
        stages["taken"].append(w.received_time - sent_at[w.id])
        stages["processed"].append(w.processed_time - w.received_time)
        stages["imported"].append(done - w.processed_time)
    return {k: statistics.median(v) for k, v in stages.items() if v}
