"""Fixtures for every test."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest

from lis_async.ops.logs import THIRD_PARTY_LOGGERS

#: The loggers whose level :func:`lis_async.ops.logs.setup_logging` sets.
_LOGGERS = ("", "lis_async", *THIRD_PARTY_LOGGERS)


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
