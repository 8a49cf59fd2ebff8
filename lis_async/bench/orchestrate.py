"""The run of ``lis-async bench``: its phases in order, then the record and the report.

The simulated world (OpenCTI platform double, LastInfoSec double, OpenCTI worker emulation in its
cheap mode, job producer) runs in this process on the local RabbitMQ; each connector runs as a
subprocess pointed at it. Phases, each with a fresh connector id (fresh queues):

1. ``classic``: ``python -m lis_async.bench.classic`` on ``--classic-jobs`` queued jobs.
2. ``lis_async``: ``python -m lis_async.cli run`` on ``--jobs`` queued jobs.
   ``lis_async-fifo`` (``--fifo``): the same with ``CONNECTOR_PRIORITY_LANES=false``.
3. ``latency``: lis_async fed at half the throughput of phase 2 for ``--latency-seconds``.
4. ``rss`` (``--rss-jobs N``): lis_async on N queued jobs, for the memory figure.
5. ``sweep`` (``--sweep``): lis_async at 1, 4, 16, 64 and 128 jobs in flight, plotted.

``--replicas N`` makes a cluster run instead, where only these run (``lis_async.bench.replicas``):

6. ``replicas``: N lis_async workers on one connector id sharing the rate and the answer cache
   through Redis, on ``--jobs`` jobs of which ``--repeat-share`` repeat an earlier observable.
7. ``replicas-baseline`` (``--replicas-baseline``): the same without Redis, each worker at
   ``--rate`` / N.

   With ``--redis-fault kill|freeze`` the ``replicas`` phase shares a redis-server of its own,
   which is killed or frozen mid-phase (``lis_async.bench.fault``); the logs are kept.

``--backlog N`` makes a backlog run instead, where only these run (``lis_async.bench.backlog``):

8. ``backlog-mover``: N auto jobs published, then one lis_async worker started (at 1 req/s):
   how fast it moves them into its lane, and the CPU per job moved.
9. ``backlog-lanes``: one lis_async worker with its defaults (priority lanes); N auto jobs
   published once it consumes, then ``--manual`` manual jobs behind them; until every work
   completed or ``--backlog-seconds`` after the manual jobs were published.
10. ``backlog-fifo``: the same with ``CONNECTOR_PRIORITY_LANES=false``.

Queued phases publish every job first (the connector id is registered beforehand, as a connector
that ran before would be, so the platform double has declared its queues), then start the
connector, and measure from the first job received to the last work completed. The connector's
CPU is sampled once it received its first job (import and start-up excluded) and again just
before it is stopped.

Each phase is a step of :data:`PHASES`: a coroutine that reads the options and the results so far,
and runs zero or more phases (a :class:`~lis_async.bench.phase.PhaseSpec` each) into the results.
A new phase is a new step in that tuple.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import shutil
import signal
import sys
import tempfile
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lis_async.bench.backlog import BACKLOG_SPECS, BacklogRunner
from lis_async.bench.backlog_table import MOVER_PHASE
from lis_async.bench.config import PRIORITY_LANES_SETTING, BenchConfig
from lis_async.bench.feed import Paced, Queued
from lis_async.bench.phase import PhaseRunner, PhaseSpec
from lis_async.bench.plot import plot_sweep
from lis_async.bench.profile import Profile, summarise
from lis_async.bench.record import build_record, write_json
from lis_async.bench.replicas import ReplicaRunner, ReplicaSpec, redis_problem
from lis_async.bench.results import FIFO_PHASE, BenchError, PhaseResult, fmt
from lis_async.bench.table import format_table
from lis_async.sim.world import rabbit_reachable

SWEEP_IN_FLIGHT = (1, 4, 16, 64, 128)


@dataclass
class Results:
    """The phases run so far: by name, and the sweep's in order of jobs in flight."""

    phases: dict[str, PhaseResult] = field(default_factory=dict)
    sweep: list[PhaseResult] = field(default_factory=list)


Step = Callable[[PhaseRunner, BenchConfig, Results], Awaitable[None]]


