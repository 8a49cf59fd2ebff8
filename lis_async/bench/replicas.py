"""The replica phases of ``lis-async bench --replicas N``: N workers on one connector id.

:meth:`ReplicaRunner.run` takes a :class:`ReplicaSpec` through these steps:

1. build the world (a fresh connector id; ``--repeat-share`` of its jobs carry the observable
   of an earlier job), pre-register the connector id, start the OpenCTI worker emulation;
   start a LastInfoSec double of its own (``python -m lis_async.sim.lastinfosec``), so that
   the times it stamps on requests, from which the rate figures come, are not delayed by this
   process's busy event loop (publishing, the OpenCTI double, the worker emulation);
2. start N ``lis-async run`` workers on that id, pointed at that double, each exposing its
   metrics on a port of its own. Shared (cluster mode): every worker gets the same
   ``REDIS_URL`` and a ``REDIS_KEY_PREFIX`` made for this phase alone (runs never share a
   cache), and ``LASTINFOSEC_RATE_PER_S`` = ``--rate``, the cluster's rate. Baseline: no Redis,
   each worker limited to ``--rate`` / N on its own;
3. once every worker consumes the queue, start the CPU stopwatch (the workers, the bench
   process, the double, RabbitMQ and, shared, the ``redis-server`` listening on the URL's
   port), then publish every job at once (:class:`~lis_async.bench.feed.Burst`);
4. once every work completed: stop the stopwatch, read the double's statistics, scrape each
   worker's metrics, stop the workers and the double, delete the phase's Redis keys; derive
   the figures (:func:`cluster_lis_figures`, :func:`replica_figures`).

With ``--redis-fault`` (``lis_async.bench.fault``) the workers share a ``redis-server`` of the
phase's own instead, which is killed or frozen mid-phase; a stall then ends the phase (the works
not completed counted as lost) instead of failing it, and the private server is stopped last,
whatever happens.
"""

from __future__ import annotations

import asyncio
import math
import secrets
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit

import aiohttp
import psutil
import redis.asyncio as aioredis
from prometheus_client.parser import text_string_to_metric_families
from redis.exceptions import RedisError

from lis_async.bench.config import BenchConfig
from lis_async.bench.double import LisDouble, double_stats
from lis_async.bench.fault import FaultInjector, PrivateRedis, fault_figures, feed_through_fault
from lis_async.bench.feed import Burst, Jobs, build_world, preregister
from lis_async.bench.measure import (
    Child,
    Stopwatch,
    busiest_window_at,
    find_listener,
    slope_per_s,
)
from lis_async.bench.phase import PhaseRunner, job_figures, lastinfosec_figures
from lis_async.bench.processes import (
    UNLIMITED_RATE_PER_S,
    connector_argv,
    connector_env,
    free_port,
)
from lis_async.bench.results import (
    BenchError,
    FaultFigures,
    ReplicaFigures,
    ReplicaPhaseResult,
)
from lis_async.redact import mask_url
from lis_async.sim.lastinfosec import LisSimStats
from lis_async.sim.world import SimWorld

#: How long a worker consuming its queue may take to answer on its metrics port, and the
#: LastInfoSec double to answer once started.
METRICS_READY_TIMEOUT_S = 30.0
SCRAPE_TIMEOUT_S = 5.0
REDIS_TIMEOUT_S = 2.0
#: A backlog shorter than this says nothing about a sustained rate (its figure is left NaN).
MIN_BACKLOG_S = 2.0
_LOOPBACK = frozenset({"127.0.0.1", "localhost", "::1"})

#: A scrape: sample name -> (labels, value) of each of its samples.
Samples = dict[str, list[tuple[dict[str, str], float]]]


