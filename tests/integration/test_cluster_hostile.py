"""Cluster mode trusts nothing it reads from Redis (issue #20, findings 1 and 2;
docs/security.md#cluster-mode-and-redis). Each test plants what someone else with write access
to the Redis could, in a redis-server of the module's own, and checks that lookups still get
LastInfoSec's answer, the limiter still grants, and the replica count stays sane."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import resource
import shlex
import time
import uuid
import zlib
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis.asyncio as aioredis
from redis.exceptions import NoPermissionError

from lis_async.cluster.cache import SharedAnswerCache
from lis_async.cluster.limiter import ClusterLimiter
from lis_async.cluster.link import MAX_REPLICAS, RedisLink
from lis_async.lastinfosec import LastInfoSecClient
from lis_async.lastinfosec.cache import CachedAnswer
from lis_async.settings.model import Settings
from lis_async.sim.lastinfosec import LastInfoSecSim, LisSimConfig
from tests.helpers import PrivateRedis, cluster_settings

VALUE = "bad.example.com"
ENDPOINT = "search_host"


@pytest.fixture(scope="module")
def redis_server() -> Iterator[PrivateRedis]:
    with PrivateRedis() as server:
        yield server


@pytest.fixture
async def lis() -> AsyncIterator[LastInfoSecSim]:
    async with LastInfoSecSim(LisSimConfig(known_share=1.0, bundle_size=12)) as sim:
        yield sim


@pytest.fixture
async def raw(redis_server: PrivateRedis) -> AsyncIterator[aioredis.Redis]:
    """A plain client: what a hostile writer has."""
    client = aioredis.from_url(redis_server.url)
    yield client
    await client.aclose()


class Replica:
    """A replica's cluster parts and LastInfoSec client (a fresh in-process cache each time)."""

    def __init__(self, s: Settings) -> None:
        self.settings = s
        self.link = RedisLink(s)
        self.shared = SharedAnswerCache.of(self.link, s)
        self.client = LastInfoSecClient(s.lastinfosec, trust_env=False, shared_cache=self.shared)

    def answer_key(self, value: str = VALUE) -> str:
        digest = hashlib.sha256(value.encode()).hexdigest()
        return self.link.key("answer", ENDPOINT, digest)

    def signed(
        self, found: bool, bundles: Any, ttl_s: float = 60.0, raw: bytes | None = None
    ) -> bytes:
        """An entry signed with the replicas' key: what a replica with looser limits, or a
        writer who holds REDIS_CACHE_KEY, could store."""
        packed = raw if raw is not None else zlib.compress(orjson.dumps(bundles), 1)
        answer = CachedAnswer(found, packed, VALUE, ENDPOINT)
        return self.shared._encode(self.answer_key(), answer, round(ttl_s * 1000))

    async def lookup(self, value: str = VALUE) -> Any:
        async with LastInfoSecClient(
            self.settings.lastinfosec, trust_env=False, shared_cache=self.shared
        ) as client:
            return await asyncio.wait_for(client.lookup_value(ENDPOINT, value), 20)

    async def close(self) -> None:
        await self.link.close()


@pytest.fixture
async def replica(redis_server: PrivateRedis, lis: LastInfoSecSim) -> AsyncIterator[Replica]:
    s = cluster_settings(
        redis_server.url,
        LASTINFOSEC_BASE_URL=str(lis.base_url),
        LASTINFOSEC_BACKOFF_MAX_S="0.5",
        LASTINFOSEC_RATE_PER_S="1000",
    )
    r = Replica(s)
    yield r
    await r.close()


def rejected(caplog: pytest.LogCaptureFixture, key: str) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.levelno == logging.WARNING and "rejected" in r.getMessage() and key in r.getMessage()
    ]


def bundle(objects: int) -> dict[str, Any]:
    return {
        "type": "bundle",
        "id": f"bundle--{uuid.uuid4()}",
        "objects": [{"type": "indicator", "id": f"indicator--{i}"} for i in range(objects)],
    }


