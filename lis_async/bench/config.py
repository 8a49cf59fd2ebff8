"""What one ``lis-async bench`` run is asked to do: :class:`BenchConfig`, built from the options.

Standard library only: the command line validates a configuration before anything of the
benchmark (simulator, psutil) is imported.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass

DEFAULT_AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/"
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
#: ``--jobs`` when not given: for the single-worker phases, and for a ``--replicas`` run.
DEFAULT_JOBS = 2000
DEFAULT_REPLICA_JOBS = 1500
#: ``--repeat-share`` when not given, in a ``--replicas`` run.
DEFAULT_REPEAT_SHARE = 0.5
#: Options that measure one worker's own phases, hence meaningless in a ``--replicas`` or a
#: ``--backlog`` run.
_SINGLE_WORKER_OPTIONS = ("sweep", "rss_jobs", "profile", "fifo")
#: In a ``--backlog`` run: ``--manual``, ``--backlog-seconds`` and ``--rate`` when not given.
DEFAULT_MANUAL = 10
DEFAULT_BACKLOG_SECONDS = 120.0
DEFAULT_BACKLOG_RATE = 20.0
#: ``--redis-fault`` kinds, and ``--redis-fault-seconds`` when not given.
FAULT_KINDS = ("kill", "freeze")
DEFAULT_FAULT_SECONDS = {"kill": 20.0, "freeze": 10.0}
#: A fault starts this long after the first job was taken (the replicas at work, their start-up
#: burst long over), and the default ``--jobs`` of a fault run lasts at least about this long
#: after it ends (:func:`fault_jobs`); a ``--jobs`` that might not outlast it is refused.
FAULT_AFTER_S = 15.0
FAULT_TAIL_S = 15.0
#: A fault run ends, its works not completed counted as lost, when none completed for this long
#: once the fault is over and every job published (a stall fails any other phase).
FAULT_STALL_S = 60.0
#: Share of the bench's jobs that ask LastInfoSec when no earlier job had their observable: the
#: rest are TLP:AMBER+STRICT or RED, or files without a hash (679 distinct values for 1,500 jobs
#: at --repeat-share 0.5 in the cluster runs of BENCHMARKS.md: 0.905; 0.88 errs long).
LOOKUP_SHARE = 0.88
#: Above this --repeat-share too few jobs reach LastInfoSec for a fault run to measure its rate.
MAX_FAULT_REPEAT_SHARE = 0.9
#: The setting a ``--backlog`` run sets per phase (lanes: left at its default; FIFO: false).
PRIORITY_LANES_SETTING = "CONNECTOR_PRIORITY_LANES"


@dataclass(frozen=True)
class BenchConfig:
    """Every option of ``lis-async bench``; field names are the options' ``dest``.

    ``replicas`` set makes a cluster run: only the replica phases run (the classic and
    single-worker phases measure something else). ``jobs`` and ``repeat_share`` then default to
    :data:`DEFAULT_REPLICA_JOBS` and :data:`DEFAULT_REPEAT_SHARE` (see :meth:`from_args`).

    ``backlog`` set makes a backlog run: only the two backlog phases run (priority lanes, then
    FIFO). ``manual``, ``backlog_seconds`` and ``rate`` then default to :data:`DEFAULT_MANUAL`,
    :data:`DEFAULT_BACKLOG_SECONDS` and :data:`DEFAULT_BACKLOG_RATE`.
    """

    jobs: int = DEFAULT_JOBS
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
    #: also run the lis_async phase with CONNECTOR_PRIORITY_LANES=false (the lanes' cost)
    fifo: bool = False
    rss_jobs: int = 0
    sweep: bool = False
    plot: str = "bench-sweep.png"
    json_path: str | None = None
    profile: str | None = None
    amqp_url: str = DEFAULT_AMQP_URL
    seed: int = 0
    worker_env: tuple[str, ...] = ()
    #: worker processes sharing one connector id (None: no replica phase)
    replicas: int | None = None
    #: share of the replica phase's jobs whose observable an earlier job of the phase had
    repeat_share: float = 0.0
    redis_url: str = DEFAULT_REDIS_URL
    #: also run the replicas without Redis, each at rate / replicas
    replicas_baseline: bool = False
    #: auto-mode jobs queued in each backlog phase (None: no backlog phase)
    backlog: int | None = None
    #: manual-mode jobs queued behind them
    manual: int | None = None
    #: a backlog phase stops this long after its manual jobs were published
    backlog_seconds: float | None = None
    #: with --replicas: a private redis-server, killed (restarted empty) or frozen mid-phase
    redis_fault: str | None = None
    #: how long it stays down or frozen
    redis_fault_seconds: float | None = None

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> BenchConfig:
        """The configuration of parsed options; ``--jobs`` and ``--repeat-share`` left out
        (None) take their default for the kind of run (one worker, or ``--replicas``), and so do
        ``--manual``, ``--backlog-seconds`` and ``--rate`` in a ``--backlog`` run."""
        names = cls.__dataclass_fields__
        values = {k: v for k, v in vars(args).items() if k in names}
        values["worker_env"] = tuple(values.get("worker_env") or ())
        cluster = values.get("replicas") is not None
        if values.get("repeat_share") is None:
            values["repeat_share"] = DEFAULT_REPEAT_SHARE if cluster else 0.0
        fault = values.get("redis_fault")
        if fault in DEFAULT_FAULT_SECONDS and values.get("redis_fault_seconds") is None:
            values["redis_fault_seconds"] = DEFAULT_FAULT_SECONDS[fault]
        if values.get("jobs") is None:
            values["jobs"] = DEFAULT_REPLICA_JOBS if cluster else DEFAULT_JOBS
            rate, seconds = values.get("rate"), values.get("redis_fault_seconds")
            if cluster and fault and rate and seconds and seconds > 0 and rate > 0:
                share = values["repeat_share"]
                if 0.0 <= share <= MAX_FAULT_REPEAT_SHARE:
                    values["jobs"] = fault_jobs(rate, seconds, share, FAULT_TAIL_S)
        if values.get("backlog") is not None:
            defaults = {
                "manual": DEFAULT_MANUAL,
                "backlog_seconds": DEFAULT_BACKLOG_SECONDS,
                "rate": DEFAULT_BACKLOG_RATE,
            }
            values |= {k: v for k, v in defaults.items() if values.get(k) is None}
        return cls(**values)

    @property
    def single_worker_run(self) -> bool:
        """True unless ``--replicas`` or ``--backlog`` makes a run of its own phases only."""
        return self.replicas is None and self.backlog is None

    @property
    def fault_run(self) -> bool:
        """True when ``--redis-fault`` makes the replica phase a fault run."""
        return self.replicas is not None and self.redis_fault is not None

    def extra_env(self) -> dict[str, str]:
        """The ``--worker-env NAME=VALUE`` settings, as a mapping."""
        return dict(item.split("=", 1) for item in self.worker_env if "=" in item)

    def problems(self) -> list[str]:
        """What is wrong with the options, one message per problem (empty: nothing)."""
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
        out.extend(self._replica_problems())
        out.extend(self._fault_problems())
        out.extend(self._backlog_problems())
        return out

    def _replica_problems(self) -> list[str]:
        out: list[str] = []
        if not 0.0 <= self.repeat_share <= 1.0:
            out.append("--repeat-share must be within 0 and 1")
        if not self.redis_url.startswith(("redis://", "rediss://", "unix://")):
            out.append("--redis-url must be a redis://, rediss:// or unix:// URL")
        if self.replicas is None:
            if self.repeat_share or self.replicas_baseline:
                out.append("--repeat-share and --replicas-baseline need --replicas N")
            return out
        if self.replicas < 1:
            out.append("--replicas must be at least 1")
        given = [n for n in _SINGLE_WORKER_OPTIONS if getattr(self, n)]
        if given:
            names = ", ".join("--" + n.replace("_", "-") for n in given)
            out.append(f"{names}: measure one worker, not with --replicas")
        return out

    def _fault_problems(self) -> list[str]:
        if self.redis_fault is None:
            if self.redis_fault_seconds is not None:
                return ["--redis-fault-seconds needs --redis-fault {kill,freeze}"]
            return []
        if self.replicas is None:
            return ["--redis-fault needs --replicas N (it breaks the Redis the replicas share)"]
        out: list[str] = []
        if self.redis_fault not in FAULT_KINDS:
            out.append(f"--redis-fault must be one of {', '.join(FAULT_KINDS)}")
        seconds = self.redis_fault_seconds
        if seconds is not None and seconds <= 0:
            out.append("--redis-fault-seconds must be positive")
        if self.rate is None:
            out.append("--redis-fault needs --rate (it measures the rate limit across failover)")
        if self.replicas_baseline:
            out.append("--redis-fault and --replicas-baseline: the baseline has no Redis to fail")
        if self.redis_url != DEFAULT_REDIS_URL:
            out.append("--redis-fault starts a redis-server of its own: --redis-url is not used")
        if self.repeat_share > MAX_FAULT_REPEAT_SHARE:
            out.append(
                f"--redis-fault needs --repeat-share at most {MAX_FAULT_REPEAT_SHARE:g} (jobs "
                "that reach LastInfoSec throughout the phase)"
            )
        if out or self.rate is None or seconds is None:
            return out
        least = fault_jobs(self.rate, seconds, self.repeat_share, 0.0)
        if self.jobs < least:
            enough = fault_jobs(self.rate, seconds, self.repeat_share, FAULT_TAIL_S)
            out.append(
                f"--jobs {self.jobs} is too few for a {seconds:g} s fault at --rate "
                f"{self.rate:g}: the fault starts {FAULT_AFTER_S:g} s into the phase, and the "
                f"jobs might be done before it ends; use --jobs {least} or more (the default, "
                f"{enough}, lasts at least about {FAULT_TAIL_S:g} s after it)"
            )
        return out

    def _backlog_problems(self) -> list[str]:
        out: list[str] = []
        if self.backlog is None:
            if self.manual is not None or self.backlog_seconds is not None:
                out.append("--manual and --backlog-seconds need --backlog N")
            return out
        if self.backlog < 1:
            out.append("--backlog must be at least 1")
        if self.manual is not None and self.manual < 1:
            out.append("--manual must be at least 1")
        if self.backlog_seconds is not None and self.backlog_seconds <= 0:
            out.append("--backlog-seconds must be positive")
        if self.replicas is not None:
            out.append("--backlog and --replicas are two different runs: choose one")
        given = [n for n in _SINGLE_WORKER_OPTIONS if getattr(self, n)]
        if given:
            names = ", ".join("--" + n.replace("_", "-") for n in given)
            out.append(f"{names}: measure one worker's own phases, not with --backlog")
        if PRIORITY_LANES_SETTING in self.extra_env():
            out.append(
                f"--worker-env {PRIORITY_LANES_SETTING}: --backlog sets it per phase "
                "(lanes: its default; FIFO: false)"
            )
        return out


def fault_jobs(rate: float, fault_s: float, repeat_share: float, tail_s: float) -> int:
    """The jobs a fault run needs to keep LastInfoSec busy at ``rate`` for
    :data:`FAULT_AFTER_S` before the fault, ``fault_s`` during it and ``tail_s`` after it.

    Shared, a job reaches LastInfoSec when its observable is new (1 - ``repeat_share``) and
    looked up (:data:`LOOKUP_SHARE`). In fallback mode, and after a restart that lost the
    cache, some repeats ask again, and each transition idles a replica: the phase lasts
    longer than this, never shorter."""
    requests = rate * (FAULT_AFTER_S + fault_s + tail_s)
    per_job = LOOKUP_SHARE * (1.0 - repeat_share)
    return math.ceil(requests / per_job)