@dataclass(frozen=True)
class ReplicaSpec:
    """What one replica phase runs: how many workers, whether they share Redis, and the fault
    to apply to a Redis of the phase's own (``kill``, ``freeze``; None: the machine's Redis,
    no fault)."""

    name: str
    replicas: int
    shared: bool
    fault: str | None = None

    def rate_per_replica(self, cfg: BenchConfig) -> float:
        """Each worker's ``LASTINFOSEC_RATE_PER_S``: the cluster's rate when shared."""
        rate = cfg.rate or UNLIMITED_RATE_PER_S
        return rate if self.shared else rate / self.replicas


@dataclass
class _Replica:
    """A worker, or the LastInfoSec double: a process and its HTTP port."""

    child: Child
    port: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


class ReplicaRunner:
    """Runs replica phases with what a :class:`PhaseRunner` shares (options, working directory,
    progress line, waiting)."""

    def __init__(self, runner: PhaseRunner) -> None:
        self.runner = runner
        self.cfg = runner.cfg
        self.redis = None if self.cfg.fault_run else redis_process(self.cfg.redis_url)
        # One REDIS_CACHE_KEY shared by the replicas of every phase (cluster mode requires one).
        self.cache_key = secrets.token_hex(32)

    async def run(self, spec: ReplicaSpec) -> ReplicaPhaseResult:
        """Run one replica phase in a fresh world; the workers are stopped whatever happens."""
        cfg = self.cfg
        result = ReplicaPhaseResult(
            name=spec.name,
            connector="lis_async",
            jobs=0,
            in_flight=cfg.in_flight,
            mode=Burst.mode,
            replicas=spec.replicas,
            shared=spec.shared,
            rate_per_replica=spec.rate_per_replica(cfg),
            repeat_share=cfg.repeat_share,
            redis_key_prefix=f"lis-bench:{uuid.uuid4().hex}" if spec.shared else "",
        )
        feed = Burst(cfg.jobs)
        world = build_world(cfg, cfg.repeat_share)
        result.connector_id = world.connector_id
        private: PrivateRedis | None = None
        if spec.fault is not None and spec.shared:
            private = PrivateRedis(self.runner.workdir, spec.name)
            seconds = cfg.redis_fault_seconds or 0.0
            result.fault = FaultFigures(spec.fault, seconds, redis_url=private.url)
        try:
            await self._run(spec, feed, world, result, private)
        finally:
            if private is not None:
                await private.stop()
        return result

    async def _run(
        self,
        spec: ReplicaSpec,
        feed: Burst,
        world: SimWorld,
        result: ReplicaPhaseResult,
        private: PrivateRedis | None,
    ) -> None:
        if private is not None:
            await private.start()
        async with world:
            await preregister(world)
            await world.start_worker_emulation()
            jobs = Jobs()
            await feed.before_start(world, jobs, self.runner.progress, spec.name)
            result.jobs = jobs.total
            double = self._double(world, spec.name)
            redis_url = private.url if private is not None else self.cfg.redis_url
            replicas = [
                self._replica(world, result, i, double, redis_url)
                for i in range(1, spec.replicas + 1)
            ]
            result.per_replica = [
                ReplicaFigures(i, metrics_port=r.port) for i, r in enumerate(replicas, 1)
            ]
            self.runner.progress.update(f"{spec.name:<16} starting {spec.replicas} workers")
            try:
                await double.start()
                for r, fig in zip(replicas, result.per_replica, strict=True):
                    await r.child.start()
                    fig.pid = r.child.pid
                procs = (double, replicas)
                await self._measure(spec, feed, world, procs, jobs, result, private)
            finally:
                await self._stop(replicas, result, drop=private is None)
                await double.child.stop()

    def _double(self, world: SimWorld, label: str) -> LisDouble:
        """The phase's LastInfoSec double, in a process of its own, shaped like the world's."""
        return LisDouble.of(self.cfg, world, self.runner.workdir / f"{label}-lastinfosec.log")

    def _replica(
        self,
        world: SimWorld,
        result: ReplicaPhaseResult,
        index: int,
        double: LisDouble,
        redis_url: str,
    ) -> _Replica:
        cfg, port = self.cfg, free_port()
        overrides = {
            "LASTINFOSEC_BASE_URL": double.base_url,
            "CONNECTOR_EXPOSE_METRICS": "true",
            "CONNECTOR_METRICS_PORT": str(port),
            "LASTINFOSEC_RATE_PER_S": f"{result.rate_per_replica:g}",
        }
        if result.shared:
            overrides |= {
                "REDIS_URL": redis_url,
                "REDIS_KEY_PREFIX": result.redis_key_prefix,
                "REDIS_CACHE_KEY": self.cache_key,
            }
        env = connector_env(cfg, world, "lis_async", cfg.in_flight, overrides)
        log_path = self.runner.workdir / f"{result.name}-{index}.log"
        child = Child(f"replica {index}", connector_argv("lis_async"), env, log_path)
        return _Replica(child, port)

    async def _stop(
        self, replicas: Sequence[_Replica], result: ReplicaPhaseResult, drop: bool
    ) -> None:
        """Stop the workers; their exit codes, log warnings and RSS into ``result``; ``drop``:
        delete the phase's keys from the shared Redis (not a private one, stopped after)."""
        codes = await asyncio.gather(*(r.child.stop() for r in replicas))
        for r, fig, code in zip(replicas, result.per_replica, codes, strict=True):
            fig.exit_code = code
            warnings = log_warnings(r.child)
            fig.log_warnings = len(warnings)
            fig.first_warning = warnings[0][:300] if warnings else ""
            if r.child.peak_rss:
                fig.peak_rss_mb = r.child.peak_rss / 2**20
        peaks = [f.peak_rss_mb for f in result.per_replica if not math.isnan(f.peak_rss_mb)]
        result.peak_rss_mb = max(peaks, default=math.nan)
        if result.shared and drop:
            await drop_keys(self.cfg.redis_url, result.redis_key_prefix)

    # -- measuring -------------------------------------------------------------------------
    async def _measure(
        self,
        spec: ReplicaSpec,
        feed: Burst,
        world: SimWorld,
        procs: tuple[LisDouble, Sequence[_Replica]],
        jobs: Jobs,
        result: ReplicaPhaseResult,
        private: PrivateRedis | None,
    ) -> None:
        """From every worker consuming to every job done (or, with a fault, to a stall): CPU,
        the double's statistics and the workers' metrics, then the figures."""
        double, replicas = procs
        children = [r.child for r in replicas]
        await self.runner.wait_ready(world, children, backlog=False)
        async with aiohttp.ClientSession() as session:
            await _wait_http(session, replicas)
            watched: dict[str, psutil.Process | None] = {
                f"replica-{i}": r.child.ps for i, r in enumerate(replicas, 1)
            }
            watched |= {"bench": self.runner.me, "rabbitmq": self.runner.rabbitmq}
            watched |= {"lastinfosec": double.child.ps}
            watched["redis"] = self.redis if spec.shared else None
            if private is not None and private.child is not None:
                # the first server only: a killed one takes its CPU figure with it
                watched["redis"] = private.child.ps
            watch = Stopwatch(watched)
            watch.start()
            if private is not None and result.fault is not None:
                injector = FaultInjector(private, result.fault)
                progress = self.runner.progress
                result.fault.ended = await feed_through_fault(
                    self.cfg, progress, spec.name, feed, world, children, jobs, injector
                )
            else:
                await self.runner.feed_and_wait(spec.name, feed, world, children, jobs)
            cpu = watch.stop()
            stats = await double_stats(session, double.url)
            scrapes = await asyncio.gather(*(scrape(session, r.port) for r in replicas))
        result.worker_cpu_s = sum(cpu.get(name, math.nan) for name in watched if "-" in name)
        result.bench_cpu_s = cpu.get("bench", math.nan)
        result.rabbitmq_cpu_s = cpu.get("rabbitmq")
        result.redis_cpu_s = cpu.get("redis")
        result.lis_double_cpu_s = cpu.get("lastinfosec")
        ours = sum(v for k, v in cpu.items() if k != "machine")
        result.other_cpu_s = max(0.0, cpu.get("machine", math.nan) - ours)
        job_figures(result, world, jobs)
        result.lost = jobs.total - result.completed
        lastinfosec_figures(result, stats)
        cluster_lis_figures(result, stats, world, jobs)
        if result.fault is not None:
            fault_figures(result.fault, [q.time for q in stats.requests])
        for i, (fig, samples) in enumerate(zip(result.per_replica, scrapes, strict=True), 1):
            replica_figures(fig, samples, cpu.get(f"replica-{i}", math.nan), result.span_s)


