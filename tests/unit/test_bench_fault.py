"""``lis-async bench --replicas N --redis-fault kill|freeze``: its options and their checks, the
jobs a fault run needs, the sliding-second figures per span from request times, and the
table and record of a synthetic fault run.

No process is started and nothing is timed: the fault itself is measured by the bench.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from lis_async.bench.cli import build_parser as bench_parser
from lis_async.bench.config import (
    DEFAULT_REPLICA_JOBS,
    FAULT_AFTER_S,
    FAULT_TAIL_S,
    LOOKUP_SHARE,
    BenchConfig,
    fault_jobs,
)
from lis_async.bench.fault import SPANS, fault_figures, span_figures
from lis_async.bench.measure import busiest_window
from lis_async.bench.record import build_record, write_json
from lis_async.bench.results import (
    FaultFigures,
    PhaseResult,
    ReplicaFigures,
    ReplicaPhaseResult,
    SpanFigures,
)
from lis_async.bench.table import format_table
from lis_async.cli import main

FAULT_RUN = ("--replicas", "3", "--rate", "30", "--redis-fault")


def _cfg(*argv: str) -> BenchConfig:
    return BenchConfig.from_args(bench_parser().parse_args(list(argv)))


# -- options -----------------------------------------------------------------------------------
def test_fault_defaults() -> None:
    kill, freeze = _cfg(*FAULT_RUN, "kill"), _cfg(*FAULT_RUN, "freeze")
    assert (kill.redis_fault, kill.redis_fault_seconds) == ("kill", 20.0)
    assert (freeze.redis_fault, freeze.redis_fault_seconds) == ("freeze", 10.0)
    assert kill.fault_run and freeze.fault_run
    assert kill.problems() == [] and freeze.problems() == []
    # --jobs defaults to what lasts FAULT_TAIL_S after the fault at the rate
    assert kill.jobs == fault_jobs(30.0, 20.0, 0.5, FAULT_TAIL_S)
    assert freeze.jobs == fault_jobs(30.0, 10.0, 0.5, FAULT_TAIL_S)
    # given: kept, and so is --redis-fault-seconds
    cfg = _cfg(*FAULT_RUN, "freeze", "--redis-fault-seconds", "4", "--jobs", "5000")
    assert (cfg.redis_fault_seconds, cfg.jobs) == (4.0, 5000)
    assert cfg.problems() == []
    # no fault: nothing changes
    cfg = _cfg("--replicas", "3", "--rate", "30")
    assert cfg.redis_fault is None and cfg.redis_fault_seconds is None and not cfg.fault_run
    assert cfg.jobs == DEFAULT_REPLICA_JOBS


def test_fault_jobs() -> None:
    # 30/s for 15 s before, 20 s during and 15 s after: 1,500 requests; one job in
    # LOOKUP_SHARE * (1 - 0.5) asks LastInfoSec
    assert fault_jobs(30.0, 20.0, 0.5, 15.0) == math.ceil(1500 / (LOOKUP_SHARE * 0.5))
    assert fault_jobs(30.0, 20.0, 0.0, 15.0) == math.ceil(1500 / LOOKUP_SHARE)
    assert fault_jobs(60.0, 20.0, 0.5, 15.0) == pytest.approx(2 * fault_jobs(30, 20, 0.5, 15), 1)
    assert fault_jobs(30.0, 10.0, 0.5, 0.0) < fault_jobs(30.0, 10.0, 0.5, 15.0)
    assert FAULT_AFTER_S > 0


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--redis-fault", "kill"], "--redis-fault needs --replicas N"),
        (["--replicas", "3", "--redis-fault", "kill"], "--redis-fault needs --rate"),
        (["--redis-fault-seconds", "5"], "--redis-fault-seconds needs --redis-fault"),
        (["--replicas", "3", "--redis-fault-seconds", "5"], "needs --redis-fault"),
        ([*FAULT_RUN, "freeze", "--redis-fault-seconds", "0"], "must be positive"),
        ([*FAULT_RUN, "kill", "--redis-fault-seconds", "-1"], "must be positive"),
        ([*FAULT_RUN, "kill", "--replicas-baseline"], "the baseline has no Redis"),
        ([*FAULT_RUN, "kill", "--redis-url", "redis://h:6380/0"], "--redis-url is not used"),
        ([*FAULT_RUN, "kill", "--repeat-share", "0.95"], "--repeat-share at most"),
        ([*FAULT_RUN, "kill", "--jobs", "100"], "--jobs 100 is too few"),
    ],
)
def test_fault_rejects(extra: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    problems = _cfg(*extra).problems()
    assert any(message in p for p in problems), problems
    assert main(["bench", *extra]) == 2
    assert message in capsys.readouterr().err


def test_too_few_jobs_says_how_many() -> None:
    least = fault_jobs(30.0, 10.0, 0.5, 0.0)  # might not outlast the fault
    assert _cfg(*FAULT_RUN, "freeze", "--jobs", str(least)).problems() == []
    (problem,) = _cfg(*FAULT_RUN, "freeze", "--jobs", str(least - 1)).problems()
    assert f"use --jobs {least} or more" in problem
    assert f"the default, {fault_jobs(30.0, 10.0, 0.5, FAULT_TAIL_S)}," in problem
    assert least == math.ceil(30 * (FAULT_AFTER_S + 10) / (LOOKUP_SHARE * 0.5))


def test_unknown_fault_kind(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", *FAULT_RUN, "pause"])
    assert exit_info.value.code == 2
    assert "invalid choice: 'pause'" in capsys.readouterr().err
    # built directly, not through the parser
    cfg = BenchConfig(replicas=3, rate=30.0, redis_fault="pause", redis_fault_seconds=5.0)
    assert "--redis-fault must be one of kill, freeze" in cfg.problems()


# -- the spans -----------------------------------------------------------------------------------
def _paced(start: float, end: float, per_s: float) -> list[float]:
    """Requests every 1 / ``per_s`` seconds from ``start`` (included) to ``end`` (excluded)."""
    n = round((end - start) * per_s)
    return [start + i / per_s for i in range(n)]


def test_span_figures_steady() -> None:
    # 32/s before a fault at t = 110, 16/s during it (fallback), 32/s after it ends at 130
    # (binary fractions: the times are exact)
    t0 = 100.0
    times = [*_paced(t0, 110, 32), *_paced(110, 130, 16), *_paced(130, 140, 32)]
    spans = span_figures(times, 110.0, 130.0)
    assert [s.name for s in spans] == list(SPANS)
    before, during, after = spans
    assert (before.from_s, before.to_s) == (0.0, 10.0)
    assert (during.from_s, during.to_s) == (10.0, 30.0)
    assert (after.from_s, after.to_s) == (30.0, 40.0 - 1 / 32)
    assert (before.requests, during.requests, after.requests) == (320, 320, 320)
    assert (before.busiest_1s, after.busiest_1s) == (32, 32)
    # the busiest window that begins during the fault begins with its last request (at
    # 130 - 1/16) and holds 30 of the requests after it
    assert during.busiest_1s == 31 and during.busiest_1s_at_s == 30.0 - 1 / 16
    assert before.per_s == pytest.approx(32.0) and during.per_s == pytest.approx(16.0)
    assert after.per_s == pytest.approx(32.0)
    assert max(s.busiest_1s for s in spans) == busiest_window(times)


def test_a_window_counts_in_the_span_where_it_begins() -> None:
    # 20 requests in the last 0.2 s of the fault, 15 in the first 0.5 s after it: the window
    # that begins with the first of the 20 holds all 35, and it begins during the fault
    times = [*_paced(0.0, 5.0, 2), *_paced(9.8, 10.0, 100), *_paced(10.0, 10.5, 30)]
    before, during, after = span_figures(times, 5.0, 10.0)
    assert (before.requests, during.requests, after.requests) == (10, 20, 15)
    assert during.busiest_1s == 35 and during.busiest_1s_at_s == pytest.approx(9.8)
    assert after.busiest_1s == 15 and after.busiest_1s_at_s == pytest.approx(10.0)
    assert before.busiest_1s == 2
    assert busiest_window(times) == 35


def test_span_figures_edges() -> None:
    # nothing recorded
    spans = span_figures([], 10.0, 20.0)
    assert [(s.name, s.requests, s.busiest_1s) for s in spans] == [(n, 0, 0) for n in SPANS]
    # nothing after the fault: the span runs to the fault's end, with no figure
    before, during, after = span_figures([0.0, 0.5, 1.0, 1.2], 1.0, 3.0)
    assert (before.requests, during.requests, after.requests) == (2, 2, 0)
    assert (after.from_s, after.to_s, after.busiest_1s) == (3.0, 3.0, 0)
    assert math.isnan(after.per_s) and math.isnan(after.busiest_1s_at_s)
    assert before.busiest_1s == 3  # 0.5, 1.0 and 1.2: begins before, reaches into the fault
    # half-open windows: requests exactly one second apart are never in the same window
    before, _, after = span_figures([0.0, 1.0, 2.0, 3.0], 1.5, 1.5)
    assert (before.busiest_1s, after.busiest_1s) == (1, 1)
    # a request exactly at the fault's start or end belongs to the later span
    before, during, after = span_figures([0.0, 1.0, 2.0], 1.0, 2.0)
    assert (before.requests, during.requests, after.requests) == (1, 1, 1)
    # unsorted input
    assert span_figures([2.0, 0.0, 1.0], 1.0, 2.0)[0].requests == 1


def test_fault_figures_offsets() -> None:
    fault = FaultFigures("freeze", 10.0, applied=True, start_time=1015.0, end_time=1025.5)
    times = [1000.0 + i / 8 for i in range(320)]  # 8/s for 40 s
    fault_figures(fault, times)
    assert (fault.start_s, fault.duration_s) == (15.0, 10.5)
    assert [s.requests for s in fault.spans] == [120, 84, 116]
    assert [s.busiest_1s for s in fault.spans] == [8, 8, 8]
    # not applied, or no request: nothing to add
    idle = FaultFigures("kill", 20.0)
    fault_figures(idle, times)
    assert math.isnan(idle.start_s) and idle.spans == []
    fault = FaultFigures("kill", 20.0, applied=True, start_time=1.0, end_time=2.0)
    fault_figures(fault, [])
    assert fault.spans == []


# -- table and record ------------------------------------------------------------------------------
def _fault_phase(busiest: list[int], lost: int, in_error: int) -> ReplicaPhaseResult:
    jobs = 3410
    p = ReplicaPhaseResult(
        "replicas", "lis_async", jobs, 64, "burst",
        completed=jobs - lost, in_error=in_error, span_s=60.0, jobs_per_s=55.0,
        replicas=3, shared=True, rate_per_replica=30.0, repeat_share=0.5,
        lis_requests=1600, lis_recorded=1600, lis_busiest_1s=max(busiest),
        backlog_s=55.0, lis_backlog_per_s=28.0, lost=lost,
    )  # fmt: skip
    p.per_replica = [
        ReplicaFigures(i, pid=100 + i, jobs=jobs // 3, redis_transitions=2, exit_code=0)
        for i in (1, 2, 3)
    ]
    p.fault = FaultFigures(
        "kill", 20.0, redis_url="redis://127.0.0.1:40000/0", applied=True,
        start_time=1015.0, end_time=1035.1, start_s=15.0, duration_s=20.1, ended="done",
    )  # fmt: skip
    p.fault.spans = [
        SpanFigures(name, 0.0, 1.0, requests=500, busiest_1s=b, busiest_1s_at_s=1.5, per_s=29.0)
        for name, b in zip(SPANS, busiest, strict=True)
    ]
    return p


def test_fault_table_and_record(tmp_path: Path) -> None:
    cfg = _cfg(*FAULT_RUN, "kill")
    phases: dict[str, PhaseResult] = {"replicas": _fault_phase([30, 28, 31], 0, 0)}
    record = build_record(cfg, phases, [])
    t = record["targets"]
    # a fault run has its own targets, not the cache's or the sustained rate's
    assert set(t) == {"fault_rate_max_sliding_1s", "fault_works_lost", "fault_works_in_error"}
    assert [t[k]["met"] for k in sorted(t)] == [True, True, True]
    assert t["fault_rate_max_sliding_1s"]["limit"] == 31.0
    note = t["fault_rate_max_sliding_1s"]["note"]
    assert "before / during / after the kill: 30 / 28 / 31" in note
    table = format_table(cfg, phases, record)
    assert "Redis fault" in table and "kill 20 s" in table
    assert "30 / 28 / 31" in table and "works not completed (lost)" in table
    assert "redis-server killed (SIGKILL) 15 s after the first job was taken" in table
    assert "Switches to/from fallback per worker: 2 / 2 / 2" in table
    assert "MET    fault_works_lost = 0.00 (limit 0)" in table
    path = tmp_path / "record.json"
    write_json(str(path), record)
    written = json.loads(path.read_text())
    fault = written["phases"]["replicas"]["fault"]
    assert (fault["kind"], fault["seconds"], fault["ended"]) == ("kill", 20.0, "done")
    assert [s["busiest_1s"] for s in fault["spans"]] == [30, 28, 31]
    assert written["config"]["redis_fault"] == "kill"
    assert written["config"]["redis_fault_seconds"] == 20.0

    # over rate + 1 after the fault, a work lost, one in error: MISSED
    phases = {"replicas": _fault_phase([30, 28, 35], 1, 1)}
    record = build_record(cfg, phases, [])
    t = record["targets"]
    assert [t[k]["met"] for k in sorted(t)] == [False, False, False]
    table = format_table(cfg, phases, record)
    assert "MISSED fault_rate_max_sliding_1s = 35.00 (limit 31)" in table
    assert "MISSED fault_works_lost = 1.00" in table

    # the fault never applied (the phase hit its time limit first): nothing measured
    p = _fault_phase([30, 0, 0], 3410, 0)
    assert p.fault is not None
    p.fault.applied, p.fault.ended = False, "time limit"
    t = build_record(cfg, {"replicas": p}, [])["targets"]
    assert t["fault_rate_max_sliding_1s"]["met"] is None
    assert t["fault_works_lost"]["met"] is False
