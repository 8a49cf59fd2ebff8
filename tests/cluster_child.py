"""A child process for the cluster-mode tests: one "replica" doing one thing against Redis.

    python -m tests.cluster_child limiter URL PREFIX RATE SECONDS TASKS OUT
        acquire the cluster rate limit from TASKS tasks for SECONDS; write the grant times
    python -m tests.cluster_child lookup URL PREFIX LIS_BASE VALUE OUT
        look VALUE up through a LastInfoSecClient in cluster mode; write the outcome

Run from the repository's root (the tests set cwd); it prints nothing but errors. Once
imported, it writes OUT.ready and waits for the file OUT's folder/go before it starts, so that
replicas started together really run together, however long each took to start.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import sys
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

from lis_async.cluster.cache import SharedAnswerCache
from lis_async.cluster.limiter import ClusterLimiter
from lis_async.cluster.link import RedisLink
from lis_async.lastinfosec import LastInfoSecClient
from tests.helpers import cluster_settings

#: The Redis command timeout of the children: 0.25 s by default, which a busy machine (the
#: suite's other tests beside them) can exceed; these tests are about sharing, not timeouts.
TIMEOUT_ENV = {"REDIS_TIMEOUT_S": "5"}


async def limiter(url: str, prefix: str, rate: str, seconds: str, tasks: str) -> dict[str, Any]:
    link = RedisLink(cluster_settings(url, prefix, **TIMEOUT_ENV))
    lim = ClusterLimiter(link, float(rate))
    grants: list[float] = []
    stop_at = time.time() + float(seconds)

    async def worker() -> None:
        while time.time() < stop_at:
            await lim.acquire()
            grants.append(time.time())

    await asyncio.wait_for(asyncio.gather(*(worker() for _ in range(int(tasks)))), 60)
    await link.close()
    return {"grants": grants, "shared": link.shared}


async def lookup(url: str, prefix: str, base: str, value: str) -> dict[str, Any]:
    settings = cluster_settings(
        url, prefix, LASTINFOSEC_BASE_URL=base, LASTINFOSEC_RATE_PER_S="100", **TIMEOUT_ENV
    )
    link = RedisLink(settings)
    shared = SharedAnswerCache.of(link, settings)
    client = LastInfoSecClient(settings.lastinfosec, trust_env=False, shared_cache=shared)
    async with client:
        result = await client.lookup_value("search_host", value)
    await link.close()
    return {"found": result.found, "stats": dataclasses.asdict(shared.stats)}


def wait_for_the_others(out: Path, timeout_s: float = 60) -> None:
    Path(f"{out}.ready").touch()
    go = out.parent / "go"
    deadline = time.monotonic() + timeout_s
    while not go.exists():
        if time.monotonic() > deadline:
            raise SystemExit(f"no {go} within {timeout_s} s")
        time.sleep(0.01)


if __name__ == "__main__":
    command, *args, out = sys.argv[1:]
    wait_for_the_others(Path(out))
    commands: dict[str, Callable[..., Coroutine[Any, Any, dict[str, Any]]]] = {
        "limiter": limiter,
        "lookup": lookup,
    }
    result = asyncio.run(commands[command](*args))
    Path(out).write_text(json.dumps(result))
