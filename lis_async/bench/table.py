"""The printed report of a run: a table (classic, lis_async, their ratio) and notes below it."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from lis_async.bench.config import BenchConfig
from lis_async.bench.results import PhaseResult, fmt, pct, ratio

Getter = Callable[[PhaseResult], float | None]


def format_table(cfg: BenchConfig, phases: dict[str, PhaseResult], record: dict[str, Any]) -> str:
    """The table of the throughput phases, then the notes (world, latency, rate, RSS, targets)."""
    lines = _table(phases)
    notes = [*_world_notes(cfg, phases), *_target_notes(record.get("targets", {}))]
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
    both = classic is not None and lis is not None
    cols = [p for p in (classic, lis) if p is not None]
    head = ["", *(p.connector for p in cols)]
    if both:
        head.append("lis/classic")
    rows: list[list[str]] = []
    for label, get, digits, with_ratio in _rows(phases.get("latency")):
        values = [get(p) for p in cols]
        line = [label, *(fmt(v, digits) for v in values)]
        if both:
            r = ratio(values[-1], values[0]) if with_ratio else None
            line.append("" if r is None else f"{r:.2f}x")
        rows.append(line)
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    lines = [
        "  ".join(c.ljust(widths[0]) if i == 0 else c.rjust(widths[i]) for i, c in enumerate(r))
        for r in [head, *rows]
    ]
    lines.insert(1, "-" * len(lines[0]))
    return lines


def _world_notes(cfg: BenchConfig, phases: dict[str, PhaseResult]) -> list[str]:
    """What was measured how: the world, the latency phase, the rate limit, the RSS phase."""
    lis, paced, rss = phases.get("lis_async"), phases.get("latency"), phases.get("rss")
    notes = [
        f"LastInfoSec {cfg.latency * 1000:.0f} ms (+{cfg.jitter * 1000:.0f} ms jitter), "
        f"{cfg.bundle_size}-object bundles, platform {cfg.platform_latency * 1000:.0f} ms; "
        f"lis_async {cfg.in_flight} jobs in flight, "
        + (f"rate {cfg.rate:g}/s" if cfg.rate else "no rate limit")
        + "; worker emulation in cheap mode (no stix2 validation).",
        "jobs/s: queued jobs / (first job received -> last work completed).",
    ]
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
        notes.append(f"  {state:<6} {name} = {fmt(t['value'], 2)} (limit {t['limit']:g}){extra}")
    return notes
