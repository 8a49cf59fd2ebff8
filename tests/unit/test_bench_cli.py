"""``lis-async bench``: argument parsing (through ``lis-async``'s pass-through and the benchmark's
own parser), the missing ``bench`` extra, the replica phases' figures, table and record from
synthetic results, and tiny runs on the real RabbitMQ (and Redis, for ``--replicas``).

The benchmark's figures are never asserted on (timing depends on the machine); the tiny runs
only check that the connectors ran, every job completed and the JSON record is complete.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import redis

from lis_async.bench.cli import build_parser as bench_parser
from lis_async.bench.config import BenchConfig
from lis_async.bench.double import stats_of
from lis_async.bench.feed import Jobs
from lis_async.bench.measure import Child, busiest_window, slope_per_s
from lis_async.bench.processes import connector_env
from lis_async.bench.record import build_record, write_json
from lis_async.bench.replicas import (
    cluster_lis_figures,
    log_warnings,
    parse_metrics,
    replica_figures,
)
from lis_async.bench.results import FIFO_PHASE, PhaseResult, ReplicaFigures, ReplicaPhaseResult
from lis_async.bench.table import format_table
from lis_async.cli import build_parser, main
from lis_async.lastinfosec.client import LisStats
from lis_async.ops.metrics import ClusterCollector, LisStatsCollector, Metrics
from lis_async.sim.lastinfosec import LisSimStats, RecordedRequest
from lis_async.sim.world import SimWorld

BENCH_OPTIONS = (
    "--help", "--jobs", "--classic-jobs", "--latency", "--jitter", "--bundle-size",
    "--platform-latency", "--in-flight", "--lis-concurrency", "--rate", "--latency-seconds",
    "--skip-classic", "--fifo", "--rss-jobs", "--sweep", "--plot", "--json", "--profile", "--worker-env",
    "--amqp-url", "--seed", "--replicas", "--repeat-share", "--replicas-baseline", "--redis-url",
    "--backlog", "--manual", "--backlog-seconds", "--redis-fault", "--redis-fault-seconds",
)  # fmt: skip


def test_bench_defaults() -> None:
    assert build_parser().parse_args(["bench"]).bench_argv == []
    cfg = BenchConfig.from_args(bench_parser().parse_args([]))
    assert cfg.jobs == 2000
    assert cfg.classic_jobs == 60
    assert cfg.latency == 0.15
    assert cfg.bundle_size == 12
    assert cfg.platform_latency == 0.0
    assert cfg.in_flight == 64
    assert cfg.rate is None
    assert cfg.latency_seconds == 10.0
    assert cfg.rss_jobs == 0
    assert not cfg.skip_classic and not cfg.sweep
    assert cfg.plot == "bench-sweep.png"
    assert cfg.json_path is None
    assert cfg.replicas is None and cfg.repeat_share == 0.0 and not cfg.replicas_baseline
    assert cfg.redis_url == "redis://127.0.0.1:6379/0"
    assert cfg.problems() == []


def test_bench_options() -> None:
    argv = [
        "--jobs", "500",
        "--classic-jobs", "10",
        "--latency", "0.05",
        "--bundle-size", "20",
        "--platform-latency", "0.01",
        "--in-flight", "16",
        "--rate", "50",
        "--latency-seconds", "3",
        "--skip-classic",
        "--rss-jobs", "20000",
        "--sweep",
        "--plot", "sweep.png",
        "--json", "out.json",
        "--worker-env", "OPENCTI_THREADS=32",
    ]  # fmt: skip
    # lis-async hands every argument after `bench` over unparsed, in order.
    assert build_parser().parse_args(["bench", *argv]).bench_argv == argv
    cfg = BenchConfig.from_args(bench_parser().parse_args(argv))
    assert (cfg.jobs, cfg.classic_jobs, cfg.in_flight, cfg.bundle_size) == (500, 10, 16, 20)
    assert (cfg.latency, cfg.platform_latency, cfg.rate) == (0.05, 0.01, 50.0)
    assert cfg.latency_seconds == 3.0 and cfg.rss_jobs == 20000
    assert cfg.skip_classic and cfg.sweep
    assert (cfg.plot, cfg.json_path) == ("sweep.png", "out.json")
    assert cfg.extra_env() == {"OPENCTI_THREADS": "32"}
    assert cfg.problems() == []


@pytest.mark.parametrize(
    "extra",
    [
        ["--jobs", "0"],
        ["--in-flight", "0"],
        ["--rate", "0"],
        ["--latency", "-1"],
        ["--bundle-size", "2"],
        ["--worker-env", "NO_EQUALS_SIGN"],
        ["--replicas", "0"],
        ["--replicas", "2", "--repeat-share", "1.5"],
        ["--replicas", "2", "--repeat-share", "-0.1"],
        ["--repeat-share", "0.3"],
        ["--replicas-baseline"],
        ["--replicas", "2", "--sweep"],
        ["--replicas", "2", "--rss-jobs", "100"],
        ["--replicas", "2", "--profile", "p.txt"],
        ["--replicas", "2", "--redis-url", "http://127.0.0.1:6379"],
    ],
)
def test_bench_rejects_bad_values(extra: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert BenchConfig.from_args(bench_parser().parse_args(extra)).problems()
    assert main(["bench", *extra]) == 2
    assert "lis-async bench:" in capsys.readouterr().err


def test_replica_options() -> None:
    # --replicas changes the defaults of --jobs and --repeat-share (one cluster run).
    cfg = BenchConfig.from_args(bench_parser().parse_args(["--replicas", "3", "--rate", "30"]))
    assert (cfg.replicas, cfg.rate, cfg.jobs, cfg.repeat_share) == (3, 30.0, 1500, 0.5)
    assert not cfg.replicas_baseline and cfg.problems() == []
    argv = [
        "--replicas", "2",
        "--jobs", "100",
        "--repeat-share", "0",
        "--replicas-baseline",
        "--redis-url", "redis://:secret@127.0.0.1:6380/1",
        "--skip-classic",
        "--latency-seconds", "0",
    ]  # fmt: skip
    assert build_parser().parse_args(["bench", *argv]).bench_argv == argv
    cfg = BenchConfig.from_args(bench_parser().parse_args(argv))
    assert (cfg.replicas, cfg.jobs, cfg.repeat_share) == (2, 100, 0.0)
    assert cfg.replicas_baseline and cfg.redis_url == "redis://:secret@127.0.0.1:6380/1"
    assert cfg.problems() == []
    # without --replicas, --jobs keeps its own default
    assert BenchConfig.from_args(bench_parser().parse_args(["--rate", "30"])).jobs == 2000


def test_replica_env_keeps_the_benchmarks_redis_out(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REDIS_URL", "redis://elsewhere:6379/0")
    monkeypatch.setenv("REDIS_KEY_PREFIX", "shared-by-accident")
    cfg = BenchConfig(worker_env=("LASTINFOSEC_CACHE_SIZE=5",))
    world = SimWorld()
    env = connector_env(cfg, world, "lis_async", 64)
    assert "REDIS_URL" not in env and "REDIS_KEY_PREFIX" not in env
    overrides = {"REDIS_URL": "redis://127.0.0.1:6379/0", "LASTINFOSEC_CACHE_SIZE": "9"}
    env = connector_env(cfg, world, "lis_async", 64, overrides)
    assert env["REDIS_URL"] == "redis://127.0.0.1:6379/0"
    assert env["LASTINFOSEC_CACHE_SIZE"] == "5"  # --worker-env has the last word


def test_bench_help_lists_every_option(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: lis-async bench ")
    for option in BENCH_OPTIONS:
        assert f" {option}" in out, option


def test_bench_unknown_option(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "--no-such-option"])
    assert exit_info.value.code == 2
    assert "lis-async bench: error: unrecognized arguments: --no-such-option" in (
        capsys.readouterr().err
    )


@pytest.mark.parametrize(("missing", "extra"), [("psutil", []), ("matplotlib", ["--sweep"])])
def test_bench_without_the_extra(
    missing: str,
    extra: list[str],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setitem(sys.modules, missing, None)  # `import <missing>` now fails
    assert main(["bench", *extra]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert "lis-async bench needs the bench extra" in err
    assert missing in err and "pip install 'lis-async[bench]'" in err


# -- the replica phases' figures, table and record (synthetic) ---------------------------------
def test_busiest_window_slides() -> None:
    times = [0.0, 0.5, 0.99, 1.0, 1.2, 1.9]
    # fixed one-second buckets see 3 and 3; the window [0.5, 1.5) holds 4
    assert busiest_window(times) == 4
    assert busiest_window([]) == 0
    assert busiest_window([0.0, 1.0, 2.0]) == 1  # half-open windows


def test_slope_is_the_rate_of_a_limiters_bursts() -> None:
    # 30 requests at once every 1.02 s (a sliding-window limiter under a backlog): whatever the
    # span's ends cut, the sustained rate is 30 / 1.02
    times = [k * 1.02 + i * 1e-4 for k in range(8) for i in range(30)]
    assert slope_per_s(times) == pytest.approx(30 / 1.02, rel=1e-3)
    assert math.isnan(slope_per_s([1.0]))
    assert math.isnan(slope_per_s([2.0, 2.0]))


def _stats(times: list[float], values: list[str], total: int) -> LisSimStats:
    """The double's statistics after these requests (``total`` of them, the ones recorded
    first), as its ``/_sim/stats`` reports them."""
    stats = LisSimStats()
    for v, t in zip(values, times, strict=True):
        record = RecordedRequest("GET", f"/v2/stix21/search_host/{v}", "search_host", v, t)
        stats._begin(record)
        stats._end(record, 200)
    stats.total = total
    return stats_of(json.loads(json.dumps(stats.to_dict())))


def _works(received: list[float]) -> tuple[Any, Jobs]:
    works = {f"w{i}": SimpleNamespace(received_time=t) for i, t in enumerate(received)}
    return SimpleNamespace(platform=SimpleNamespace(works=works)), Jobs(len(works), [*works])


def test_cluster_lis_figures() -> None:
    times = [k * 1.02 + i * 1e-3 for k in range(5) for i in range(30)]
    values = [f"v{i}" for i in range(148)] + ["v0", "v1"]
    # the queue emptied at t = 3.0: the backlog holds the bursts at 0, 1.02 and 2.04
    world, jobs = _works([0.0, 1.0, 3.0])
    r = ReplicaPhaseResult("replicas", "lis_async", 3, 64, "burst")
    stats = _stats(times, values, len(times))
    assert stats.max_per_window() == 30 and stats.by_status == {200: 150}
    cluster_lis_figures(r, stats, world, jobs)
    assert (r.lis_recorded, r.lis_distinct_values, r.lis_busiest_1s) == (150, 148, 30)
    assert r.lis_busiest_1s_at_s == 0.0
    assert r.lis_request_offsets_ms[:2] == [0, 1] and len(r.lis_request_offsets_ms) == 150
    assert r.lis_requests_per_distinct == pytest.approx(150 / 148)
    assert r.backlog_s == pytest.approx(3.0)
    assert r.lis_backlog_per_s == pytest.approx(30 / 1.02, rel=1e-2)
    # the double kept only part of its requests: no distinct count; a short backlog: no rate
    r = ReplicaPhaseResult("replicas", "lis_async", 3, 64, "burst")
    world, jobs = _works([0.0, 1.0, 1.5])
    cluster_lis_figures(r, _stats(times, values, 20_000), world, jobs)
    assert r.lis_distinct_values is None and math.isnan(r.lis_requests_per_distinct)
    assert math.isnan(r.lis_backlog_per_s)


def test_replica_figures_from_a_workers_metrics() -> None:
    """The scrape reads the metric names the worker really exposes."""
    m = Metrics()
    for outcome in ("enriched", "enriched", "enriched", "not_found"):
        m.observe_job(outcome, 0.1, 0, 0)
    stats = LisStats(responses_by_status={200: 3, 422: 1}, cache_hits=2, shared_cache_hits=5)
    stats.coalesced = 1
    m.add_collector(LisStatsCollector(stats))
    link = SimpleNamespace(
        shared=True, stats=SimpleNamespace(errors=1, transitions=2, replicas_seen=3)
    )
    limiter = SimpleNamespace(granted_shared=4, fallback_share=1 / 3, last_window=2)
    cache = SimpleNamespace(stats=SimpleNamespace(waits=6, waits_answered=5))
    m.add_collector(ClusterCollector(link, limiter, cache))
    fig = ReplicaFigures(1)
    replica_figures(fig, parse_metrics(m.render().decode()), cpu_s=0.04, span_s=2.0)
    assert fig.jobs_by_outcome == {"enriched": 3, "not_found": 1} and fig.jobs == 4
    assert (fig.jobs_per_s, fig.cpu_ms_per_job) == (2.0, 10.0)
    assert (fig.lis_requests, fig.cache_hits_local, fig.cache_hits_shared) == (4, 2, 5)
    assert (fig.coalesced_local, fig.coalesced_waits, fig.coalesced_waits_answered) == (1, 6, 5)
    assert (fig.cluster_granted, fig.redis_errors, fig.redis_transitions) == (4, 1, 2)
    assert fig.redis_shared is True


def test_log_warnings(tmp_path: Path) -> None:
    log = tmp_path / "replicas-1.log"
    log.write_text(
        "2026-12-01 19:13:50,001 INFO    lis_async: started\n"
        "2026-12-01 19:13:50,002 WARNING lis_async.cluster: Redis redis://x unreachable\n"
        "2026-12-01 19:13:52,003 ERROR   lis_async: boom\n"
    )
    child = Child("replica 1", ["true"], {}, log)
    assert [line.split()[2] for line in log_warnings(child)] == ["WARNING", "ERROR"]
    assert log_warnings(Child("replica 2", ["true"], {}, tmp_path / "none.log")) == []
    # pycti's JSON lines, the default format
    json_log = tmp_path / "replicas-3.log"
    json_log.write_text(
        '{"timestamp":"2026-12-01T19:13:50.001000Z","level":"INFO","name":"x","message":"a"}\n'
        '{"timestamp":"2026-12-01T19:13:50.002000Z","level":"WARNING","name":"x","message":"b"}\n'
    )
    assert [json.loads(line)["message"] for line in log_warnings(Child("3", [], {}, json_log))] == [
        "b"
    ]


def _replica_phase(shared: bool, requests: int, cpu_ms: float) -> ReplicaPhaseResult:
    name = "replicas" if shared else "replicas-baseline"
    p = ReplicaPhaseResult(
        name, "lis_async", 1500, 64, "burst",
        completed=1500, span_s=25.0, jobs_per_s=60.0,
        worker_cpu_s=cpu_ms * 1.5, worker_cpu_ms_per_job=cpu_ms, peak_rss_mb=120.0,
        bench_cpu_s=5.0, rabbitmq_cpu_s=4.0, other_cpu_s=0.25,
        replicas=3, shared=shared, rate_per_replica=30.0 if shared else 10.0, repeat_share=0.5,
        lis_requests=requests, lis_recorded=requests, lis_distinct_values=660,
        lis_requests_per_distinct=requests / 660, lis_busiest_1s=30,
        backlog_s=20.0, lis_backlog_per_s=29.4, redis_cpu_s=0.3 if shared else None,
    )  # fmt: skip
    p.per_replica = [_worker(i, shared, requests // 3, cpu_ms) for i in (1, 2, 3)]
    return p


def _worker(i: int, shared: bool, requests: int, cpu_ms: float) -> ReplicaFigures:
    return ReplicaFigures(
        i, pid=100 + i, jobs=500, jobs_by_outcome={"enriched": 400, "not_found": 100},
        jobs_per_s=20.0, cpu_s=cpu_ms / 2, cpu_ms_per_job=cpu_ms, lis_requests=requests,
        cache_hits_local=50, cache_hits_shared=80 if shared else 0,
        coalesced_waits=5 if shared else 0, coalesced_waits_answered=4 if shared else 0,
        redis_shared=True if shared else None, exit_code=0,
    )  # fmt: skip


def test_replica_table_and_record(tmp_path: Path) -> None:
    cfg = BenchConfig(
        replicas=3, rate=30.0, jobs=1500, repeat_share=0.5, replicas_baseline=True,
        redis_url="redis://:secret@127.0.0.1:6379/0",
    )  # fmt: skip
    phases: dict[str, PhaseResult] = {
        "replicas": _replica_phase(True, 663, 8.4),
        "replicas-baseline": _replica_phase(False, 980, 8.0),
    }
    record = build_record(cfg, phases, [])
    t = record["targets"]
    assert t["replicas_requests_per_distinct"]["met"] is True  # 663 <= 660 + 1 %
    assert t["replicas_rate_max_per_window"]["met"] is True  # 30 <= 30 + 1
    assert t["replicas_rate_sustained_per_s"]["met"] is True  # 29.4 >= 29.1 (97 %)
    assert t["replicas_redis_worker_cpu_ms_per_job"]["value"] == pytest.approx(0.4)
    assert t["replicas_redis_worker_cpu_ms_per_job"]["met"] is True
    assert set(t) == {
        "replicas_requests_per_distinct",
        "replicas_rate_max_per_window",
        "replicas_rate_sustained_per_s",
        "replicas_redis_worker_cpu_ms_per_job",
    }
    table = format_table(cfg, phases, record)
    assert "Redis (shared)" in table and "no Redis (baseline)" in table
    assert "classic" not in table  # no single-worker table in a cluster run
    assert "jobs/s per worker" in table and "20.0 / 20.0 / 20.0" in table
    assert "replicas worker 3 (pid 103): 500 jobs (enriched 400, not_found 100)" in table
    assert "MET    replicas_requests_per_distinct = 1.00 (limit 1.01)" in table
    path = tmp_path / "record.json"
    write_json(str(path), record)
    text = path.read_text()
    assert "secret" not in text
    written = json.loads(text)
    assert written["phases"]["replicas"]["per_replica"][0]["jobs"] == 500
    assert written["phases"]["replicas-baseline"]["redis_cpu_s"] is None

    # duplicated requests, a busiest window over the rate, too slow: MISSED; no baseline, no
    # CPU target
    shared = _replica_phase(True, 700, 9.5)
    shared.lis_busiest_1s, shared.lis_backlog_per_s = 32, 27.0
    record = build_record(cfg, {"replicas": shared}, [])
    t = record["targets"]
    assert [t[k]["met"] for k in sorted(t)] == [False, False, False]
    assert "MISSED replicas_requests_per_distinct = 1.06" in format_table(
        cfg, {"replicas": shared}, record
    )


def test_fifo_phase_shows_what_the_lanes_cost() -> None:
    cfg = BenchConfig(skip_classic=True, fifo=True)
    lanes = PhaseResult("lis_async", "lis_async", 4000, 64, "queued", completed=4000)
    fifo = PhaseResult(FIFO_PHASE, "lis_async", 4000, 64, "queued", completed=4000)
    lanes.worker_cpu_ms_per_job, fifo.worker_cpu_ms_per_job = 3.45, 3.30
    phases: dict[str, PhaseResult] = {"lis_async": lanes, FIFO_PHASE: fifo}
    record = build_record(cfg, phases, [])
    target = record["targets"]["lanes_cpu_ms_per_job"]
    assert target["value"] == pytest.approx(0.15) and target["met"] is True
    table = format_table(cfg, phases, record)
    head, cost = table.splitlines()[0], next(x for x in table.splitlines() if "lanes - FIFO" in x)
    assert head.split() == ["lis_async", "lis_async-fifo"] and cost.endswith("0.15")
    fifo.worker_cpu_ms_per_job = 3.0
    assert build_record(cfg, phases, [])["targets"]["lanes_cpu_ms_per_job"]["met"] is False
    assert BenchConfig.from_args(bench_parser().parse_args(["--fifo"])).fifo


@pytest.mark.rabbitmq
def test_tiny_bench_run(tmp_path: Path) -> None:
    record_path = tmp_path / "bench.json"
    argv = [
        sys.executable, "-m", "lis_async.cli", "bench",
        "--jobs", "20",
        "--classic-jobs", "3",
        "--latency", "0.01",
        "--latency-seconds", "2",
        "--json", str(record_path),
    ]  # fmt: skip
    done = subprocess.run(
        argv, cwd=tmp_path, env=os.environ.copy(), capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "lis_async" in done.stdout and "classic" in done.stdout

    record = json.loads(record_path.read_text())
    assert record["kind"] == "lis-async-bench"
    assert record["machine"]["cpu_count"] >= 1
    phases = record["phases"]
    classic, lis, paced = phases["classic"], phases["lis_async"], phases["latency"]
    assert classic["jobs"] == classic["completed"] == 3
    assert lis["jobs"] == lis["completed"] == 20
    assert paced["completed"] == paced["jobs"] >= 1
    for phase in (classic, lis):
        for key in ("jobs_per_s", "worker_cpu_ms_per_job", "peak_rss_mb", "bench_cpu_s"):
            assert isinstance(phase[key], float), (key, phase[key])
        assert phase["lis_requests"] >= 1
        assert phase["service_ms"]["p99"] >= 0
    assert classic["lis_max_concurrent"] == 1
    assert paced["latency_ms"]["p50"] > 0
    assert record["ratios"]["throughput"] is not None
    assert set(record["targets"]) >= {"throughput_ratio", "worker_cpu_ms_per_job"}


@pytest.mark.rabbitmq
@pytest.mark.redis
def test_tiny_replicas_run(tmp_path: Path) -> None:
    record_path = tmp_path / "bench.json"
    argv = [
        sys.executable, "-m", "lis_async.cli", "bench",
        "--replicas", "2",
        "--jobs", "40",
        "--skip-classic",
        "--latency-seconds", "0",
        "--rate", "200",
        "--json", str(record_path),
    ]  # fmt: skip
    done = subprocess.run(
        argv, cwd=tmp_path, env=os.environ.copy(), capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Redis (shared)" in done.stdout and "replicas worker 2" in done.stdout

    record = json.loads(record_path.read_text())
    assert set(record["phases"]) == {"replicas"}  # a cluster run runs nothing else
    phase = record["phases"]["replicas"]
    assert phase["jobs"] == phase["completed"] == 40
    workers = phase["per_replica"]
    assert len(workers) == 2 and sum(w["jobs"] for w in workers) == 40
    assert all(w["exit_code"] == 0 and w["redis_shared"] for w in workers)
    assert phase["lis_requests"] >= phase["lis_distinct_values"] >= 1
    assert isinstance(phase["worker_cpu_ms_per_job"], float)
    assert "replicas_requests_per_distinct" in record["targets"]
    # the phase's keys are gone from Redis
    prefix = phase["redis_key_prefix"]
    assert prefix.startswith("lis-bench:")
    client = redis.Redis.from_url("redis://127.0.0.1:6379/0")
    try:
        assert list(client.scan_iter(match=f"{prefix}:*")) == []
    finally:
        client.close()
