"""A Redis fault under the replicas: ``lis-async bench --replicas N --rate R --redis-fault
kill|freeze``.

The replicas share a ``redis-server`` of the phase's own (:class:`PrivateRedis`: a free loopback
port, no persistence), never the machine's. :class:`FaultInjector` waits until the first job was
taken, then :data:`~lis_async.bench.config.FAULT_AFTER_S` more, and applies the fault:

- ``kill``: SIGKILL, ``--redis-fault-seconds`` without Redis, then a new server on the same port,
  empty (every key lost: rate schedule, registry, cached answers, leases);
- ``freeze``: SIGSTOP (connections stay open, nothing answers), then SIGCONT.

:func:`feed_through_fault` publishes the jobs and waits, like a replica phase does, except that a
stall ends the phase (the works not completed are reported as lost) instead of failing it.
:func:`span_figures` splits the requests the LastInfoSec double recorded into the spans before,
during and after the fault.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import shutil
import signal
import time
from collections.abc import Sequence
from pathlib import Path

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from lis_async.bench.config import FAULT_AFTER_S, FAULT_STALL_S, BenchConfig
from lis_async.bench.feed import Burst, Jobs
from lis_async.bench.measure import Child, slope_per_s
from lis_async.bench.phase import PER_JOB_TIMEOUT_S, PHASE_BASE_TIMEOUT_S
from lis_async.bench.processes import free_port, own_env
from lis_async.bench.progress import Progress, bar
from lis_async.bench.results import BenchError, FaultFigures, SpanFigures
from lis_async.sim.opencti import Work
from lis_async.sim.world import SimWorld

#: The spans of a fault run, in order.
SPANS = ("before", "during", "after")
#: How long a private redis-server may take to answer PING once started.
REDIS_START_TIMEOUT_S = 20.0
WINDOW_S = 1.0


# -- figures (pure) --------------------------------------------------------------------------
def span_figures(
    times: Sequence[float], fault_start: float, fault_end: float, width_s: float = WINDOW_S
) -> list[SpanFigures]:
    """The requests at ``times`` (epoch seconds) in the spans before ``fault_start``, from it to
    ``fault_end``, and from then on; offsets in seconds after the first request.

    Each sliding window ``[t, t + width)`` is anchored at a request and counted in the span of
    that request: any set of requests that fits in a half-open window fits in the one that
    begins at its first request, so the largest of the three spans' figures is the phase's
    busiest window (:func:`~lis_async.bench.measure.busiest_window`)."""
    ordered = sorted(times)
    if not ordered:
        return [SpanFigures(name) for name in SPANS]
    first, last = ordered[0], ordered[-1]
    # in_window[i]: the requests in [ordered[i], ordered[i] + width)
    in_window: list[int] = []
    end = 0
    for i, t in enumerate(ordered):
        end = max(end, i)
        while end < len(ordered) and ordered[end] < t + width_s:
            end += 1
        in_window.append(end - i)
    bounds = {
        "before": (-math.inf, fault_start, first, fault_start),
        "during": (fault_start, fault_end, fault_start, fault_end),
        "after": (fault_end, math.inf, fault_end, max(last, fault_end)),
    }
    out = []
    for name in SPANS:
        lo, hi, begins, ends = bounds[name]
        mine = [i for i, t in enumerate(ordered) if lo <= t < hi]
        span = SpanFigures(name, from_s=begins - first, to_s=ends - first, requests=len(mine))
        if mine:
            best = max(mine, key=lambda i: (in_window[i], -i))
            span.busiest_1s = in_window[best]
            span.busiest_1s_at_s = ordered[best] - first
            span.per_s = slope_per_s([ordered[i] for i in mine])
        out.append(span)
    return out


def fault_figures(fault: FaultFigures, times: Sequence[float]) -> None:
    """``fault``'s offsets and spans from the double's request times (epoch seconds)."""
    if not fault.applied or not times:
        return
    first = min(times)
    fault.start_s = fault.start_time - first
    fault.duration_s = fault.end_time - fault.start_time
    fault.spans = span_figures(times, fault.start_time, fault.end_time)


# -- the private redis-server ----------------------------------------------------------------
class PrivateRedis:
    """A ``redis-server`` of one phase's own on a free loopback port, without persistence
    (``--save '' --appendonly no``), which the phase may kill, restart (empty, on the same
    port), freeze and thaw. Each server runs as a :class:`~lis_async.bench.measure.Child`
    (own session, log in the working directory, killed by the bench's last-resort cleanup
    if a run dies without stopping it)."""

    def __init__(self, workdir: Path, label: str) -> None:
        exe = shutil.which("redis-server")
        if exe is None:
            raise BenchError("--redis-fault needs redis-server on PATH")
        self.exe = exe
        self.port = free_port()
        self.workdir = workdir
        self.label = label
        self.child: Child | None = None
        self.frozen = False
        self.servers = 0

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    async def start(self) -> None:
        """Start a server on :attr:`port` and wait until it answers PING."""
        self.servers += 1
        argv = [self.exe, "--port", str(self.port), "--bind", "127.0.0.1"]
        argv += ["--save", "", "--appendonly", "no"]
        log_path = self.workdir / f"{self.label}-redis-{self.servers}.log"
        self.child = Child("redis-server", argv, own_env(), log_path)
        await self.child.start()
        await self._wait_ready(self.child)

    async def _wait_ready(self, child: Child) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + REDIS_START_TIMEOUT_S
        client = aioredis.from_url(self.url, socket_timeout=1.0, socket_connect_timeout=1.0)
        try:
            while True:
                try:
                    await client.ping()
                    return
                except (RedisError, OSError, TimeoutError) as exc:
                    if not child.running or loop.time() > deadline:
                        raise BenchError(
                            f"the private redis-server on port {self.port} did not start "
                            f"({type(exc).__name__}); its log:\n{child.log_tail()}"
                        ) from None
                await asyncio.sleep(0.02)
        finally:
            await client.aclose()

    async def kill(self) -> None:
        """SIGKILL (its data goes with it)."""
        child, self.child = self.child, None
        if child is None:
            return
        if child.proc is not None:
            with contextlib.suppress(ProcessLookupError):
                child.proc.kill()
        await child.stop()

    def _signal(self, sig: signal.Signals) -> None:
        child = self.child
        if child is not None and child.proc is not None and child.running:
            with contextlib.suppress(ProcessLookupError):
                child.proc.send_signal(sig)

    def freeze(self) -> None:
        """SIGSTOP: connections stay open, nothing answers (a hung Redis)."""
        self._signal(signal.SIGSTOP)
        self.frozen = True

    def thaw(self) -> None:
        """SIGCONT."""
        self._signal(signal.SIGCONT)
        self.frozen = False

    async def stop(self) -> None:
        """Stop the server, frozen or not; idempotent."""
        if self.frozen:
            self.thaw()
        child, self.child = self.child, None
        if child is not None:
            await child.stop(timeout_s=5.0)


# -- the fault ---------------------------------------------------------------------------------
class FaultInjector:
    """Applies ``fault`` to ``redis`` :data:`FAULT_AFTER_S` after the first job was taken."""

    def __init__(self, redis: PrivateRedis, fault: FaultFigures) -> None:
        self.redis = redis
        self.fault = fault
        self.state = "due"  # due -> down -> over

    @property
    def status(self) -> str:
        """For the progress line."""
        f = self.fault
        if self.state == "down":
            done = time.time() - f.start_time
            what = "killed" if f.kind == "kill" else "frozen"
            return f"Redis {what} {done:4.1f}/{f.seconds:g} s"
        return "Redis back" if self.state == "over" else f"{f.kind} due"

    async def run(self, started: asyncio.Event) -> None:
        """Once ``started`` is set (the first job taken): wait, break Redis, wait, mend it."""
        await started.wait()
        await asyncio.sleep(FAULT_AFTER_S)
        f, redis = self.fault, self.redis
        f.start_time = time.time()
        self.state = "down"
        f.applied = True
        if f.kind == "kill":
            await redis.kill()
            await asyncio.sleep(f.seconds)
            await redis.start()  # the same port, empty
        else:
            redis.freeze()
            await asyncio.sleep(f.seconds)
            redis.thaw()
        f.end_time = time.time()
        self.state = "over"


async def feed_through_fault(
    cfg: BenchConfig,
    progress: Progress,
    label: str,
    feed: Burst,
    world: SimWorld,
    children: Sequence[Child],
    jobs: Jobs,
    injector: FaultInjector,
) -> str:
    """Publish ``feed`` and apply the fault while waiting until every work completed and the
    fault is over (``done``), or no work completed for :data:`FAULT_STALL_S` once every job was
    published and the fault is over (``stalled``), or the phase overran its time limit
    (``time limit``); the works not completed are then lost. BenchError when a worker exits,
    publishing or the fault fails, or every work completed before the fault was due."""
    wait = _FaultWait(cfg, progress, label, world, children, jobs, injector)
    publishing = asyncio.create_task(feed.while_running(world, jobs) or asyncio.sleep(0))
    faulting = asyncio.create_task(injector.run(wait.started))
    try:
        while True:
            ended = wait.check(publishing, faulting)
            if ended:
                return ended
            await asyncio.sleep(0.25)
    finally:
        for task in (publishing, faulting):
            if not task.done():
                task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task


class _FaultWait:
    """The waiting of :func:`feed_through_fault`, one check at a time."""

    def __init__(
        self,
        cfg: BenchConfig,
        progress: Progress,
        label: str,
        world: SimWorld,
        children: Sequence[Child],
        jobs: Jobs,
        injector: FaultInjector,
    ) -> None:
        self.progress, self.label, self.world = progress, label, world
        self.children, self.jobs, self.injector = children, jobs, injector
        total = jobs.total
        self.limit_s = PHASE_BASE_TIMEOUT_S + total * PER_JOB_TIMEOUT_S + total / (cfg.rate or 1)
        self.limit_s += FAULT_AFTER_S + injector.fault.seconds
        #: set once the first job was taken
        self.started = asyncio.Event()
        self.t0 = time.monotonic()
        self.last_done, self.last_change = -1, self.t0
        self.seen = 0
        self.pending: list[Work] = []

    def _done(self) -> int:
        works, ids = self.world.platform.works, self.jobs.work_ids
        if self.seen < len(ids):
            self.pending.extend(works[w] for w in ids[self.seen :])
            self.seen = len(ids)
        self.pending = [w for w in self.pending if w.status != "complete"]
        return self.seen - len(self.pending)

    def _fail(self, message: str) -> BenchError:
        self.progress.done("")
        return BenchError(message)

    def check(self, publishing: asyncio.Task[None], faulting: asyncio.Task[None]) -> str | None:
        """How the phase ended, or None while it goes on."""
        if self.world.platform.calls["workToReceived"] > 0:
            self.started.set()
        done, total, now = self._done(), self.jobs.total, time.monotonic()
        rate = done / (now - self.t0) if now > self.t0 else 0.0
        line = f"{self.label:<16} {bar(done, total)} {done}/{total} jobs  {rate:7.1f} jobs/s"
        self.progress.update(f"{line}  {self.injector.status}")
        published = publishing.done()
        if published:
            publishing.result()  # raise a publishing error here
        if faulting.done() and faulting.exception() is not None:
            self.progress.done("")
            faulting.result()  # and a failed restart
        state = self.injector.state
        if published and done >= total and state == "due":
            raise self._fail(
                f"{self.label}: every job was done before the Redis fault was due "
                f"({FAULT_AFTER_S:g} s after the first job): use more --jobs"
            )
        if published and done >= total and state == "over":
            self.progress.done(f"{line} in {now - self.t0:.1f} s")
            return "done"
        if done != self.last_done:
            self.last_done, self.last_change = done, now
        for child in self.children:
            if not child.running:
                raise self._fail(
                    f"{child.name} exited (code {child.proc and child.proc.returncode}) with "
                    f"{done}/{total} jobs done; its log:\n{child.log_tail()}"
                )
        if published and state == "over" and now - self.last_change > FAULT_STALL_S:
            self.progress.done(f"{line}: stalled, {total - done} works not completed")
            return "stalled"
        if now - self.t0 > self.limit_s:
            self.progress.done(f"{line}: time limit ({self.limit_s:.0f} s), {total - done} left")
            return "time limit"
        return None
