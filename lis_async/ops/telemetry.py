"""Logging setup, Prometheus metrics and the health endpoints (``/healthz``, ``/readyz``)."""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable, Iterable
from typing import Any, Final

import orjson
from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "timestamp": self.formatTime(record, "%Y-%m-%dT%H:%M:%S"),
            "level": record.levelname.lower(),
            "name": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            doc["exc_info"] = self.formatException(record.exc_info)
        return orjson.dumps(doc).decode()


#: Third-party chatter stays at warning even in debug: their records may carry URLs.
THIRD_PARTY_LOGGERS: Final = ("aio_pika", "aiormq", "urllib3", "pycti", "api", "pika")


def setup_logging(level: str, json_lines: bool, filters: Iterable[logging.Filter] = ()) -> None:
    """One stderr handler on the root logger; ``filters`` go on the handler (the broker's
    :class:`~lis_async.broker.connection.ExpectedReconnection`, given by the CLI)."""
    handler = logging.StreamHandler(sys.stderr)
    for f in filters:
        handler.addFilter(f)
    handler.setFormatter(
        _JsonFormatter()
        if json_lines
        else logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s")
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING)
    logging.getLogger("lis_async").setLevel(_LEVELS.get(level, logging.INFO))
    for name in THIRD_PARTY_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)


def metric_name(name: str, namespace: str = "", subsystem: str = "") -> str:
    """prometheus_client's full name: ``namespace_subsystem_name``, empty parts left out (what
    pycti's ``CONNECTOR_METRICS_NAMESPACE`` / ``_SUBSYSTEM`` do to its metrics)."""
    return "_".join(part for part in (namespace, subsystem, name) if part)


class Metrics:
    """Prometheus metrics in their own registry. Hot-path updates are plain counter bumps;
    LastInfoSec client counters are read at scrape time (no cost per request). ``namespace`` and
    ``subsystem`` prefix every name, the collectors' too (:meth:`name`)."""

    def __init__(self, namespace: str = "", subsystem: str = "") -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.namespace, self.subsystem = namespace, subsystem
        ns, sub, r = namespace, subsystem, self.registry
        self.jobs = Counter(
            "lis_jobs", "Jobs by outcome", ["outcome"], namespace=ns, subsystem=sub, registry=r
        )
        self.job_seconds = Histogram(
            "lis_job_duration_seconds",
            "Job duration, received to processed",
            buckets=(0.05, 0.1, 0.2, 0.3, 0.5, 1, 2, 5, 10, 30, 60, 300),
            namespace=ns,
            subsystem=sub,
            registry=r,
        )
        self.objects = Counter(
            "lis_objects_published",
            "STIX objects published",
            namespace=ns,
            subsystem=sub,
            registry=r,
        )
        self.publishes = Counter(
            "lis_push_messages", "Push messages confirmed", namespace=ns, subsystem=sub, registry=r
        )
        self.lis_latency = Histogram(
            "lis_api_latency_seconds",
            "LastInfoSec answer time per HTTP attempt",
            buckets=(0.025, 0.05, 0.1, 0.2, 0.3, 0.5, 1, 2, 5, 10, 30),
            namespace=ns,
            subsystem=sub,
            registry=r,
        )
        self.queue_depth = Gauge(
            "lis_listen_queue_messages",
            "Jobs waiting in the listen queue (sampled)",
            namespace=ns,
            subsystem=sub,
            registry=r,
        )

        self.jobs_moved = Counter(
            "lis_jobs_moved",
            "Jobs moved from the listen queue into the priority lane, by lane",
            ["lane"],
            namespace=ns,
            subsystem=sub,
            registry=r,
        )

    def moved(self, priority: int) -> None:
        """The lane mover's hook: one job moved at ``priority`` (0 normal, 1 urgent)."""
        self.jobs_moved.labels("urgent" if priority else "normal").inc()

    def name(self, name: str) -> str:
        """A collector's metric name with this registry's prefix."""
        return metric_name(name, self.namespace, self.subsystem)

    def observe_job(self, outcome: str, seconds: float, objects: int, bundles: int) -> None:
        self.jobs.labels(outcome).inc()
        self.job_seconds.observe(seconds)
        if objects:
            self.objects.inc(objects)
        if bundles:
            self.publishes.inc(bundles)

    def add_collector(self, collector: Collector) -> None:
        self.registry.register(collector)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class LisStatsCollector(Collector):
    """Exports the LastInfoSec client's counters (``LisStats``) at scrape time."""

    def __init__(self, stats: Any, name: Callable[[str], str] = str) -> None:
        self._stats = stats
        self._name = name

    def collect(self) -> Iterable[Any]:
        s = self._stats
        req = CounterMetricFamily(
            self._name("lis_api_requests"), "LastInfoSec HTTP answers", labels=["status"]
        )
        for status, n in sorted(getattr(s, "responses_by_status", {}).items()):
            req.add_metric([str(status)], n)
        yield req
        hits = CounterMetricFamily(
            self._name("lis_cache_hits"),
            "Lookups answered from a cache, by level",
            labels=["level"],
        )
        hits.add_metric(["local"], float(getattr(s, "cache_hits", 0)))
        hits.add_metric(["shared"], float(getattr(s, "shared_cache_hits", 0)))
        yield hits
        for name, attr, doc in (
            ("lis_api_retries", "retries", "LastInfoSec retries"),
            ("lis_api_throttled", "throttled", "LastInfoSec 429 answers"),
            ("lis_api_timeouts", "timeouts", "LastInfoSec timeouts"),
            ("lis_api_connection_errors", "connection_errors", "LastInfoSec connection errors"),
            ("lis_cache_misses", "cache_misses", "Lookups not in the in-process cache"),
            ("lis_coalesced", "coalesced", "Lookups served by an identical lookup in flight"),
        ):
            c = CounterMetricFamily(self._name(name), doc)
            c.add_metric([], float(getattr(s, attr, 0)))
            yield c


