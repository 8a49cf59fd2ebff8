"""The composition root: build everything from settings, start in order, stop in reverse order.

Start: platform client -> registration -> heartbeat -> LastInfoSec client -> publisher ->
consumer (of the lane, or of the listen queue with lanes off) -> lane mover -> health/metrics.
Stop (SIGTERM/SIGINT, or a fatal error): the mover stops, intake stops at once, jobs in flight
finish up to ``connector.shutdown_timeout_s`` (the rest return to the queue), then everything
closes in reverse order, each step bounded by :data:`STEP_TIMEOUT_S`. A second signal exits at
once.
"""

from __future__ import annotations

import asyncio
import functools
import gc
import logging
import math
import os
import signal
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Protocol

from lis_async.broker.connection import BrokerWatch, queue_depth
from lis_async.broker.consumer import Consumer
from lis_async.broker.lanes import Lanes, Mover
from lis_async.broker.publisher import Publisher
from lis_async.enrichment.pipeline import Outcome, Pipeline, Policy, Result
from lis_async.errors import PlatformAuthError, PlatformError
from lis_async.intake.backpressure import Backpressure
from lis_async.intake.hold import Hold
from lis_async.intake.threshold import QueueThreshold
from lis_async.lastinfosec import LastInfoSecClient
from lis_async.lastinfosec.budget import file_budget
from lis_async.ops.gauges import (
    BudgetGauges,
    PyctiGauges,
    WorkerGauges,
    readiness_checks,
    readiness_details,
)
from lis_async.ops.health import HealthServer
from lis_async.ops.metrics import ClusterCollector, LisStatsCollector, Metrics
from lis_async.platform.client import BYTES_PER_MB, Platform, Registration
from lis_async.platform.health import PlatformHealth
from lis_async.redact import redact
from lis_async.retry import Backoff
from lis_async.settings.model import Settings

if TYPE_CHECKING:
    from lis_async.cluster.link import RedisLink

log = logging.getLogger("lis_async.app")

EXIT_OK = 0
EXIT_FATAL = 3  # stopped because of a fatal error after start-up (e.g. LastInfoSec key invalid)
EXIT_STARTUP = 2  # could not start (registration refused, platform unreachable)


# Registration retries: 2, 4, 8, 16, 30 s (a platform still starting up), then give up.
_REGISTER_BACKOFF = Backoff(base_s=2.0, max_s=30.0, floor=1.0)
_REGISTER_ATTEMPTS = 6
# A background loop that fails is restarted after 0.1 s; one that keeps failing (within a
# minute of its start) after 4, 8, 16, 30, 30... s.
_SUPERVISE_BACKOFF = Backoff(base_s=2.0, max_s=30.0, floor=1.0)


def _warn_unused_settings(s: Settings) -> None:
    """One start-up warning per removed setting that is set (lis_async/settings/removed.py):
    ignored, never silent."""
    for line in s.ignored:
        log.warning("%s", line)


#: Each shutdown step after the drain (cancelling the consumers, the background tasks, closing a
#: connection or client) gets this long; one that hangs (a broker that never answers a close)
#: is logged and left behind, so that the process still exits: unacked jobs return to the
#: queue when its connections drop.
STEP_TIMEOUT_S = 10.0

#: Outcomes pycti's errors_total counts: the work ended in error, the body could not be read.
_IN_ERROR = frozenset({Outcome.FAILED, Outcome.INVALID})


class _Closable(Protocol):
    async def close(self) -> None: ...


async def _step(what: str, op: Awaitable[Any], steps: int = 1) -> None:
    """One shutdown step, bounded by ``steps`` times :data:`STEP_TIMEOUT_S`; a failure is only
    logged (the other steps still run)."""
    timeout_s = steps * STEP_TIMEOUT_S
    try:
        await asyncio.wait_for(op, timeout_s)
    except TimeoutError:
        log.warning("shutdown: %s took more than %g s; going on", what, timeout_s)
    except Exception as exc:  # the type only: a close error's text may carry a URL
        log.info("shutdown: %s failed (%s); going on", what, type(exc).__name__)


