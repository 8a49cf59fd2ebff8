"""Helpers shared by the test files: constants, polling, the in-process and out-of-process worker
harness, broker inspection.

Test files import from here (never from another test file or from a conftest); the conftest
files hold only pytest fixtures and hooks.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

import aiormq

from lis_async.app import App
from lis_async.settings.model import Settings, load_settings
from lis_async.sim.lastinfosec import LisSimConfig
from lis_async.sim.opencti import PlatformSimConfig
from lis_async.sim.world import SimWorld

# ------------------------------------------------------------------------------------------
# fixture files

FIXTURES: Final = Path(__file__).resolve().parent / "fixtures"


def job_body(name: str) -> bytes:
    """A listen-queue body from ``tests/fixtures/jobs``."""
    return (FIXTURES / "jobs" / name).read_bytes()


# ------------------------------------------------------------------------------------------
# settings for the end-to-end worker

#: Worker settings for tests: short back-offs and deadlines, no fixed health port.
#: The least an App needs to be built (and stopped) without being started: nothing it names
#: is reached.
OFFLINE_ENV: Final[dict[str, str]] = {
    "OPENCTI_URL": "http://opencti:8080",
    "OPENCTI_TOKEN": "octi-token-secret",
    "CONNECTOR_ID": "0b3c1f2e-6d7a-4b8c-9d0e-1f2a3b4c5d6e",
    "CONFIG_LIS_APIKEY_CTI": "lis-key-secret",
}
FAST_ENV: Final[dict[str, str]] = {
    "CONNECTOR_LOG_LEVEL": "info",
    "CONNECTOR_HEALTH_PORT": "0",
    "CONNECTOR_JOBS_IN_FLIGHT": "32",
    "LASTINFOSEC_CONCURRENCY": "32",
    "LASTINFOSEC_RATE_PER_S": "1000",
    "LASTINFOSEC_BACKOFF_BASE_S": "0.05",
    "LASTINFOSEC_BACKOFF_MAX_S": "0.5",
    "CONNECTOR_PLATFORM_RETRY_MAX_S": "1",
    "CONNECTOR_SHUTDOWN_TIMEOUT_S": "10",
}
#: Job producer options: only plain enrichment jobs that are looked up (no TLP:RED, no
#: playbooks, no file without a hash).
QUIET_PRODUCER: Final[dict[str, Any]] = {
    "red_share": 0.0,
    "playbook_share": 0.0,
    "no_hash_share": 0.0,
}
#: The OpenCTI worker emulation runs in the test process; without stix2 validation it costs
#: little CPU (for tests about volume, not about the content of the bundles).
LIGHT_WORKER: Final[dict[str, Any]] = {"validate": False}


# ------------------------------------------------------------------------------------------
# waiting


async def poll(
    predicate: Callable[[], bool | Awaitable[bool]],
    timeout: float,  # noqa: ASYNC109
    every: float = 0.05,
) -> bool:
    """True once ``predicate()`` holds (sync or async); False at ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if not isinstance(value, bool):
            value = await value
        if value:
            return True
        if time.monotonic() >= deadline:
            return False
        await asyncio.sleep(every)


def work_ids(jobs: Iterable[Any]) -> list[str]:
    """The work ids of produced jobs (playbook jobs have none)."""
    return [j.work_id for j in jobs if j.work_id]


# ------------------------------------------------------------------------------------------
# the worker in-process


@dataclass
class Running:
    """A started worker App in a simulated world."""

    world: SimWorld
    app: App
    task: asyncio.Task[int]

    async def stop(self) -> int:
        self.app.request_stop()
        return await asyncio.wait_for(self.task, 60)


@contextlib.asynccontextmanager
async def app_only(world: SimWorld, env: Mapping[str, str] | None = None) -> AsyncIterator[Running]:
    """The real worker App in-process, WITHOUT starting the OpenCTI worker emulation."""
    app = App(load_settings(env=world.env() | FAST_ENV | dict(env or {})))
    task = await app.start_in_background(timeout_s=30)
    try:
        yield Running(world, app, task)
    finally:
        if not task.done():
            app.request_stop()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(task, 60)