async def _wait_http(session: aiohttp.ClientSession, procs: Sequence[_Replica]) -> None:
    """Until every worker answers on its metrics port (BenchError after a while; the double
    waits for itself: :meth:`LisDouble.start`)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + METRICS_READY_TIMEOUT_S
    timeout = aiohttp.ClientTimeout(total=SCRAPE_TIMEOUT_S)
    for p in procs:
        path = "/metrics"
        while True:
            try:
                async with session.get(p.url + path, timeout=timeout) as resp:
                    resp.raise_for_status()
                    await resp.read()
                break
            except (aiohttp.ClientError, TimeoutError) as exc:
                if loop.time() > deadline or not p.child.running:
                    raise BenchError(
                        f"{p.child.name}: nothing on port {p.port} ({exc}); its log:\n"
                        f"{p.child.log_tail()}"
                    ) from None
                await asyncio.sleep(0.1)


# -- figures ---------------------------------------------------------------------------------
def cluster_lis_figures(
    r: ReplicaPhaseResult, stats: LisSimStats, world: SimWorld, jobs: Jobs
) -> None:
    """From the LastInfoSec double's recorded requests: distinct values asked, requests per
    distinct value, the busiest one-second window (sliding), and the rate sustained while the
    backlog lasted (first request -> last job taken from the queue, at least
    :data:`MIN_BACKLOG_S`)."""
    recorded = list(stats.requests)
    times = [q.time for q in recorded]
    r.lis_recorded = len(recorded)
    r.lis_busiest_1s, busiest_at = busiest_window_at(times)
    if not times:
        return
    first = min(times)
    r.lis_busiest_1s_at_s = busiest_at - first
    r.lis_request_offsets_ms = sorted(round((t - first) * 1000) for t in times)
    if len(recorded) == stats.total:
        r.lis_distinct_values = len({q.value for q in recorded})
        r.lis_requests_per_distinct = stats.total / r.lis_distinct_values
    works = (world.platform.works[w] for w in jobs.work_ids)
    received = [w.received_time for w in works if w.received_time is not None]
    if received:
        end = min(max(times), max(received))
        r.backlog_s = end - first
        if r.backlog_s >= MIN_BACKLOG_S:
            r.lis_backlog_per_s = slope_per_s([t for t in times if t <= end])


def replica_figures(fig: ReplicaFigures, samples: Samples, cpu_s: float, span_s: float) -> None:
    """One worker's figures from its scraped metrics and its CPU over the phase."""
    fig.jobs_by_outcome = {
        labels.get("outcome", "?"): int(v) for labels, v in samples.get("lis_jobs_total", [])
    }
    fig.jobs = sum(fig.jobs_by_outcome.values())
    fig.jobs_per_s = fig.jobs / span_s if span_s > 0 else math.nan
    fig.cpu_s = cpu_s
    fig.cpu_ms_per_job = cpu_s / fig.jobs * 1000 if fig.jobs else math.nan
    fig.lis_requests = int(metric(samples, "lis_api_requests_total"))
    fig.cache_hits_local = int(metric(samples, "lis_cache_hits_total", level="local"))
    fig.cache_hits_shared = int(metric(samples, "lis_cache_hits_total", level="shared"))
    fig.coalesced_local = int(metric(samples, "lis_coalesced_total"))
    fig.coalesced_waits = int(metric(samples, "lis_coalesced_waits_total"))
    fig.coalesced_waits_answered = int(metric(samples, "lis_coalesced_waits_answered_total"))
    fig.cluster_granted = int(metric(samples, "lis_cluster_granted_total"))
    fig.redis_errors = int(metric(samples, "lis_redis_errors_total"))
    fig.redis_transitions = int(metric(samples, "lis_redis_transitions_total"))
    shared = samples.get("lis_redis_shared")
    fig.redis_shared = bool(shared[0][1]) if shared else None