# -- the phases --------------------------------------------------------------------------------
async def classic_phase(runner: PhaseRunner, cfg: BenchConfig, results: Results) -> None:
    if cfg.skip_classic or not cfg.single_worker_run:
        return
    spec = PhaseSpec("classic", "classic", Queued(cfg.classic_jobs))
    results.phases["classic"] = await runner.run(spec)


async def throughput_phase(runner: PhaseRunner, cfg: BenchConfig, results: Results) -> None:
    if not cfg.single_worker_run:
        return
    spec = PhaseSpec(
        "lis_async", "lis_async", Queued(cfg.jobs), in_flight=cfg.in_flight, profile=cfg.profile
    )
    results.phases["lis_async"] = await runner.run(spec)


async def fifo_phase(runner: PhaseRunner, cfg: BenchConfig, results: Results) -> None:
    """``--fifo``: the ``lis_async`` phase again without priority lanes (what they cost)."""
    if not cfg.fifo or not cfg.single_worker_run:
        return
    spec = PhaseSpec(
        FIFO_PHASE,
        "lis_async",
        Queued(cfg.jobs),
        in_flight=cfg.in_flight,
        overrides={PRIORITY_LANES_SETTING: "false"},
    )
    results.phases[FIFO_PHASE] = await runner.run(spec)


async def latency_phase(runner: PhaseRunner, cfg: BenchConfig, results: Results) -> None:
    """Paced at half the throughput the ``lis_async`` phase measured."""
    lis = results.phases.get("lis_async")
    if cfg.latency_seconds <= 0 or lis is None or math.isnan(lis.jobs_per_s):
        return
    rate = max(1.0, lis.jobs_per_s / 2)
    feed = Paced(rate=rate, seconds=cfg.latency_seconds)
    spec = PhaseSpec("latency", "lis_async", feed, in_flight=cfg.in_flight)
    results.phases["latency"] = await runner.run(spec)


async def rss_phase(runner: PhaseRunner, cfg: BenchConfig, results: Results) -> None:
    if not cfg.rss_jobs:
        return
    spec = PhaseSpec("rss", "lis_async", Queued(cfg.rss_jobs), in_flight=cfg.in_flight)
    results.phases["rss"] = await runner.run(spec)


async def sweep_phases(runner: PhaseRunner, cfg: BenchConfig, results: Results) -> None:
    if not cfg.sweep:
        return
    for n in SWEEP_IN_FLIGHT:
        jobs = min(cfg.jobs, max(40, 15 * n))
        spec = PhaseSpec(f"sweep-{n}", "lis_async", Queued(jobs), in_flight=n)
        results.sweep.append(await runner.run(spec))


async def replica_phases(runner: PhaseRunner, cfg: BenchConfig, results: Results) -> None:
    """N workers through Redis, then (``--replicas-baseline``) the same N without it."""
    if cfg.replicas is None:
        return
    problem = None if cfg.fault_run else await redis_problem(cfg.redis_url)
    if problem:
        hint = "start it (`redis-server --daemonize yes`) or pass --redis-url"
        raise BenchError(f"{problem}: {hint}")
    replicas = ReplicaRunner(runner)
    specs = [ReplicaSpec("replicas", cfg.replicas, shared=True, fault=cfg.redis_fault)]
    if cfg.replicas_baseline:
        specs.append(ReplicaSpec("replicas-baseline", cfg.replicas, shared=False))
    for spec in specs:
        results.phases[spec.name] = await replicas.run(spec)


async def backlog_phases(runner: PhaseRunner, cfg: BenchConfig, results: Results) -> None:
    """Manual jobs behind a backlog of auto jobs: priority lanes, then FIFO."""
    if cfg.backlog is None:
        return
    backlog = BacklogRunner(runner)
    results.phases[MOVER_PHASE] = await backlog.run_mover()
    for spec in BACKLOG_SPECS:
        results.phases[spec.name] = await backlog.run(spec)


