"""``lis-async bench``: argument parsing (through ``lis-async``'s pass-through and the benchmark's
own parser), the missing ``bench`` extra, and one tiny run on the real RabbitMQ.

The benchmark's figures are never asserted on (timing depends on the machine); the tiny run only
checks that both connectors ran, every job completed and the JSON record is complete.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from lis_async.bench.cli import build_parser as bench_parser
from lis_async.bench.config import BenchConfig
from lis_async.cli import build_parser, main

BENCH_OPTIONS = (
    "--help", "--jobs", "--classic-jobs", "--latency", "--jitter", "--bundle-size",
    "--platform-latency", "--in-flight", "--lis-concurrency", "--rate", "--latency-seconds",
    "--skip-classic", "--rss-jobs", "--sweep", "--plot", "--json", "--profile", "--worker-env",
    "--amqp-url", "--seed",
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
    ],
)
def test_bench_rejects_bad_values(extra: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert BenchConfig.from_args(bench_parser().parse_args(extra)).problems()
    assert main(["bench", *extra]) == 2
    assert "lis-async bench:" in capsys.readouterr().err


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


def _rabbit_up() -> bool:
    try:
        with socket.create_connection(("127.0.0.1", 5672), timeout=2):
            return True
    except OSError:
        return False


@pytest.mark.rabbitmq
def test_tiny_bench_run(tmp_path: Path) -> None:
    if not _rabbit_up():
        pytest.skip("RabbitMQ not reachable on 127.0.0.1:5672")
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
