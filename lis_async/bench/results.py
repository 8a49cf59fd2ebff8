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
Mode = Literal["queued", "paced"]


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


def fmt(value: float | None, digits: int = 1) -> str:
    """A figure for the report: thousands separated, ``-`` when missing."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:,.{digits}f}"


def ratio(a: float | None, b: float | None) -> float | None:
    """``a / b``, or None when either is missing or ``b`` is zero."""
    if a is None or b is None or math.isnan(a) or math.isnan(b) or b == 0:
        return None
    return a / b


def pct(summary: dict[str, float] | None, key: str) -> float | None:
    """One percentile (``"p50"``...) of a :func:`~lis_async.bench.measure.summary_ms`."""
    return None if summary is None else summary[key]
