"""``lis-async bench``: lis_async against the classic pycti-helper connector, in one run.

The simulated world (OpenCTI platform double, LastInfoSec double, OpenCTI worker emulation in its
cheap mode, job producer) runs in this process on the local RabbitMQ; each connector runs as a
subprocess pointed at it. Phases, each with a fresh connector id (fresh queues):

1. ``classic``: ``python -m lis_async.bench.classic`` on ``--classic-jobs`` queued jobs.
2. ``lis_async``: ``python -m lis_async.cli run`` on ``--jobs`` queued jobs.
3. ``latency``: lis_async fed at half the throughput of phase 2 for ``--latency-seconds``.
4. ``rss`` (``--rss-jobs N``): lis_async on N queued jobs, for the memory figure.
5. ``sweep`` (``--sweep``): lis_async at 1, 4, 16, 64 and 128 jobs in flight, plotted.

Queued phases publish every job first (the connector id is registered beforehand, as a connector
that ran before would be, so the platform double has declared its queues), then start the
connector, and measure from the first job received to the last work completed. The connector's
CPU is sampled once it received its first job (import and start-up excluded) and again just
before it is stopped.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import aio_pika
import aiohttp
import psutil

from lis_async.bench.measure import (
    Child,
    Stopwatch,
    find_rabbitmq,
    kill_leftovers,
    machine,
    summary_ms,
)
from lis_async.bench.profile import Profile, summarise
from lis_async.sim.lastinfosec import LisSimConfig
from lis_async.sim.opencti import PlatformSimConfig, Work
from lis_async.sim.world import SimWorld, rabbit_reachable

log = logging.getLogger("lis_async.bench")

DEFAULT_AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/"
SWEEP_IN_FLIGHT = (1, 4, 16, 64, 128)
UNLIMITED_RATE_PER_S = 1000.0
READY_TIMEOUT_S = 120.0
STALL_TIMEOUT_S = 60.0
Connector = Literal["classic", "lis_async"]

REGISTER = (
    "mutation RegisterConnector($input: RegisterConnectorInput) "
    "{ registerConnector(input: $input) { id } }"
)


#: Settings from the benchmark's own environment never reach the connectors (reproducibility;
#: and a proxy variable would send the local LastInfoSec double's traffic through a proxy).
_FOREIGN_PREFIXES = ("CONNECTOR_", "OPENCTI_", "LASTINFOSEC_", "CONFIG_LIS_", "MQ_", "PROXY_")
_PROXY_VARIABLES = frozenset({"http_proxy", "https_proxy", "all_proxy", "no_proxy"})


def _foreign_setting(name: str) -> bool:
    return name.upper().startswith(_FOREIGN_PREFIXES) or name.lower() in _PROXY_VARIABLES


class BenchError(Exception):
    """A phase could not run (connector did not start, stalled, RabbitMQ unreachable...)."""


# ---------------------------------------------------------------------------------- options


def add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    add = parser.add_argument
    add("--jobs", type=int, default=2000, help="queued jobs for lis_async (default 2000)")
    add("--classic-jobs", type=int, default=60, help="queued jobs for the classic connector (60)")
    add("--latency", type=float, default=0.15, help="LastInfoSec latency, seconds (0.15)")
    add("--jitter", type=float, default=0.0, help="extra uniform LastInfoSec delay, seconds")
    add("--bundle-size", type=int, default=12, help="objects per LastInfoSec bundle (12)")
    add("--platform-latency", type=float, default=0.0, help="GraphQL latency, seconds (0)")
    add("--in-flight", type=int, default=64, help="lis_async jobs in flight (64)")
    add(
        "--lis-concurrency",
        type=int,
        default=None,
        help="lis_async LastInfoSec requests open at once (default: --in-flight)",
    )
    add(
        "--rate",
        type=float,
        default=None,
        help="lis_async LastInfoSec requests/s limit (default: none, i.e. 1000/s); "
        "also reports the sustained rate and the busiest one-second window",
    )
    add(
        "--latency-seconds",
        type=float,
        default=10.0,
        help="duration of the paced latency phase (0 skips it)",
    )
    add("--skip-classic", action="store_true", help="do not run the classic connector")
    add("--rss-jobs", type=int, default=0, help="also run lis_async on N queued jobs for RSS")
    add("--sweep", action="store_true", help="throughput at 1, 4, 16, 64, 128 jobs in flight")
    add("--plot", default="bench-sweep.png", help="PNG of the sweep (default bench-sweep.png)")
    add("--json", dest="json_path", default=None, metavar="PATH", help="write a JSON record")
    add(
        "--profile",
        default=None,
        metavar="PATH",
        help="py-spy record of the lis_async worker during the throughput phase "
        "(.svg: flame graph, .txt: collapsed stacks, .json: speedscope)",
    )
    add(
        "--worker-env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="extra environment variable for the lis_async worker (repeatable), "
        "e.g. --worker-env OPENCTI_THREADS=32",
    )
    add("--amqp-url", default=DEFAULT_AMQP_URL)
    add("--seed", type=int, default=0, help="job mix seed")


@dataclass(frozen=True)
class BenchConfig:
    jobs: int = 2000
    classic_jobs: int = 60
    latency: float = 0.15
    jitter: float = 0.0
    bundle_size: int = 12
    platform_latency: float = 0.0
    in_flight: int = 64
    lis_concurrency: int | None = None
    rate: float | None = None
    latency_seconds: float = 10.0
    skip_classic: bool = False
    rss_jobs: int = 0
    sweep: bool = False
    plot: str = "bench-sweep.png"
    json_path: str | None = None
    profile: str | None = None
    amqp_url: str = DEFAULT_AMQP_URL
    seed: int = 0
    worker_env: tuple[str, ...] = ()

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> BenchConfig:
        names = cls.__dataclass_fields__
        values = {k: v for k, v in vars(args).items() if k in names}
        values["worker_env"] = tuple(values.get("worker_env") or ())
        return cls(**values)

    def extra_env(self) -> dict[str, str]:
        return dict(item.split("=", 1) for item in self.worker_env if "=" in item)

    def problems(self) -> list[str]:
        out: list[str] = []
        if self.jobs < 1:
            out.append("--jobs must be at least 1")
        if self.classic_jobs < 1 and not self.skip_classic:
            out.append("--classic-jobs must be at least 1 (or use --skip-classic)")
        if self.in_flight < 1:
            out.append("--in-flight must be at least 1")
        if self.lis_concurrency is not None and self.lis_concurrency < 1:
            out.append("--lis-concurrency must be at least 1")
        if self.rate is not None and self.rate <= 0:
            out.append("--rate must be positive")
        if self.latency < 0 or self.jitter < 0 or self.platform_latency < 0:
            out.append("latencies must not be negative")
        if self.bundle_size < 5:
            out.append("--bundle-size must be at least 5")
        if self.latency_seconds < 0 or self.rss_jobs < 0:
            out.append("--latency-seconds and --rss-jobs must not be negative")
        out.extend(
            f"--worker-env {item!r}: expected NAME=VALUE"
            for item in self.worker_env
            if "=" not in item or not item.split("=", 1)[0]
        )
        return out


# ---------------------------------------------------------------------------------- results


@dataclass
class PhaseResult:
    name: str
    connector: Connector
    jobs: int
    in_flight: int
    mode: Literal["queued", "paced"]
    completed: int = 0
    in_error: int = 0
    span_s: float = math.nan
    jobs_per_s: float = math.nan
    offered_jobs_per_s: float | None = None
    #: received -> completed (the connector's own time per job), milliseconds
    service_ms: dict[str, float] | None = None
    #: published -> completed (paced phase only), milliseconds
    latency_ms: dict[str, float] | None = None
    worker_cpu_s: float = math.nan
    worker_cpu_ms_per_job: float = math.nan
    peak_rss_mb: float = math.nan
    #: worker RSS once a second from its start, MB
    rss_mb_per_second: list[float] = field(default_factory=list)
    bench_cpu_s: float = math.nan
    rabbitmq_cpu_s: float | None = None
    #: CPU the rest of the machine used meanwhile (other processes, kernel); noise indicator
    other_cpu_s: float | None = None
    lis_requests: int = 0
    lis_max_concurrent: int = 0
    lis_max_per_window: int = 0
    lis_sustained_per_s: float = math.nan
    #: requests in each one-second window, from the first request's to the last one's
    lis_per_second: list[int] = field(default_factory=list)
    lis_by_status: dict[str, int] = field(default_factory=dict)
    push_messages: int = 0
    worker_pid: int = -1
    connector_id: str = ""
    exit_code: int | None = None
    profile: str | None = None

    def per_job(self, seconds: float | None) -> float:
        if seconds is None or not self.completed:
            return math.nan
        return seconds / self.completed * 1000


# ---------------------------------------------------------------------------------- progress


class Progress:
    """One ``\\r`` status line on stderr (a line per phase when stderr is not a terminal)."""

    def __init__(self) -> None:
        self.tty = sys.stderr.isatty()
        self._width = 0

    def update(self, text: str) -> None:
        if not self.tty:
            return
        pad = max(0, self._width - len(text))
        sys.stderr.write("\r" + text + " " * pad)
        sys.stderr.flush()
        self._width = len(text)

    def done(self, text: str) -> None:
        if self.tty:
            self.update(text)
            sys.stderr.write("\n")
        else:
            sys.stderr.write(text + "\n")
        sys.stderr.flush()
        self._width = 0


def _bar(done: int, total: int, width: int = 24) -> str:
    filled = width * done // total if total else width
    return "[" + "#" * filled + "." * (width - filled) + "]"


# ---------------------------------------------------------------------------------- a phase


@dataclass(frozen=True)
class PhaseSpec:
    name: str
    connector: Connector
    jobs: int = 0  # queued before the connector starts
    in_flight: int = 1
    paced_rate: float | None = None  # jobs/s, published while the connector runs
    paced_seconds: float = 0.0
    profile: str | None = None


class Bench:
    def __init__(self, cfg: BenchConfig, workdir: Path) -> None:
        self.cfg = cfg
        self.workdir = workdir
        self.progress = Progress()
        self.rabbitmq = find_rabbitmq()
        self.me = psutil.Process()

    # -- world ---------------------------------------------------------------------------
    def _world(self) -> SimWorld:
        c = self.cfg
        return SimWorld(
            platform_config=PlatformSimConfig(
                amqp_url=c.amqp_url, latency_s=c.platform_latency, max_recorded_requests=1000
            ),
            lis_config=LisSimConfig(
                latency_s=c.latency, jitter_s=c.jitter, bundle_size=c.bundle_size
            ),
            amqp_url=c.amqp_url,
            seed=c.seed,
            # Playbook jobs have no work to time; everything else is the producer's mix.
            producer_options={"playbook_share": 0.0},
            # Cheap mode: no stix2 validation, nothing recorded (the simulator must not be the
            # bottleneck).
            worker_options={"validate": False, "max_records": 0, "prefetch_count": 256},
        )

    @staticmethod
    async def _preregister(world: SimWorld) -> None:
        """Register the connector id so that the platform double declares its queues."""
        connector_input = {
            "id": world.connector_id,
            "name": world.connector_name,
            "type": "INTERNAL_ENRICHMENT",
            "scope": world.scope.split(","),
            "auto": False,
            "only_contextual": False,
        }
        async with (
            aiohttp.ClientSession() as session,
            session.post(
                world.opencti_url + "/graphql",
                json={"query": REGISTER, "variables": {"input": connector_input}},
                headers={"Authorization": f"Bearer {world.opencti_token}"},
            ) as resp,
        ):
            body = await resp.json()
        if body.get("errors"):
            raise BenchError(f"pre-registration failed: {body['errors']}")

    def _env(self, world: SimWorld, spec: PhaseSpec) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not _foreign_setting(k)}
        env |= world.env() | {"PYTHONUNBUFFERED": "1"}
        if spec.connector == "classic":
            return env | {"CONNECTOR_TYPE": "INTERNAL_ENRICHMENT", "CONNECTOR_LOG_LEVEL": "error"}
        c = self.cfg
        concurrency = c.lis_concurrency or spec.in_flight
        return (
            env
            | {
                "CONNECTOR_LOG_LEVEL": "warning",
                "CONNECTOR_HEALTH_PORT": "0",
                "CONNECTOR_SHUTDOWN_TIMEOUT_S": "5",
                "CONNECTOR_JOBS_IN_FLIGHT": str(spec.in_flight),
                "LASTINFOSEC_CONCURRENCY": str(concurrency),
                "LASTINFOSEC_RATE_PER_S": str(c.rate or UNLIMITED_RATE_PER_S),
            }
            | c.extra_env()
        )

    @staticmethod
    def _argv(connector: Connector) -> list[str]:
        module = "lis_async.bench.classic" if connector == "classic" else "lis_async.cli"
        return [sys.executable, "-m", module, *([] if connector == "classic" else ["run"])]

    # -- waiting -------------------------------------------------------------------------
    async def _consumers(self, conn: aio_pika.abc.AbstractConnection, queue: str) -> int:
        channel = await conn.channel()
        try:
            q = await channel.declare_queue(queue, passive=True)
            return int(q.declaration_result.consumer_count or 0)
        finally:
            if not channel.is_closed:
                await channel.close()

    async def _wait_ready(self, world: SimWorld, child: Child, queued: bool) -> None:
        """Until the connector took its first job (queued) or consumes its queue (paced)."""
        deadline = time.monotonic() + READY_TIMEOUT_S
        listen = world.names()["listen"]
        calls = world.platform.calls
        async with await aio_pika.connect(self.cfg.amqp_url) as conn:
            polls = 0
            while True:
                if queued and calls["workToReceived"] > 0:
                    return
                if not queued and polls % 10 == 0 and await self._consumers(conn, listen) > 0:
                    return
                if not child.running:
                    raise BenchError(
                        f"{child.name} exited with code {child.proc and child.proc.returncode} "
                        f"before taking a job; its log ({child.log_path}):\n{child.log_tail()}"
                    )
                if time.monotonic() > deadline:
                    raise BenchError(f"{child.name} did not start within {READY_TIMEOUT_S:.0f} s")
                polls += 1
                await asyncio.sleep(0.005)

    async def _wait_done(
        self,
        label: str,
        world: SimWorld,
        child: Child,
        work_ids: list[str],
        total: int,
        publishing: asyncio.Task[None] | None,
    ) -> None:
        works = world.platform.works
        started = time.monotonic()
        timeout = 120.0 + total * (2.0 if child.name == "classic" else 0.25)
        last_done, last_change = -1, started
        seen = 0
        pending: list[Work] = []
        while True:
            if seen < len(work_ids):
                pending.extend(works[w] for w in work_ids[seen:])
                seen = len(work_ids)
            pending = [w for w in pending if w.status != "complete"]
            done = seen - len(pending)
            now = time.monotonic()
            rate = done / (now - started) if now > started else 0.0
            self.progress.update(
                f"{label:<16} {_bar(done, total)} {done}/{total} jobs  {rate:7.1f} jobs/s"
            )
            if publishing is not None and publishing.done():
                publishing.result()  # raise a publishing error here
                publishing = None
            if publishing is None and done >= total:
                self.progress.done(
                    f"{label:<16} {_bar(done, total)} {done}/{total} jobs  {rate:7.1f} jobs/s "
                    f"in {now - started:.1f} s"
                )
                return
            if done != last_done:
                last_done, last_change = done, now
            if not child.running:
                self.progress.done("")
                raise BenchError(
                    f"{child.name} exited (code {child.proc and child.proc.returncode}) with "
                    f"{done}/{total} jobs done; its log:\n{child.log_tail()}"
                )
            if now - last_change > STALL_TIMEOUT_S or now - started > timeout:
                self.progress.done("")
                raise BenchError(
                    f"{label}: {done}/{total} jobs done, no progress for "
                    f"{now - last_change:.0f} s; {child.name} log:\n{child.log_tail()}"
                )
            await asyncio.sleep(0.25)

    # -- publishing ----------------------------------------------------------------------
    async def _publish_queued(self, world: SimWorld, n: int, label: str) -> list[str]:
        ids: list[str] = []
        chunk = 500
        for start in range(0, n, chunk):
            jobs = await world.producer.publish_many(min(chunk, n - start))
            ids.extend(j.work_id for j in jobs if j.work_id)
            self.progress.update(f"{label:<16} publishing {len(ids)}/{n} jobs")
        return ids

    @staticmethod
    async def _pace(
        world: SimWorld, rate: float, n: int, work_ids: list[str], sent_at: dict[str, float]
    ) -> None:
        loop = asyncio.get_running_loop()
        producer = world.producer
        pending: set[asyncio.Task[None]] = set()
        t0 = loop.time()
        for i in range(n):
            delay = t0 + i / rate - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            job = producer.make_job(producer.next_index())
            assert job.work_id is not None  # no playbook jobs in the bench mix
            sent_at[job.work_id] = time.time()
            work_ids.append(job.work_id)
            task = asyncio.create_task(producer.publish(job))
            pending.add(task)
            task.add_done_callback(pending.discard)
        if pending:
            await asyncio.gather(*pending)

    # -- profiling -----------------------------------------------------------------------
    def _start_profiler(self, pid: int, path: str, seconds: float) -> subprocess.Popen[bytes]:
        exe = shutil.which("py-spy")
        if exe is None:
            raise BenchError("--profile needs py-spy (pip install py-spy)")
        fmt = {".svg": "flamegraph", ".json": "speedscope"}.get(Path(path).suffix, "raw")
        duration = max(1, int(seconds))
        argv = [exe, "record", "--pid", str(pid), "--duration", str(duration)]
        argv += ["--rate", "200", "--gil", "--format", fmt, "--output", path, "--nonblocking"]
        log_file = (self.workdir / "py-spy.log").open("wb")
        return subprocess.Popen(argv, stdout=log_file, stderr=subprocess.STDOUT)

    # -- the phase -----------------------------------------------------------------------
    async def run_phase(self, spec: PhaseSpec) -> PhaseResult:
        label = spec.name
        result = PhaseResult(
            name=spec.name,
            connector=spec.connector,
            jobs=0,
            in_flight=spec.in_flight,
            mode="paced" if spec.paced_rate else "queued",
        )
        world = self._world()
        result.connector_id = world.connector_id
        child: Child | None = None
        profiler: subprocess.Popen[bytes] | None = None
        async with world:
            try:
                await self._preregister(world)
                await world.start_worker_emulation()
                work_ids: list[str] = []
                sent_at: dict[str, float] = {}
                if spec.jobs:
                    work_ids = await self._publish_queued(world, spec.jobs, label)
                total = len(work_ids)
                if spec.paced_rate:
                    total = max(1, round(spec.paced_rate * spec.paced_seconds))
                    result.offered_jobs_per_s = spec.paced_rate
                result.jobs = total
                self.progress.update(f"{label:<16} starting {spec.connector}")
                child = Child(
                    spec.connector,
                    self._argv(spec.connector),
                    self._env(world, spec),
                    self.workdir / f"{spec.name}.log",
                )
                await child.start()
                result.worker_pid = child.pid
                await self._wait_ready(world, child, queued=not spec.paced_rate)
                assert child.ps is not None
                watch = Stopwatch({"worker": child.ps, "bench": self.me, "rabbitmq": self.rabbitmq})
                watch.start()
                if spec.profile:
                    seconds = min(10.0, max(1.0, total / 200))
                    profiler = self._start_profiler(child.pid, spec.profile, seconds)
                    result.profile = spec.profile
                publishing = None
                if spec.paced_rate:
                    publishing = asyncio.create_task(
                        self._pace(world, spec.paced_rate, total, work_ids, sent_at)
                    )
                try:
                    await self._wait_done(label, world, child, work_ids, total, publishing)
                finally:
                    if publishing is not None and not publishing.done():
                        publishing.cancel()
                        with contextlib.suppress(asyncio.CancelledError, Exception):
                            await publishing
                cpu = watch.stop()
                if profiler is not None:
                    await asyncio.to_thread(profiler.wait, 60)
                result.worker_cpu_s = cpu.get("worker", math.nan)
                result.bench_cpu_s = cpu.get("bench", math.nan)
                result.rabbitmq_cpu_s = cpu.get("rabbitmq")
                ours = sum(v for k, v in cpu.items() if k != "machine")
                result.other_cpu_s = max(0.0, cpu.get("machine", math.nan) - ours)
                result.peak_rss_mb = child.peak_rss / 2**20
                self._figures(result, world, work_ids, sent_at)
            finally:
                if profiler is not None and profiler.poll() is None:
                    profiler.kill()
                    profiler.wait()
                if child is not None:
                    result.exit_code = await child.stop()
                    if child.peak_rss:
                        result.peak_rss_mb = child.peak_rss / 2**20
                    result.rss_mb_per_second = [round(b / 2**20, 1) for b in child.rss_series]
        return result

    def _figures(
        self, r: PhaseResult, world: SimWorld, work_ids: list[str], sent_at: dict[str, float]
    ) -> None:
        works = [world.platform.works[w] for w in work_ids]
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
        if sent_at:
            r.latency_ms = summary_ms(
                [w.completed_time - sent_at[w.id] for w in done if w.completed_time is not None]
            )
        r.worker_cpu_ms_per_job = r.per_job(r.worker_cpu_s)
        stats = world.lis.stats
        r.lis_requests = stats.total
        r.lis_max_concurrent = stats.max_concurrent
        r.lis_max_per_window = stats.max_per_window()
        r.lis_by_status = {str(k): v for k, v in sorted(stats.by_status.items())}
        r.lis_sustained_per_s = sustained_rate(stats.per_window, stats.total, r.span_s)
        if stats.per_window:
            first, last = min(stats.per_window), max(stats.per_window)
            r.lis_per_second = [stats.per_window.get(k, 0) for k in range(first, last + 1)]
        r.push_messages = world.worker.counters.received - world.worker.counters.republished


def sustained_rate(per_window: dict[int, int], total: int, span_s: float) -> float:
    """Mean requests per one-second window, leaving out the first and last (partial) windows."""
    if len(per_window) >= 3:
        first, last = min(per_window), max(per_window)
        inner = range(first + 1, last)
        return sum(per_window.get(k, 0) for k in inner) / len(inner)
    return total / span_s if span_s and span_s > 0 else math.nan


# ---------------------------------------------------------------------------------- report


def _f(value: float | None, digits: int = 1) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:,.{digits}f}"


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or math.isnan(a) or math.isnan(b) or b == 0:
        return None
    return a / b


def _pct(summary: dict[str, float] | None, key: str) -> float | None:
    return None if summary is None else summary[key]


def build_record(
    cfg: BenchConfig, phases: dict[str, PhaseResult], sweep: list[PhaseResult]
) -> dict[str, Any]:
    classic, lis = phases.get("classic"), phases.get("lis_async")
    paced, rss = phases.get("latency"), phases.get("rss")
    ratios: dict[str, float | None] = {}
    if classic and lis:
        ratios = {
            "throughput": _ratio(lis.jobs_per_s, classic.jobs_per_s),
            "cpu_per_job": _ratio(lis.worker_cpu_ms_per_job, classic.worker_cpu_ms_per_job),
        }
    targets: dict[str, dict[str, Any]] = {}

    def target(name: str, value: float | None, limit: float, higher: bool, note: str) -> None:
        ok = (
            None
            if value is None or math.isnan(value)
            else (value >= limit if higher else value <= limit)
        )
        targets[name] = {"value": value, "limit": limit, "met": ok, "note": note}

    std = cfg.latency == 0.15 and cfg.bundle_size == 12 and cfg.in_flight == 64
    if ratios:
        target(
            "throughput_ratio",
            ratios["throughput"],
            25.0,
            True,
            "lis_async/classic jobs/s"
            + ("" if std else " (target defined at 150 ms, 12 objects, 64 in flight)"),
        )
    if lis:
        target("worker_cpu_ms_per_job", lis.worker_cpu_ms_per_job, 6.0, False, "aim 3 ms")
    if cfg.rate is not None and lis:
        target("rate_sustained_per_s", lis.lis_sustained_per_s, 0.94 * cfg.rate, True, "")
        target("rate_max_per_window", float(lis.lis_max_per_window), cfg.rate, False, "")
    if rss:
        target(
            "peak_rss_mb",
            rss.peak_rss_mb,
            200.0,
            False,
            f"{rss.jobs} jobs queued, {rss.in_flight} in flight",
        )
    if paced:
        target(
            "latency_p99_ms",
            _pct(paced.latency_ms, "p99"),
            cfg.latency * 1000 + 100,
            False,
            f"paced at {_f(paced.offered_jobs_per_s)} jobs/s (half the measured maximum)",
        )
    return {
        "kind": "lis-async-bench",
        "version": 1,
        "machine": machine(),
        "config": asdict(cfg),
        "world": {
            "worker_emulation": "cheap mode (no stix2 validation, nothing recorded)",
            "job_mix": "JobProducer default mix without playbook jobs",
            "lastinfosec_latency_s": cfg.latency,
            "bundle_size": cfg.bundle_size,
            "platform_latency_s": cfg.platform_latency,
        },
        "phases": {k: asdict(v) for k, v in phases.items()},
        "sweep": [asdict(s) for s in sweep],
        "ratios": ratios,
        "targets": targets,
    }


def format_table(cfg: BenchConfig, phases: dict[str, PhaseResult], record: dict[str, Any]) -> str:
    classic, lis, paced = phases.get("classic"), phases.get("lis_async"), phases.get("latency")
    cols = [p for p in (classic, lis) if p is not None]
    head = ["", *(p.connector for p in cols)]
    if classic and lis:
        head.append("lis/classic")
    rows: list[list[str]] = []

    def row(
        label: str, get: Callable[[PhaseResult], float | None], digits: int = 1, ratio: bool = True
    ) -> None:
        values = [get(p) for p in cols]
        line = [label, *(_f(v, digits) for v in values)]
        if classic and lis:
            r = _ratio(values[-1], values[0]) if ratio else None
            line.append("" if r is None else f"{r:.2f}x")
        rows.append(line)

    def lat(p: PhaseResult, key: str) -> float | None:
        if p.connector == "lis_async" and paced is not None:
            return _pct(paced.latency_ms, key)
        return _pct(p.service_ms, key)

    row("jobs", lambda p: float(p.completed), 0, ratio=False)
    row("jobs/s", lambda p: p.jobs_per_s)

    def lat_of(key: str) -> Callable[[PhaseResult], float | None]:
        return lambda p: lat(p, key)

    for key in ("p50", "p95", "p99"):
        row(f"job latency {key} (ms)", lat_of(key), 0)
    row("worker CPU / job (ms)", lambda p: p.worker_cpu_ms_per_job, 2)
    row("worker CPU (cores busy)", lambda p: _ratio(p.worker_cpu_s, p.span_s), 2, ratio=False)
    row("worker peak RSS (MB)", lambda p: p.peak_rss_mb)
    row("LastInfoSec requests", lambda p: float(p.lis_requests), 0, ratio=False)
    row("LastInfoSec max concurrent", lambda p: float(p.lis_max_concurrent), 0, ratio=False)
    row("LastInfoSec max in 1 s", lambda p: float(p.lis_max_per_window), 0, ratio=False)
    row("bench process CPU / job (ms)", lambda p: p.per_job(p.bench_cpu_s), 2, ratio=False)
    row("bench process (cores busy)", lambda p: _ratio(p.bench_cpu_s, p.span_s), 2, ratio=False)
    row("RabbitMQ CPU / job (ms)", lambda p: p.per_job(p.rabbitmq_cpu_s), 2, ratio=False)
    row("RabbitMQ (cores busy)", lambda p: _ratio(p.rabbitmq_cpu_s, p.span_s), 2, ratio=False)
    row("other processes (cores busy)", lambda p: _ratio(p.other_cpu_s, p.span_s), 2, ratio=False)
    row(
        "push messages / job",
        lambda p: p.push_messages / p.completed if p.completed else None,
        ratio=False,
    )
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    lines = [
        "  ".join(c.ljust(widths[0]) if i == 0 else c.rjust(widths[i]) for i, c in enumerate(r))
        for r in [head, *rows]
    ]
    lines.insert(1, "-" * len(lines[0]))
    notes = [
        f"LastInfoSec {cfg.latency * 1000:.0f} ms (+{cfg.jitter * 1000:.0f} ms jitter), "
        f"{cfg.bundle_size}-object bundles, platform {cfg.platform_latency * 1000:.0f} ms; "
        f"lis_async {cfg.in_flight} jobs in flight, "
        + (f"rate {cfg.rate:g}/s" if cfg.rate else "no rate limit")
        + "; worker emulation in cheap mode (no stix2 validation).",
        "jobs/s: queued jobs / (first job received -> last work completed).",
    ]
    if paced:
        notes.append(
            f"job latency: classic = received -> completed; lis_async = published -> completed, "
            f"paced at {_f(paced.offered_jobs_per_s)} jobs/s for {cfg.latency_seconds:g} s."
        )
    if cfg.rate is not None and lis:
        windows = lis.lis_per_second
        busiest = windows.index(max(windows)) + 1 if windows else 0
        later = max(windows[1:], default=0)
        notes.append(
            f"rate limit {cfg.rate:g}/s: sustained {_f(lis.lis_sustained_per_s)} req/s, "
            f"busiest one-second window {lis.lis_max_per_window} requests (second {busiest} of "
            f"{len(windows)}; busiest after the first second: {later}); first seconds: "
            + ", ".join(str(n) for n in windows[:5])
            + "."
        )
    rss = phases.get("rss")
    if rss:
        notes.append(
            f"RSS phase: {rss.jobs} jobs queued, {rss.in_flight} in flight: peak RSS "
            f"{_f(rss.peak_rss_mb)} MB, {_f(rss.jobs_per_s)} jobs/s, "
            f"{_f(rss.worker_cpu_ms_per_job, 2)} ms CPU/job."
        )
    targets = record.get("targets", {})
    if targets:
        notes.append("targets:")
        for name, t in targets.items():
            state = {True: "MET", False: "MISSED", None: "n/a"}[t["met"]]
            value = _f(t["value"], 2)
            extra = f" ({t['note']})" if t["note"] else ""
            notes.append(f"  {state:<6} {name} = {value} (limit {t['limit']:g}){extra}")
    return "\n".join([*lines, "", *notes])


def plot_sweep(
    path: str, sweep: list[PhaseResult], cfg: BenchConfig, classic: float | None
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = [s.in_flight for s in sweep]
    ys = [s.jobs_per_s for s in sweep]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.plot(xs, ys, marker="o", label="lis_async")
    for x, y in zip(xs, ys, strict=True):
        ax.annotate(f"{y:.0f}", (x, y), textcoords="offset points", xytext=(0, 7), ha="center")
    if classic is not None and not math.isnan(classic):
        ax.axhline(classic, color="grey", linestyle="--", label=f"classic ({classic:.1f} jobs/s)")
    ax.set_xscale("log", base=2)
    ax.set_xticks(xs, [str(x) for x in xs])
    ax.set_xlabel("jobs in flight")
    ax.set_ylabel("jobs/s")
    ax.set_title(
        f"lis_async throughput vs jobs in flight "
        f"(LastInfoSec {cfg.latency * 1000:.0f} ms, {cfg.bundle_size}-object bundles)"
    )
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------------- main


def _attach_profile(path: str, record: dict[str, Any], workdir: Path) -> str:
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


def _write_json(path: str, record: dict[str, Any]) -> None:
    text = json.dumps(_nan_to_none(record), indent=2, allow_nan=False)
    Path(path).write_text(text + "\n")


async def run_bench(cfg: BenchConfig, workdir: Path) -> tuple[dict[str, Any], str]:
    """Run every phase; return the JSON record and the printed report."""
    bench = Bench(cfg, workdir)
    phases: dict[str, PhaseResult] = {}
    sweep: list[PhaseResult] = []
    if not cfg.skip_classic:
        phases["classic"] = await bench.run_phase(
            PhaseSpec("classic", "classic", jobs=cfg.classic_jobs)
        )
    lis = await bench.run_phase(
        PhaseSpec("lis_async", "lis_async", jobs=cfg.jobs, in_flight=cfg.in_flight,
                  profile=cfg.profile)
    )  # fmt: skip
    phases["lis_async"] = lis
    if cfg.latency_seconds > 0 and not math.isnan(lis.jobs_per_s):
        rate = max(1.0, lis.jobs_per_s / 2)
        phases["latency"] = await bench.run_phase(
            PhaseSpec("latency", "lis_async", in_flight=cfg.in_flight, paced_rate=rate,
                      paced_seconds=cfg.latency_seconds)
        )  # fmt: skip
    if cfg.rss_jobs:
        phases["rss"] = await bench.run_phase(
            PhaseSpec("rss", "lis_async", jobs=cfg.rss_jobs, in_flight=cfg.in_flight)
        )
    if cfg.sweep:
        for n in SWEEP_IN_FLIGHT:
            jobs = min(cfg.jobs, max(40, 15 * n))
            sweep.append(
                await bench.run_phase(PhaseSpec(f"sweep-{n}", "lis_async", jobs=jobs, in_flight=n))
            )
    record = build_record(cfg, phases, sweep)
    record["rabbitmq_cpu_measured"] = bench.rabbitmq is not None
    report = format_table(cfg, phases, record)
    if cfg.profile:
        report += await asyncio.to_thread(_attach_profile, cfg.profile, record, workdir)
    if sweep:
        report += "\n\nsweep (jobs in flight -> jobs/s): " + ", ".join(
            f"{s.in_flight} -> {_f(s.jobs_per_s)}" for s in sweep
        )
        classic = phases.get("classic")
        await asyncio.to_thread(
            plot_sweep, cfg.plot, sweep, cfg, classic.jobs_per_s if classic else None
        )
        report += f"\nplot: {cfg.plot}"
    return record, report


async def _main(cfg: BenchConfig) -> int:
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
        if ok:
            shutil.rmtree(workdir, ignore_errors=True)
    print(report)
    if cfg.json_path:
        await asyncio.to_thread(_write_json, cfg.json_path, record)
        print(f"record: {cfg.json_path}")
    return 0


def _nan_to_none(value: Any) -> Any:
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _nan_to_none(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_nan_to_none(v) for v in value]
    return value


def run_bench_cli(args: argparse.Namespace) -> int:
    cfg = BenchConfig.from_args(args)
    problems = cfg.problems()
    if problems:
        for p in problems:
            print(f"lis-async bench: {p}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    logging.getLogger("lis_async.sim").setLevel(logging.ERROR)
    try:
        import uvloop

        return uvloop.run(_main(cfg))
    except KeyboardInterrupt:
        print("\nlis-async bench: interrupted", file=sys.stderr)
        return 130
    except asyncio.CancelledError:  # SIGTERM
        print("\nlis-async bench: terminated", file=sys.stderr)
        return 143
    finally:
        for name in kill_leftovers():
            print(f"lis-async bench: killed a leftover {name} process", file=sys.stderr)
