"""Prometheus metrics: the worker's registry and the collectors read at scrape time.

The collectors read the LastInfoSec client's and cluster mode's counters through the Protocols
below (ops sits beside :mod:`lis_async.lastinfosec` and above nothing of :mod:`lis_async.cluster`:
it never imports them).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any, Final, Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector


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

        # pycti's connector metrics (pycti's OpenCTIMetricHandler: same names, help texts and
        # namespace/subsystem prefix), with the meanings of docs/telemetry.md. client_errors_total
        # and state are read at scrape time (lis_async.ops.gauges.PyctiGauges).
        self.bundles_sent = Counter(
            "bundles_sent_total", "Number of bundles sent", namespace=ns, subsystem=sub, registry=r
        )
        self.records_sent = Counter(
            "records_sent_total",
            "Number of records (objects per bundle) sent",
            namespace=ns,
            subsystem=sub,
            registry=r,
        )
        self.runs = Counter("runs_total", "Number of runs", namespace=ns, subsystem=sub, registry=r)
        self.errors = Counter(
            "errors_total", "Number of errors", namespace=ns, subsystem=sub, registry=r
        )

        self.jobs_moved = Counter(
            "lis_jobs_moved",
            "Jobs moved from the listen queue into the priority lane, by lane",
            ["lane"],
            namespace=ns,
            subsystem=sub,
            registry=r,
        )
        # resolved once: the mover counts thousands a second
        self._moved_by_priority = (
            self.jobs_moved.labels("normal"),
            self.jobs_moved.labels("urgent"),
        )

    def moved(self, priority: int) -> None:
        """The lane mover's hook: one job moved at ``priority`` (0 normal, 1 urgent)."""
        self._moved_by_priority[1 if priority else 0].inc()

    def name(self, name: str) -> str:
        """A collector's metric name with this registry's prefix."""
        return metric_name(name, self.namespace, self.subsystem)

    def observe_job(
        self, outcome: str, seconds: float, objects: int, bundles: int, error: bool = False
    ) -> None:
        """One job handled (pycti: one run); ``error``: it ended in error (pycti's
        ``error_count``)."""
        self.jobs.labels(outcome).inc()
        self.job_seconds.observe(seconds)
        self.runs.inc()
        if error:
            self.errors.inc()
        if objects:
            self.objects.inc(objects)
            self.records_sent.inc(objects)
        if bundles:
            self.publishes.inc(bundles)
            self.bundles_sent.inc(bundles)

    def add_collector(self, collector: Collector) -> None:
        self.registry.register(collector)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class LisCounters(Protocol):
    """The LastInfoSec client's counters (:class:`lis_async.lastinfosec.LisStats`)."""

    @property
    def responses_by_status(self) -> Mapping[int, int]: ...
    @property
    def cache_hits(self) -> int: ...
    @property
    def shared_cache_hits(self) -> int: ...
    @property
    def retries(self) -> int: ...
    @property
    def throttled(self) -> int: ...
    @property
    def timeouts(self) -> int: ...
    @property
    def connection_errors(self) -> int: ...
    @property
    def cache_misses(self) -> int: ...
    @property
    def coalesced(self) -> int: ...
    @property
    def bad_answers(self) -> int: ...


#: Answers that are not a failure of the client: found, or not found (docs/lastinfosec.md).
_ANSWERED: Final = frozenset({200, 404, 422})


def client_errors(s: LisCounters) -> int:
    """LastInfoSec requests that brought no usable answer (pycti's ``client_error_count``, what
    a connector counts when the API it wraps fails): timeouts, connection errors, answers other
    than found or not found (429, 5xx, 401/403, a redirect...) and unreadable answers."""
    refused = sum(n for status, n in s.responses_by_status.items() if status not in _ANSWERED)
    return s.timeouts + s.connection_errors + refused + s.bad_answers


class LisStatsCollector(Collector):
    """Exports the LastInfoSec client's counters (``LisStats``) at scrape time."""

    def __init__(self, stats: LisCounters, name: Callable[[str], str] = str) -> None:
        self._stats = stats
        self._name = name

    def collect(self) -> Iterable[Any]:
        s = self._stats
        req = CounterMetricFamily(
            self._name("lis_api_requests"), "LastInfoSec HTTP answers", labels=["status"]
        )
        for status, n in sorted(s.responses_by_status.items()):
            req.add_metric([str(status)], n)
        yield req
        hits = CounterMetricFamily(
            self._name("lis_cache_hits"),
            "Lookups answered from a cache, by level",
            labels=["level"],
        )
        hits.add_metric(["local"], float(s.cache_hits))
        hits.add_metric(["shared"], float(s.shared_cache_hits))
        yield hits
        for name, value, doc in (
            ("lis_api_retries", s.retries, "LastInfoSec retries"),
            ("lis_api_throttled", s.throttled, "LastInfoSec 429 answers"),
            ("lis_api_timeouts", s.timeouts, "LastInfoSec timeouts"),
            ("lis_api_connection_errors", s.connection_errors, "LastInfoSec connection errors"),
            ("lis_cache_misses", s.cache_misses, "Lookups not in the in-process cache"),
            ("lis_coalesced", s.coalesced, "Lookups served by an identical lookup in flight"),
        ):
            c = CounterMetricFamily(self._name(name), doc)
            c.add_metric([], float(value))
            yield c


class LinkCounters(Protocol):
    """The Redis link's counters (:class:`lis_async.cluster.link.LinkStats`)."""

    @property
    def errors(self) -> int: ...
    @property
    def transitions(self) -> int: ...
    @property
    def replicas_seen(self) -> int: ...


class RedisLinkView(Protocol):
    """The Redis link (:class:`lis_async.cluster.link.RedisLink`)."""

    @property
    def shared(self) -> bool:
        """True while Redis answers (shared mode), False in fallback."""
        ...

    @property
    def stats(self) -> LinkCounters: ...


class ClusterLimiterView(Protocol):
    """The cluster-wide rate limit (:class:`lis_async.cluster.limiter.ClusterLimiter`)."""

    @property
    def granted_shared(self) -> int: ...
    @property
    def fallback_share(self) -> float: ...
    @property
    def last_window(self) -> int: ...


class WaitCounters(Protocol):
    @property
    def waits(self) -> int: ...
    @property
    def waits_answered(self) -> int: ...


class SharedCacheView(Protocol):
    """The shared answer cache (:class:`lis_async.cluster.cache.SharedAnswerCache`)."""

    @property
    def stats(self) -> WaitCounters: ...


class ClusterCollector(Collector):
    """Cluster mode's state (``lis_async.cluster``), read at scrape time."""

    def __init__(
        self,
        link: RedisLinkView,
        limiter: ClusterLimiterView,
        cache: SharedCacheView,
        name: Callable[[str], str] = str,
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
        for name, gauge, doc in (
            ("lis_cluster_replicas", link.stats.replicas_seen, "Replicas seen on this quota"),
            ("lis_redis_fallback_share", self._limiter.fallback_share, "Rate share if Redis fails"),
            (
                "lis_cluster_quota_used",
                self._limiter.last_window,
                "Grants this second, all replicas",
            ),
        ):
            g = GaugeMetricFamily(self._name(name), doc)
            g.add_metric([], float(gauge))
            yield g