def lookahead(jobs_in_flight: int, rate_per_s: float, consumer_timeout_s: float) -> int:
    """Jobs taken at once: ``jobs_in_flight``, bounded so that the last of them gets its
    LastInfoSec request within half of RabbitMQ's consumer timeout at the rate limit (a slow
    rate with many jobs in flight would otherwise hold deliveries toward the timeout)."""
    if not consumer_timeout_s:
        return jobs_in_flight
    return max(1, min(jobs_in_flight, math.floor(rate_per_s * consumer_timeout_s / 2)))


class App:
    """The worker: builds every part from the settings, starts them in order, runs until a stop
    signal or a fatal error, then stops them in reverse order (see the module docstring).

    The parts are public attributes once started (``platform``, ``lis``, ``publisher``,
    ``pipeline``, ``consumer``) for the health checks, the demo and the tests.
    """

    def __init__(self, settings: Settings, *, freeze_heap: bool = False) -> None:
        self.settings = settings
        #: Move what start-up made into the collector's permanent generation, once, just
        #: before consuming (``lis-async run``; tests start many workers in one process).
        self._freeze_heap = freeze_heap
        self.platform = Platform(settings)
        c = settings.connector
        self.metrics = Metrics(c.metrics_namespace or "", c.metrics_subsystem or "")
        self.lis: LastInfoSecClient | None = None
        self.publisher: Publisher | None = None
        self.consumer: Consumer | None = None
        self.lanes: Lanes | None = None  # priority lanes (connector.priority_lanes)
        self.lane_depth: int | None = None  # sampled with the listen queue's
        self.pipeline: Pipeline | None = None
        self.registration: Registration | None = None
        self.redis: RedisLink | None = None  # cluster mode (redis.url set)
        self.health: PlatformHealth | None = None
        self.backpressure: Backpressure | None = None
        self.queue_threshold: QueueThreshold | None = None
        self._servers: list[HealthServer] = []
        self.health_server: HealthServer | None = None  # /healthz, /readyz
        self.metrics_server: HealthServer | None = None  # /metrics (+ health), when exposed
        self._tasks: set[asyncio.Task[None]] = set()
        self.background_restarts: dict[str, int] = {}  # task name -> restarts (see _spawn)
        self._stop = asyncio.Event()
        self.fatal: str | None = None
        self.ready = asyncio.Event()  # set once consuming (tests and the demo wait on it)

    @property
    def mover(self) -> Mover | None:
        """The lane mover, while priority lanes run."""
        return self.lanes.mover if self.lanes is not None else None

    @property
    def lane_refused(self) -> tuple[str, ...]:
        """The arguments of a foreign queue holding the lane's name (empty: none)."""
        return self.lanes.foreign if self.lanes is not None else ()

    @property
    def stopping(self) -> bool:
        """True once a stop was requested or a fatal error stopped intake."""
        return self._stop.is_set()

    # -- signals and fatal errors ------------------------------------------------------------
    def request_stop(self) -> None:
        if self._stop.is_set():
            log.warning("second stop signal: exiting at once (unacked jobs return to the queue)")
            os._exit(130)
        log.info("stop requested: no new jobs; finishing jobs in flight")
        self._stop.set()

    def _on_fatal(self, reason: str) -> None:
        if self.fatal is None:
            self.fatal = reason
            log.critical("FATAL, the worker stops taking jobs: %s", reason)
        self._stop.set()

    def _spawn(self, loop_fn: Callable[[], Awaitable[None]], name: str) -> None:
        """Run ``loop_fn()`` (a loop meant to last as long as the worker) as a background task,
        restarted whenever it fails or ends (:meth:`_supervise`)."""
        task: asyncio.Task[None] = asyncio.ensure_future(self._supervise(loop_fn, name))
        task.set_name(name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _supervise(self, loop_fn: Callable[[], Awaitable[None]], name: str) -> None:
        """A background loop that fails (a bug, a value it did not expect) or ends is logged at
        ERROR, with its traceback, and started again after a growing pause: none dies
        silently. ``background_restarts`` counts the restarts (logged, and in ``/readyz``)."""
        failures = 0
        while True:
            started = time.monotonic()
            try:
                await loop_fn()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.error("background task %s failed: restarting it", name, exc_info=True)
            else:
                log.error("background task %s ended unexpectedly: restarting it", name)
            self.background_restarts[name] = self.background_restarts.get(name, 0) + 1
            failures = 1 if time.monotonic() - started > 60 else failures + 1
            await asyncio.sleep(_SUPERVISE_BACKOFF.delay(failures) if failures > 1 else 0.1)

    # -- readiness ---------------------------------------------------------------------------
    def checks(self) -> dict[str, bool]:
        """The ``checks`` of ``/readyz`` (:func:`lis_async.ops.gauges.readiness_checks`)."""
        # Fresh: within three heartbeats (OpenCTI itself drops a connector after 5 minutes).
        return readiness_checks(self, 3 * self.settings.connector.heartbeat_interval_s)

    def details(self) -> dict[str, Any]:
        """The ``details`` of ``/readyz`` (:func:`lis_async.ops.gauges.readiness_details`)."""
        return readiness_details(self)

    # -- run ---------------------------------------------------------------------------------
    async def _handle(self, body: bytes, redelivered: bool) -> Result:
        assert self.pipeline is not None
        started = time.monotonic()
        try:
            result = await self.pipeline.handle(body, redelivered)
        except Exception:
            self.metrics.errors.inc()  # pycti's errors_total counts a handler that raised
            raise
        self.metrics.observe_job(
            result.outcome.value,
            time.monotonic() - started,
            result.objects,
            result.bundles,
            error=result.outcome in _IN_ERROR,
        )
        return result

    async def _register(self) -> Registration:
        attempt = 0
        while True:
            try:
                await self.platform.start()
                return await self.platform.register()
            except PlatformAuthError:
                raise
            except PlatformError as exc:
                attempt += 1
                if not exc.retriable or attempt >= _REGISTER_ATTEMPTS or self._stop.is_set():
                    raise
                delay = _REGISTER_BACKOFF.delay(attempt)
                log.warning("registration failed (%s); retrying in %.0fs", exc, delay)
                await asyncio.sleep(delay)

    async def start(self) -> None:
        s = self.settings
        log.info("starting lis-async with %s", s.summary())
        _warn_unused_settings(s)
        self.registration = reg = await self._register()
        log.info(
            "registered connector %s (%s): listen=%s push=%s rabbitmq=%s:%d",
            s.connector.id,
            s.connector.name,
            reg.listen,
            reg.push,
            reg.amqp.host,
            reg.amqp.port,
        )
        self.health = health = PlatformHealth(self.platform.probe)
        self._spawn(functools.partial(self.platform.heartbeat, health), "heartbeat")
        self.lis = self._lastinfosec_client()
        await self.lis.start()
        if self.redis is not None:
            await self.redis.warm_up(min(16, s.lastinfosec.concurrency))
        retry_backoff = Backoff(max_s=s.connector.platform_retry_max_s)
        watch = BrokerWatch(lambda: self.consumer.in_flight if self.consumer else 0)
        self.backpressure = backpressure = self._backpressure()
        self.publisher = Publisher(
            reg.amqp,
            reg.push_exchange,
            reg.push_routing,
            backoff=retry_backoff,
            watch=watch,
            on_published=backpressure.published if backpressure else None,
        )
        await self.publisher.start()
        self.pipeline = self._pipeline(reg, retry_backoff, health)
        self._spawn(self.pipeline.ping_long_works, "work-ping")
        if s.connector.priority_lanes:
            self.lanes = Lanes(reg.listen, s.connector.id, self.metrics.moved, reg.amqp)
            await self.lanes.check()  # a foreign queue may hold the lane's name
        self.consumer = self._consumer(reg, watch)
        self.queue_threshold = qt = self._queue_threshold()
        self._hold_intake(self.consumer)
        if backpressure is not None:
            self._spawn(backpressure.run, "backpressure")
        self._spawn(qt.run, "queue-threshold")
        if self._freeze_heap:
            # The modules, settings and clients made so far live as long as the worker. Frozen,
            # the cyclic collector no longer walks them at every full collection, which the
            # allocations of each job trigger (BENCHMARKS.md, "The mover (issue #21)"). Done
            # before the health server opens: the full collection blocks the loop, and a burst
            # of connections meanwhile overflowed its listen backlog (a test saw them hang).
            gc.collect()
            gc.freeze()
        await self._start_servers()
        await self.consumer.start()
        if s.connector.consumer_timeout_s:
            self._spawn(
                functools.partial(self.consumer.watch, 0.8 * s.connector.consumer_timeout_s),
                "watchdog",
            )
        if self.lanes is not None:
            await self.lanes.start(self.consumer)
            self._spawn(functools.partial(self.lanes.watch, self.consumer), "lanes")
        self.ready.set()
        log.info(
            "consuming %s%s with %d jobs in flight, LastInfoSec %d concurrent at %.1f req/s",
            self.consumer.queue_name,
            f" (priority lane fed from {reg.listen})" if self.mover else "",
            self.consumer.prefetch,
            s.lastinfosec.concurrency,
            s.lastinfosec.rate_per_s,
        )

    def _consumer(self, reg: Registration, watch: BrokerWatch) -> Consumer:
        """The consumer of the lane (priority lanes on) or of the listen queue."""
        c = self.settings.connector
        declare = None
        queue = reg.listen
        if self.lanes is not None and not self.lanes.foreign:
            queue, declare = self.lanes.name, self.lanes.declare
        return Consumer(
            reg.amqp,
            queue,
            lookahead(c.jobs_in_flight, self.settings.lastinfosec.rate_per_s, c.consumer_timeout_s),
            self._handle,
            self._on_fatal,
            watch=watch,
            declare=declare,
        )

    def _pipeline(self, reg: Registration, backoff: Backoff, health: PlatformHealth) -> Pipeline:
        s = self.settings
        assert self.lis is not None and self.publisher is not None
        return Pipeline(
            lookup=self.lis,
            platform=self.platform,
            publisher=self.publisher,
            policy=Policy(
                scope=frozenset(s.connector.scope),
                max_tlp=s.lastinfosec.max_tlp,
                confidence=s.connector.confidence_level,
                connector_user_id=reg.connector_user_id,
                max_pap=s.lastinfosec.max_pap,
            ),
            backoff=backoff,
            health=health,
        )

    def _lastinfosec_client(self) -> LastInfoSecClient:
        """The client, with cluster mode's shared limiter and cache when Redis is set."""
        s = self.settings
        lis = s.lastinfosec
        if s.redis.url is None:
            budget = file_budget(lis, s.connector.id)
            return LastInfoSecClient(lis, proxy=s.lastinfosec_proxy, budget=budget)
        # Imported here: a worker without Redis never loads the Redis client.
        from lis_async.cluster.cache import SharedAnswerCache
        from lis_async.cluster.limiter import ClusterLimiter
        from lis_async.cluster.link import RedisLink

        self.redis = link = RedisLink(s)
        r = s.redis
        limiter = ClusterLimiter(
            link,
            lis.rate_per_s,
            lis.rate_burst,
            r.fallback_rate_share,
            max_pause_s=lis.backoff_max_s,
        )
        shared = SharedAnswerCache.of(link, s)
        self._spawn(link.maintain, "redis")
        self.metrics.add_collector(ClusterCollector(link, limiter, shared, self.metrics.name))
        log.info("cluster mode: quota and cache shared through Redis %s", link.where)
        budget = None
        if lis.daily_budget is not None:
            from lis_async.cluster.budget import cluster_budget

            budget = cluster_budget(
                link, lis.daily_budget, lis.daily_budget_urgent_share, lis.rate_per_s
            )
        return LastInfoSecClient(
            lis, proxy=s.lastinfosec_proxy, limiter=limiter, shared_cache=shared, budget=budget
        )

    # -- intake holds (lis_async/intake/hold.py) ----------------------------------------------
    async def _push_depth(self) -> int | None:
        """Messages in the push queue (None: not known), for the holds that watch it."""
        publisher, reg = self.publisher, self.registration
        if publisher is None or reg is None:
            return None
        return await publisher.queue_depth(reg.push)

    def _backpressure(self) -> Backpressure | None:
        """The push-queue watermarks, when ``connector.push_high_watermark`` is set."""
        c = self.settings.connector
        if not c.push_high_watermark:
            return None
        return Backpressure(self._push_depth, c.push_high_watermark, c.push_low_watermark)

    def _queue_threshold(self) -> QueueThreshold:
        """pycti's CONNECTOR_QUEUE_THRESHOLD, checked at the heartbeat's pace and reported in
        it (lis_async/intake/threshold.py)."""
        c = self.settings.connector
        qt = QueueThreshold(
            self.platform.queue_details,
            c.queue_threshold,
            c.heartbeat_interval_s,
            push_depth=self._push_depth,
        )
        self.platform.info_source = lambda: qt.connector_info(self.lane_size_mb() or 0.0)
        return qt

    def lane_size_mb(self) -> float | None:
        """The priority lane's size in OpenCTI's unit (MB, 10^6 bytes): its sampled depth times
        the mean size of the jobs moved into it (None: lanes off, or nothing known yet). The
        heartbeat adds it to ``queue_messages_size``, which OpenCTI's connector page shows
        against the queue threshold (docs/protocol.md §2.2)."""
        mover, depth = self.mover, self.lane_depth
        mean = mover.mean_body_bytes if mover is not None else None
        if depth is None or mean is None:
            return None
        return depth * mean / BYTES_PER_MB

    def holds(self) -> list[Hold]:
        """Every hold built: the platform health gate, the watermarks, the queue threshold."""
        parts: list[Hold | None] = [self.health, self.backpressure, self.queue_threshold]
        return [hold for hold in parts if hold is not None]

    def _hold_intake(self, consumer: Consumer) -> None:
        """The one place intake is subscribed to the holds: each tells the consumer, under its
        reason, when it starts and stops holding intake."""
        for hold in self.holds():
            hold.add_listener(functools.partial(consumer.hold_intake, hold.reason))

    # -- health and metrics servers ---------------------------------------------------------
    async def _start_servers(self) -> None:
        s = self.settings.connector
        m = self.metrics
        lis = self.lis
        assert lis is not None
        m.add_collector(LisStatsCollector(lis.stats, m.name))
        lis.stats.latency_observer = m.lis_latency.observe
        self._spawn(self._sample_queue_depth, "queue-depth")
        m.add_collector(
            WorkerGauges(
                self,
                m.name,
                lanes=s.priority_lanes,
                rate_per_s=self.settings.lastinfosec.rate_per_s,
            )
        )
        m.add_collector(PyctiGauges(self, m.name))
        if lis.budget is not None:
            m.add_collector(BudgetGauges(lis.budget, m.name))
        if s.health_port:
            self.health_server = HealthServer(
                self.checks, None, host=s.health_host, port=s.health_port, details=self.details
            )
            self._servers.append(self.health_server)
        if s.expose_metrics:
            self.metrics_server = HealthServer(
                self.checks, m, host=s.health_host, port=s.metrics_port, details=self.details
            )
            self._servers.append(self.metrics_server)
        for server in self._servers:
            await server.start()

    async def _sample_queue_depth(self, every_s: float = 5.0, retry_s: float = 0.5) -> None:
        """The listen queue's depth and, with lanes, the lane's, every ``every_s``; every
        ``retry_s`` until the consumer is connected, so the first figures come at start-up. A
        failed read keeps the last figure (the gauge's and ``/readyz``'s): ``None`` means never
        read."""
        listen = self.registration.listen if self.registration else None
        while True:
            consumer = self.consumer
            if consumer is None or not consumer.connected or listen is None:
                await asyncio.sleep(retry_s)
                continue
            depth = await queue_depth(consumer.connection, listen)
            if depth is not None:
                self.metrics.queue_depth.set(depth)
            if self.mover is not None:
                lane = await consumer.queue_depth()
                if lane is not None:
                    self.lane_depth = lane
            await asyncio.sleep(every_s)

    async def stop(self) -> None:
        deadline = self.settings.connector.shutdown_timeout_s
        if self.mover is not None:
            # two steps: cancelling its consumer, then letting the moves under way finish
            await _step(
                "stopping the lane mover", self.mover.stop(timeout_s=STEP_TIMEOUT_S), steps=2
            )
        if self.consumer is not None:
            await _step("cancelling the consumer", self.consumer.stop_intake())
            left = await self.consumer.drain(deadline)
            if left:
                log.warning(
                    "%d job(s) unfinished after %.0fs: returned to the queue", left, deadline
                )
        await self._cancel_tasks()
        for what, part in self._closers():
            await _step(f"closing {what}", part.close())
        log.info("stopped")

    async def _cancel_tasks(self) -> None:
        """Cancel the background tasks (heartbeat, samplers, ...) and wait for them, within
        :data:`STEP_TIMEOUT_S`."""
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=STEP_TIMEOUT_S)
            if pending:
                log.warning(
                    "shutdown: background task(s) %s still running after %g s; going on",
                    ", ".join(sorted(t.get_name() for t in pending)),
                    STEP_TIMEOUT_S,
                )

    def _closers(self) -> list[tuple[str, _Closable]]:
        """What to close, in order, with its name for the log."""
        parts: list[tuple[str, _Closable | None]] = [
            *(("the health server", server) for server in self._servers),
            ("the consumer connection", self.consumer),
            ("the publisher connection", self.publisher),
            ("the LastInfoSec client", self.lis),
            ("the Redis link", self.redis),
            ("the platform probe", self.health),
            ("the platform client", self.platform),
        ]
        return [(what, part) for what, part in parts if part is not None]

    async def start_in_background(self, timeout_s: float = 60.0) -> asyncio.Task[int]:
        """Run the worker as a task of the caller's loop (demo, tests, benchmark) and return once
        it consumes. Raises RuntimeError if it stopped or did not get ready in time."""
        task = asyncio.create_task(self.run(install_signals=False))
        ready = asyncio.create_task(self.ready.wait())
        await asyncio.wait({task, ready}, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
        if not self.ready.is_set():
            ready.cancel()
            if not task.done():
                self.request_stop()
            code = await task
            raise RuntimeError(f"the worker did not start (exit code {code})")
        return task

    async def run(self, install_signals: bool = True) -> int:
        loop = asyncio.get_running_loop()
        if install_signals:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, self.request_stop)
        try:
            try:
                await self.start()
            except PlatformError as exc:
                log.critical("cannot start: %s", exc)
                return EXIT_STARTUP
            except Exception as exc:  # RabbitMQ unreachable or refusing the credentials, ...
                secrets = [self.registration.amqp.password] if self.registration else []
                text = redact(str(exc), secrets)
                log.critical("cannot start: %s: %s", type(exc).__name__, text[:500])
                return EXIT_STARTUP
            await self._stop.wait()
            return EXIT_FATAL if self.fatal else EXIT_OK
        finally:
            await self.stop()
            if install_signals:
                for sig in (signal.SIGTERM, signal.SIGINT):
                    loop.remove_signal_handler(sig)
