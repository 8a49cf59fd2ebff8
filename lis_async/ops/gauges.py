"""The worker's state as the operator sees it: the ``lis_*`` gauges read at scrape time and the
body of ``/readyz``.

Both read the running worker (:class:`lis_async.app.App`) through :class:`Worker`, a Protocol of
what they look at, at the moment of the scrape or the request: a part not built (yet, or at all:
no watermarks, no cluster mode) reads as the gauge's neutral value or is left out.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Final, Protocol

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, StateSetMetricFamily
from prometheus_client.registry import Collector

from lis_async.ops.metrics import LisCounters, RedisLinkView, client_errors

__all__ = [
    "BudgetGauges",
    "PyctiGauges",
    "Worker",
    "WorkerGauges",
    "readiness_checks",
    "readiness_details",
]


class Connected(Protocol):
    @property
    def connected(self) -> bool: ...


class Intake(Connected, Protocol):
    """The consumer (:class:`lis_async.broker.consumer.Consumer`)."""

    @property
    def in_flight(self) -> int: ...
    @property
    def accepting(self) -> bool: ...
    @property
    def queue_name(self) -> str: ...


class Heartbeat(Protocol):
    """The platform client (:class:`lis_async.platform.client.Platform`)."""

    @property
    def last_heartbeat(self) -> float | None:
        """Monotonic time of the last successful ping (None: none yet)."""
        ...

    @property
    def pings(self) -> int:
        """Heartbeat pings that went through."""
        ...

    @property
    def ping_errors(self) -> int:
        """Heartbeat pings that failed."""
        ...


class PlatformGate(Protocol):
    """The platform health gate (:class:`lis_async.platform.health.PlatformHealth`)."""

    @property
    def up(self) -> bool: ...


class PushQueueHold(Protocol):
    """The push-queue watermarks (:class:`lis_async.intake.backpressure.Backpressure`)."""

    @property
    def engaged(self) -> bool: ...
    @property
    def estimate(self) -> int:
        """Messages in the push queue (last sample plus this worker's publishes since)."""
        ...


class QueueSize(Protocol):
    @property
    def size_bytes(self) -> int: ...


class ThresholdHold(Protocol):
    """pycti's queue threshold (:class:`lis_async.intake.threshold.QueueThreshold`)."""

    @property
    def engaged(self) -> bool: ...
    @property
    def details(self) -> QueueSize | None:
        """The platform's last report of the connector's queue (None: none yet)."""
        ...


class LastInfoSec(Protocol):
    """The LastInfoSec client (:class:`lis_async.lastinfosec.LastInfoSecClient`)."""

    @property
    def outage_down(self) -> bool: ...
    @property
    def stats(self) -> LisCounters: ...


class Worker(Protocol):
    """What the gauges and ``/readyz`` read of the worker (:class:`lis_async.app.App`)."""

    @property
    def consumer(self) -> Intake | None: ...
    @property
    def publisher(self) -> Connected | None: ...
    @property
    def platform(self) -> Heartbeat: ...
    @property
    def health(self) -> PlatformGate | None: ...
    @property
    def backpressure(self) -> PushQueueHold | None: ...
    @property
    def queue_threshold(self) -> ThresholdHold | None: ...
    @property
    def lis(self) -> LastInfoSec | None: ...
    @property
    def redis(self) -> RedisLinkView | None: ...
    @property
    def mover(self) -> object | None:
        """The priority lanes' mover (None: lanes off)."""
        ...

    @property
    def lane_depth(self) -> int | None:
        """Jobs in the priority lane at the last sample (None: never read)."""
        ...

    @property
    def lane_refused(self) -> tuple[str, ...]:
        """The arguments of a foreign queue holding the lane's name (empty: none)."""
        ...

    @property
    def background_restarts(self) -> Mapping[str, int]:
        """Restarts of each background task that failed, by task name."""
        ...

    @property
    def stopping(self) -> bool:
        """True once the worker stops taking jobs for good (stop signal, fatal error)."""
        ...


def _bool(value: bool) -> float:
    return 1.0 if value else 0.0


def _connector_queue_bytes(w: Worker) -> float | None:
    qt = w.queue_threshold
    return float(qt.details.size_bytes) if qt is not None and qt.details else None


_Read = Callable[[Worker], float | None]

#: Name, help text and reading of each gauge; a reading of None leaves the sample out.
_GAUGES: tuple[tuple[str, str, _Read], ...] = (
    (
        "lis_heartbeat_age",
        "Seconds since the last successful connector ping",
        lambda w: time.monotonic() - (w.platform.last_heartbeat or 0.0),
    ),
    (
        "lis_platform_up",
        "1 while OpenCTI answers, 0 while jobs wait on the platform health gate",
        lambda w: _bool(w.health is None or w.health.up),
    ),
    (
        "lis_backpressure",
        "1 while intake is held because the push queue is above its high watermark",
        lambda w: _bool(w.backpressure is not None and w.backpressure.engaged),
    ),
    (
        "lis_push_queue_messages",
        "Messages in the push queue (sampled every second, estimated between samples)",
        lambda w: float(w.backpressure.estimate) if w.backpressure else 0.0,
    ),
    (
        "lis_queue_threshold_hold",
        "1 while intake is held because OpenCTI reports the connector's queue at or "
        "above CONNECTOR_QUEUE_THRESHOLD",
        lambda w: _bool(w.queue_threshold is not None and w.queue_threshold.engaged),
    ),
    (
        "lis_connector_queue_bytes",
        "Bytes in the connector's queue as OpenCTI last reported them "
        "(connector_queue_details.messages_size)",
        _connector_queue_bytes,
    ),
    (
        "lis_lastinfosec_up",
        "1 while LastInfoSec answers, 0 during an outage (lookups wait on one probe)",
        lambda w: _bool(w.lis is None or not w.lis.outage_down),
    ),
)
_RATE_LIMIT = (
    "lis_lastinfosec_rate_limit",
    "LastInfoSec requests per second allowed (LASTINFOSEC_RATE_PER_S): all replicas "
    "together in cluster mode, this worker's own otherwise",
)
_JOBS_RUNNING: tuple[str, str, _Read] = (
    "lis_jobs_running",
    "Jobs in flight",
    lambda w: w.consumer.in_flight if w.consumer is not None else None,
)
_LANE: tuple[str, str, _Read] = (
    "lis_lane_messages",
    "Jobs waiting in the priority lane (sampled every 5 s)",
    lambda w: w.lane_depth,
)


class WorkerGauges(Collector):
    """The worker's ``lis_*`` gauges, read at scrape time (``lis_lane_messages`` only with
    priority lanes; ``rate_per_s``: the configured LastInfoSec rate limit); ``name`` prefixes
    them (:meth:`lis_async.ops.metrics.Metrics.name`)."""

    def __init__(
        self, worker: Worker, name: Callable[[str], str], lanes: bool, rate_per_s: float
    ) -> None:
        self._worker = worker
        rate: tuple[str, str, _Read] = (*_RATE_LIMIT, lambda w: rate_per_s)
        self._gauges = (_JOBS_RUNNING, *((_LANE,) if lanes else ()), *_GAUGES, rate)
        self._name = name

    def collect(self) -> Iterable[Any]:
        for name, doc, read in self._gauges:
            g = GaugeMetricFamily(self._name(name), doc)
            value = read(self._worker)
            if value is not None:
                g.add_metric([], float(value))
            yield g


class Budget(Protocol):
    """The daily LastInfoSec budget (:class:`lis_async.lastinfosec.budget.BlockBudget`)."""

    @property
    def limits(self) -> tuple[int, int]:
        """(auto, urgent) requests per UTC day."""
        ...

    def remaining(self) -> tuple[int, int]:
        """(auto, urgent) requests left today."""
        ...


class BudgetGauges(Collector):
    """``lis_daily_budget_remaining`` and ``lis_daily_budget_limit``, by ``share``: ``auto``
    (what auto jobs may use) and ``urgent`` (manual and playbook jobs: the whole budget).
    Registered only when LASTINFOSEC_DAILY_BUDGET is set."""

    def __init__(self, budget: Budget, name: Callable[[str], str]) -> None:
        self._budget = budget
        self._name = name

    def collect(self) -> Iterable[Any]:
        for metric, doc, values in (
            (
                "lis_daily_budget_remaining",
                "LastInfoSec requests left today (UTC) as this worker last saw the budget",
                self._budget.remaining(),
            ),
            (
                "lis_daily_budget_limit",
                "LastInfoSec requests per UTC day (LASTINFOSEC_DAILY_BUDGET; auto: without "
                "the share kept for manual and playbook jobs)",
                self._budget.limits,
            ),
        ):
            g = GaugeMetricFamily(self._name(metric), doc, labels=["share"])
            for share, value in zip(("auto", "urgent"), values, strict=True):
                g.add_metric([share], float(value))
            yield g


#: pycti's ``state`` enum and its states (OpenCTIMetricHandler).
STATES: Final = ("idle", "running", "stopped")


def connector_state(w: Worker) -> str:
    """pycti's ``state``: ``running`` while jobs are in flight, ``idle`` while none is,
    ``stopped`` once the worker stops taking jobs."""
    if w.stopping:
        return "stopped"
    return "running" if w.consumer is not None and w.consumer.in_flight else "idle"


class PyctiGauges(Collector):
    """pycti's connector metrics that are read at scrape time: ``ping_api_total``,
    ``ping_api_errors_total``, ``client_errors_total`` and the ``state`` enum (the counters
    bumped per job are :class:`lis_async.ops.metrics.Metrics`'s). Same names, help texts and
    prefix as pycti's (docs/telemetry.md)."""

    def __init__(self, worker: Worker, name: Callable[[str], str]) -> None:
        self._worker = worker
        self._name = name

    def collect(self) -> Iterable[Any]:
        w = self._worker
        lis = w.lis
        for name, doc, value in (
            ("ping_api", "Number of pings to the API", w.platform.pings),
            ("ping_api_errors", "Number of errors when pinging the API", w.platform.ping_errors),
            ("client_errors", "Number of client errors", client_errors(lis.stats) if lis else 0),
        ):
            yield CounterMetricFamily(self._name(name), doc, value=float(value))
        state = connector_state(w)
        yield StateSetMetricFamily(
            self._name("state"), "State of connector", {s: s == state for s in STATES}
        )


def readiness_checks(w: Worker, heartbeat_max_age_s: float) -> dict[str, bool]:
    """The ``checks`` of ``/readyz``: every one must hold for the worker to be ready."""
    hb = w.platform.last_heartbeat
    return {
        "consumer": bool(w.consumer and w.consumer.connected),
        "publisher": bool(w.publisher and w.publisher.connected),
        "heartbeat": hb is not None and time.monotonic() - hb < heartbeat_max_age_s,
        "accepting": bool(w.consumer and w.consumer.accepting),
        "platform": w.health is None or w.health.up,
    }


def readiness_details(w: Worker) -> dict[str, Any]:
    """The ``details`` of ``/readyz``: what an operator wants to see beside the checks."""
    out: dict[str, Any] = {"redis": "off"}
    if w.background_restarts:
        out["background_restarts"] = dict(w.background_restarts)
    link = w.redis
    if link is not None:
        out["redis"] = "shared" if link.shared else "fallback"
        out["replicas_seen"] = link.stats.replicas_seen
    if w.mover is not None and w.consumer is not None:
        out["lane"] = w.consumer.queue_name
        out["lane_messages"] = w.lane_depth
    if w.lane_refused:
        out["lane_refused"] = list(w.lane_refused)  # a foreign queue holds the lane's name
    bp = w.backpressure
    if bp is not None:
        out["backpressure"] = bp.engaged
        out["push_queue_messages"] = bp.estimate
    qt = w.queue_threshold
    if qt is not None:
        out["queue_threshold"] = qt.engaged
        out["connector_queue_bytes"] = qt.details.size_bytes if qt.details else None
    return out
