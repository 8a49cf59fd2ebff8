"""The oldest pycti pyproject.toml allows really works: ``lis-async run`` from this checkout,
under an interpreter whose only pycti is the floor, registers with a platform double shaped like
the oldest supported OpenCTI (docs/protocol.md §2.1) and enriches jobs end to end.

The floor's virtual environment is made by ``bash .ci/floor-venv`` (fresh, from PyPI, a few
minutes); without it the test is skipped and says so.
"""

from __future__ import annotations

import os
import re
import subprocess
import tomllib
from pathlib import Path

import pytest

from lis_async.sim.opencti import PlatformSimConfig
from lis_async.sim.world import SimWorld
from tests.helpers import (
    FAST_ENV,
    FIELDS_MISSING_6_8_9,
    INPUT_FIELDS_6_8_9,
    start_worker_process,
    stop_async,
    work_ids,
    worker_log,
)

pytestmark = [pytest.mark.rabbitmq]

ROOT = Path(__file__).resolve().parents[2]
FLOOR_VENV = Path(os.environ.get("LIS_FLOOR_VENV", "/tmp/lis-async-floor"))
#: RegisterConnectorInput of OpenCTI 6.8.9 and a Connector type without the 7.x fields.
PLATFORM_6_8_9 = {
    "register_input_fields": INPUT_FIELDS_6_8_9,
    "missing_fields": FIELDS_MISSING_6_8_9,
    "platform_version": "6.8.9",
}


def pycti_floor() -> str:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    return next(m.group(1) for d in deps if (m := re.match(r"pycti>=([0-9.]+)", d)))


def floor_python() -> str:
    python = FLOOR_VENV / "bin" / "python"
    if not python.exists():
        pytest.skip(f"no pycti floor venv at {FLOOR_VENV}: create it with `bash .ci/floor-venv`")
    out = subprocess.run(
        [str(python), "-c", "import pycti; print(pycti.__version__)"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd="/",  # not this checkout: the venv's own pycti
    )
    assert out.returncode == 0, out.stderr
    floor = pycti_floor()
    assert out.stdout.strip() == floor, (
        f"{FLOOR_VENV} has pycti {out.stdout.strip()}, the floor is {floor}: "
        "re-run `bash .ci/floor-venv`"
    )
    return str(python)


@pytest.mark.slow
async def test_lis_async_runs_on_the_pycti_floor() -> None:
    python = floor_python()
    config = PlatformSimConfig(**PLATFORM_6_8_9)  # type: ignore[arg-type]
    async with SimWorld(platform_config=config) as world:
        env = world.env() | FAST_ENV | {"PYTHONPATH": str(ROOT)}
        proc = start_worker_process(env, python=python)
        try:
            assert await world.wait_registration(timeout=60), worker_log(proc)[-3000:]
            record = world.platform.connectors[world.connector_id]
            await world.start_worker_emulation()
            jobs = await world.producer.publish_many(30)  # every kind of job the producer makes
            works = work_ids(jobs)
            assert await world.platform.wait_works(works, timeout=90), worker_log(proc)[-3000:]
            agents = {
                r.user_agent for r in world.platform.requests if r.operation == "workToProcessed"
            }
            assert len(works) > 10 and agents == {f"pycti/{pycti_floor()}"}
            assert set(record.input) <= INPUT_FIELDS_6_8_9
        finally:
            code = await stop_async(proc)
        assert code == 0, worker_log(proc)[-3000:]


def test_start_up_imports_on_the_pycti_floor() -> None:
    """What the image runs at build time and at start, under the floor's interpreter: the
    command line, the health check's parser, and every module `run` and `check` import (pycti
    6.8.9 imports python-magic, which needs libmagic: the Dockerfile installs libmagic1 then)."""
    python = floor_python()
    env = os.environ | {"PYTHONPATH": str(ROOT)}
    for args in (
        ["-m", "lis_async.cli", "--help"],
        ["-m", "lis_async.cli", "health", "--help"],
        ["-c", "import magic, lis_async.app, lis_async.check, lis_async.ops.logs"],
    ):
        done = subprocess.run(
            [python, *args], capture_output=True, text=True, timeout=120, env=env, cwd="/"
        )
        assert done.returncode == 0, (args, done.stderr[-3000:])