#: Every phase step, in the order they run (each one decides from the options whether it runs).
PHASES: tuple[Step, ...] = (
    classic_phase,
    throughput_phase,
    fifo_phase,
    latency_phase,
    rss_phase,
    sweep_phases,
    replica_phases,
    backlog_phases,
)


# -- the run -----------------------------------------------------------------------------------
async def run_bench(cfg: BenchConfig, workdir: Path) -> tuple[dict[str, Any], str]:
    """Run every phase; return the JSON record and the printed report."""
    runner = PhaseRunner(cfg, workdir)
    results = Results()
    for step in PHASES:
        await step(runner, cfg, results)
    record = build_record(cfg, results.phases, results.sweep)
    record["rabbitmq_cpu_measured"] = runner.rabbitmq is not None
    report = await _report(cfg, results, record, workdir)
    return record, report


async def _report(cfg: BenchConfig, results: Results, record: dict[str, Any], workdir: Path) -> str:
    """The table, then the profile summary and the sweep (whose plot is drawn here)."""
    report = format_table(cfg, results.phases, record)
    if cfg.profile:
        report += await asyncio.to_thread(attach_profile, cfg.profile, record, workdir)
    sweep = results.sweep
    if sweep:
        report += "\n\nsweep (jobs in flight -> jobs/s): " + ", ".join(
            f"{s.in_flight} -> {fmt(s.jobs_per_s)}" for s in sweep
        )
        classic = results.phases.get("classic")
        await asyncio.to_thread(
            plot_sweep, cfg.plot, sweep, cfg, classic.jobs_per_s if classic else None
        )
        report += f"\nplot: {cfg.plot}"
    return report


def attach_profile(path: str, record: dict[str, Any], workdir: Path) -> str:
    """Summarise a raw py-spy profile into the record; return the text for the report."""
    if Path(path).suffix in (".svg", ".json"):
        return f"\n\nprofile: {path}"
    if not Path(path).is_file():
        return f"\n\nprofile: py-spy wrote nothing (see {workdir}/py-spy.log)"
    prof = Profile.parse(Path(path).read_text(errors="replace").splitlines())
    record["profile"] = {
        "path": path,
        "samples": prof.total,
        "lis_async_functions": prof.project_functions(15),
        "libraries": prof.libraries(),
        "hottest": prof.hottest(15),
    }
    return (
        f"\n\nprofile of the lis_async worker (py-spy --gil, raw stacks in {path}; "
        "the figures above are slowed by the sampling):\n" + summarise(path, 12)
    )


async def run(cfg: BenchConfig) -> int:
    """The whole benchmark: print the report (and write the record); the exit code.

    SIGTERM cancels the run (the connectors are stopped on the way out). The connectors' logs
    are kept, and their directory named, when a phase fails, and after a fault run (the
    workers' and the private redis-server's logs are its evidence).
    """
    if not await rabbit_reachable(cfg.amqp_url):
        print(
            f"lis-async bench: RabbitMQ is not reachable at {cfg.amqp_url.split('@')[-1]} "
            "(start it, e.g. `rabbitmq-server -detached`, or pass --amqp-url)",
            file=sys.stderr,
        )
        return 1
    task = asyncio.current_task()
    loop = asyncio.get_running_loop()
    if task is not None:
        loop.add_signal_handler(signal.SIGTERM, task.cancel)
    workdir = Path(tempfile.mkdtemp(prefix="lis-bench-"))
    ok = False
    try:
        record, report = await run_bench(cfg, workdir)
        ok = True
    except BenchError as exc:
        print(f"\nlis-async bench: {exc}\n(logs kept in {workdir})", file=sys.stderr)
        return 1
    finally:
        with contextlib.suppress(Exception):
            loop.remove_signal_handler(signal.SIGTERM)
        if ok and not cfg.fault_run:
            shutil.rmtree(workdir, ignore_errors=True)
    print(report)
    if cfg.fault_run:
        print(f"logs: {workdir}")
    if cfg.json_path:
        await asyncio.to_thread(write_json, cfg.json_path, record)
        print(f"record: {cfg.json_path}")
    return 0
