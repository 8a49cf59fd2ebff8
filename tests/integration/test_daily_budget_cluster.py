"""The daily LastInfoSec budget in cluster mode: blocks reserved in real Redis (database 14, a
fresh key prefix per test), real clients against the LastInfoSec double on loopback, which counts
what arrives; the UTC day is the test's."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import timedelta
from typing import Any

import pytest

from lis_async.cluster.budget import RedisLedger
from lis_async.cluster.link import RedisLink
from lis_async.errors import LisBudgetSpent
from lis_async.lastinfosec import LastInfoSecClient
from lis_async.lastinfosec.budget import UNREACHABLE, BlockBudget
from lis_async.settings.model import Settings
from lis_async.sim.lastinfosec import LastInfoSecSim, LisSimConfig
from tests.fakes import SPENT, Today
from tests.helpers import cluster_settings, free_port

pytestmark = pytest.mark.redis  # the machine's Redis, database 14

REDIS_DB14 = "redis://127.0.0.1:6379/14"


def settings(lis: LastInfoSecSim, url: str = REDIS_DB14, **env: str) -> Settings:
    assert lis.base_url is not None
    return cluster_settings(
        url,
        f"test-budget-{uuid.uuid4()}",
        LASTINFOSEC_BASE_URL=lis.base_url,
        LASTINFOSEC_CACHE_SIZE="0",
        LASTINFOSEC_RATE_PER_S="1000",
        LASTINFOSEC_RETRY_BUDGET_S="5",
        **env,
    )


@asynccontextmanager
async def replica(
    s: Settings, budget: int, share: float, block: int, day: Today
) -> AsyncIterator[tuple[LastInfoSecClient, BlockBudget, RedisLink]]:
    """One replica's client and budget (no shared cache: every lookup asks LastInfoSec)."""
    link = RedisLink(s)
    b = BlockBudget(RedisLedger(link), budget, share, block, day=day)
    try:
        async with LastInfoSecClient(s.lastinfosec, trust_env=False, budget=b) as c:
            yield c, b, link
    finally:
        await link.close()


async def lookups(c: LastInfoSecClient, prefix: str, n: int, urgent: bool = False) -> int:
    """Up to ``n`` lookups of fresh values; how many the budget let through."""
    done = 0
    for i in range(n):
        try:
            await c.lookup_value("search_host", f"{prefix}-{i}.example.com", urgent=urgent)
        except LisBudgetSpent as exc:
            assert str(exc) == SPENT
            break
        done += 1
    return done


async def test_two_replicas_and_a_restart_send_at_most_the_budget() -> None:
    day = Today()
    async with LastInfoSecSim(LisSimConfig(known_share=1.0)) as lis:
        s = settings(lis)
        async with (
            replica(s, 10, 0.2, 2, day) as (a, _, _),
            replica(s, 10, 0.2, 2, day) as (b, _, _),
        ):
            sent = 0
            for i in range(20):  # the two replicas take turns
                sent += await lookups(a if i % 2 else b, f"auto-{i}", 1)
            assert sent == 8 and lis.stats.total == 8  # the auto part: 10 * (1 - 0.2)
            assert await lookups(a, "auto-a", 5) == 0
        async with replica(s, 10, 0.2, 2, day) as (c, budget, _):  # a restarted replica
            assert await lookups(c, "auto-c", 5) == 0
            assert budget.remaining() == (0, 2)
            assert await lookups(c, "manual", 5, urgent=True) == 2  # the urgent share
            assert await lookups(c, "manual-2", 5, urgent=True) == 0
        assert lis.stats.total == 10


async def test_the_next_utc_day_starts_afresh() -> None:
    day = Today()
    async with LastInfoSecSim(LisSimConfig(known_share=1.0)) as lis:
        s = settings(lis)
        async with replica(s, 3, 0.0, 2, day) as (c, _, link):
            assert await lookups(c, "d1", 10) == 3
            day.day += timedelta(days=1)
            assert await lookups(c, "d2", 10) == 3
            ttl = await link.client.ttl(link.key("budget", "2026-12-08"))
            assert 86_400 < ttl <= 2 * 86_400  # the day's counter expires after two days
        assert lis.stats.total == 6


@pytest.mark.parametrize(
    "plant",
    [
        lambda r, k: r.set(k, "lots"),
        lambda r, k: r.set(k, "-5"),
        lambda r, k: r.set(k, "1.5"),
        lambda r, k: r.set(k, "nan"),
        lambda r, k: r.hset(k, "n", "0"),
        lambda r, k: r.rpush(k, "0"),
    ],
)
async def test_garbage_in_the_redis_counter_never_overspends(plant: Any) -> None:
    day = Today()
    async with LastInfoSecSim(LisSimConfig(known_share=1.0)) as lis:
        s = settings(lis)
        async with replica(s, 10, 0.2, 2, day) as (c, budget, link):
            await plant(link.client, link.key("budget", "2026-12-07"))
            assert await lookups(c, "auto", 5) == 0
            assert await lookups(c, "manual", 5, urgent=True) == 0
            assert budget.remaining() == (0, 0)
        assert lis.stats.total == 0


async def test_garbage_in_the_auto_counter_leaves_the_urgent_share() -> None:
    day = Today()
    async with LastInfoSecSim(LisSimConfig(known_share=1.0)) as lis:
        s = settings(lis)
        async with replica(s, 10, 0.2, 2, day) as (c, _, link):
            await link.client.set(link.key("budget", "2026-12-07", "auto"), "x")
            assert await lookups(c, "auto", 5) == 0
            assert await lookups(c, "manual", 5, urgent=True) == 5
        assert lis.stats.total == 5


async def test_without_redis_a_replica_spends_only_what_it_holds() -> None:
    """Redis unreachable and nothing reserved: nothing is sent, the job is told why."""
    day = Today()
    async with LastInfoSecSim(LisSimConfig(known_share=1.0)) as lis:
        s = settings(lis, f"redis://127.0.0.1:{free_port()}/0", REDIS_TIMEOUT_S="0.2")
        async with replica(s, 10, 0.0, 2, day) as (c, _, _):
            with pytest.raises(LisBudgetSpent) as caught:
                await c.lookup_value("search_host", "down.example.com")
            assert str(caught.value) == UNREACHABLE
        assert lis.stats.total == 0
