"""The JSON record of a run (``--json``): machine, configuration, every phase, ratios, targets.

``version`` is the record's format; NaN figures (nothing measured) are written as ``null``.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict
from pathlib import Path
from typing import Any

from lis_async.bench.backlog_table import MOVER_PHASE
from lis_async.bench.config import BenchConfig
from lis_async.bench.measure import machine
from lis_async.bench.results import (
    FIFO_PHASE,
    BacklogPhaseResult,
    MoverPhaseResult,
    PhaseResult,
    ReplicaPhaseResult,
    fmt,
    pct,
    ratio,
)
from lis_async.redact import mask_url

RECORD_KIND = "lis-async-bench"
RECORD_VERSION = 1
#: The settings the backlog targets are defined at (``--backlog``, ``--rate``).
BACKLOG_TARGET_JOBS = 20000
BACKLOG_TARGET_RATE = 20.0
#: The backlog targets: manual p99 with lanes (seconds); lanes' auto jobs/s within this share
#: of FIFO's.
BACKLOG_MANUAL_P99_S = 5.0
BACKLOG_AUTO_DEVIATION = 0.05
#: How fast one worker's mover must take jobs off a flooded listen queue (the mover phase).
MOVES_PER_S = 5000.0
#: What the priority lanes may cost per job in worker CPU against FIFO (``--fifo``), in ms.
LANES_CPU_MS_PER_JOB = 0.2


def build_record(
    cfg: BenchConfig, phases: dict[str, PhaseResult], sweep: list[PhaseResult]
) -> dict[str, Any]:
    """The record of a run; ``phases`` by name (``classic``, ``lis_async``, ``latency``,
    ``rss``, ``replicas``, ``replicas-baseline``, ``backlog-lanes``, ``backlog-fifo``),
    ``sweep`` in order of jobs in flight."""
    classic, lis = phases.get("classic"), phases.get("lis_async")
    ratios: dict[str, float | None] = {}
    if classic and lis:
        ratios = {
            "throughput": ratio(lis.jobs_per_s, classic.jobs_per_s),
            "cpu_per_job": ratio(lis.worker_cpu_ms_per_job, classic.worker_cpu_ms_per_job),
        }
    lanes, fifo = backlog_pair(phases)
    if lanes and fifo:
        ratios["backlog_auto_throughput"] = ratio(lanes.auto_jobs_per_s, fifo.auto_jobs_per_s)
    config = asdict(cfg)
    # URLs may carry passwords
    config["amqp_url"], config["redis_url"] = mask_url(cfg.amqp_url), mask_url(cfg.redis_url)
    job_mix = "JobProducer default mix without playbook jobs"
    if cfg.replicas is not None:
        job_mix += f"; {cfg.repeat_share:.0%} repeating an earlier job's observable"
    if cfg.backlog is not None:
        job_mix = (
            "backlog: auto-create and auto-update jobs on files of distinct random content, "
            "then manual jobs of the default entity mix; nothing above TLP:AMBER, no file "
            "without a hash, no draft"
        )
    return {
        "kind": RECORD_KIND,
        "version": RECORD_VERSION,
        "machine": machine(),
        "config": config,
        "world": {
            "worker_emulation": "cheap mode (no stix2 validation, nothing recorded)",
            "job_mix": job_mix,
            "lastinfosec_latency_s": cfg.latency,
            "bundle_size": cfg.bundle_size,
            "platform_latency_s": cfg.platform_latency,
        },
        "phases": {k: asdict(v) for k, v in phases.items()},
        "sweep": [asdict(s) for s in sweep],
        "ratios": ratios,
        "targets": targets(cfg, phases, ratios),
    }


def targets(
    cfg: BenchConfig, phases: dict[str, PhaseResult], ratios: dict[str, float | None]
) -> dict[str, dict[str, Any]]:
    """The project's performance targets, each with its value, limit and whether it is met
    (None: not measured in this run)."""
    lis, paced, rss = phases.get("lis_async"), phases.get("latency"), phases.get("rss")
    out: dict[str, dict[str, Any]] = {}
    std = cfg.latency == 0.15 and cfg.bundle_size == 12 and cfg.in_flight == 64
    if "throughput" in ratios:
        note = "lis_async/classic jobs/s"
        if not std:
            note += " (target defined at 150 ms, 12 objects, 64 in flight)"
        _target(out, "throughput_ratio", ratios["throughput"], 25.0, True, note)
    if lis:
        _target(out, "worker_cpu_ms_per_job", lis.worker_cpu_ms_per_job, 6.0, False, "aim 3 ms")
    fifo = phases.get(FIFO_PHASE)
    if lis and fifo:
        cost = lis.worker_cpu_ms_per_job - fifo.worker_cpu_ms_per_job
        note = "worker CPU / job, lis_async (priority lanes) - lis_async-fifo"
        _target(out, "lanes_cpu_ms_per_job", cost, LANES_CPU_MS_PER_JOB, False, note)
    if cfg.rate is not None and lis:
        _target(out, "rate_sustained_per_s", lis.lis_sustained_per_s, 0.97 * cfg.rate, True, "")
        _target(out, "rate_max_per_window", float(lis.lis_max_per_window), cfg.rate, False, "")
        sliding = float(lis.lis_max_sliding_1s)
        note = "any one-second window at the API: rate + 1"
        _target(out, "rate_max_sliding_1s", sliding, cfg.rate + 1, False, note)
    if rss:
        note = f"{rss.jobs} jobs queued, {rss.in_flight} in flight"
        _target(out, "peak_rss_mb", rss.peak_rss_mb, 200.0, False, note)
    if paced:
        note = f"paced at {fmt(paced.offered_jobs_per_s)} jobs/s (half the measured maximum)"
        limit = cfg.latency * 1000 + 100
        _target(out, "latency_p99_ms", pct(paced.latency_ms, "p99"), limit, False, note)
    _replica_targets(cfg, phases, out)
    _backlog_targets(cfg, phases, ratios, out)
    return out


def _replica_targets(
    cfg: BenchConfig, phases: dict[str, PhaseResult], out: dict[str, dict[str, Any]]
) -> None:
    """Cluster mode's targets, from the ``replicas`` phase (and its baseline)."""
    shared, base = phases.get("replicas"), phases.get("replicas-baseline")
    if not isinstance(shared, ReplicaPhaseResult):
        return
    if shared.fault is not None:
        _fault_targets(cfg, shared, out)
        return
    switches = sum(r.redis_transitions for r in shared.per_replica)
    fallback = f"; {switches} switches to/from fallback mode" if switches else ""
    note = f"{shared.lis_requests} requests, {shared.lis_distinct_values} distinct values"
    value = shared.lis_requests_per_distinct
    _target(out, "replicas_requests_per_distinct", value, 1.01, False, note + fallback)
    if cfg.rate is not None:
        note = "sliding one-second window over the whole phase: rate + 1" + fallback
        busiest = float(shared.lis_busiest_1s)
        _target(out, "replicas_rate_max_per_window", busiest, cfg.rate + 1, False, note)
        note = f"while the backlog lasted ({fmt(shared.backlog_s)} s)"
        value = shared.lis_backlog_per_s
        _target(out, "replicas_rate_sustained_per_s", value, 0.97 * cfg.rate, True, note)
    if isinstance(base, ReplicaPhaseResult):
        with_redis, without = shared.worker_cpu_ms_per_job, base.worker_cpu_ms_per_job
        note = f"{fmt(with_redis, 2)} ms/job with Redis, {fmt(without, 2)} without"
        added = with_redis - without
        _target(out, "replicas_redis_worker_cpu_ms_per_job", added, 0.5, False, note)