def log_warnings(child: Child) -> list[str]:
    """The warning, error and critical lines of a worker's log (the logs go when a run
    succeeds; these stay in the record)."""
    try:
        text = child.log_path.read_text(errors="replace")
    except OSError:
        return []
    # Plain lines (OPENCTI_JSON_LOGGING=false) and pycti's JSON lines (the default).
    levels = [
        form.format(lv)
        for lv in ("WARNING", "ERROR", "CRITICAL")
        for form in (" {} ", '"level":"{}"')
    ]
    return [line for line in text.splitlines() if any(lv in line for lv in levels)]


# -- metrics ---------------------------------------------------------------------------------
def parse_metrics(text: str) -> Samples:
    """A Prometheus text exposition, by sample name."""
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out.setdefault(sample.name, []).append((dict(sample.labels), float(sample.value)))
    return out


def metric(samples: Samples, name: str, **labels: str) -> float:
    """The sum of the samples called ``name`` whose labels include ``labels`` (0 if none)."""
    return sum(
        value
        for have, value in samples.get(name, [])
        if all(have.get(k) == v for k, v in labels.items())
    )


async def scrape(session: aiohttp.ClientSession, port: int) -> Samples:
    """One worker's ``/metrics`` on ``port``."""
    timeout = aiohttp.ClientTimeout(total=SCRAPE_TIMEOUT_S)
    async with session.get(f"http://127.0.0.1:{port}/metrics", timeout=timeout) as resp:
        resp.raise_for_status()
        return parse_metrics(await resp.text())


