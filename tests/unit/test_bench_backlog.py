"""``lis-async bench --backlog N``: its options and their checks, the censored percentiles, the
phases' figures from synthetic works, the table and the record from synthetic results, and a
tiny run on the real RabbitMQ.

As for the other bench tests, no measured figure is asserted on; the tiny run only checks that
both phases ran, every job completed and the record holds the backlog figures.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from lis_async.bench.backlog import (
    AUTO_ENTITY_TYPE,
    AUTO_KINDS,
    BACKLOG_MIX,
    BACKLOG_SPECS,
    ListenWatch,
    Published,
    backlog_figures,
)
from lis_async.bench.cli import build_parser as bench_parser
from lis_async.bench.config import BenchConfig
from lis_async.bench.measure import censored_percentile, percentile
from lis_async.bench.processes import connector_env
from lis_async.bench.record import build_record, write_json
from lis_async.bench.results import BacklogPhaseResult, Bound, MoverPhaseResult, PhaseResult
from lis_async.bench.table import format_table
from lis_async.cli import main
from lis_async.sim.opencti import PlatformSim, Work
from lis_async.sim.producer import JobProducer
from lis_async.sim.world import SimWorld


def _cfg(*argv: str) -> BenchConfig:
    return BenchConfig.from_args(bench_parser().parse_args(list(argv)))


# -- options -----------------------------------------------------------------------------------
def test_backlog_defaults() -> None:
    cfg = _cfg("--backlog", "500")
    assert (cfg.backlog, cfg.manual, cfg.backlog_seconds, cfg.rate) == (500, 10, 120.0, 20.0)
    assert not cfg.single_worker_run and cfg.problems() == []
    argv = ["--backlog", "20000", "--manual", "3", "--backlog-seconds", "30", "--rate", "50"]
    cfg = _cfg(*argv)
    assert (cfg.backlog, cfg.manual, cfg.backlog_seconds, cfg.rate) == (20000, 3, 30.0, 50.0)
    # without --backlog nothing changes
    cfg = _cfg()
    assert (cfg.backlog, cfg.manual, cfg.backlog_seconds, cfg.rate) == (None, None, None, None)
    assert cfg.single_worker_run


@pytest.mark.parametrize(
    "extra",
    [
        ["--manual", "5"],
        ["--backlog-seconds", "10"],
        ["--backlog", "0"],
        ["--backlog", "10", "--manual", "0"],
        ["--backlog", "10", "--backlog-seconds", "0"],
        ["--backlog", "10", "--replicas", "2"],
        ["--backlog", "10", "--sweep"],
        ["--backlog", "10", "--rss-jobs", "100"],
        ["--backlog", "10", "--fifo"],
        ["--backlog", "10", "--worker-env", "CONNECTOR_PRIORITY_LANES=true"],
    ],
)
def test_backlog_rejects(extra: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert _cfg(*extra).problems()
    assert main(["bench", *extra]) == 2
    assert "lis-async bench:" in capsys.readouterr().err


def test_manual_without_backlog_says_so() -> None:
    assert _cfg("--manual", "5").problems() == ["--manual and --backlog-seconds need --backlog N"]


def test_backlog_phases_environment() -> None:
    cfg = _cfg("--backlog", "100")
    world = SimWorld()
    lanes, fifo = BACKLOG_SPECS
    assert (lanes.name, lanes.lanes, fifo.name, fifo.lanes) == (
        "backlog-lanes",
        True,
        "backlog-fifo",
        False,
    )
    env = connector_env(cfg, world, "lis_async", cfg.in_flight, lanes.overrides)
    assert "CONNECTOR_PRIORITY_LANES" not in env  # the worker's default
    assert env["LASTINFOSEC_RATE_PER_S"] == "20.0"  # --rate's default in a backlog run
    env = connector_env(cfg, world, "lis_async", cfg.in_flight, fifo.overrides)
    assert env["CONNECTOR_PRIORITY_LANES"] == "false"


def test_backlog_auto_jobs_have_distinct_lookup_values() -> None:
    # The auto jobs the phase makes: auto mode, and no two share a lookup value.
    mix: dict[str, Any] = dict(BACKLOG_MIX)
    producer = JobProducer(PlatformSim(), "c1", playbook_share=0.0, **mix)
    jobs = [
        producer.make_job(i, kind=AUTO_KINDS[i % 2], entity_type=AUTO_ENTITY_TYPE)
        for i in range(2000)
    ]
    assert all(j.json()["internal"]["mode"] == "auto" for j in jobs)
    values = [j.value for j in jobs]
    assert None not in values and len(set(values)) == len(values)
    manual = producer.make_job(5000, kind="manual")
    assert manual.json()["internal"]["mode"] == "manual"


# -- censored percentiles ----------------------------------------------------------------------
def test_censored_percentile() -> None:
    known = [1.0, 2.0, 3.0, 4.0]
    assert censored_percentile(known, [], 99) == (percentile(known, 99), False)
    # one job still waiting after 10 s: the median is read from known jobs below 10 s
    assert censored_percentile(known, [10.0], 50) == (3.0, False)
    value, lower = censored_percentile(known, [10.0], 99)
    assert lower and value == pytest.approx(percentile([*known, 10.0], 99))
    # a known 100 s above a job waiting for 50 s: the median needs the waiting one's rank
    assert censored_percentile([1.0, 100.0], [50.0], 50) == (50.0, True)
    # nothing completed
    value, lower = censored_percentile([], [8.0, 8.1], 50)
    assert value == pytest.approx(8.05) and lower
    assert censored_percentile([], [8.0, 8.1], 100) == (8.1, True)
    value, lower = censored_percentile([], [], 50)
    assert math.isnan(value) and not lower


def test_bound_text() -> None:
    assert Bound(1.234).text(2) == "1.23"
    assert Bound(118.0, lower=True).text() == "> 118.0"
    assert Bound().text() == "-" and Bound(math.nan, lower=True).text() == "-"


# -- figures -------------------------------------------------------------------------------------
def _work(wid: str, completed: float | None) -> Work:
    w = Work(wid, "c1", "Enrichment")
    if completed is not None:
        w.status, w.completed_time = "complete", completed
    return w


def test_backlog_figures() -> None:
    # 40 auto jobs completing at 20/s from t=101, 3 manual jobs published at t=110: one done
    # 2 s later, one done after the phase's end (counted as waiting), one never done
    auto = {f"a{i}": _work(f"a{i}", 101.0 + i / 20) for i in range(40)}
    manual = {"m0": _work("m0", 112.0), "m1": _work("m1", 131.0), "m2": _work("m2", None)}
    published = Published(first_at=100.0, auto_ids=[*auto], manual_ids=[*manual])
    published.sent_at = {"m0": 110.0, "m1": 110.0, "m2": 110.5}
    r = BacklogPhaseResult("backlog-fifo", "lis_async", 0, 64, "backlog", lanes=False)
    r.worker_cpu_s = 0.41
    backlog_figures(r, {**auto, **manual}, published, end=130.0)
    assert (r.jobs, r.auto_jobs, r.manual_jobs) == (43, 40, 3)
    assert (r.auto_completed, r.manual_completed, r.completed) == (40, 1, 41)
    assert r.span_s == 30.0
    assert r.manual_latency_s == [2.0, None, None]
    assert r.manual_waited_s == [20.0, 19.5]
    assert r.manual_p50_s == Bound(19.5, lower=True)
    assert r.manual_max_s == Bound(20.0, lower=True)
    assert r.auto_jobs_per_s == pytest.approx(20.0)
    assert r.auto_mean_per_s == pytest.approx(20.0)
    assert r.auto_window_s == pytest.approx(39 / 20)
    assert r.worker_cpu_ms_per_job == pytest.approx(10.0)


# -- table and record ----------------------------------------------------------------------------
def _phase(lanes: bool, p99: Bound, auto_per_s: float) -> BacklogPhaseResult:
    name = "backlog-lanes" if lanes else "backlog-fifo"
    return BacklogPhaseResult(
        name, "lis_async", 20010, 64, "backlog", lanes=lanes, auto_jobs=20000,
        auto_completed=2400, auto_distinct_values=20000, manual_jobs=10,
        manual_completed=0 if p99.lower else 10, manual_p50_s=p99, manual_p99_s=p99,
        manual_max_s=p99, auto_jobs_per_s=auto_per_s, auto_mean_per_s=auto_per_s,
        auto_window_s=120.0, span_s=141.0, stopped_at_cap=True,
        worker_overrides={} if lanes else {"CONNECTOR_PRIORITY_LANES": "false"},
    )  # fmt: skip


def test_backlog_table_and_record(tmp_path: Path) -> None:
    cfg = _cfg("--backlog", "20000")
    phases: dict[str, PhaseResult] = {
        "backlog-lanes": _phase(True, Bound(3.2), 19.9),
        "backlog-fifo": _phase(False, Bound(118.0, lower=True), 20.0),
    }
    record = build_record(cfg, phases, [])
    assert record["ratios"]["backlog_auto_throughput"] == pytest.approx(0.995)
    t = record["targets"]
    assert set(t) == {"backlog_manual_p99_s", "backlog_auto_throughput_deviation"}
    assert t["backlog_manual_p99_s"]["met"] is True
    assert t["backlog_auto_throughput_deviation"]["met"] is True
    assert "FIFO > 118.0 s" in t["backlog_manual_p99_s"]["note"]
    assert "target defined" not in t["backlog_manual_p99_s"]["note"]
    table = format_table(cfg, phases, record)
    assert "lanes/FIFO" in table and "0.995x" in table and "> 118.00" in table
    assert "0/10" in table and "2,400/20,000" in table and "141.0 (cap)" in table
    assert "MET    backlog_manual_p99_s = 3.20 (limit 5)" in table
    assert "classic" not in table and "jobs/s: queued jobs" not in table
    path = tmp_path / "record.json"
    write_json(str(path), record)
    written = json.loads(path.read_text())
    fifo = written["phases"]["backlog-fifo"]
    assert fifo["manual_p99_s"] == {"value": 118.0, "lower": True}
    assert fifo["worker_overrides"] == {"CONNECTOR_PRIORITY_LANES": "false"}


def test_backlog_targets_missed_and_unknown() -> None:
    cfg = _cfg("--backlog", "300", "--rate", "50")
    # lanes' p99 known only from below: over the limit is missed, under it unknown
    phases: dict[str, PhaseResult] = {
        "backlog-lanes": _phase(True, Bound(7.0, lower=True), 18.0),
        "backlog-fifo": _phase(False, Bound(30.0, lower=True), 20.0),
    }
    t = build_record(cfg, phases, [])["targets"]
    assert t["backlog_manual_p99_s"]["met"] is False
    assert t["backlog_manual_p99_s"]["lower_bound"] is True
    assert "target defined at --backlog 20000 --rate 20" in t["backlog_manual_p99_s"]["note"]
    assert t["backlog_auto_throughput_deviation"]["met"] is False  # 0.9
    phases["backlog-lanes"] = _phase(True, Bound(4.0, lower=True), 20.0)
    record = build_record(cfg, phases, [])
    assert record["targets"]["backlog_manual_p99_s"]["met"] is None
    assert "n/a    backlog_manual_p99_s = > 4.00" in format_table(cfg, phases, record)


# -- a tiny run ----------------------------------------------------------------------------------
@pytest.mark.rabbitmq
def test_tiny_backlog_run(tmp_path: Path) -> None:
    record_path = tmp_path / "bench.json"
    argv = [
        sys.executable, "-m", "lis_async.cli", "bench",
        "--backlog", "30",
        "--manual", "3",
        "--rate", "200",
        "--latency", "0.01",
        "--backlog-seconds", "60",
        "--json", str(record_path),
    ]  # fmt: skip
    done = subprocess.run(
        argv, cwd=tmp_path, env=os.environ.copy(), capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "lanes/FIFO" in done.stdout and "manual latency p99 (s)" in done.stdout
    record = json.loads(record_path.read_text())
    assert set(record["phases"]) == {"backlog-mover", "backlog-lanes", "backlog-fifo"}
    mover = record["phases"].pop("backlog-mover")
    assert mover["jobs"] == mover["completed"] == 30 and mover["exit_code"] == 0
    assert mover["worker_cpu_ms_per_move"] >= 0 and mover["moves_mean_per_s"] > 0  # 30: a blink
    assert mover["moves_per_s"] is None  # 30 jobs: never 1,000 ready
    assert "mover: 30 auto jobs in the listen queue" in done.stdout
    for phase in record["phases"].values():
        assert (phase["auto_completed"], phase["manual_completed"]) == (30, 3)
        assert phase["auto_distinct_values"] == 30 and not phase["stopped_at_cap"]
        assert phase["manual_p99_s"]["lower"] is False and phase["manual_p99_s"]["value"] > 0
        assert phase["lis_requests"] >= 33 and phase["exit_code"] == 0
    assert record["phases"]["backlog-fifo"]["worker_overrides"] == {
        "CONNECTOR_PRIORITY_LANES": "false"
    }
    assert set(record["targets"]) == {
        "backlog_mover_moves_per_s",
        "backlog_manual_p99_s",
        "backlog_auto_throughput_deviation",
    }
    assert record["targets"]["backlog_mover_moves_per_s"]["met"] is None


def test_the_listen_queue_figures_count_only_while_it_is_flooded() -> None:
    watch = ListenWatch.__new__(ListenWatch)
    # published, ready: the producer outruns the worker, then stops; the worker takes 2,000/s
    # while the queue holds 1,000 or more, then empties it
    watch.samples = [
        (0.0, 0, 0),
        (1.0, 3_000, 1_000),
        (2.0, 6_000, 2_000),
        (3.0, 7_000, 1_000),
        (4.0, 7_000, 0),
    ]
    peak, rate = watch.figures()
    assert peak == 2_000 and rate == pytest.approx(2_000.0)
    watch.samples = watch.samples[:2] + watch.samples[4:]  # flooded once: no slope
    assert math.isnan(watch.figures()[1])


def test_mover_notes_and_target() -> None:
    cfg = _cfg("--backlog", "20000")
    mover = MoverPhaseResult("backlog-mover", "lis_async", 20_000, 64, "backlog")
    mover.completed, mover.span_s, mover.moves_per_s = 20_000, 4.0, 5_200.0
    mover.moves_mean_per_s, mover.worker_cpu_ms_per_move = 5_000.0, 0.151
    mover.rabbitmq_cpu_s, mover.rabbitmq_cpu_ms_per_move = 3.0, 0.15
    phases: dict[str, PhaseResult] = {
        "backlog-mover": mover,
        "backlog-lanes": _phase(True, Bound(3.2), 19.9),
    }
    record = build_record(cfg, phases, [])
    assert record["targets"]["backlog_mover_moves_per_s"]["met"] is True
    table = format_table(cfg, phases, record)
    assert "moved them into its lane at 5,200 jobs/s" in table
    assert "worker 0.151 ms, RabbitMQ 0.150 ms" in table
    mover.moves_per_s = 4_999.0
    assert build_record(cfg, phases, [])["targets"]["backlog_mover_moves_per_s"]["met"] is False


def test_manual_stages_split_the_wait() -> None:
    from lis_async.bench.backlog import manual_stages

    done = _work("m0", 114.0)
    done.received_time, done.processed_time = 111.0, 113.5
    waiting = _work("m1", None)
    waiting.received_time = 112.0
    stages = manual_stages([done, waiting], {"m0": 110.0, "m1": 110.0}, end=120.0)
    assert stages == {"taken": 1.0, "processed": 2.5, "imported": 0.5}  # m1 not completed
