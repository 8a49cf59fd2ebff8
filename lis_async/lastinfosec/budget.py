"""The daily LastInfoSec budget: at most ``LASTINFOSEC_DAILY_BUDGET`` requests per UTC day,
across replicas and restarts (docs/lastinfosec.md, Daily budget).

Every HTTP request counts, retries too (LastInfoSec counts arrivals); a cache hit sends nothing
and spends nothing. Auto jobs may use ``budget * (1 - urgent_share)`` of the day; manual and
playbook jobs (urgent) the whole of it.

The day's budget is handed out in small blocks: a replica reserves a block in its
:class:`Ledger` (a state file here, Redis in cluster mode: :mod:`lis_async.cluster.budget`) and
spends it locally. The reservation is the only shared or persisted step, so a crash, a restart or
a Redis outage can waste at most the block in hand, never overspend. While the ledger cannot be
reached, the replica spends only what it holds.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import math
import os
import re
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Final, Protocol

import orjson

from lis_async.errors import LisBudgetSpent
from lis_async.settings.model import LastInfoSecSettings

log: Final = logging.getLogger("lis_async.lastinfosec")

#: The job's message when no request is held and the ledger (Redis) cannot be reached.
UNREACHABLE: Final = (
    "LastInfoSec daily budget cannot be reserved while Redis is unreachable; nothing was sent, "
    "re-enrich later"
)
#: The largest block, as a share of the day's budget: at most 1 % is wasted per crash.
BLOCK_SHARE: Final = 100


class DailyBudget(Protocol):
    """What the client asks before each request (the local budget below, or the cluster's:
    :func:`lis_async.cluster.budget.cluster_budget`)."""

    async def spend(self, urgent: bool = False) -> None:
        """One more request may go to LastInfoSec today. Raises :class:`LisBudgetSpent` when
        the day's budget (its auto share, unless ``urgent``) is spent, or when no request is
        held and the ledger cannot be reached (:data:`UNREACHABLE`)."""
        ...

    @property
    def limits(self) -> tuple[int, int]:
        """(auto jobs' limit, urgent jobs' limit) per day."""
        ...

    def remaining(self) -> tuple[int, int]:
        """(auto, urgent): the requests auto and urgent jobs may still make today."""
        ...


def utc_day() -> date:
    return datetime.now(UTC).date()


@dataclass(frozen=True, slots=True)
class Caps:
    """The day's limits: every request, and the auto jobs' part of them."""

    total: int
    auto: int

    @classmethod
    def of(cls, budget: int, urgent_share: float) -> Caps:
        return cls(budget, math.floor(budget * (1.0 - urgent_share) + 1e-9))


@dataclass(frozen=True, slots=True)
class Tally:
    """What a day's ledger has handed out: in all, and to auto jobs."""

    used: int = 0
    auto: int = 0


def grant(tally: Tally, n: int, urgent: bool, caps: Caps) -> int:
    """How many of ``n`` requests a reservation gets (the same rule as the Redis script in
    :mod:`lis_async.cluster.budget`)."""
    left = caps.total - tally.used
    if not urgent:
        left = min(left, caps.auto - tally.auto)
    return max(0, min(n, left))


class Ledger(Protocol):
    """Where the day's reservations are recorded: the only shared or persisted step."""

    async def reserve(self, day: str, n: int, urgent: bool, caps: Caps) -> tuple[int, Tally] | None:
        """Reserve up to ``n`` requests of ``day`` (YYYY-MM-DD): how many were granted, and
        the day's tally after it. None: the ledger cannot be reached."""
        ...


