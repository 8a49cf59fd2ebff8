"""``lis-async bench``'s command line: its options and its entry point :func:`main`.

``lis-async bench ARGS`` hands ARGS to :func:`main` unparsed, so that the connector's own command
line never imports the benchmark. This module imports only the standard library and the
configuration: the options are parsed and checked, and the ``bench`` extra looked for, before
the benchmark itself (simulator, psutil) is imported.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import logging
import sys
from collections.abc import Sequence

from lis_async.bench.config import (
    DEFAULT_AMQP_URL,
    DEFAULT_BACKLOG_RATE,
    DEFAULT_BACKLOG_SECONDS,
    DEFAULT_FAULT_SECONDS,
    DEFAULT_JOBS,
    DEFAULT_MANUAL,
    DEFAULT_REDIS_URL,
    DEFAULT_REPEAT_SHARE,
    DEFAULT_REPLICA_JOBS,
    FAULT_AFTER_S,
    FAULT_KINDS,
    FAULT_TAIL_S,
    BenchConfig,
)

PROG = "lis-async bench"
DESCRIPTION = (
    "Benchmark lis_async against the classic pycti-helper connector on a simulated OpenCTI and "
    "LastInfoSec (needs RabbitMQ); with --replicas N, N lis_async workers sharing one "
    "connector id, rate and cache through Redis instead; with --backlog N, manual jobs queued "
    "behind N auto jobs, with priority lanes and FIFO, instead."
)
#: The modules of the ``bench`` extra, and which runs need them.
EXTRA_ALWAYS = ("psutil",)
EXTRA_SWEEP = ("matplotlib",)
INSTALL_HINT = "pip install 'lis-async[bench]'"


def add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    """Every ``lis-async bench`` option; ``dest`` names are :class:`BenchConfig` fields."""
    add = parser.add_argument
    add(
        "--jobs",
        type=int,
        default=None,
        help=f"queued jobs for lis_async (default {DEFAULT_JOBS}; "
        f"{DEFAULT_REPLICA_JOBS} with --replicas; with --redis-fault, enough for about "
        f"{FAULT_TAIL_S:g} s of work after the fault at --rate)",
    )
    add("--classic-jobs", type=int, default=60, help="queued jobs for the classic connector (60)")
    add("--latency", type=float, default=0.15, help="LastInfoSec latency, seconds (0.15)")
    add("--jitter", type=float, default=0.0, help="extra uniform LastInfoSec delay, seconds")
    add("--bundle-size", type=int, default=12, help="objects per LastInfoSec bundle (12)")
    add("--platform-latency", type=float, default=0.0, help="GraphQL latency, seconds (0)")
    add("--in-flight", type=int, default=64, help="lis_async jobs in flight (64)")
    add(
        "--lis-concurrency",
        type=int,
        default=None,
        help="lis_async LastInfoSec requests open at once (default: --in-flight)",
    )
    add(
        "--rate",
        type=float,
        default=None,
        help="lis_async LastInfoSec requests/s limit (default: none, i.e. 1000/s; "
        f"{DEFAULT_BACKLOG_RATE:g} with --backlog); "
        "also reports the sustained rate and the busiest one-second window",
    )
    add(
        "--latency-seconds",
        type=float,
        default=10.0,
        help="duration of the paced latency phase (0 skips it)",
    )
    add("--skip-classic", action="store_true", help="do not run the classic connector")
    add(
        "--fifo",
        action="store_true",
        help="also run the lis_async phase with CONNECTOR_PRIORITY_LANES=false, for the CPU "
        "per job the priority lanes cost",
    )
    add("--rss-jobs", type=int, default=0, help="also run lis_async on N queued jobs for RSS")
    add("--sweep", action="store_true", help="throughput at 1, 4, 16, 64, 128 jobs in flight")
    add("--plot", default="bench-sweep.png", help="PNG of the sweep (default bench-sweep.png)")
    add("--json", dest="json_path", default=None, metavar="PATH", help="write a JSON record")
    add(
        "--profile",
        default=None,
        metavar="PATH",
        help="py-spy record of the lis_async worker during the throughput phase "
        "(.svg: flame graph, .txt: collapsed stacks, .json: speedscope)",
    )
    add(
        "--worker-env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="extra environment variable for the lis_async worker (repeatable), "
        "e.g. --worker-env OPENCTI_THREADS=32",
    )
    add_mode_arguments(parser)
    add("--amqp-url", default=DEFAULT_AMQP_URL)
    add("--seed", type=int, default=0, help="job mix seed")


def add_mode_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of the runs that replace the default phases (``--replicas``,
    ``--backlog``)."""
    add_replica_arguments(parser)
    add_backlog_arguments(parser)


