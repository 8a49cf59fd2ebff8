"""Process handling and the small statistics the benchmark needs (no extra dependency)."""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import signal
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO, Any

import psutil

RSS_SAMPLE_S = 0.2
#: pids of the subprocesses still running, for the last-resort cleanup in ``kill_leftovers``.
_LIVE: dict[int, str] = {}


def cpu_seconds(proc: psutil.Process) -> float:
    """User + system CPU seconds of ``proc`` (all its threads)."""
    t = proc.cpu_times()
    return float(t.user + t.system)


def find_rabbitmq() -> psutil.Process | None:
    """RabbitMQ's ``beam.smp`` if this machine runs one and its CPU times are readable."""
    for proc in psutil.process_iter(["name"]):
        if proc.info.get("name") == "beam.smp":
            try:
                cpu_seconds(proc)
            except (psutil.AccessDenied, psutil.NoSuchProcess):
                continue
            return proc
    return None


def find_listener(name: str, port: int) -> psutil.Process | None:
    """The process called ``name`` listening on TCP ``port``, if its CPU times are readable
    (e.g. the ``redis-server`` behind a Redis URL)."""
    for proc in psutil.process_iter(["name"]):
        if not str(proc.info.get("name") or "").startswith(name):
            continue
        try:
            conns = proc.net_connections("tcp")
            if any(c.status == psutil.CONN_LISTEN and c.laddr.port == port for c in conns):
                cpu_seconds(proc)
                return proc
        except (psutil.AccessDenied, psutil.NoSuchProcess):
            continue
    return None


def busiest_window(times: Sequence[float], width_s: float = 1.0) -> int:
    """The most events in any window of ``width_s`` seconds: sliding (every half-open
    ``[t, t + width)``), not fixed buckets."""
    return busiest_window_at(times, width_s)[0]


def busiest_window_at(times: Sequence[float], width_s: float = 1.0) -> tuple[int, float]:
    """:func:`busiest_window`, and the time of the first event of that window (NaN if none)."""
    ordered = sorted(times)
    best, at, start = 0, math.nan, 0
    for end, t in enumerate(ordered):
        while ordered[start] <= t - width_s:
            start += 1
        if end - start + 1 > best:
            best, at = end - start + 1, ordered[start]
    return best, at


def slope_per_s(times: Sequence[float]) -> float:
    """Events per second sustained over ``times``: the least-squares slope of the running count
    against time. Unlike a count over a fixed span it does not depend on where the span cuts a
    rate limiter's bursts. NaN with fewer than two distinct times."""
    ordered = sorted(times)
    return slope(ordered, range(1, len(ordered) + 1))


def slope(xs: Sequence[float], ys: Sequence[float]) -> float:
    """The least-squares slope of ``ys`` against ``xs``; NaN with fewer than two distinct xs."""
    n = len(xs)
    if n < 2:
        return math.nan
    mean_x, mean_y = sum(xs) / n, sum(ys) / n
    var = sum((x - mean_x) ** 2 for x in xs)
    if var == 0:
        return math.nan
    return sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys, strict=True)) / var