# -- Redis -----------------------------------------------------------------------------------
def redis_process(url: str) -> psutil.Process | None:
    """The ``redis-server`` of this machine serving ``url`` (found by its listening port), if
    its CPU times are readable; None for a remote or a unix-socket URL."""
    try:
        parts = urlsplit(url)
        port = parts.port or 6379
    except ValueError:
        return None
    if parts.scheme not in ("redis", "rediss") or parts.hostname not in _LOOPBACK:
        return None
    return find_listener("redis-server", port)


async def redis_problem(url: str) -> str | None:
    """Why Redis at ``url`` cannot serve a replica phase (None: it answers PING)."""
    client = aioredis.from_url(
        url, socket_timeout=REDIS_TIMEOUT_S, socket_connect_timeout=REDIS_TIMEOUT_S
    )
    try:
        await client.ping()
    except (RedisError, OSError, TimeoutError) as exc:
        return f"Redis is not reachable at {mask_url(url)} ({type(exc).__name__})"
    finally:
        await client.aclose()
    return None


async def drop_keys(url: str, prefix: str) -> int:
    """Delete every key under ``prefix:`` (a phase's answers, leases, rate window); the count.
    Best effort: a Redis gone meanwhile leaves them to their TTLs."""
    client = aioredis.from_url(
        url, socket_timeout=REDIS_TIMEOUT_S, socket_connect_timeout=REDIS_TIMEOUT_S
    )
    dropped = 0
    try:
        batch: list[bytes] = []
        async for key in client.scan_iter(match=f"{prefix}:*", count=500):
            batch.append(key)
            if len(batch) >= 500:
                dropped += int(await client.delete(*batch))
                batch.clear()
        if batch:
            dropped += int(await client.delete(*batch))
    except (RedisError, OSError, TimeoutError):
        pass
    finally:
        await client.aclose()
    return dropped
