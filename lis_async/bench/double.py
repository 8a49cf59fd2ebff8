"""The LastInfoSec double in a process of its own (``python -m lis_async.sim.lastinfosec``).

The double stamps each request with the time it arrives, and the bench's rate figures come from
those stamps. In the bench process, whose event loop also publishes jobs and runs the OpenCTI
double and the worker emulation, a request is stamped late whenever that loop is busy, and
several come out in one bunch: during a burst of publishing that inflated the busiest sliding
second by half. In a process of its own, the double stamps requests when they arrive.
"""

from __future__ import annotations

import asyncio
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import aiohttp

from lis_async.bench.config import BenchConfig
from lis_async.bench.measure import Child
from lis_async.bench.processes import free_port, own_env
from lis_async.bench.results import BenchError
from lis_async.sim.lastinfosec import LisSimStats, RecordedRequest
from lis_async.sim.world import SimWorld

READY_TIMEOUT_S: Final = 30.0
#: Reading the statistics of a long run (tens of thousands of requests) takes a while.
STATS_TIMEOUT_S: Final = 20.0


@dataclass
class LisDouble:
    """A LastInfoSec double process shaped like the world's (latency, jitter, bundle size, API
    key), on a free port; workers reach it at :attr:`base_url`."""

    child: Child
    port: int

    @classmethod
    def of(cls, cfg: BenchConfig, world: SimWorld, log_path: Path) -> LisDouble:
        port = free_port()
        argv = [sys.executable, "-m", "lis_async.sim.lastinfosec", "--port", str(port)]
        argv += ["--latency", str(cfg.latency), "--jitter", str(cfg.jitter)]
        argv += ["--bundle-size", str(cfg.bundle_size), "--api-key", world.lis_api_key]
        return cls(Child("lastinfosec double", argv, own_env(), log_path), port)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def base_url(self) -> str:
        """``LASTINFOSEC_BASE_URL`` for a worker."""
        return self.url + "/v2"

    async def start(self) -> None:
        """Start the process and wait until it answers (BenchError if it does not)."""
        await self.child.start()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + READY_TIMEOUT_S
        async with aiohttp.ClientSession() as session:
            while True:
                try:
                    await self.stats(session)
                    return
                except (aiohttp.ClientError, TimeoutError) as exc:
                    if loop.time() > deadline or not self.child.running:
                        raise BenchError(
                            f"the LastInfoSec double does not answer on port {self.port} "
                            f"({exc}); its log:\n{self.child.log_tail()}"
                        ) from None
                    await asyncio.sleep(0.1)

    async def stats(self, session: aiohttp.ClientSession) -> LisSimStats:
        """What the double counted (``GET /_sim/stats``)."""
        return await double_stats(session, self.url)


async def double_stats(session: aiohttp.ClientSession, url: str) -> LisSimStats:
    """The statistics of a LastInfoSec double in another process (``GET /_sim/stats``)."""
    timeout = aiohttp.ClientTimeout(total=STATS_TIMEOUT_S)
    async with session.get(url + "/_sim/stats", timeout=timeout) as resp:
        resp.raise_for_status()
        body = await resp.json()
    return stats_of(body)


def stats_of(body: dict[str, Any]) -> LisSimStats:
    """:class:`LisSimStats` from its ``to_dict()`` (what ``/_sim/stats`` answers)."""
    stats = LisSimStats()
    stats.total = int(body["total"])
    stats.by_status = {int(k): int(v) for k, v in body["by_status"].items()}
    stats.by_endpoint = {str(k): int(v) for k, v in body["by_endpoint"].items()}
    stats.max_concurrent = int(body["max_concurrent"])
    stats.per_window = {int(k): int(v) for k, v in body["per_window"].items()}
    stats.per_window_accepted = {int(k): int(v) for k, v in body["per_window_accepted"].items()}
    fields = ("method", "path", "endpoint", "value", "time", "status")
    stats.requests.extend(RecordedRequest(**{k: q[k] for k in fields}) for q in body["requests"])
    return stats
