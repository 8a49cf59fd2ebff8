"""The printed report of a run: a table (classic, lis_async, their ratio), or in a ``--replicas``
run the replica phases' table and one line per worker, or in a ``--backlog`` run the backlog
phases' table (``lis_async.bench.backlog_table``), then notes below it."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from lis_async.bench.backlog_table import (
    BACKLOG_PHASES,
    MOVER_PHASE,
    backlog_notes,
    backlog_rows,
    mover_notes,
)
from lis_async.bench.config import FAULT_AFTER_S, FAULT_STALL_S, BenchConfig
from lis_async.bench.results import (
    FIFO_PHASE,
    BacklogPhaseResult,
    FaultFigures,
    MoverPhaseResult,
    PhaseResult,
    ReplicaPhaseResult,
    SpanFigures,
    fmt,
    pct,
    ratio,
)
from lis_async.redact import mask_url

Getter = Callable[[PhaseResult], float | None]
ReplicaGetter = Callable[[ReplicaPhaseResult], str]
#: The replica phases, in the order of their columns.
REPLICA_PHASES = {"replicas": "Redis (shared)", "replicas-baseline": "no Redis (baseline)"}


def format_table(cfg: BenchConfig, phases: dict[str, PhaseResult], record: dict[str, Any]) -> str:
    """The table of the throughput phases (or of the replica phases), then the notes (world,
    latency, rate, RSS, replicas, targets)."""
    lines = _table(phases) if "classic" in phases or "lis_async" in phases else []
    replicas = {
        title: p
        for name, title in REPLICA_PHASES.items()
        if isinstance(p := phases.get(name), ReplicaPhaseResult)
    }
    if replicas:
        lines += [*(["", ""] if lines else []), *_replica_table(replicas), ""]
        lines += [line for p in replicas.values() for line in _worker_lines(p)]
    backlog = {
        title: p
        for name, title in BACKLOG_PHASES.items()
        if isinstance(p := phases.get(name), BacklogPhaseResult)
    }
    if backlog:
        lines += [*(["", ""] if lines else []), *_align(backlog_rows(backlog))]
    notes = [*_world_notes(cfg, phases), *_replica_notes(cfg, replicas)]
    notes += backlog_notes(cfg, backlog)
    mover = phases.get(MOVER_PHASE)
    notes += mover_notes(mover if isinstance(mover, MoverPhaseResult) else None)
    notes += _target_notes(record.get("targets", {}))
    return "\n".join([*lines, "", *notes])


def _rows(paced: PhaseResult | None) -> list[tuple[str, Getter, int, bool]]:
    """(label, figure, digits, with a lis/classic ratio) of every row."""

    def latency(key: str) -> Getter:
        # lis_async's latency comes from the paced phase (published -> completed) when it ran.
        def get(p: PhaseResult) -> float | None:
            if p.connector == "lis_async" and paced is not None:
                return pct(paced.latency_ms, key)
            return pct(p.service_ms, key)

        return get

    def busy(get: Callable[[PhaseResult], float | None]) -> Getter:
        return lambda p: ratio(get(p), p.span_s)

    return [
        ("jobs", lambda p: float(p.completed), 0, False),
        ("jobs/s", lambda p: p.jobs_per_s, 1, True),
        *((f"job latency {key} (ms)", latency(key), 0, True) for key in ("p50", "p95", "p99")),
        ("worker CPU / job (ms)", lambda p: p.worker_cpu_ms_per_job, 2, True),
        ("worker CPU (cores busy)", busy(lambda p: p.worker_cpu_s), 2, False),
        ("worker peak RSS (MB)", lambda p: p.peak_rss_mb, 1, True),
        ("LastInfoSec requests", lambda p: float(p.lis_requests), 0, False),
        ("LastInfoSec max concurrent", lambda p: float(p.lis_max_concurrent), 0, False),
        ("LastInfoSec max in 1 s", lambda p: float(p.lis_max_per_window), 0, False),
        ("LastInfoSec max in 1 s (sliding)", lambda p: float(p.lis_max_sliding_1s), 0, False),
        ("bench process CPU / job (ms)", lambda p: p.per_job(p.bench_cpu_s), 2, False),
        ("bench process (cores busy)", busy(lambda p: p.bench_cpu_s), 2, False),
        ("RabbitMQ CPU / job (ms)", lambda p: p.per_job(p.rabbitmq_cpu_s), 2, False),
        ("RabbitMQ (cores busy)", busy(lambda p: p.rabbitmq_cpu_s), 2, False),
        ("other processes (cores busy)", busy(lambda p: p.other_cpu_s), 2, False),
        (
            "push messages / job",
            lambda p: p.push_messages / p.completed if p.completed else None,
            1,
            False,
        ),
    ]


def _table(phases: dict[str, PhaseResult]) -> list[str]:
    """The table's lines: a column per connector, and lis/classic when both ran."""
    classic, lis = phases.get("classic"), phases.get("lis_async")
    fifo = phases.get(FIFO_PHASE)
    both = classic is not None and lis is not None
    cols = [p for p in (classic, lis, fifo) if p is not None]
    head = ["", *(p.name for p in cols)]
    if both:
        head.append("lis/classic")
    rows: list[list[str]] = []
    for label, get, digits, with_ratio in _rows(phases.get("latency")):
        values = [get(p) for p in cols]
        line = [label, *(fmt(v, digits) for v in values)]
        if classic is not None and lis is not None:
            r = ratio(get(lis), get(classic)) if with_ratio else None
            line.append("" if r is None else f"{r:.2f}x")
        rows.append(line)
    if lis is not None and fifo is not None:
        cost = lis.worker_cpu_ms_per_job - fifo.worker_cpu_ms_per_job
        label = "priority lanes: worker CPU / job, lanes - FIFO (ms)"
        rows.append([label, *([""] * (len(cols) - 1)), fmt(cost, 2), *([""] if both else [])])
    return _align([head, *rows])


