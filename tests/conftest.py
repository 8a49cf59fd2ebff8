"""Fixtures and hooks for every test; how the suite runs.

One command runs everything: ``python3 -m pytest`` (options in pyproject.toml's
``[tool.pytest.ini_options]``). For a test author:

* **Services.** A test that needs the machine's RabbitMQ (127.0.0.1:5672, guest/guest) is marked
  ``rabbitmq``; one that needs the machine's Redis (127.0.0.1:6379) ``redis`` (a module:
  ``pytestmark = pytest.mark.rabbitmq``). Both are checked once per run, only when a selected
  test needs them; if one is missing, the run fails with one message saying what to start, and
  runs nothing else. A test never skips because a service is missing. (A test with a private
  server of its own, ``PrivateRedis`` or ``PrivateRabbitMQ`` of tests/helpers.py, needs no mark.)
* **Timeout.** Every test has 60 s (``timeout`` in pyproject, pytest-timeout), set-up and
  teardown included; a test marked ``slow`` (a fault-injection scenario, whose own waits allow
  for a loaded machine) has 180 s; a test that really needs another deadline says so with
  ``@pytest.mark.timeout(seconds)``. Wait on events with a deadline (``tests.helpers.poll``),
  never with long sleeps, and assert no durations: performance belongs in ``lis-async bench``.
* **Parallel.** The suite runs on several pytest-xdist workers (``-n`` in addopts,
  ``--dist loadgroup``), so tests run beside others from other files. Each test uses its own
  names (a fresh connector id: its own queues; a fresh Redis key prefix in database 0, or a
  database number no other test uses: 11 for tests/e2e/test_dashboard.py, 14 for
  tests/integration/test_daily_budget_cluster.py), its own loopback
  ports (port 0 or ``tests.helpers.free_port``) and ``tmp_path``; it never flushes Redis nor
  changes the broker's settings. Reading the broker's lists filtered by the test's own queue
  names (``tests.helpers.queue_depth``) is safe beside others. A test that cannot keep to this
  (broker-wide effects, a shared file or fixed port, a costly module fixture) takes an
  ``xdist_group`` mark: the tests of one group run one after the other on one worker. Groups:

  - ``broker_connections``: tests that close connections from the broker side with
    ``rabbitmqctl eval`` after listing every connection (tests/e2e/test_faults.py).
  - ``amqp_tls``: tests/integration/test_amqp_tls.py, one private TLS RabbitMQ node per module.
  - ``short_timeout_broker``: the consumer_timeout tests (tests/e2e/test_lanes.py), one private
    node with a 6 s consumer_timeout (never lowered on the machine's broker: that would close
    the channels of every other test running meanwhile).

  Run a file, or anything timing-sensitive, in one process with ``-n 0`` to rule the parallel
  load out.
* **Warnings.** A ``DeprecationWarning`` raised from ``lis_async`` code fails the test; other
  libraries' deprecations are ignored.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Iterator
from typing import Any

import pytest

from lis_async.ops.logs import THIRD_PARTY_LOGGERS

#: The loggers whose level :func:`lis_async.ops.logs.setup_logging` sets.
_LOGGERS = ("", "lis_async", *THIRD_PARTY_LOGGERS)

#: The services a mark needs: (name, address, what to send, what the answer starts with).
_SERVICES: dict[str, tuple[str, tuple[str, int], bytes, bytes]] = {
    # AMQP 0-9-1's protocol header; the broker answers with a method frame (Connection.Start).
    "rabbitmq": ("RabbitMQ", ("127.0.0.1", 5672), b"AMQP\x00\x00\x09\x01", b"\x01"),
    "redis": ("Redis", ("127.0.0.1", 6379), b"PING\r\n", b"+PONG"),
}
_HOW_TO_START = (
    "Start them (`bash .ci/run` starts both, then runs the suite), or leave their tests out: "
    "python3 -m pytest -m 'not rabbitmq and not redis'."
)


def _answers(address: tuple[str, int], hello: bytes, expected: bytes) -> str | None:
    """None if the service at ``address`` answers ``hello`` as expected; else what went wrong."""
    try:
        with socket.create_connection(address, timeout=5) as sock:
            sock.settimeout(5)
            sock.sendall(hello)
            answer = sock.recv(len(expected))
    except OSError as exc:
        return f"{type(exc).__name__}: {exc}"
    return None if answer == expected else f"unexpected answer {answer!r}"


class _ServicesMissing(pytest.Item):
    """Stands for the whole selection when a service it needs is missing: one failure, one
    message. (Every xdist worker collects the same single item, so it runs once.)"""

    message = ""

    def runtest(self) -> None:
        raise RuntimeError(self.message)

    def repr_failure(self, excinfo: Any, style: Any = None) -> str:
        return self.message

    def reportinfo(self) -> tuple[Any, int | None, str]:
        return self.path, None, self.name


#: The deadline of a test marked ``slow`` without a ``timeout`` mark of its own, seconds.
SLOW_TIMEOUT_S = 180


@pytest.hookimpl(trylast=True)  # after -m / -k deselection: only what will run counts
def pytest_collection_modifyitems(
    session: pytest.Session, config: pytest.Config, items: list[pytest.Item]
) -> None:
    for item in items:
        if item.get_closest_marker("slow") and not item.get_closest_marker("timeout"):
            item.add_marker(pytest.mark.timeout(SLOW_TIMEOUT_S))
    needed = [m for m in _SERVICES if any(item.get_closest_marker(m) for item in items)]
    missing = []
    for mark in needed:
        name, address, hello, expected = _SERVICES[mark]
        problem = _answers(address, hello, expected)
        if problem is not None:
            count = sum(1 for item in items if item.get_closest_marker(mark))
            missing.append(
                f"  {name} on {address[0]}:{address[1]} ({problem}): needed by {count} "
                f"selected test(s) marked {mark!r}"
            )
    if missing:
        item = _ServicesMissing.from_parent(session, name="services the selected tests need")
        item.message = "\n".join(["Not reachable:", *missing, _HOW_TO_START])
        items[:] = [item]


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    """Undo what a test's in-process ``setup_logging`` did (the demo, the CLI, the logging
    tests): it replaces the root handlers with one on the test's captured stderr, which pytest
    closes after the test, so every later test's log records would be lost ("I/O operation on
    closed file") and pytest's own capture with them."""
    root = logging.getLogger()
    # pytest adds and removes its own capture handlers around each phase: keep the current
    # phase's ones, put back everything else as it was.
    before = [h for h in root.handlers if not _pytests(h)]
    levels = {name: logging.getLogger(name).level for name in _LOGGERS}
    yield
    root.handlers[:] = before + [h for h in root.handlers if _pytests(h)]
    for name, level in levels.items():
        logging.getLogger(name).setLevel(level)


def _pytests(handler: logging.Handler) -> bool:
    return type(handler).__module__.startswith("_pytest")