def add_replica_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of a cluster run (``--replicas``)."""
    add = parser.add_argument
    add(
        "--replicas",
        type=int,
        default=None,
        metavar="N",
        help="cluster run: N lis_async workers on one connector id sharing --rate (the "
        "cluster's rate) and the answer cache through Redis; only the replica phases run",
    )
    add(
        "--repeat-share",
        type=float,
        default=None,
        metavar="SHARE",
        help="with --replicas: share of jobs whose observable an earlier job had "
        f"(default {DEFAULT_REPEAT_SHARE})",
    )
    add(
        "--replicas-baseline",
        action="store_true",
        help="with --replicas: also run the N workers without Redis, each at rate / N",
    )
    add("--redis-url", default=DEFAULT_REDIS_URL, help=f"default {DEFAULT_REDIS_URL}")
    seconds = ", ".join(f"{v:g} for {k}" for k, v in DEFAULT_FAULT_SECONDS.items())
    add(
        "--redis-fault",
        choices=FAULT_KINDS,
        default=None,
        help="with --replicas and --rate: the replicas share a redis-server of the bench's own, "
        f"which {FAULT_AFTER_S:g} s after the first job is taken is killed and, "
        "--redis-fault-seconds later, started again empty (kill), or stopped (SIGSTOP) and "
        "continued (freeze); reports the busiest second at LastInfoSec before, during and "
        "after the fault, and the works lost or in error",
    )
    add(
        "--redis-fault-seconds",
        type=float,
        default=None,
        metavar="S",
        help=f"with --redis-fault: how long Redis stays down or frozen (default {seconds})",
    )


def add_backlog_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of a backlog run (``--backlog``)."""
    add = parser.add_argument
    add(
        "--backlog",
        type=int,
        default=None,
        metavar="N",
        help="backlog run: N auto jobs queued, then --manual jobs behind them, once with "
        "priority lanes (the worker's default) and once FIFO (CONNECTOR_PRIORITY_LANES=false); "
        "reports the manual jobs' latency and the auto jobs/s; only these two phases run",
    )
    add(
        "--manual",
        type=int,
        default=None,
        metavar="M",
        help=f"with --backlog: manual jobs queued behind the backlog (default {DEFAULT_MANUAL})",
    )
    add(
        "--backlog-seconds",
        type=float,
        default=None,
        metavar="S",
        help="with --backlog: a phase stops S seconds after its manual jobs were published "
        f"if jobs are still waiting (default {DEFAULT_BACKLOG_SECONDS:g})",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description=DESCRIPTION)
    add_bench_arguments(parser)
    return parser


def missing_extra(cfg: BenchConfig) -> list[str]:
    """The modules of the ``bench`` extra this run needs and cannot import."""
    needed = EXTRA_ALWAYS + (EXTRA_SWEEP if cfg.sweep else ())
    return [name for name in needed if importlib.util.find_spec(name) is None]


def main(argv: Sequence[str] | None = None) -> int:
    """``lis-async bench`` with ``argv`` (the arguments after ``bench``); the exit code."""
    cfg = BenchConfig.from_args(build_parser().parse_args(argv))
    problems = cfg.problems()
    for p in problems:
        print(f"{PROG}: {p}", file=sys.stderr)
    if problems:
        return 2
    missing = missing_extra(cfg)
    if missing:
        print(
            f"{PROG} needs the bench extra ({', '.join(missing)} not installed): {INSTALL_HINT}",
            file=sys.stderr,
        )
        return 2
    return _run(cfg)


def _run(cfg: BenchConfig) -> int:
    from lis_async.bench.measure import kill_leftovers
    from lis_async.bench.orchestrate import run

    logging.basicConfig(
        level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    logging.getLogger("lis_async.sim").setLevel(logging.ERROR)
    try:
        import uvloop

        return uvloop.run(run(cfg))
    except KeyboardInterrupt:
        print(f"\n{PROG}: interrupted", file=sys.stderr)
        return 130
    except asyncio.CancelledError:  # SIGTERM
        print(f"\n{PROG}: terminated", file=sys.stderr)
        return 143
    finally:
        for name in kill_leftovers():
            print(f"{PROG}: killed a leftover {name} process", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