def _align(rows: list[list[str]]) -> list[str]:
    """Rows as lines: the first column left-aligned, the others right-aligned, a rule under the
    first row."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = [
        "  ".join(c.ljust(widths[0]) if i == 0 else c.rjust(widths[i]) for i, c in enumerate(r))
        for r in rows
    ]
    lines.insert(1, "-" * len(lines[0]))
    return lines


def _replica_rows() -> list[tuple[str, ReplicaGetter]]:
    """(label, figure as text) of every row of the replica table."""

    def each(get: Callable[[Any], float], digits: int = 1) -> ReplicaGetter:
        return lambda p: " / ".join(fmt(get(r), digits) for r in p.per_replica)

    def total(get: Callable[[Any], float]) -> ReplicaGetter:
        return lambda p: fmt(float(sum(get(r) for r in p.per_replica)), 0)

    def shared(get: ReplicaGetter) -> ReplicaGetter:
        return lambda p: get(p) if p.shared else "-"

    def busy(seconds: Callable[[ReplicaPhaseResult], float | None]) -> ReplicaGetter:
        return lambda p: fmt(ratio(seconds(p), p.span_s), 2)

    return [
        ("workers x jobs in flight", lambda p: f"{p.replicas} x {p.in_flight}"),
        ("LastInfoSec rate per worker (/s)", lambda p: fmt(p.rate_per_replica)),
        ("jobs completed (in error)", lambda p: f"{p.completed:,} ({p.in_error})"),
        ("jobs per worker", each(lambda r: float(r.jobs), 0)),
        ("jobs/s, all workers", lambda p: fmt(p.jobs_per_s)),
        ("jobs/s per worker", each(lambda r: r.jobs_per_s)),
        ("worker CPU / job (ms), all workers", lambda p: fmt(p.worker_cpu_ms_per_job, 2)),
        ("worker CPU / job (ms) per worker", each(lambda r: r.cpu_ms_per_job, 2)),
        ("workers (cores busy)", busy(lambda p: p.worker_cpu_s)),
        ("LastInfoSec requests", lambda p: fmt(float(p.lis_requests), 0)),
        ("distinct values asked", lambda p: fmt(p.lis_distinct_values, 0)),
        ("requests / distinct value", lambda p: fmt(p.lis_requests_per_distinct, 3)),
        ("LastInfoSec req/s during the backlog", lambda p: fmt(p.lis_backlog_per_s)),
        ("backlog (s)", lambda p: fmt(p.backlog_s)),
        ("LastInfoSec max in 1 s (sliding)", lambda p: str(p.lis_busiest_1s)),
        ("... from second (after the first request)", lambda p: fmt(p.lis_busiest_1s_at_s, 2)),
        ("cache hits, local", total(lambda r: r.cache_hits_local)),
        ("cache hits, shared (Redis)", shared(total(lambda r: r.cache_hits_shared))),
        ("coalesced within a worker", total(lambda r: r.coalesced_local)),
        ("waits for another worker", shared(total(lambda r: r.coalesced_waits))),
        ("... answered", shared(total(lambda r: r.coalesced_waits_answered))),
        ("Redis errors", shared(total(lambda r: r.redis_errors))),
        ("switches to/from fallback mode", shared(total(lambda r: r.redis_transitions))),
        ("Redis CPU / job (ms)", shared(lambda p: fmt(p.per_job(p.redis_cpu_s), 2))),
        ("Redis (cores busy)", shared(busy(lambda p: p.redis_cpu_s))),
        ("bench process CPU / job (ms)", lambda p: fmt(p.per_job(p.bench_cpu_s), 2)),
        ("LastInfoSec double CPU / job (ms)", lambda p: fmt(p.per_job(p.lis_double_cpu_s), 2)),
        ("RabbitMQ CPU / job (ms)", lambda p: fmt(p.per_job(p.rabbitmq_cpu_s), 2)),
        ("other processes (cores busy)", busy(lambda p: p.other_cpu_s)),
        ("worker peak RSS (MB), largest", lambda p: fmt(p.peak_rss_mb)),
    ]


def _fault_rows() -> list[tuple[str, ReplicaGetter]]:
    """(label, figure as text) of the rows a fault run adds (``-``: a phase without one)."""

    def fault(get: Callable[[FaultFigures], str]) -> ReplicaGetter:
        return lambda p: get(p.fault) if p.fault is not None and p.fault.applied else "-"

    def spans(get: Callable[[SpanFigures], str]) -> ReplicaGetter:
        return fault(lambda f: " / ".join(get(s) for s in f.spans) or "-")

    return [
        ("Redis fault", fault(lambda f: f"{f.kind} {f.seconds:g} s")),
        ("... from second (after the first request)", fault(lambda f: fmt(f.start_s, 2))),
        ("... lasted (s)", fault(lambda f: fmt(f.duration_s, 2))),
        ("LastInfoSec max in 1 s, before / during / after", spans(lambda s: str(s.busiest_1s))),
        ("... from second", spans(lambda s: fmt(s.busiest_1s_at_s, 2))),
        ("LastInfoSec requests, before / during / after", spans(lambda s: str(s.requests))),
        ("LastInfoSec req/s, before / during / after", spans(lambda s: fmt(s.per_s))),
        ("works not completed (lost)", lambda p: str(p.lost) if p.fault else "-"),
        ("phase ended", lambda p: p.fault.ended if p.fault else "-"),
    ]


def _replica_table(phases: dict[str, ReplicaPhaseResult]) -> list[str]:
    """The replica phases' table: a column per phase (with Redis, and the baseline), and the
    rows of a fault run if one ran."""
    rows = [["", *phases]]
    every = _replica_rows()
    if any(p.fault is not None for p in phases.values()):
        every += _fault_rows()
    rows += [[label, *(get(p) for p in phases.values())] for label, get in every]
    return _align(rows)


def _worker_lines(p: ReplicaPhaseResult) -> list[str]:
    """One line per worker of a replica phase, from its own metrics."""
    lines = []
    for r in p.per_replica:
        outcomes = ", ".join(f"{k} {v}" for k, v in sorted(r.jobs_by_outcome.items()))
        line = (
            f"{p.name} worker {r.index} (pid {r.pid}): {r.jobs} jobs ({outcomes}), "
            f"{fmt(r.jobs_per_s)} jobs/s, {fmt(r.cpu_ms_per_job, 2)} ms CPU/job, "
            f"{r.lis_requests} LastInfoSec answers, cache hits {r.cache_hits_local} local"
        )
        if p.shared:
            line += (
                f" / {r.cache_hits_shared} shared, {r.coalesced_waits} waits "
                f"({r.coalesced_waits_answered} answered), {r.cluster_granted} granted by "
                f"Redis, {r.redis_errors} Redis errors, {r.redis_transitions} switches to/from "
                "fallback" + ("" if r.redis_shared else " (in fallback mode at the end)")
            )
        line += f", exit code {r.exit_code}"
        if r.log_warnings:
            line += f"; {r.log_warnings} warning lines, the first: {r.first_warning}"
        lines.append(line)
    return lines


def _replica_notes(cfg: BenchConfig, phases: dict[str, ReplicaPhaseResult]) -> list[str]:
    """How the replica phases ran and what their figures mean."""
    if not phases:
        return []
    rate = f"{cfg.rate:g}/s" if cfg.rate else "no limit"
    shared = phases.get(REPLICA_PHASES["replicas"])
    fault = shared.fault if shared is not None else None
    redis = mask_url(cfg.redis_url) if fault is None else f"its own, {fault.redis_url}"
    return [
        f"replicas: {cfg.replicas} workers on one connector id, {cfg.jobs:,} jobs published at "
        f"once when every worker consumed, {cfg.repeat_share:.0%} of them with the observable "
        f"of an earlier job; shared: one Redis ({redis}, a key prefix per "
        f"phase), cluster rate {rate}; baseline: no Redis, each worker at rate / "
        f"{cfg.replicas}.",
        *_fault_notes(shared),
        "req/s during the backlog: least-squares slope of the LastInfoSec double's request "
        "count, from the first request until the last job was taken from the queue; max in "
        "1 s: sliding window over the double's request times; distinct values: as the double "
        "recorded them.",
        "worker CPU: every worker, from all of them consuming to every work completed; jobs "
        "per worker from each worker's lis_jobs_total, scraped before it was stopped.",
    ]


def _fault_notes(p: ReplicaPhaseResult | None) -> list[str]:
    """What a fault run did, and how its spans are counted."""
    if p is None or p.fault is None:
        return []
    f = p.fault
    if f.kind == "kill":
        how = (
            f"redis-server killed (SIGKILL) {FAULT_AFTER_S:g} s after the first job was taken, "
            f"a new one started empty on the same port {f.seconds:g} s later"
        )
    else:
        how = (
            f"redis-server stopped (SIGSTOP) {FAULT_AFTER_S:g} s after the first job was "
            f"taken, continued (SIGCONT) {f.seconds:g} s later"
        )
    switches = " / ".join(str(r.redis_transitions) for r in p.per_replica)
    return [
        f"fault: {how}; during = from the signal until Redis was back (the new server "
        "answering, or SIGCONT sent). Spans: every sliding second at LastInfoSec is counted in "
        "the span where it begins (at a request), so the largest of the three is the phase's "
        "busiest; req/s: least-squares slope over the span. The phase ends when every work "
        f"completed, or {FAULT_STALL_S:g} s without a completion after the fault (the rest "
        f"lost). Switches to/from fallback per worker: {switches}.",
    ]


def _world_notes(cfg: BenchConfig, phases: dict[str, PhaseResult]) -> list[str]:
    """What was measured how: the world, the latency phase, the rate limit, the RSS phase."""
    lis, paced, rss = phases.get("lis_async"), phases.get("latency"), phases.get("rss")
    notes = [
        f"LastInfoSec {cfg.latency * 1000:.0f} ms (+{cfg.jitter * 1000:.0f} ms jitter), "
        f"{cfg.bundle_size}-object bundles, platform {cfg.platform_latency * 1000:.0f} ms; "
        f"lis_async {cfg.in_flight} jobs in flight, "
        + (f"rate {cfg.rate:g}/s" if cfg.rate else "no rate limit")
        + "; worker emulation in cheap mode (no stix2 validation).",
    ]
    if cfg.backlog is None:
        notes.append("jobs/s: queued jobs / (first job received -> last work completed).")
    if paced:
        notes.append(
            f"job latency: classic = received -> completed; lis_async = published -> completed, "
            f"paced at {fmt(paced.offered_jobs_per_s)} jobs/s for {cfg.latency_seconds:g} s."
        )
    if cfg.rate is not None and lis:
        notes.append(_rate_note(cfg.rate, lis))
    if rss:
        notes.append(
            f"RSS phase: {rss.jobs} jobs queued, {rss.in_flight} in flight: peak RSS "
            f"{fmt(rss.peak_rss_mb)} MB, {fmt(rss.jobs_per_s)} jobs/s, "
            f"{fmt(rss.worker_cpu_ms_per_job, 2)} ms CPU/job."
        )
    return notes


def _rate_note(rate: float, lis: PhaseResult) -> str:
    windows = lis.lis_per_second
    busiest = windows.index(max(windows)) + 1 if windows else 0
    later = max(windows[1:], default=0)
    return (
        f"rate limit {rate:g}/s: sustained {fmt(lis.lis_sustained_per_s)} req/s, "
        f"busiest one-second window {lis.lis_max_per_window} requests (second {busiest} of "
        f"{len(windows)}; busiest after the first second: {later}); first seconds: "
        + ", ".join(str(n) for n in windows[:5])
        + "."
    )


def _target_notes(targets: dict[str, dict[str, Any]]) -> list[str]:
    if not targets:
        return []
    notes = ["targets:"]
    for name, t in targets.items():
        state = {True: "MET", False: "MISSED", None: "n/a"}[t["met"]]
        extra = f" ({t['note']})" if t["note"] else ""
        value = ("> " if t.get("lower_bound") else "") + fmt(t["value"], 2)
        notes.append(f"  {state:<6} {name} = {value} (limit {t['limit']:g}){extra}")
    return notes