class ClusterCollector(Collector):
    """Cluster mode's state (``lis_async.cluster``), read at scrape time."""

    def __init__(
        self, link: Any, limiter: Any, cache: Any, name: Callable[[str], str] = str
    ) -> None:
        self._link, self._limiter, self._cache = link, limiter, cache
        self._name = name

    def collect(self) -> Iterable[Any]:
        link, cache = self._link, self._cache
        state = GaugeMetricFamily(
            self._name("lis_redis_shared"), "1 while Redis answers (shared mode), 0 in fallback"
        )
        state.add_metric([], 1.0 if link.shared else 0.0)
        yield state
        for name, value, doc in (
            ("lis_redis_errors", link.stats.errors, "Redis commands that failed or timed out"),
            ("lis_redis_transitions", link.stats.transitions, "Shared/fallback switches"),
            ("lis_cluster_granted", self._limiter.granted_shared, "Requests granted by Redis"),
            ("lis_coalesced_waits", cache.stats.waits, "Waits for another replica's lookup"),
            ("lis_coalesced_waits_answered", cache.stats.waits_answered, "... that got it"),
        ):
            c = CounterMetricFamily(self._name(name), doc)
            c.add_metric([], float(value))
            yield c
        for name, value, doc in (
            ("lis_cluster_replicas", link.stats.replicas_seen, "Replicas seen on this quota"),
            ("lis_redis_fallback_share", self._limiter.fallback_share, "Rate share if Redis fails"),
            ("lis_cluster_quota_used", self._limiter.last_window, "Requests in the last window"),
        ):
            g = GaugeMetricFamily(self._name(name), doc)
            g.add_metric([], float(value))
            yield g


class GaugeCallback(Collector):
    """A gauge read at scrape time from ``fn``; a sample is left out while ``fn`` returns
    None (not known yet)."""

    def __init__(self, name: str, doc: str, fn: Callable[[], float | None]) -> None:
        self._name, self._doc, self._fn = name, doc, fn

    def collect(self) -> Iterable[Any]:
        g = GaugeMetricFamily(self._name, self._doc)
        value = self._fn()
        if value is not None:
            g.add_metric([], float(value))
        yield g


class HealthServer:
    """``/healthz`` (the loop answers), ``/readyz`` (checks pass), ``/metrics`` (when enabled)."""

    def __init__(
        self,
        checks: Callable[[], dict[str, bool]],
        metrics: Metrics | None,
        host: str = "0.0.0.0",
        port: int = 9096,
        details: Callable[[], dict[str, Any]] | None = None,
    ) -> None:
        self._checks = checks
        self._details = details
        self._metrics = metrics
        self._host, self._port = host, port
        self._runner: web.AppRunner | None = None
        self.started = time.time()
        self.port: int | None = None

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/readyz", self._readyz)
        if self._metrics is not None:
            app.router.add_get("/metrics", self._metrics_view)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self._host, self._port)
        await site.start()
        server = site._server
        sockets = getattr(server, "sockets", None) or []
        self.port = sockets[0].getsockname()[1] if sockets else self._port

    async def close(self) -> None:
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()

    async def _healthz(self, _: web.Request) -> web.Response:
        return web.json_response({"status": "ok", "uptime_s": round(time.time() - self.started)})

    async def _readyz(self, _: web.Request) -> web.Response:
        checks = self._checks()
        ok = all(checks.values())
        body: dict[str, Any] = {"status": "ready" if ok else "not ready", "checks": checks}
        if self._details is not None:
            body["details"] = self._details()
        return web.json_response(body, status=200 if ok else 503)

    async def _metrics_view(self, _: web.Request) -> web.Response:
        assert self._metrics is not None
        return web.Response(body=self._metrics.render(), content_type="text/plain")
