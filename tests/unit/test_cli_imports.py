"""``lis-async run`` and ``check`` never import the benchmark, the simulator or their
dependencies: a fresh interpreter builds the command line, parses ``run``, ``check``, ``bench``
arguments and ``--help``, imports what ``run`` and ``check`` import, and lists its modules.
``lis-async settings`` imports the settings alone."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
FORBIDDEN = ("lis_async.sim", "lis_async.bench", "psutil", "matplotlib")

PARSE = """
import contextlib, io, sys
from lis_async.cli import build_parser

parser = build_parser()
parser.parse_args(["run"])
parser.parse_args(["run", "--config", "config.yml"])
parser.parse_args(["check", "--config", "config.yml"])
parser.parse_args(["bench", "--jobs", "5", "--sweep"])  # parsed by the benchmark only if it runs
out = io.StringIO()
with contextlib.redirect_stdout(out), contextlib.suppress(SystemExit):
    parser.parse_args(["--help"])
assert "bench" in out.getvalue(), out.getvalue()
import lis_async.app, lis_async.check, lis_async.ops.logs  # what `run` and `check` import
"""
LIST = "\nprint('\\n'.join(sorted(sys.modules)))\n"


def imported_modules(code: str) -> set[str]:
    env = os.environ.copy()
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    done = subprocess.run(
        [sys.executable, "-c", code + LIST],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return set(done.stdout.split())


def forbidden(modules: set[str]) -> list[str]:
    return sorted(m for m in modules if any(m == f or m.startswith(f + ".") for f in FORBIDDEN))


def test_run_and_check_do_not_import_the_benchmark() -> None:
    modules = imported_modules(PARSE)
    assert "lis_async.cli" in modules and "lis_async.app" in modules
    assert forbidden(modules) == []


def test_the_check_sees_the_benchmark() -> None:
    """The same listing does show them once the benchmark is imported."""
    modules = imported_modules(PARSE + "import lis_async.bench.orchestrate\n")
    assert {"lis_async.sim.world", "lis_async.bench.phase", "psutil"} <= set(forbidden(modules))


SETTINGS = """
import contextlib, io, sys
from lis_async.cli import main

out = io.StringIO()
with contextlib.redirect_stdout(out):
    assert main(["settings"]) == 0
assert "CONNECTOR_JOBS_IN_FLIGHT" in out.getvalue()
"""


def test_lis_async_settings_imports_only_the_settings() -> None:
    """An operator's `lis-async settings` loads the model, not the worker: no broker, platform,
    HTTP or Redis client, no benchmark."""
    modules = imported_modules(SETTINGS)
    assert "lis_async.settings.reference" in modules
    heavy = ("pycti", "aio_pika", "aiohttp", "redis", "lis_async.app", "lis_async.broker")
    assert [m for m in modules if m.split(".")[0] in heavy or m in heavy] == []
    assert forbidden(modules) == []


HEALTH = """
import sys
from lis_async.cli import main

assert main(["health", "--port", "0"]) == 0  # the health server disabled: healthy
"""


def test_health_command_imports_only_the_standard_library() -> None:
    """`lis-async health` runs every 30 s in the container (the image's HEALTHCHECK): it loads
    neither the settings model nor any I/O library."""
    modules = imported_modules(HEALTH)
    heavy = ("pydantic", "aiohttp", "aio_pika", "pycti", "yaml", "orjson", "uvloop", "redis")
    assert {m for m in modules if m.split(".")[0] in heavy} == set()
    assert {m for m in modules if m.startswith("lis_async")} == {"lis_async", "lis_async.cli"}