def block_size(budget: int, rate_per_s: float) -> int:
    """One second of the rate, at most ``budget / BLOCK_SHARE``, at least one request."""
    return max(1, min(math.ceil(rate_per_s), budget // BLOCK_SHARE))


class BlockBudget:
    """:class:`DailyBudget` spending blocks reserved in a :class:`Ledger` (module docstring).

    Two pools are held: blocks reserved by auto requests (counted against the auto part; any
    request may spend them) and by urgent ones (only urgent requests spend them)."""

    def __init__(
        self,
        ledger: Ledger,
        budget: int,
        urgent_share: float,
        block: int,
        *,
        day: Callable[[], date] = utc_day,
    ) -> None:
        self._ledger = ledger
        self.caps = Caps.of(budget, urgent_share)
        self._block = max(1, block)
        self._day = day
        self._lock = asyncio.Lock()  # one reservation at a time
        self._pool_day = ""
        self._auto = 0
        self._urgent = 0
        self._tally_day = ""
        self._tally = Tally()
        self.spent = 0  # requests let through

    @property
    def limits(self) -> tuple[int, int]:
        """(auto jobs' limit, urgent jobs' limit) per day."""
        return self.caps.auto, self.caps.total

    def _take(self, day: str, urgent: bool) -> bool:
        if day != self._pool_day:  # a new UTC day: yesterday's blocks are void
            self._pool_day, self._auto, self._urgent = day, 0, 0
        if urgent and self._urgent > 0:
            self._urgent -= 1
        elif self._auto > 0:
            self._auto -= 1
        else:
            return False
        self.spent += 1
        return True

    async def spend(self, urgent: bool = False) -> None:
        day = self._day().isoformat()
        if self._take(day, urgent):
            return
        async with self._lock:
            if self._take(day, urgent):  # another request reserved meanwhile
                return
            got = await self._ledger.reserve(day, self._block, urgent, self.caps)
            if got is None:
                raise LisBudgetSpent(UNREACHABLE)
            n, tally = got
            self._tally_day, self._tally = day, tally
            if n <= 0:
                raise LisBudgetSpent()
            if day != self._pool_day:
                self._pool_day, self._auto, self._urgent = day, 0, 0
            if urgent:
                self._urgent += n
            else:
                self._auto += n
            self._take(day, urgent)

    def remaining(self) -> tuple[int, int]:
        """(auto, urgent): the requests auto and urgent jobs may still make today, as this
        replica last saw the ledger (its own unspent blocks included)."""
        day = self._day().isoformat()
        tally = self._tally if self._tally_day == day else Tally()
        auto_held, urgent_held = (self._auto, self._urgent) if self._pool_day == day else (0, 0)
        left = max(0, self.caps.total - tally.used)
        auto = min(left, max(0, self.caps.auto - tally.auto)) + auto_held
        urgent = left + auto_held + urgent_held
        return auto, urgent


def file_budget(
    settings: LastInfoSecSettings, connector_id: str, *, block: int | None = None
) -> BlockBudget | None:
    """The daily budget of a worker without Redis (None: no ``daily_budget``), its count in
    ``daily_budget_file`` or :func:`default_state_file`; ``block``: the block size (default
    :func:`block_size`)."""
    if settings.daily_budget is None:
        return None
    path = settings.daily_budget_file
    ledger = FileLedger(Path(path) if path else default_state_file(connector_id))
    size = block or block_size(settings.daily_budget, settings.rate_per_s)
    return BlockBudget(ledger, settings.daily_budget, settings.daily_budget_urgent_share, size)


def default_state_file(connector_id: str) -> Path:
    """``$XDG_STATE_HOME/lis-async/daily-budget-<connector id>.json`` (XDG_STATE_HOME defaults
    to ``~/.local/state``)."""
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", connector_id) or "connector"
    return Path(base) / "lis-async" / f"daily-budget-{safe}.json"


class FileLedger:
    """:class:`Ledger` of a worker without Redis: the day's tally in a small JSON file
    (``{"day": "YYYY-MM-DD", "used": n, "auto": n}``), rewritten atomically (a temporary file,
    then a rename) at each reservation, before the block is spent. Each reservation reads the
    file again under an exclusive lock (``<file>.lock``), so processes sharing the file on one
    host (a worker and ``lis-async check``) count together.

    A file that exists but is not one of ours (not JSON, not counts) counts as today's budget
    spent: it may have held today's tally. A file that cannot be written is said once (WARNING)
    and the worker counts in memory: the budget then holds until the next restart only."""

    def __init__(self, path: Path, *, day: Callable[[], date] = utc_day) -> None:
        self.path = path
        self._lock_path = path.with_name(path.name + ".lock")
        self._day = ""
        self._tally = Tally()
        self.writable = True
        self._warned_garbage = False
        today = day().isoformat()
        with self._locked():
            self._merge(self._read(today))
            self._save_or_warn(self._day or today, self._tally)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """An exclusive lock on ``<file>.lock`` while the file is read and written (none when
        it cannot be opened: the file cannot be written either)."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError:
            yield
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the lock

    def _read(self, today: str) -> tuple[str, Tally] | None:
        """The file's day and tally; None when there is no file to read."""
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            if self.writable:
                log.warning(
                    "daily budget file %s cannot be read (%s): counting from what this worker "
                    "knows",
                    self.path,
                    type(exc).__name__,
                )
            return None
        try:
            data = orjson.loads(raw)
            day, used, auto = data["day"], data["used"], data["auto"]
            valid = isinstance(day, str) and all(type(v) is int and v >= 0 for v in (used, auto))
        except (orjson.JSONDecodeError, TypeError, KeyError):
            valid = False
        if not valid:
            if not self._warned_garbage:
                self._warned_garbage = True
                log.warning(
                    "daily budget file %s is not a budget tally: today's budget counts as "
                    "spent (delete the file to start the day afresh)",
                    self.path,
                )
            return today, Tally(2**62, 2**62)
        return day, Tally(used, auto)

    def _merge(self, read: tuple[str, Tally] | None) -> None:
        """Take the file's tally in: the later day, or the larger counts of the same day."""
        if read is None:
            return
        day, tally = read
        if day > self._day:
            self._day, self._tally = day, tally
        elif day == self._day:
            mine = self._tally
            self._tally = Tally(max(mine.used, tally.used), max(mine.auto, tally.auto))

    def _write(self, day: str, tally: Tally) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        body = orjson.dumps({"day": day, "used": tally.used, "auto": tally.auto})
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".daily-budget-")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(body)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise

    def _save_or_warn(self, day: str, tally: Tally) -> None:
        if not self.writable:
            return
        try:
            self._write(day, tally)
        except OSError as exc:
            self.writable = False
            log.warning(
                "daily budget file %s cannot be written (%s): the daily budget is counted in "
                "memory and starts again at each restart (set LASTINFOSEC_DAILY_BUDGET_FILE "
                "to a writable path, or use Redis)",
                self.path,
                type(exc).__name__,
            )

    def _reserve(self, day: str, n: int, urgent: bool, caps: Caps) -> tuple[int, Tally]:
        with self._locked():
            if self.writable:
                self._merge(self._read(day))
            tally = self._tally if day == self._day else Tally()
            granted = grant(tally, n, urgent, caps)
            if granted > 0:
                tally = Tally(tally.used + granted, tally.auto + (0 if urgent else granted))
                self._day, self._tally = day, tally
                self._save_or_warn(day, tally)  # persisted before it is spent
            return granted, tally

    async def reserve(self, day: str, n: int, urgent: bool, caps: Caps) -> tuple[int, Tally] | None:
        # In a thread: a lock, a read, a write and an fsync, once per block.
        return await asyncio.to_thread(self._reserve, day, n, urgent, caps)
