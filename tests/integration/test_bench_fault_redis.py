"""The private redis-server of ``lis-async bench --redis-fault``: killed, it loses its data and
comes back on the same port; frozen, it answers nothing; stopped, frozen or not, it is gone
(and the bench's last-resort cleanup knows it while it runs). Needs ``redis-server`` on PATH,
not the machine's Redis."""

from __future__ import annotations

import shutil
from pathlib import Path

import psutil
import pytest
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from lis_async.bench import measure
from lis_async.bench.fault import PrivateRedis

pytestmark = pytest.mark.skipif(
    shutil.which("redis-server") is None, reason="needs redis-server on PATH"
)


async def test_private_redis_kill_freeze_stop(tmp_path: Path) -> None:
    server = PrivateRedis(tmp_path, "phase")
    client = aioredis.from_url(server.url, socket_timeout=0.3, socket_connect_timeout=0.3)
    try:
        await server.start()
        assert server.child is not None
        first = server.child.pid
        assert first in measure._LIVE  # kill_leftovers would find it
        await client.set("k", "v")
        await server.kill()
        assert first not in measure._LIVE and not psutil.pid_exists(first)
        with pytest.raises((RedisError, OSError)):
            await client.ping()
        await server.start()  # the same port, empty
        assert await client.get("k") is None
        assert (tmp_path / "phase-redis-1.log").exists() and server.servers == 2
        server.freeze()
        with pytest.raises((RedisError, TimeoutError)):
            await client.ping()
        second = server.child.pid
        await server.stop()  # frozen: continued, then stopped
        assert server.child is None and not psutil.pid_exists(second)
        await server.stop()  # idempotent
    finally:
        await server.stop()
        await client.aclose()