def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile (``q`` in 0..100) of ``values``; NaN when empty."""
    if not values:
        return math.nan
    data = sorted(values)
    if len(data) == 1:
        return data[0]
    pos = (len(data) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(data) - 1)
    return data[lo] + (data[hi] - data[lo]) * (pos - lo)


def censored_percentile(
    known: Sequence[float], waiting: Sequence[float], q: float
) -> tuple[float, bool]:
    """Percentile ``q`` of durations of which ``known`` were measured and ``waiting`` had not
    ended, each known only to exceed the time it had waited; the figure and whether it is only
    a lower bound.

    Each waiting duration counted at its time so far gives a lower bound of every percentile
    (a percentile never decreases when a value grows). It is the percentile itself when the
    values it reads are known durations shorter than every waiting one: those keep their
    rank whatever the waiting ones turn out to be. NaN (not a bound) when there is no value.
    """
    if not waiting:
        return percentile(known, q), False
    data = sorted([*known, *waiting])
    floor = min(waiting)
    certain = sum(1 for v in known if v < floor)
    pos = (len(data) - 1) * q / 100.0
    needed = math.ceil(pos) if pos > math.floor(pos) else math.floor(pos)
    return percentile(data, q), needed >= certain


def summary_ms(seconds: Sequence[float]) -> dict[str, float] | None:
    """p50/p95/p99/mean/max of durations given in seconds, in milliseconds."""
    if not seconds:
        return None
    return {
        "n": float(len(seconds)),
        "p50": percentile(seconds, 50) * 1000,
        "p95": percentile(seconds, 95) * 1000,
        "p99": percentile(seconds, 99) * 1000,
        "mean": sum(seconds) / len(seconds) * 1000,
        "max": max(seconds) * 1000,
    }


class Child:
    """A connector subprocess: started in its own session (a Ctrl-C on the terminal reaches the
    benchmark only, which then stops it), output to a log file, RSS sampled every 0.2 s."""

    def __init__(
        self, name: str, argv: Sequence[str], env: Mapping[str, str], log_path: Path
    ) -> None:
        self.name = name
        self.argv = list(argv)
        self.env = dict(env)
        self.log_path = log_path
        self.proc: asyncio.subprocess.Process | None = None
        self.ps: psutil.Process | None = None
        self.peak_rss = 0
        #: RSS at each whole second since the start (bytes)
        self.rss_series: list[int] = []
        self.returncode: int | None = None
        self._log: IO[bytes] | None = None
        self._sampler: asyncio.Task[None] | None = None

    @property
    def pid(self) -> int:
        return self.proc.pid if self.proc is not None else -1

    async def start(self) -> None:
        self._log = self.log_path.open("wb")
        self.proc = await asyncio.create_subprocess_exec(
            *self.argv,
            env=self.env,
            cwd=str(self.log_path.parent),  # never pick up a stray ./config.yml
            stdin=asyncio.subprocess.DEVNULL,
            stdout=self._log,
            stderr=asyncio.subprocess.STDOUT,
            start_new_session=True,
        )
        _LIVE[self.proc.pid] = self.name
        self.ps = psutil.Process(self.proc.pid)
        self._sampler = asyncio.create_task(self._sample_rss())

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.returncode is None

    async def _sample_rss(self) -> None:
        started = time.monotonic()
        while self.ps is not None:
            with contextlib.suppress(psutil.Error):
                rss = int(self.ps.memory_info().rss)
                self.peak_rss = max(self.peak_rss, rss)
                if len(self.rss_series) <= time.monotonic() - started:
                    self.rss_series.append(rss)
            await asyncio.sleep(RSS_SAMPLE_S)

    def cpu_s(self) -> float:
        assert self.ps is not None
        return cpu_seconds(self.ps)

    def log_tail(self, lines: int = 25) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    async def stop(self, timeout_s: float = 10.0) -> int | None:
        """SIGTERM, then SIGKILL after ``timeout_s``; idempotent."""
        proc = self.proc
        if self._sampler is not None:
            self._sampler.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sampler
            self._sampler = None
        if proc is not None:
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGTERM)
                try:
                    await asyncio.wait_for(proc.wait(), timeout_s)
                except TimeoutError:
                    with contextlib.suppress(ProcessLookupError):
                        proc.kill()
                    await proc.wait()
            self.returncode = proc.returncode
            _LIVE.pop(proc.pid, None)
        if self._log is not None:
            self._log.close()
            self._log = None
        return self.returncode


def kill_leftovers() -> list[str]:
    """SIGKILL any subprocess a crashed or interrupted run left behind; return their names."""
    killed: list[str] = []
    for pid, name in list(_LIVE.items()):
        _LIVE.pop(pid, None)
        try:
            proc = psutil.Process(pid)
            if proc.ppid() != os.getpid():
                continue  # already reaped; the pid may have been reused
            proc.kill()
            killed.append(name)
        except psutil.Error:
            continue
    return killed


def machine_busy_s() -> float:
    """CPU seconds the whole machine spent busy (every core, every process) since boot."""
    t = psutil.cpu_times()
    fields = ("user", "nice", "system", "irq", "softirq", "steal")  # guest time is in user
    return float(sum(getattr(t, f, 0.0) for f in fields))


class Stopwatch:
    """CPU seconds of a set of processes (and of the whole machine, as ``"machine"``) between
    ``start()`` and ``stop()``."""

    def __init__(self, procs: Mapping[str, psutil.Process | None]) -> None:
        self.procs = {k: v for k, v in procs.items() if v is not None}
        self._start: dict[str, float] = {}
        self.elapsed: dict[str, float] = {}
        self.wall_start = 0.0
        self.wall_s = 0.0

    def _read(self) -> dict[str, float]:
        out: dict[str, float] = {"machine": machine_busy_s()}
        for name, proc in self.procs.items():
            with contextlib.suppress(psutil.Error):
                out[name] = cpu_seconds(proc)
        return out

    def start(self) -> None:
        self.wall_start = time.monotonic()
        self._start = self._read()

    def stop(self) -> dict[str, float]:
        self.wall_s = time.monotonic() - self.wall_start
        end = self._read()
        self.elapsed = {k: end[k] - self._start[k] for k in end if k in self._start}
        return self.elapsed


def machine() -> dict[str, Any]:
    """The machine a record was measured on."""
    import platform
    import sys
    from datetime import UTC, datetime

    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    mem = psutil.virtual_memory().total
    load = [round(x, 2) for x in psutil.getloadavg()]
    return {
        "cpu_count": os.cpu_count(),
        "cpu_model": model or platform.processor(),
        "memory_gb": round(mem / 2**30, 1),
        "python": sys.version.split()[0],
        "implementation": platform.python_implementation(),
        "platform": platform.platform(),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "load_average_at_end": load,
    }
