"""``lis-async run | demo | bench | check | settings | health``.

Only the standard library at module level: ``lis-async health`` (the image's HEALTHCHECK, every
30 s) and ``--help`` load nothing else; each command imports what it needs.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from collections.abc import Coroutine, Sequence
from typing import Any


def _run_loop(coro: Coroutine[Any, Any, int]) -> int:
    try:
        import uvloop

        return uvloop.run(coro)
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        return asyncio.run(coro)


def raise_open_files_limit() -> tuple[int, int]:
    """The soft limit of open files raised to the hard one (often 1,024 of 524,288): the
    connections of the health server, RabbitMQ, OpenCTI and LastInfoSec share it
    (docs/telemetry.md). Returns (before, after); a limit that cannot be raised stays."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    # Linux refuses an unlimited number of open files: take a large finite one then.
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    if soft == resource.RLIM_INFINITY or soft >= target:
        return soft, soft
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (ValueError, OSError):
        return soft, soft
    return soft, target


def cmd_run(args: argparse.Namespace) -> int:
    from lis_async.app import App
    from lis_async.broker.connection import ExpectedReconnection
    from lis_async.ops.logs import setup_logging
    from lis_async.redact import SecretFilter, register_secrets
    from lis_async.settings.model import SettingsError, load_settings

    try:
        settings = load_settings(args.config)
    except SettingsError as exc:
        print(f"lis-async: {exc}", file=sys.stderr)
        return 2
    register_secrets(settings.secrets())  # masked in every log line (SecretFilter)
    setup_logging(
        settings.connector.log_level,
        settings.opencti.json_logging,
        filters=(ExpectedReconnection(), SecretFilter()),
    )
    before, after = raise_open_files_limit()
    if after != before:
        logging.getLogger("lis_async.cli").info(
            "open files limit raised from %d to %d", before, after
        )

    async def main() -> int:
        return await App(settings, freeze_heap=True).run()

    code = _run_loop(main())
    # Everything is closed and every settled job acked. A pycti call still stuck in its thread
    # (OpenCTI hanging) must not hold the exit past the shutdown deadline: exit now.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _lacks_extra(command: str, extra: str, modules: Sequence[str]) -> bool:
    """True (with one line on stderr) when a tool's modules are not installed: the Docker image
    ships neither the simulators nor the benchmark, and the extras may be missing."""
    import importlib.util

    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        print(
            f"lis-async {command} needs the {extra} extra ({', '.join(missing)} not installed): "
            f"pip install 'lis-async[{extra}]'",
            file=sys.stderr,
        )
    return bool(missing)


def cmd_demo(args: argparse.Namespace) -> int:
    if _lacks_extra("demo", "demo", ("lis_async.sim", "stix2", "jwt", "cryptography")):
        return 2
    from lis_async.sim.demo import run_demo

    return _run_loop(run_demo(jobs=args.jobs, latency_s=args.latency, amqp_url=args.amqp_url))


def cmd_check(args: argparse.Namespace) -> int:
    from lis_async.check import run_check
    from lis_async.redact import register_secrets
    from lis_async.settings.model import SettingsError, load_settings

    try:
        settings = load_settings(args.config)
    except SettingsError as exc:
        print(f"FAIL settings: {exc}")
        return 2
    register_secrets(settings.secrets())  # masked in every line the check prints
    print("PASS settings")
    for line in settings.ignored:  # removed settings (lis_async/settings/removed.py)
        print(f"WARN settings: {line}")
    return _run_loop(run_check(settings))


def cmd_settings(args: argparse.Namespace) -> int:
    """Print the settings reference (or another generated file); ``--write`` / ``--check`` the
    generated files of a repository (lis_async/settings/reference.py)."""
    from pathlib import Path

    from lis_async.settings import reference

    root = Path(args.root)
    if args.write:
        for path in reference.write(root):
            print(f"wrote {root / path}")
        return 0
    if args.check:
        stale = reference.stale(root)
        for path in stale:
            print(f"stale: {root / path} (run: lis-async settings --write)", file=sys.stderr)
        return 1 if stale else 0
    sys.stdout.write(reference.generate()[_SHOW[args.show]])
    return 0


_SHOW = {
    "reference": "docs/configuration.md",
    "sample": "config.yml.sample",
    "schema": "__metadata__/connector_config_schema.json",
    "manifest": "__metadata__/connector_manifest.json",
}


def cmd_bench(args: argparse.Namespace) -> int:
    # The benchmark parses its own options: nothing of it is imported unless it runs.
    if _lacks_extra("bench", "bench", ("lis_async.bench", "lis_async.sim")):
        return 2
    from lis_async.bench.cli import main as bench_main

    argv: list[str] = args.bench_argv
    return bench_main(argv)