def _fault_targets(
    cfg: BenchConfig, shared: ReplicaPhaseResult, out: dict[str, dict[str, Any]]
) -> None:
    """A fault run's targets (issue #21): LastInfoSec never sees more than rate + 1 requests
    in any sliding second across the fault, and no work is lost or ends in error. The other
    replica targets do not apply: without Redis the replicas share no cache, and each
    transition idles them."""
    fault = shared.fault
    assert fault is not None
    switches = [r.redis_transitions for r in shared.per_replica]
    spans = " / ".join(str(s.busiest_1s) for s in fault.spans) or "-"
    note = (
        f"sliding one-second window over the whole phase: rate + 1; before / during / after "
        f"the {fault.kind}: {spans}; switches to/from fallback per worker: "
        + " / ".join(map(str, switches))
    )
    if cfg.rate is not None:
        # not applied (the phase hit its time limit first): nothing measured
        busiest = float(shared.lis_busiest_1s) if fault.applied else None
        note = note if fault.applied else "the fault was not applied"
        _target(out, "fault_rate_max_sliding_1s", busiest, cfg.rate + 1, False, note)
    note = f"of {shared.jobs} works, not completed when the phase ended ({fault.ended})"
    _target(out, "fault_works_lost", float(shared.lost), 0, False, note)
    note = f"of {shared.jobs} works"
    _target(out, "fault_works_in_error", float(shared.in_error), 0, False, note)


