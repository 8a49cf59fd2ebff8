"""Summarise a py-spy ``--format raw`` profile (collapsed stacks) of the worker.

``python -m lis_async.bench.profile FILE [--top N]`` prints, as shares of the samples:

* the lis_async functions with their callees included (where the worker's time goes, by the
  project's own functions),
* self time by library (who burns it: AMQP client, synchronous HTTP, aiohttp, pycti...),
* the hottest functions by self time.

Recorded with ``--gil`` (as ``lis-async bench --profile`` does), a sample is a moment where a
thread held the GIL, so the shares are shares of the interpreter's CPU time.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

_FRAME = re.compile(r"^(?P<func>.*) \((?P<file>[^()]*?)(?::\d+)?\)$")

_AMQP = "AMQP client (aio-pika, aiormq, pamqp)"
_SYNC_HTTP = "GraphQL over sync HTTP in threads (requests, urllib3; env/netrc look-ups incl.)"
_AIOHTTP = "aiohttp (LastInfoSec client)"
_PYCTI = "pycti (splitter, API client)"
_THREADS = "thread hand-offs (concurrent.futures, threading)"
#: A sample is charged to the innermost frame that belongs to one of these packages (so the
#: stdlib work a library does, e.g. asyncio stream writes for aiormq, is charged to it).
LIBRARIES: dict[str, str] = {
    "aio_pika": _AMQP,
    "aiormq": _AMQP,
    "pamqp": _AMQP,
    "requests": _SYNC_HTTP,
    "urllib3": _SYNC_HTTP,
    "aiohttp": _AIOHTTP,
    "yarl": _AIOHTTP,
    "multidict": _AIOHTTP,
    "pycti": _PYCTI,
    "stix2": _PYCTI,
    "prometheus_client": "prometheus_client",
    "orjson": "lis_async itself",
    "lis_async": "lis_async itself",
}
#: Leaf modules charged to themselves whoever called them.
LEAF_CATEGORIES: dict[str, str] = {
    "concurrent": _THREADS,
    "threading": _THREADS,
    "queue": _THREADS,
}
EVENT_LOOP = "event loop (asyncio, uvloop; no library frame on the stack)"


@dataclass(frozen=True)
class Frame:
    func: str
    file: str

    @property
    def label(self) -> str:
        return f"{self.func} ({self.file})"

    @property
    def top(self) -> str:
        name = self.file
        if name.startswith("<frozen "):
            name = name[len("<frozen ") : -1]
        first = name.split("/", 1)[0]
        return first[:-3] if first.endswith(".py") else first


def _library(frames: Sequence[Frame]) -> str:
    leaf = LEAF_CATEGORIES.get(frames[-1].top) if frames else None
    if leaf is not None:
        return leaf
    for frame in reversed(frames):
        lib = LIBRARIES.get(frame.top)
        if lib is not None:
            return lib
    if any(f.top in ("asyncio", "uvloop") for f in frames):
        return EVENT_LOOP
    return f"other ({frames[-1].top})" if frames else "other"


def parse_frame(text: str) -> Frame:
    m = _FRAME.match(text)
    if m is None:
        return Frame(text or "?", "?")
    return Frame(m["func"], m["file"])


@dataclass
class Profile:
    total: int
    self_time: Counter[Frame]
    inclusive: Counter[Frame]
    by_library: Counter[str]

    @classmethod
    def parse(cls, lines: Iterable[str]) -> Profile:
        self_time: Counter[Frame] = Counter()
        inclusive: Counter[Frame] = Counter()
        libraries: Counter[str] = Counter()
        total = 0
        for line in lines:
            line = line.rstrip("\n")
            if not line.strip():
                continue
            stack, _, count = line.rpartition(" ")
            try:
                n = int(count)
            except ValueError:
                continue
            frames = [parse_frame(f) for f in stack.split(";")]
            total += n
            self_time[frames[-1]] += n
            for frame in set(frames):
                inclusive[frame] += n
            libraries[_library(frames)] += n
        return cls(total, self_time, inclusive, libraries)

    def share(self, n: int) -> float:
        return 100.0 * n / self.total if self.total else 0.0

    def project_functions(self, top: int) -> list[tuple[str, float]]:
        """lis_async functions, callees included; entry points (``cli``, ``app.run``) left out."""
        entry = {"main", "cmd_run", "_run_loop", "<module>", "run"}
        rows = [
            (f.label, self.share(n))
            for f, n in self.inclusive.most_common()
            if f.top == "lis_async" and f.func not in entry
        ]
        return rows[:top]

    def libraries(self) -> list[tuple[str, float]]:
        return [(name, self.share(n)) for name, n in self.by_library.most_common()]

    def hottest(self, top: int) -> list[tuple[str, float]]:
        return [(f.label, self.share(n)) for f, n in self.self_time.most_common(top)]


def summarise(path: str | Path, top: int = 15) -> str:
    prof = Profile.parse(Path(path).read_text(errors="replace").splitlines())
    out = [f"{prof.total} samples"]
    sections = (
        ("lis_async functions (callees included)", prof.project_functions(top)),
        ("by library (innermost library frame on the stack)", prof.libraries()[:top]),
        ("hottest functions (self time)", prof.hottest(top)),
    )
    for title, rows in sections:
        out.append("")
        out.append(title)
        out.extend(f"  {pct:5.1f}%  {label}" for label, pct in rows)
    return "\n".join(out)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("file", help="py-spy record --format raw output")
    parser.add_argument("--top", type=int, default=15)
    args = parser.parse_args(argv)
    print(summarise(args.file, args.top))
    return 0


if __name__ == "__main__":
    sys.exit(main())