#: Addresses that mean "every interface": the check asks on loopback instead.
_WILDCARDS = ("", "0.0.0.0", "::")


def health_url(host: str | None, port: int) -> str:
    """``/healthz`` of a health server bound to ``host`` (a wildcard: asked on 127.0.0.1)."""
    host = (host or "").strip()
    host = "127.0.0.1" if host in _WILDCARDS else host
    return f"http://{f'[{host}]' if ':' in host else host}:{port}/healthz"


def cmd_health(args: argparse.Namespace) -> int:
    """GET ``/healthz`` of the local worker: exit 0 when it answers 200, 1 otherwise (the
    image's HEALTHCHECK). Port 0 (the health server disabled) is healthy: nothing to ask. The
    port and host default to CONNECTOR_HEALTH_PORT and CONNECTOR_HEALTH_HOST of the environment;
    values set only in config.yml are not read here (that would load the settings model)."""
    import urllib.error
    import urllib.request

    port = (
        args.port if args.port is not None else int(os.environ.get("CONNECTOR_HEALTH_PORT") or 9096)
    )
    if port == 0:
        return 0
    host = args.host if args.host is not None else os.environ.get("CONNECTOR_HEALTH_HOST")
    url = health_url(host, port)
    try:
        with urllib.request.urlopen(url, timeout=args.timeout) as resp:
            ok = resp.status == 200
    except (urllib.error.URLError, OSError, ValueError) as exc:
        print(f"lis-async health: {url}: {exc}", file=sys.stderr)
        return 1
    if not ok:
        print(f"lis-async health: {url}: HTTP {resp.status}", file=sys.stderr)
    return 0 if ok else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lis-async",
        description="Asyncio OpenCTI enrichment connector for LastInfoSec",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the connector (the Docker image's default command)")
    run.add_argument(
        "--config",
        help="path of config.yml (default ./config.yml, then "
        "/opt/opencti-connector-lastinfosec-enrichment/config.yml)",
    )
    run.set_defaults(fn=cmd_run)
    demo = sub.add_parser("demo", help="run the worker against a simulated OpenCTI and LastInfoSec")
    demo.add_argument("--jobs", type=int, default=300)
    demo.add_argument("--latency", type=float, default=0.15, help="LastInfoSec latency, seconds")
    demo.add_argument("--amqp-url", default="amqp://guest:guest@127.0.0.1:5672/")
    demo.set_defaults(fn=cmd_demo)
    check = sub.add_parser(
        "check", help="validate settings and reach OpenCTI, RabbitMQ, LastInfoSec"
    )
    check.add_argument("--config")
    check.set_defaults(fn=cmd_check)
    settings = sub.add_parser(
        "settings",
        help="print every setting: environment name, config.yml key, type, default, bounds",
        description="Print the settings reference (docs/configuration.md), generated from the "
        "settings model, or another generated file; --write rewrites all of them.",
    )
    settings.add_argument(
        "--show",
        choices=sorted(_SHOW),
        default="reference",
        help="what to print: the reference (default), config.yml.sample, or the OpenCTI "
        "catalog's connector_config_schema.json or connector_manifest.json",
    )
    mode = settings.add_mutually_exclusive_group()
    mode.add_argument(
        "--write",
        action="store_true",
        help="rewrite the generated files that are out of date under --root: "
        + ", ".join(_SHOW.values()),
    )
    mode.add_argument(
        "--check", action="store_true", help="exit 1 when a generated file under --root is stale"
    )
    settings.add_argument(
        "--root", default=".", help="the repository root (default: the current directory)"
    )
    settings.set_defaults(fn=cmd_settings)
    health = sub.add_parser(
        "health",
        help="exit 0 if the local worker's /healthz answers (the image's HEALTHCHECK)",
    )
    health.add_argument(
        "--port", type=int, help="health port (default: $CONNECTOR_HEALTH_PORT, else 9096)"
    )
    health.add_argument(
        "--host", help="health host (default: $CONNECTOR_HEALTH_HOST; a wildcard asks 127.0.0.1)"
    )
    health.add_argument("--timeout", type=float, default=3.0, help="seconds (default 3)")
    health.set_defaults(fn=cmd_health)
    # A pass-through: every argument after `bench` (`--help` included) goes to the benchmark's
    # own parser. This parser's only prefix character is NUL, which no command-line argument
    # can contain: `--jobs` and the like are then part of the remainder, not unknown options.
    bench = sub.add_parser(
        "bench",
        help="benchmark against the classic pycti connector",
        add_help=False,
        prefix_chars="\0",
    )
    bench.add_argument("bench_argv", nargs=argparse.REMAINDER)
    bench.set_defaults(fn=cmd_bench)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    code: int = args.fn(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