def zlib_bomb(head: bytes, mib: int) -> bytes:
    """A zlib stream of ``head`` then ``mib`` MiB of blanks, about 1 KB per MiB: one 1 MiB
    block compressed once (after a full flush, blocks decode on their own) and repeated."""
    packer = zlib.compressobj(9, zlib.DEFLATED, -15)
    first = packer.compress(head) + packer.flush(zlib.Z_FULL_FLUSH)
    chunk = b" " * (1 << 20)
    block = packer.compress(chunk) + packer.flush(zlib.Z_FULL_FLUSH)
    tail = packer.flush(zlib.Z_FINISH)
    check = zlib.adler32(head)
    for _ in range(mib):
        check = zlib.adler32(chunk, check)
    return b"\x78\xda" + first + block * mib + tail + check.to_bytes(4, "big")


async def assert_asked_again(
    replica: Replica, lis: LastInfoSecSim, caplog: pytest.LogCaptureFixture, raw: aioredis.Redis
) -> None:
    """The planted entry was refused: LastInfoSec was asked, its answer used and stored in
    place of the planted one, and a warning named the key."""
    asked = lis.stats.total
    result = await replica.lookup()
    assert result.found and len(result.bundles) == 1 and len(result.bundles[0]["objects"]) == 12
    assert lis.stats.total == asked + 1
    assert rejected(caplog, replica.answer_key()), caplog.text
    stored = await raw.get(replica.answer_key())
    assert isinstance(stored, bytes) and stored.startswith(b"L1")
    assert 0 < await raw.pttl(replica.answer_key()) <= 3_600_000
    assert replica.link.shared  # nothing of it was taken for a Redis failure


# ------------------------------------------------------------------------------------------
# the answer cache


