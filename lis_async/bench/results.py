"""What a benchmark phase produces: a :class:`PhaseResult`, or a :class:`BenchError`.

Shared by the phase runner (which fills the results), the record and the table (which read
them), with the few helpers both of those use to format figures. No dependency outside the
standard library.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

Connector = Literal["classic", "lis_async"]
Mode = Literal["queued", "paced", "burst", "backlog"]


class BenchError(Exception):
    """A phase could not run (connector did not start, stalled, RabbitMQ unreachable...)."""


@dataclass
class PhaseResult:
    name: str
    connector: Connector
    jobs: int
    in_flight: int
    mode: Mode
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
    #: most requests in any sliding one-second window at the double (its last 10,000 requests):
    #: where LastInfoSec counts its quota, when requests arrive
    lis_max_sliding_1s: int = 0
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
        """``seconds`` per completed job, in milliseconds (NaN when nothing completed)."""
        if seconds is None or not self.completed:
            return math.nan
        return seconds / self.completed * 1000


@dataclass
class ReplicaFigures:
    """One worker of a replica phase: its own metrics (scraped just before it was stopped) and
    its CPU over the phase."""

    index: int
    pid: int = -1
    metrics_port: int = 0
    #: lis_jobs_total, all outcomes, and by outcome
    jobs: int = 0
    jobs_by_outcome: dict[str, int] = field(default_factory=dict)
    #: its jobs / the phase's span
    jobs_per_s: float = math.nan
    cpu_s: float = math.nan
    cpu_ms_per_job: float = math.nan
    peak_rss_mb: float = math.nan
    #: LastInfoSec HTTP answers it got (lis_api_requests_total)
    lis_requests: int = 0
    cache_hits_local: int = 0
    cache_hits_shared: int = 0
    #: lookups that joined an identical lookup in flight in this worker (lis_coalesced_total)
    coalesced_local: int = 0
    #: waits for another replica's lookup, and those that got its answer
    coalesced_waits: int = 0
    coalesced_waits_answered: int = 0
    #: requests the Redis window granted (lis_cluster_granted_total)
    cluster_granted: int = 0
    #: lis_redis_shared at the end (None: no Redis)
    redis_shared: bool | None = None
    redis_errors: int = 0
    #: switches between shared and fallback mode (lis_redis_transitions_total)
    redis_transitions: int = 0
    #: warning (or worse) lines in its log, and the first of them
    log_warnings: int = 0
    first_warning: str = ""
    exit_code: int | None = None


@dataclass
class SpanFigures:
    """The requests that reached the LastInfoSec double in one span of a fault run."""

    #: ``before`` (first request -> fault start), ``during`` (fault start -> Redis back:
    #: a new server accepting connections, or SIGCONT sent) or ``after`` (-> last request)
    name: str
    #: where the span begins and ends, seconds after the first request
    from_s: float = math.nan
    to_s: float = math.nan
    requests: int = 0
    #: most requests in a sliding one-second window that begins in this span (at one of its
    #: requests; the window may reach into the next span): the three spans' figures share out
    #: the phase's windows, and the largest of them is the phase's busiest second
    busiest_1s: int = 0
    #: when that window began, seconds after the first request
    busiest_1s_at_s: float = math.nan
    #: requests/s over the span (least-squares slope of the running count; NaN under 2)
    per_s: float = math.nan


@dataclass
class FaultFigures:
    """The Redis fault of a fault run (``--redis-fault``) and the figures around it."""

    #: ``kill`` (SIGKILL, then a new empty server on the same port) or ``freeze`` (SIGSTOP,
    #: then SIGCONT)
    kind: str
    #: how long it was asked to last
    seconds: float
    #: the private redis-server's URL (loopback, a free port)
    redis_url: str = ""
    applied: bool = False
    #: epoch seconds: signal sent; Redis back (kill: the new server accepts connections;
    #: freeze: SIGCONT sent)
    start_time: float = math.nan
    end_time: float = math.nan
    #: the same, in seconds after the first request at the double, and how long it lasted
    start_s: float = math.nan
    duration_s: float = math.nan
    spans: list[SpanFigures] = field(default_factory=list)
    #: why the phase ended: ``done`` (every work completed), ``stalled`` (no work completed
    #: for a while), ``time limit``
    ended: str = ""


@dataclass
class ReplicaPhaseResult(PhaseResult):
    """A phase of N workers on one connector id. The inherited figures are the cluster's:
    ``worker_cpu_s`` sums the workers', ``peak_rss_mb`` is the largest worker's."""

    replicas: int = 1
    #: True: rate and cache shared through Redis; False: each worker on its own (baseline)
    shared: bool = True
    #: each worker's LASTINFOSEC_RATE_PER_S (the cluster's rate when shared)
    rate_per_replica: float = math.nan
    repeat_share: float = 0.0
    redis_key_prefix: str = ""
    per_replica: list[ReplicaFigures] = field(default_factory=list)
    #: requests the double recorded (all of them unless ``lis_requests`` is larger)
    lis_recorded: int = 0
    #: distinct values the double was asked (None: its record of requests is incomplete)
    lis_distinct_values: int | None = None
    lis_requests_per_distinct: float = math.nan
    #: most requests in any one second (sliding window over the double's request times), and
    #: when that second began (seconds after the first request)
    lis_busiest_1s: int = 0
    lis_busiest_1s_at_s: float = math.nan
    #: for a closer look: when each request reached the double, milliseconds after the first
    lis_request_offsets_ms: list[int] = field(default_factory=list)
    #: from the first request until the last job was taken from the queue (or the last
    #: request, if earlier), the requests/s sustained over it (least-squares slope)
    backlog_s: float = math.nan
    lis_backlog_per_s: float = math.nan
    redis_cpu_s: float | None = None
    #: CPU of the LastInfoSec double (its own process in these phases)
    lis_double_cpu_s: float | None = None
    #: works not completed when the phase ended (a fault run ends after a stall instead of
    #: failing; other phases fail unless every work completed)
    lost: int = 0
    #: the Redis fault (``--redis-fault``; None: none)
    fault: FaultFigures | None = None


@dataclass(frozen=True)
class Bound:
    """A figure that may be known only from below: ``lower`` means the true figure is at least
    ``value`` (jobs not completed when the phase stopped counted at the time they had waited)."""

    value: float = math.nan
    lower: bool = False

    def text(self, digits: int = 1) -> str:
        """``1.2``, ``> 118.0`` (a lower bound), or ``-`` (nothing measured)."""
        shown = fmt(self.value, digits)
        return f"> {shown}" if self.lower and shown != "-" else shown


@dataclass
class BacklogPhaseResult(PhaseResult):
    """A backlog phase: ``auto_jobs`` auto-mode jobs queued, then ``manual_jobs`` manual-mode
    jobs behind them, one worker. The inherited ``jobs`` and ``completed`` count both kinds;
    ``span_s`` is the phase, from the first job published to its end."""

    #: True: the worker's default (priority lanes); False: CONNECTOR_PRIORITY_LANES=false
    lanes: bool = True
    #: the busiest sliding second at the double from one second after the last auto job was
    #: published (with the double in the bench process, the flood's publishing made it stamp
    #: requests late and in bunches; in a process of its own since, the two should agree)
    lis_max_sliding_after_flood: int = 0
    #: what the phase set in the worker's environment on top of the bench's settings
    worker_overrides: dict[str, str] = field(default_factory=dict)
    auto_jobs: int = 0
    auto_completed: int = 0
    #: distinct lookup values among the auto jobs (each one costs a LastInfoSec request)
    auto_distinct_values: int = 0
    manual_jobs: int = 0
    manual_completed: int = 0
    #: publishing the auto jobs, then the manual ones (seconds)
    auto_publish_s: float = math.nan
    manual_publish_s: float = math.nan
    #: True: stopped at --backlog-seconds with jobs still waiting
    stopped_at_cap: bool = False
    #: each manual job, in publishing order: publish confirmed -> work completed (seconds;
    #: None: not completed), and for those not completed how long they had waited at the end
    manual_latency_s: list[float | None] = field(default_factory=list)
    manual_waited_s: list[float] = field(default_factory=list)
    manual_p50_s: Bound = field(default_factory=Bound)
    manual_p99_s: Bound = field(default_factory=Bound)
    manual_max_s: Bound = field(default_factory=Bound)
    #: where the completed manual jobs' time went, medians (seconds): "taken" publish ->
    #: toReceived (the queues: listen, mover, lane), "processed" toReceived -> toProcessed (the
    #: worker: rate limit, LastInfoSec, publishing), "imported" toProcessed -> work completed
    #: (the push queue and OpenCTI's workers)
    manual_stages_s: dict[str, float] = field(default_factory=dict)
    #: auto works completed per second: least-squares slope of their running count against
    #: their completion times, from the first auto completion to the phase's end
    auto_jobs_per_s: float = math.nan
    #: the same window: (completions - 1) / (last - first completion)
    auto_mean_per_s: float = math.nan
    auto_window_s: float = math.nan
    #: the listen queue: its peak depth (jobs ready), and the jobs the worker took off it per
    #: second while it held at least 1,000 (with lanes: the mover's pace; FIFO: the intake);
    #: NaN when it never held that many for long (see lis_async.bench.backlog.ListenWatch)
    listen_peak: int = 0
    listen_taken_per_s: float = math.nan


@dataclass
class MoverPhaseResult(PhaseResult):
    """The ``backlog-mover`` phase: ``jobs`` auto jobs in the listen queue before the worker
    starts (at LastInfoSec 1 req/s, so that it hardly processes meanwhile); from the first job
    taken off the queue to the last, the worker does little but move them into its lane."""

    #: the jobs taken off the listen queue per second while 1,000 or more were ready
    #: (least-squares slope), and over the whole move (jobs / span)
    moves_per_s: float = math.nan
    moves_mean_per_s: float = math.nan
    #: CPU per job moved, milliseconds: the worker's (the lanes' cost per job) and RabbitMQ's
    worker_cpu_ms_per_move: float = math.nan
    rabbitmq_cpu_ms_per_move: float = math.nan


#: The ``lis_async`` phase without priority lanes (``--fifo``).
FIFO_PHASE = "lis_async-fifo"


def fmt(value: float | None, digits: int = 1) -> str:
    """A figure for the report: thousands separated, ``-`` when missing."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if abs(value) < 0.5 * 10**-digits:
        value = 0.0  # not "-0.00" for a tiny negative (two processes' clocks)
    return f"{value:,.{digits}f}"


def ratio(a: float | None, b: float | None) -> float | None:
    """``a / b``, or None when either is missing or ``b`` is zero."""
    if a is None or b is None or math.isnan(a) or math.isnan(b) or b == 0:
        return None
    return a / b


def pct(summary: dict[str, float] | None, key: str) -> float | None:
    """One percentile (``"p50"``...) of a :func:`~lis_async.bench.measure.summary_ms`."""
    return None if summary is None else summary[key]
