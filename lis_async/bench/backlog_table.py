"""The report of a ``--backlog`` run: the rows of its table (a column per phase, lanes then
FIFO, and their ratio) and the notes that say how each figure was measured."""

from __future__ import annotations

from collections.abc import Callable

from lis_async.bench.config import BenchConfig
from lis_async.bench.results import BacklogPhaseResult, MoverPhaseResult, fmt, ratio

BacklogGetter = Callable[[BacklogPhaseResult], str]
#: The phase that measures the mover alone (notes under the table, not a column).
MOVER_PHASE = "backlog-mover"
#: The backlog phases, in the order of their columns, and their titles.
BACKLOG_PHASES = {"backlog-lanes": "lanes", "backlog-fifo": "FIFO"}


def _phase_s(p: BacklogPhaseResult) -> str:
    return fmt(p.span_s) + (" (cap)" if p.stopped_at_cap else "")


def _stages(p: BacklogPhaseResult) -> str:
    st = p.manual_stages_s
    if not st:
        return "-"
    return " / ".join(fmt(st.get(k), 2) for k in ("taken", "processed", "imported"))


def _rows() -> list[tuple[str, BacklogGetter, Callable[[BacklogPhaseResult], float] | None]]:
    """(label, figure as text, the figure whose lanes/FIFO ratio is shown) of every row."""
    return [
        ("manual jobs completed", lambda p: f"{p.manual_completed}/{p.manual_jobs}", None),
        ("manual latency p50 (s)", lambda p: p.manual_p50_s.text(2), None),
        ("manual latency p99 (s)", lambda p: p.manual_p99_s.text(2), None),
        ("manual latency max (s)", lambda p: p.manual_max_s.text(2), None),
        ("manual: taken / processed / imported (s, p50)", _stages, None),
        ("auto jobs completed", lambda p: f"{p.auto_completed:,}/{p.auto_jobs:,}", None),
        ("auto jobs/s", lambda p: fmt(p.auto_jobs_per_s, 2), lambda p: p.auto_jobs_per_s),
        ("auto jobs/s, mean", lambda p: fmt(p.auto_mean_per_s, 2), lambda p: p.auto_mean_per_s),
        ("... over (s)", lambda p: fmt(p.auto_window_s), None),
        ("jobs in error", lambda p: str(p.in_error), None),
        ("LastInfoSec requests", lambda p: fmt(float(p.lis_requests), 0), None),
        ("LastInfoSec req/s (sustained)", lambda p: fmt(p.lis_sustained_per_s), None),
        ("LastInfoSec max in 1 s (sliding)", lambda p: str(p.lis_max_sliding_1s), None),
        ("... after the flood", lambda p: str(p.lis_max_sliding_after_flood), None),
        ("auto jobs published in (s)", lambda p: fmt(p.auto_publish_s), None),
        ("listen queue: peak depth", lambda p: f"{p.listen_peak:,}", None),
        (
            "listen queue: jobs taken/s while flooded",
            lambda p: fmt(p.listen_taken_per_s, 0),
            lambda p: p.listen_taken_per_s,
        ),
        ("phase (s)", _phase_s, None),
        ("worker CPU / job (ms)", lambda p: fmt(p.worker_cpu_ms_per_job, 2), None),
    ]


def backlog_rows(phases: dict[str, BacklogPhaseResult]) -> list[list[str]]:
    """The table's rows, its head first: a column per phase, and lanes/FIFO with both."""
    lanes, fifo = phases.get("lanes"), phases.get("FIFO")
    both = lanes is not None and fifo is not None
    rows = [["", *phases, *(["lanes/FIFO"] if both else [])]]
    for label, get, ratio_of in _rows():
        line = [label, *(get(p) for p in phases.values())]
        if lanes is not None and fifo is not None:
            r = ratio(ratio_of(lanes), ratio_of(fifo)) if ratio_of else None
            line.append("" if r is None else f"{r:.3f}x")
        rows.append(line)
    return rows


def backlog_notes(cfg: BenchConfig, phases: dict[str, BacklogPhaseResult]) -> list[str]:
    """How the backlog phases ran and what their figures mean."""
    if not phases:
        return []
    rate = f"{cfg.rate:g}/s" if cfg.rate else "no limit"
    drain = ""
    if cfg.rate:
        drain = f"; FIFO drains the backlog in about {(cfg.backlog or 0) / cfg.rate:,.0f} s"
    distinct = ", ".join(
        f"{title} {p.auto_distinct_values:,}/{p.auto_jobs:,}" for title, p in phases.items()
    )
    return [
        f"backlog: one worker, rate {rate}, {cfg.in_flight} jobs in flight; {cfg.backlog:,} "
        f"auto jobs published once it consumed, then {cfg.manual} manual jobs behind them; "
        f"lanes: the worker's defaults, FIFO: CONNECTOR_PRIORITY_LANES=false{drain}. A phase "
        f"stops when every work completed, or {cfg.backlog_seconds:g} s after the last manual "
        "job was published ((cap) in the table).",
        "manual latency: publish confirmed -> work completed in the platform double. '> X': "
        "some manual jobs had not completed when the phase stopped; each counted as the time "
        "it had waited, so the true figure is at least X.",
        "manual taken / processed / imported: medians of publish -> toReceived (the queues), "
        "toReceived -> toProcessed (the worker), toProcessed -> work completed (the push queue "
        "and OpenCTI's workers).",
        "auto jobs/s: auto works completed per second, from the first auto completion to the "
        "last one within the phase: least-squares slope of their running count (robust to the "
        "limiter's bursts); mean: (completions - 1) / that span.",
        f"auto observables distinct (each costs a LastInfoSec request): {distinct}.",
        "listen queue: sampled every 0.1 s while the phase runs; jobs taken/s: the slope of "
        "(jobs published - jobs ready) while 1,000 or more were ready. With lanes that is the "
        "mover's pace (moves/s), with FIFO the worker's intake.",
        "worker CPU / job: the phase's worker CPU over the jobs completed; with lanes it "
        "includes moving every published job into the lane (what moving costs per job: the "
        "mover note below; what the lanes cost per job processed: `lis-async bench --fifo`).",
    ]


def mover_notes(p: MoverPhaseResult | None) -> list[str]:
    """The ``backlog-mover`` phase, as notes under the table."""
    if p is None:
        return []
    rabbit = ""
    if p.rabbitmq_cpu_s is not None:
        rabbit = f", RabbitMQ {fmt(p.rabbitmq_cpu_ms_per_move, 3)} ms"
    return [
        f"mover: {p.jobs:,} auto jobs in the listen queue before one worker started (at 1 "
        f"req/s); it moved them into its lane at {fmt(p.moves_per_s, 0)} jobs/s while 1,000 "
        f"or more were ready ({fmt(p.moves_mean_per_s, 0)}/s over all {fmt(p.span_s, 2)} s), "
        f"CPU per job moved: worker {fmt(p.worker_cpu_ms_per_move, 3)} ms{rabbit}.",
    ]