async def test_a_memory_bomb_is_never_inflated(
    replica: Replica, lis: LastInfoSecSim, raw: aioredis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    """Finding: a 1 MB compressed entry took the worker from 55 MiB to 2.1 GiB. Signed or not,
    it is inflated at most to LASTINFOSEC_MAX_ANSWER_BYTES (4 MiB), then refused."""
    caplog.set_level(logging.WARNING, "lis_async")
    bomb = zlib_bomb(b'[{"type":"bundle","objects":[', 1024)  # 1 GiB of blanks
    assert len(bomb) < 2 << 20
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB
    for entry in (replica.signed(True, None, raw=bomb), b"L1" + bomb, b"F" + bomb):
        await raw.set(replica.answer_key(), entry, px=60_000)
        await assert_asked_again(replica, lis, caplog, raw)
        caplog.clear()
    grown_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert grown_mib < 100, grown_mib


async def test_an_entry_of_50000_objects_is_refused(
    replica: Replica, lis: LastInfoSecSim, raw: aioredis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    """Finding: a 150 KB entry of 50,000 objects was accepted (limit 5,000) and became 100,002
    push messages. The HTTP path's object bound applies to entries, signed ones included."""
    caplog.set_level(logging.WARNING, "lis_async")
    entry = replica.signed(True, [bundle(50_000)])
    await raw.set(replica.answer_key(), entry, px=60_000)
    await assert_asked_again(replica, lis, caplog, raw)
    assert "more than LASTINFOSEC_MAX_ANSWER_OBJECTS" in rejected(caplog, replica.answer_key())[0]


async def test_an_entry_nested_too_deep_is_refused(
    replica: Replica, lis: LastInfoSecSim, raw: aioredis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, "lis_async")
    deep: Any = "x"
    for _ in range(200):
        deep = {"a": deep}
    entry = replica.signed(True, [{"type": "bundle", "objects": [deep]}])
    await raw.set(replica.answer_key(), entry, px=60_000)
    await assert_asked_again(replica, lis, caplog, raw)


@pytest.mark.parametrize("expiry", ["none", "too long"])
async def test_an_entry_without_expiry_or_with_a_longer_one_is_asked_again(
    expiry: str,
    replica: Replica,
    lis: LastInfoSecSim,
    raw: aioredis.Redis,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Finding: a planted entry with no expiry was served forever. A real entry whose TTL was
    removed (or stretched past LASTINFOSEC_CACHE_TTL_S) is refused."""
    caplog.set_level(logging.WARNING, "lis_async")
    await replica.lookup()  # a genuine entry, signed by this replica
    key = replica.answer_key()
    if expiry == "none":
        assert await raw.persist(key)
    else:
        assert await raw.pexpire(key, 10 * 86_400_000)
    await assert_asked_again(replica, lis, caplog, raw)


async def test_a_replayed_entry_past_its_signed_expiry_is_refused(
    replica: Replica, lis: LastInfoSecSim, raw: aioredis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, "lis_async")
    old = replica.signed(True, [bundle(3)], ttl_s=-1)  # its life ended a second ago
    await raw.set(replica.answer_key(), old, px=60_000)
    await assert_asked_again(replica, lis, caplog, raw)


async def test_an_entry_moved_from_another_value_is_refused(
    replica: Replica, lis: LastInfoSecSim, raw: aioredis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    """A genuine not-found entry of another value, copied under this value's key."""
    caplog.set_level(logging.WARNING, "lis_async")
    lis.config.unknown_values.add("nothing.example.org")
    assert not (await replica.lookup("nothing.example.org")).found
    other = await raw.get(replica.answer_key("nothing.example.org"))
    assert other is not None
    await raw.set(replica.answer_key(), other, px=60_000)
    await assert_asked_again(replica, lis, caplog, raw)


@pytest.mark.parametrize("form", ["legacy", "unsigned", "no expiry"])
async def test_a_planted_not_found_does_not_stop_enrichment(
    form: str,
    replica: Replica,
    lis: LastInfoSecSim,
    raw: aioredis.Redis,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Finding: a planted "not found" entry stopped enrichment of that value."""
    caplog.set_level(logging.WARNING, "lis_async")
    empty = zlib.compress(b"[]")
    key = replica.answer_key()
    if form == "legacy":  # what the previous version accepted
        await raw.set(key, b"N" + empty)
    elif form == "unsigned":
        await raw.set(key, b"L1" + bytes(32) + b"N" + bytes(8) + empty, px=60_000)
    else:
        await raw.set(key, replica.signed(False, []))  # no expiry
    await assert_asked_again(replica, lis, caplog, raw)


@pytest.mark.parametrize("form", ["random bytes", "bad zlib", "bad json", "a hash", "a list"])
async def test_an_unreadable_entry_is_asked_again(
    form: str,
    replica: Replica,
    lis: LastInfoSecSim,
    raw: aioredis.Redis,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Finding: an unreadable entry raised a zlib or JSON error out of the client, and every
    job for the value ended as an internal error."""
    caplog.set_level(logging.WARNING, "lis_async")
    key = replica.answer_key()
    if form == "random bytes":
        await raw.set(key, os.urandom(5000), px=60_000)
    elif form == "bad zlib":
        await raw.set(key, replica.signed(True, None, raw=os.urandom(300)), px=60_000)
    elif form == "bad json":
        await raw.set(key, replica.signed(True, None, raw=zlib.compress(b"[{,")), px=60_000)
    elif form == "a hash":
        await raw.hset(key, mapping={"F": "1"})
    else:
        await raw.rpush(key, "x", "y")
    await assert_asked_again(replica, lis, caplog, raw)


async def test_a_planted_lease_without_expiry_does_not_hold_lookups(
    replica: Replica, lis: LastInfoSecSim, raw: aioredis.Redis
) -> None:
    """A lease no replica took (no expiry) would make every replica wait REDIS_COALESCE_WAIT_S
    (30 s) for an answer that never comes: it is dropped and taken."""
    digest = hashlib.sha256(VALUE.encode()).hexdigest()
    await raw.set(replica.link.key("lease", ENDPOINT, digest), "someone")
    asked = lis.stats.total
    assert (await replica.lookup()).found
    assert replica.shared.stats.waits == 0 and lis.stats.total == asked + 1


async def test_an_oversized_entry_is_deleted_before_it_is_read(
    replica: Replica, lis: LastInfoSecSim, raw: aioredis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, "lis_async")
    await raw.set(replica.answer_key(), b"L1" + b"\0" * (6 << 20), px=60_000)  # 6 MiB
    await assert_asked_again(replica, lis, caplog, raw)
    assert "larger than any answer" in rejected(caplog, replica.answer_key())[0]


async def test_the_warning_names_the_key_never_the_value(
    replica: Replica, raw: aioredis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, "lis_async")
    await raw.set(replica.answer_key(), b"garbage", px=60_000)
    await replica.lookup()
    assert rejected(caplog, replica.answer_key())
    assert VALUE not in caplog.text


# ------------------------------------------------------------------------------------------
# the limiter


def limiter_of(replica: Replica, **kw: Any) -> ClusterLimiter:
    return ClusterLimiter(replica.link, 100, max_pause_s=0.5, **kw)


@pytest.mark.parametrize("pause", ["1e18", "99999999999999999999", "inf", "abc", "a list"])
async def test_a_planted_pause_holds_at_most_the_backoff_maximum(
    pause: str, replica: Replica, raw: aioredis.Redis
) -> None:
    """Finding: a planted 429 pause with no expiry stalled every replica ("no grant after
    5 s"). A pause is never longer than LASTINFOSEC_BACKOFF_MAX_S (0.5 s here); a value that
    is no number is no pause."""
    key = replica.link.key("rate", "pause")
    if pause == "a list":
        await raw.rpush(key, "1")
    else:
        await raw.set(key, pause)
    limiter = limiter_of(replica)
    await asyncio.wait_for(limiter.acquire(), 5)
    await asyncio.wait_for(limiter.acquire(urgent=True), 5)
    assert limiter.granted_shared == 2 and replica.link.shared


async def test_a_planted_schedule_and_urgent_marks_from_the_future_are_dropped(
    replica: Replica, raw: aioredis.Redis
) -> None:
    far = 10**18
    schedule = replica.link.key("rate", "schedule")
    await raw.set(schedule, str(far))
    await raw.zadd(replica.link.key("rate", "urgent"), {"someone": far})
    limiter = limiter_of(replica)
    await asyncio.wait_for(limiter.acquire(), 5)  # not urgent: a live mark would hold it
    assert limiter.granted_shared == 1
    stamp = await raw.get(schedule)
    assert stamp is not None and int(stamp) < far


@pytest.mark.parametrize("planted", ["nan", "abc", "-1e400"])
async def test_a_non_numeric_schedule_is_reset(
    planted: str, replica: Replica, raw: aioredis.Redis
) -> None:
    await raw.set(replica.link.key("rate", "schedule"), planted)
    limiter = limiter_of(replica)
    await asyncio.wait_for(limiter.acquire(), 5)
    assert limiter.granted_shared == 1 and replica.link.shared


async def test_planted_keys_of_another_type_are_replaced(
    replica: Replica, raw: aioredis.Redis
) -> None:
    await raw.zadd(replica.link.key("rate", "schedule"), {"x": 1e9})
    await raw.hset(replica.link.key("rate", "urgent"), mapping={"a": "1"})
    await raw.set(replica.link.key("rate", "second"), "1e9")
    limiter = limiter_of(replica)
    await asyncio.wait_for(limiter.acquire(), 5)
    assert limiter.granted_shared == 1 and replica.link.shared


async def test_a_pause_of_ours_is_still_honoured(replica: Replica) -> None:
    """The clamp does not disable 429 pauses: another replica's pause holds this one."""
    first, second = limiter_of(replica), limiter_of(replica)
    await first.acquire()
    await first.pause(0.4)
    started = time.monotonic()
    await asyncio.wait_for(second.acquire(), 5)
    assert time.monotonic() - started >= 0.3


# ------------------------------------------------------------------------------------------
# the replica registry


@pytest.mark.parametrize("peak", ["1000000", "abc", "1e400", "-5", "2.5"])
async def test_a_planted_replica_count_is_treated_as_absent(
    peak: str, replica: Replica, raw: aioredis.Redis
) -> None:
    """Finding: a planted count of 1,000,000 set the fallback rate to 1e-5 req/s; a non-numeric
    one killed the registry task silently."""
    await raw.set(replica.link.key("replicas", "peak"), peak, ex=600)
    await replica.link.register_replica()
    assert replica.link.stats.replicas_seen == 1
    assert limiter_of(replica).fallback_share == 1.0
    assert await raw.get(replica.link.key("replicas", "peak")) == b"1"


async def test_a_peak_without_expiry_is_not_kept(replica: Replica, raw: aioredis.Redis) -> None:
    await raw.set(replica.link.key("replicas", "peak"), "40")
    await replica.link.register_replica()
    assert replica.link.stats.replicas_seen == 1


async def test_the_replica_count_is_bounded(replica: Replica, raw: aioredis.Redis) -> None:
    key = replica.link.key("replicas")
    now = time.time()
    await raw.zadd(key, {f"r{i}": now for i in range(1000)})  # a thousand "live" replicas
    await raw.zadd(key, {f"future{i}": 10**12 for i in range(1000)})
    await replica.link.register_replica()
    assert replica.link.stats.replicas_seen == MAX_REPLICAS
    assert await raw.zcount(key, 10**12, 10**12) == 0


async def test_a_registry_of_another_type_is_replaced(
    replica: Replica, raw: aioredis.Redis
) -> None:
    await raw.set(replica.link.key("replicas"), "1000000")
    await raw.rpush(replica.link.key("replicas", "peak"), "9")
    await replica.link.register_replica()
    assert replica.link.stats.replicas_seen == 1 and replica.link.shared


async def test_a_non_numeric_value_does_not_stop_the_maintenance_loop(
    replica: Replica, raw: aioredis.Redis
) -> None:
    await raw.set(replica.link.key("replicas", "peak"), "not a number")
    task = asyncio.create_task(replica.link.maintain())
    try:
        await asyncio.sleep(0.3)
        assert not task.done()
        assert replica.link.stats.replicas_seen == 1
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


# ------------------------------------------------------------------------------------------
# the ACL user docs/security.md documents


def documented_acl_line() -> str:
    text = (Path(__file__).resolve().parents[2] / "docs" / "security.md").read_text()
    lines = [line for line in text.splitlines() if line.startswith("ACL SETUSER lis-async ")]
    assert len(lines) == 1
    return lines[0]


async def test_the_documented_acl_user_is_enough_and_confined(
    redis_server: PrivateRedis, lis: LastInfoSecSim, raw: aioredis.Redis
) -> None:
    connector_id = str(uuid.uuid4())
    password = "acl-" + uuid.uuid4().hex
    line = documented_acl_line().replace("<connector id>", connector_id)
    line = line.replace("CHANGE-ME-to-a-long-random-password", password)
    await raw.execute_command(*shlex.split(line))
    url = f"redis://lis-async:{password}@127.0.0.1:{redis_server.port}/3"
    s = cluster_settings(
        url,
        f"lis-async:{connector_id}",
        CONNECTOR_ID=connector_id,
        LASTINFOSEC_BASE_URL=str(lis.base_url),
        LASTINFOSEC_RATE_PER_S="1000",
    )
    r = Replica(s)
    try:
        assert await r.link.check()
        await r.link.warm_up(2)
        await r.link.register_replica()
        limiter = ClusterLimiter(r.link, 1000, max_pause_s=0.5)
        await limiter.acquire()
        await limiter.acquire(urgent=True)
        await limiter.pause(0.01)
        limiter._restamp()
        assert (await r.lookup()).found  # miss, lease, LastInfoSec, write
        assert (await r.lookup()).found and r.shared.stats.hits == 1
        await r.link.client.set(r.answer_key(), b"junk", px=1000)
        assert (await r.lookup()).found and r.shared.stats.rejected == 1
        await asyncio.sleep(0.05)  # the restamp, not awaited
        assert r.link.shared and r.link.stats.errors == 0
        with pytest.raises(NoPermissionError):
            await r.link.client.set("lis-async:another-connector:rate:pause", "1")
    finally:
        await r.close()
