"""The processes a phase starts: the connector under test, and py-spy when profiling.

A connector is ``python -m lis_async.bench.classic`` or ``python -m lis_async.cli run``, run as a
:class:`~lis_async.bench.measure.Child` (own session, log file, RSS sampling) with an
environment built from the world's settings only: settings from the benchmark's own environment
never reach it.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import IO

from lis_async.bench.config import BenchConfig
from lis_async.bench.measure import Child
from lis_async.bench.results import BenchError, Connector
from lis_async.sim.world import SimWorld

#: ``LASTINFOSEC_RATE_PER_S`` when ``--rate`` is not given: in effect no limit.
UNLIMITED_RATE_PER_S = 1000.0
#: py-spy samples per second.
PROFILE_RATE_HZ = 200

#: Settings from the benchmark's own environment never reach the connectors (reproducibility;
#: and a proxy variable would send the local LastInfoSec double's traffic through a proxy).
_FOREIGN_PREFIXES = (
    "CONNECTOR_",
    "OPENCTI_",
    "LASTINFOSEC_",
    "CONFIG_LIS_",
    "MQ_",
    "PROXY_",
    "REDIS_",
)
_PROXY_VARIABLES = frozenset({"http_proxy", "https_proxy", "all_proxy", "no_proxy"})


def _foreign_setting(name: str) -> bool:
    return name.upper().startswith(_FOREIGN_PREFIXES) or name.lower() in _PROXY_VARIABLES


def own_env() -> dict[str, str]:
    """The benchmark's environment without any connector or proxy setting (the base of every
    subprocess's)."""
    return {k: v for k, v in os.environ.items() if not _foreign_setting(k)}


def connector_env(
    cfg: BenchConfig,
    world: SimWorld,
    connector: Connector,
    in_flight: int,
    overrides: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """The environment of a connector pointed at ``world``; lis_async's settings are the
    benchmark's, then ``overrides`` (a phase's own), then ``--worker-env``."""
    env = own_env() | world.env() | {"PYTHONUNBUFFERED": "1"}
    if connector == "classic":
        return env | {"CONNECTOR_TYPE": "INTERNAL_ENRICHMENT", "CONNECTOR_LOG_LEVEL": "error"}
    concurrency = cfg.lis_concurrency or in_flight
    return (
        env
        | {
            "CONNECTOR_LOG_LEVEL": "warning",
            "CONNECTOR_HEALTH_PORT": "0",
            "CONNECTOR_SHUTDOWN_TIMEOUT_S": "5",
            "CONNECTOR_JOBS_IN_FLIGHT": str(in_flight),
            "LASTINFOSEC_CONCURRENCY": str(concurrency),
            "LASTINFOSEC_RATE_PER_S": str(cfg.rate or UNLIMITED_RATE_PER_S),
        }
        | dict(overrides or {})
        | cfg.extra_env()
    )


def connector_argv(connector: Connector) -> list[str]:
    """The command line of a connector process."""
    if connector == "classic":
        return [sys.executable, "-m", "lis_async.bench.classic"]
    return [sys.executable, "-m", "lis_async.cli", "run"]


def connector_child(
    cfg: BenchConfig,
    world: SimWorld,
    connector: Connector,
    in_flight: int,
    log_path: Path,
    overrides: Mapping[str, str] | None = None,
) -> Child:
    """A connector pointed at ``world``, not started yet; its output will go to ``log_path``;
    ``overrides``: the phase's own settings (see :func:`connector_env`)."""
    return Child(
        connector,
        connector_argv(connector),
        connector_env(cfg, world, connector, in_flight, overrides),
        log_path,
    )


def free_port() -> int:
    """A TCP port free on every interface right now (for a worker's metrics server)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("", 0))
        return int(sock.getsockname()[1])


class Profiler:
    """``py-spy record`` of one process for a fixed duration, written to ``path``.

    The format follows the suffix: ``.svg`` flame graph, ``.json`` speedscope, anything else
    raw collapsed stacks. py-spy's own output goes to ``log_path``.
    """

    def __init__(self, pid: int, path: str, seconds: float, log_path: Path) -> None:
        exe = shutil.which("py-spy")
        if exe is None:
            raise BenchError("--profile needs py-spy (pip install py-spy)")
        fmt = {".svg": "flamegraph", ".json": "speedscope"}.get(Path(path).suffix, "raw")
        duration = max(1, int(seconds))
        argv = [exe, "record", "--pid", str(pid), "--duration", str(duration)]
        argv += ["--rate", str(PROFILE_RATE_HZ), "--gil", "--format", fmt, "--output", path]
        argv += ["--nonblocking"]
        self._log: IO[bytes] = log_path.open("wb")
        self.proc = subprocess.Popen(argv, stdout=self._log, stderr=subprocess.STDOUT)

    def wait(self, timeout_s: float) -> None:
        """Until py-spy wrote its output (blocking: call it in a thread)."""
        self.proc.wait(timeout_s)

    def stop(self) -> None:
        """Kill py-spy if it still runs; idempotent."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._log.close()