@contextlib.asynccontextmanager
async def world_with_worker(
    env: Mapping[str, str] | None = None,
    lis: LisSimConfig | None = None,
    platform: PlatformSimConfig | None = None,
    **world_kw: Any,
) -> AsyncIterator[Running]:
    """A simulated world with the real worker App in-process and the OpenCTI worker emulation."""
    async with (
        SimWorld(lis_config=lis, platform_config=platform, **world_kw) as world,
        app_only(world, env) as run,
    ):
        await world.start_worker_emulation()
        yield run


# ------------------------------------------------------------------------------------------
# the worker as a real process (kill and signal tests)


class WorkerProcess(subprocess.Popen[bytes]):
    """``lis-async run`` as a child process; its output goes to ``log_path``."""

    log_path: Path


def start_worker_process(
    env: Mapping[str, str], log_path: Path | None = None, python: str = sys.executable
) -> WorkerProcess:
    """``lis-async run`` as a real process (``python``: another interpreter, e.g. the pycti
    floor's venv). Its output goes to a file (a pipe nobody reads would block the worker)."""
    full = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("OPENCTI_", "CONNECTOR_", "LASTINFOSEC_", "REDIS_"))
    }
    full |= dict(env)
    if log_path is None:
        fd, name = tempfile.mkstemp(prefix="lis-worker-", suffix=".log")
        os.close(fd)
        log_path = Path(name)
    with log_path.open("ab") as out:
        proc = WorkerProcess(
            [python, "-m", "lis_async.cli", "run"],
            env=full,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    proc.log_path = log_path
    return proc


def worker_log(proc: WorkerProcess) -> str:
    """Everything the worker process wrote so far."""
    return proc.log_path.read_text(errors="replace")


def log_records(text: str) -> list[dict[str, Any]]:
    """The JSON lines of a worker's log (pycti's format, the default), parsed; any other line
    (something the interpreter itself wrote) is left out."""
    out = []
    for line in text.splitlines():
        if line.startswith("{"):
            with contextlib.suppress(ValueError):
                out.append(json.loads(line))
    return out


def record_time(record: Mapping[str, Any]) -> float:
    """A JSON log record's ``timestamp`` (UTC, ``...Z``) as epoch seconds."""
    stamp = datetime.strptime(record["timestamp"], "%Y-%m-%dT%H:%M:%S.%fZ")
    return stamp.replace(tzinfo=UTC).timestamp()


def stop_process(
    proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM, timeout: float = 30
) -> int:
    """Send ``sig`` (if still running) and wait up to ``timeout``; SIGKILL after that."""
    if proc.poll() is None:
        proc.send_signal(sig)
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait(10)


async def stop_async(proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM) -> int:
    """``stop_process`` off the event loop: the simulated platform and LastInfoSec API run on
    this loop, and a worker finishing its jobs needs them to answer while we wait for it."""
    return await asyncio.to_thread(stop_process, proc, sig)


# ------------------------------------------------------------------------------------------
# broker inspection


async def ready_count(world: SimWorld, key: str = "jobs") -> int:
    """Messages ready (not delivered to a consumer) in one of the connector's queues:
    ``listen``, ``lane`` (the worker's priority lane), ``push``, or ``jobs``: the jobs waiting,
    in the listen queue and the lane together. An absent queue counts 0."""
    total = 0
    for name in ("listen", "lane") if key == "jobs" else (key,):
        try:
            async with world.admin_channel() as channel:
                queue = await channel.declare_queue(world.names()[name], passive=True)
                total += int(queue.declaration_result.message_count or 0)
        except aiormq.exceptions.ChannelNotFoundEntity:
            continue
    return total


def rabbitmqctl(*args: str) -> str:
    """``rabbitmqctl -q <args>``; its standard output."""
    out = subprocess.run(
        ["rabbitmqctl", "-q", *args], capture_output=True, text=True, timeout=30, check=True
    )
    return out.stdout


async def jobs_queued(world: SimWorld) -> tuple[int, int]:
    """(ready, unacknowledged) jobs of the connector, in its listen queue and its priority lane
    together, as the broker counts them."""
    ready = unacked = 0
    for key in ("listen", "lane"):
        try:
            r, u = await queue_depth(world.names()[key])
        except LookupError:  # no lane (lanes off)
            continue
        ready, unacked = ready + r, unacked + u
    return ready, unacked


async def queue_depth(name: str) -> tuple[int, int]:
    """(ready, unacknowledged) of a queue, as the broker counts them."""
    text = await asyncio.to_thread(
        rabbitmqctl,
        "list_queues",
        "name",
        "messages_ready",
        "messages_unacknowledged",
        "--no-table-headers",
    )
    for line in text.splitlines():
        parts = line.split("\t")
        if len(parts) == 3 and parts[0] == name:
            return int(parts[1]), int(parts[2])
    raise LookupError(name)


# ------------------------------------------------------------------------------------------
# the oldest supported platform

#: RegisterConnectorInput of OpenCTI 6.8.9, the oldest supported platform (pycti 6.8.9 sends
#: exactly these; docs/protocol.md §2.1).
INPUT_FIELDS_6_8_9: Final = frozenset(
    {
        "id",
        "name",
        "type",
        "scope",
        "auto",
        "auto_update",
        "enrichment_resolution",
        "only_contextual",
        "playbook_compatible",
        "listen_callback_uri",
    }
)
#: The Connector type of a 6.x platform lacks the 7.x fields.
FIELDS_MISSING_6_8_9: Final = frozenset({"Connector.jwks", "Connector.version", "Connector.slug"})


# ------------------------------------------------------------------------------------------
# Redis (cluster mode)

#: The machine's Redis (CI starts one when none answers); tests use unique key prefixes.
REDIS_URL: Final = "redis://127.0.0.1:6379/0"
#: REDIS_CACHE_KEY of the cluster tests' workers (cluster mode requires one).
CACHE_KEY: Final = "test-cache-key-0123456789abcdef"


def cluster_settings(url: str, prefix: str | None = None, **env: str) -> Settings:
    """Worker settings in cluster mode on ``url`` (a fresh key prefix unless given), for the
    cluster tests and their child processes."""
    return load_settings(
        env={
            "OPENCTI_URL": "http://127.0.0.1:1",
            "OPENCTI_TOKEN": "t",
            "CONNECTOR_ID": str(uuid.uuid4()),
            "CONFIG_LIS_APIKEY_CTI": "test-lis-key",
            "REDIS_URL": url,
            "REDIS_CACHE_KEY": CACHE_KEY,
            "REDIS_KEY_PREFIX": prefix or f"test-{uuid.uuid4()}",
            "LASTINFOSEC_ALLOW_HTTP": "true",  # the LastInfoSec double serves http on loopback
            **env,
        }
    )


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class PrivateRedis:
    """A redis-server of the test's own on a free loopback port, so a test can stop, freeze or
    restart it (or give it a password) without touching the machine's Redis."""

    def __init__(self, password: str | None = None) -> None:
        self.port = free_port()
        self.password = password
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def start(self) -> None:
        args = ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1"]
        args += ["--save", "", "--appendonly", "no"]
        if self.password:
            args += ["--requirepass", self.password]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError):
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    return
            time.sleep(0.05)
        raise RuntimeError("the private redis-server did not start")

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None:
            proc.kill()
            proc.wait(10)

    def freeze(self) -> None:
        """SIGSTOP: connections stay open, nothing answers (a hung Redis)."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)

    def thaw(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)

    def __enter__(self) -> PrivateRedis:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGCONT)
        self.stop()


#: The Debian package's rabbitmq-server wrapper switches to the rabbitmq user; the script
#: behind it does not.
RABBITMQ_SERVER_SCRIPTS: Final = (
    "/usr/lib/rabbitmq/bin/rabbitmq-server",
    shutil.which("rabbitmq-server"),
)


class PrivateRabbitMQ:
    """A RabbitMQ node of the test's own (its node name, data directory, configuration and
    ports, loopback only) in ``base``, for what must not touch the machine's broker: a TLS-only
    listener, a short ``consumer_timeout``. ``conf`` is its rabbitmq.conf (with ``{port}``, its
    AMQP port, to fill in), ``advanced`` its advanced.config (Erlang terms), if any. Starting
    takes a few seconds: share one per module (a module fixture and an ``xdist_group``)."""

    def __init__(self, base: Path, conf: str, advanced: str | None = None) -> None:
        self.base = base
        self.port = free_port()
        self.conf = conf.format(port=self.port)
        self.advanced = advanced
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.port}/"

    def _env(self) -> dict[str, str]:
        base = self.base
        (base / "enabled_plugins").write_text("[].\n")  # no management plugin, no 15672
        (base / "rabbitmq-env.conf").write_text("")  # not the machine's (its NODENAME)
        (base / "rabbitmq.conf").write_text(self.conf)
        env = {k: v for k, v in os.environ.items() if not k.startswith("RABBITMQ_")}
        if self.advanced is not None:
            (base / "advanced.config").write_text(self.advanced)
            env["RABBITMQ_ADVANCED_CONFIG_FILE"] = str(base / "advanced.config")
        return (
            env
            | {
                "HOME": str(base),  # its own Erlang cookie
                "RABBITMQ_NODENAME": f"lis-test-{uuid.uuid4().hex[:8]}@localhost",
                "RABBITMQ_DIST_PORT": str(free_port()),
                "RABBITMQ_CONFIG_FILE": str(base / "rabbitmq.conf"),
                "RABBITMQ_CONF_ENV_FILE": str(base / "rabbitmq-env.conf"),
                "RABBITMQ_ENABLED_PLUGINS_FILE": str(base / "enabled_plugins"),
                "RABBITMQ_MNESIA_BASE": str(base / "mnesia"),
                "RABBITMQ_LOG_BASE": str(base / "log"),
                "RABBITMQ_PID_FILE": str(base / "node.pid"),
                "ERL_EPMD_ADDRESS": "127.0.0.1",
                "ERL_FLAGS": "-kernel inet_dist_use_interface {127,0,0,1}",
            }
        )

    def start(self, timeout_s: float = 90) -> None:
        """Start the node and wait for its AMQP port; ``pytest.skip`` without rabbitmq-server."""
        import pytest

        script = next((s for s in RABBITMQ_SERVER_SCRIPTS if s and os.access(s, os.X_OK)), None)
        if script is None:
            pytest.skip("rabbitmq-server is not installed: no private RabbitMQ node can start")
        log = (self.base / "node.out").open("wb")
        self.proc = subprocess.Popen([script], env=self._env(), stdout=log, stderr=log)
        log.close()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and self.proc.poll() is None:
            with (
                contextlib.suppress(OSError),
                socket.create_connection(("127.0.0.1", self.port), 0.5),
            ):
                return
            time.sleep(0.3)
        self.stop()
        pytest.fail("the private RabbitMQ node did not start:\n" + self.output())

    def output(self) -> str:
        return (self.base / "node.out").read_text(errors="replace")

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        proc.terminate()  # the script stops the node gracefully on SIGTERM
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)

    def __enter__(self) -> PrivateRabbitMQ:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def busiest_window(times: Iterable[float], width_s: float = 1.0) -> int:
    """The most events in any window of ``width_s`` (sliding, half-open [t, t + width))."""
    ordered = sorted(times)
    best, start = 0, 0
    for end, t in enumerate(ordered):
        while ordered[start] <= t - width_s:
            start += 1
        best = max(best, end - start + 1)
    return best


# a hostile LastInfoSec answer (the security review's, issue #15)

HOSTILE_T = "2026-10-14T08:12:03.000Z"
#: Entities that exist on the platform and have nothing to do with the enrichment.
FOREIGN_INTRUSION_SET = "intrusion-set--0e0e0e0e-1111-4222-8333-000000000001"
FOREIGN_MALWARE = "malware--0e0e0e0e-1111-4222-8333-000000000002"
FOREIGN_FILE = "file--0e0e0e0e-1111-5222-8333-000000000003"
FOREIGN_ORG = "identity--0e0e0e0e-1111-4222-8333-000000000004"
#: The id the hostile report chooses (say, an internal incident report).
CHOSEN_REPORT_ID = "report--0e0e0e0e-1111-4222-8333-000000000005"
CUSTOM_MARKING = "marking-definition--0e0e0e0e-1111-4222-8333-000000000006"
IMPOSTOR_ID = "identity--0e0e0e0e-1111-4222-8333-000000000007"
TLP_CLEAR_ID = "marking-definition--613f2e26-407d-48c7-9eca-b8e91df99dc9"


def hostile_answer(observable_id: str, value: str) -> dict[str, Any]:
    """One LastInfoSec answer that tries to reshape the platform, about the observable
    ``observable_id`` (a domain ``value``): a new marking definition, an identity posing as
    LastInfoSec and a foreign one, a relationship between two unrelated existing entities, a
    report with a chosen id pointing at the observable, a malware carrying ``x_opencti_*``
    properties, granted refs and TLP:CLEAR, a sighting by a foreign organisation, an object of a
    type LastInfoSec never sends; plus the legitimate part (an indicator of the value, a sector)."""
    sdo = {"spec_version": "2.1", "created": HOSTILE_T, "modified": HOSTILE_T}
    indicator = {
        **sdo,
        "type": "indicator",
        "id": "indicator--0e0e0e0e-1111-4222-8333-000000000010",
        "pattern": f"[domain-name:value = '{value}']",
        "pattern_type": "stix",
        "valid_from": HOSTILE_T,
        "created_by_ref": IMPOSTOR_ID,
    }
    malware = {
        **sdo,
        "type": "malware",
        "id": "malware--0e0e0e0e-1111-4222-8333-000000000011",
        "name": "Hostileware",
        "is_family": True,
        "created_by_ref": FOREIGN_ORG,
        "object_marking_refs": [TLP_CLEAR_ID, CUSTOM_MARKING],
        "x_opencti_files": [
            {"name": "x.exe", "data": "TVqQ", "mime_type": "application/x-dosexec"}
        ],
        "x_opencti_granted_refs": [FOREIGN_ORG],
        "x_opencti_score": 100,
        "sample_refs": [FOREIGN_FILE],
        "extensions": {
            "extension-definition--ea279b3e-5c71-4632-ac08-831c66a786ba": {
                "extension_type": "property-extension",
                "granted_refs": [FOREIGN_ORG],
                "score": 100,
            }
        },
    }
    objects: list[dict[str, Any]] = [
        {**sdo, "type": "identity", "id": IMPOSTOR_ID, "name": "Last Info Sec",
         "identity_class": "organization"},
        {**sdo, "type": "identity", "id": FOREIGN_ORG, "name": "ACME Corp",
         "identity_class": "organization"},
        {**sdo, "type": "identity", "id": "identity--0e0e0e0e-1111-4222-8333-000000000012",
         "name": "Finance", "identity_class": "class"},
        {"type": "marking-definition", "spec_version": "2.1", "id": CUSTOM_MARKING,
         "created": HOSTILE_T, "definition_type": "statement", "name": "LastInfoSec says so",
         "definition": {"statement": "LastInfoSec says so"}},
        {"type": "marking-definition", "spec_version": "2.1", "id": TLP_CLEAR_ID,
         "created": "2017-01-20T00:00:00.000Z", "definition_type": "tlp", "name": "TLP:CLEAR",
         "definition": {"tlp": "clear"}},
        indicator,
        malware,
        {**sdo, "type": "relationship", "id": "relationship--0e0e0e0e-1111-4222-8333-000000000013",
         "relationship_type": "indicates", "source_ref": indicator["id"],
         "target_ref": malware["id"]},
        {**sdo, "type": "relationship", "id": "relationship--0e0e0e0e-1111-4222-8333-000000000014",
         "relationship_type": "uses", "source_ref": FOREIGN_INTRUSION_SET,
         "target_ref": FOREIGN_MALWARE},
        {**sdo, "type": "report", "id": CHOSEN_REPORT_ID, "name": "Internal incident 42",
         "published": HOSTILE_T, "report_types": ["threat-report"],
         "object_refs": [observable_id, FOREIGN_MALWARE, malware["id"]]},
        {**sdo, "type": "sighting", "id": "sighting--0e0e0e0e-1111-4222-8333-000000000015",
         "sighting_of_ref": indicator["id"], "where_sighted_refs": [FOREIGN_ORG]},
        {**sdo, "type": "note", "id": "note--0e0e0e0e-1111-4222-8333-000000000016",
         "content": "pwned", "object_refs": [FOREIGN_MALWARE]},
    ]  # fmt: skip
    return {
        "type": "bundle",
        "id": "bundle--0e0e0e0e-1111-4222-8333-000000000017",
        "objects": objects,
    }


def opencti_keys(obj: Any) -> list[str]:
    """Every ``x_opencti_*`` key and OpenCTI extension anywhere in ``obj``."""
    found: list[str] = []
    if isinstance(obj, dict):
        for key, val in obj.items():
            if key.startswith("x_opencti_") or key.startswith("extension-definition--"):
                found.append(key)
            found.extend(opencti_keys(val))
    elif isinstance(obj, list):
        for val in obj:
            found.extend(opencti_keys(val))
    return found