def backlog_pair(
    phases: dict[str, PhaseResult],
) -> tuple[BacklogPhaseResult | None, BacklogPhaseResult | None]:
    """The backlog phases of a run: (lanes, FIFO), None for one that did not run."""
    lanes, fifo = phases.get("backlog-lanes"), phases.get("backlog-fifo")
    return (
        lanes if isinstance(lanes, BacklogPhaseResult) else None,
        fifo if isinstance(fifo, BacklogPhaseResult) else None,
    )


def _backlog_targets(
    cfg: BenchConfig,
    phases: dict[str, PhaseResult],
    ratios: dict[str, float | None],
    out: dict[str, dict[str, Any]],
) -> None:
    """A backlog run's targets: the manual jobs' p99 with lanes, and lanes' auto jobs/s
    against FIFO's. A p99 known only from below is met only if that bound is over the limit
    (missed), unknown otherwise."""
    mover = phases.get(MOVER_PHASE)
    if isinstance(mover, MoverPhaseResult):
        note = f"{mover.jobs:,} jobs in the listen queue, moved while 1,000 or more were ready"
        _target(out, "backlog_mover_moves_per_s", mover.moves_per_s, MOVES_PER_S, True, note)
    lanes, fifo = backlog_pair(phases)
    if lanes is None:
        return
    std = cfg.backlog == BACKLOG_TARGET_JOBS and cfg.rate == BACKLOG_TARGET_RATE
    where = "" if std else f"; target defined at --backlog {BACKLOG_TARGET_JOBS} --rate 20"
    p99 = lanes.manual_p99_s
    note = "lanes" + (f"; FIFO {fifo.manual_p99_s.text()} s" if fifo else "")
    if p99.lower:
        note += f"; lower bound: {lanes.manual_jobs - lanes.manual_completed} not completed"
    _target(out, "backlog_manual_p99_s", p99.value, BACKLOG_MANUAL_P99_S, False, note + where)
    out["backlog_manual_p99_s"]["lower_bound"] = p99.lower
    if p99.lower and p99.value <= BACKLOG_MANUAL_P99_S:
        out["backlog_manual_p99_s"]["met"] = None
    r = ratios.get("backlog_auto_throughput")
    if fifo is not None:
        deviation = None if r is None else abs(r - 1.0)
        note = f"|lanes/FIFO auto jobs/s - 1|, lanes/FIFO = {fmt(r, 3)}" + where
        limit = BACKLOG_AUTO_DEVIATION
        _target(out, "backlog_auto_throughput_deviation", deviation, limit, False, note)


def _target(
    out: dict[str, dict[str, Any]],
    name: str,
    value: float | None,
    limit: float,
    higher: bool,
    note: str,
) -> None:
    """Record one target in ``out``: met when ``value`` is at least (``higher``) or at most
    ``limit``; None when nothing was measured."""
    ok = (
        None
        if value is None or math.isnan(value)
        else (value >= limit if higher else value <= limit)
    )
    out[name] = {"value": value, "limit": limit, "met": ok, "note": note}


def nan_to_none(value: Any) -> Any:
    """``value`` with every NaN float, at any depth of dicts and lists, replaced by None."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: nan_to_none(v) for k, v in value.items()}
    if isinstance(value, list):
        return [nan_to_none(v) for v in value]
    return value


def write_json(path: str, record: dict[str, Any]) -> None:
    """Write ``record`` to ``path`` as strict JSON (NaN as null), indented."""
    text = json.dumps(nan_to_none(record), indent=2, allow_nan=False)
    Path(path).write_text(text + "\n")
