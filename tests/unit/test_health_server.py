"""The health server cannot be exhausted by whoever reaches its port (lis_async/ops/health.py):
real sockets on loopback against the real server."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import resource
import subprocess
import sys
from collections.abc import AsyncIterator
from typing import Any

import pytest

from lis_async.ops.health import HealthServer
from lis_async.ops.metrics import Metrics
from tests.helpers import poll

Conn = tuple[asyncio.StreamReader, asyncio.StreamWriter]
REQUEST = b"GET /healthz HTTP/1.1\r\nHost: probe\r\n\r\n"


@contextlib.asynccontextmanager
async def server(**limits: Any) -> AsyncIterator[HealthServer]:
    s = HealthServer(lambda: {"consumer": True}, Metrics(), host="127.0.0.1", port=0, **limits)
    await s.start()
    try:
        yield s
    finally:
        await s.close()


async def connect(s: HealthServer) -> Conn:
    assert s.port is not None
    return await asyncio.open_connection("127.0.0.1", s.port)


async def closed_by_server(reader: asyncio.StreamReader, within_s: float) -> bool:
    """True when the server closes the connection (EOF or reset) within ``within_s``."""
    try:
        while await asyncio.wait_for(reader.read(65536), within_s):
            pass
    except ConnectionError:
        return True
    except TimeoutError:
        return False
    return True


async def get(conn: Conn, path: str = "/healthz") -> tuple[int, bytes]:
    reader, writer = conn
    writer.write(f"GET {path} HTTP/1.1\r\nHost: probe\r\n\r\n".encode())
    await writer.drain()
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    status = int(head.split(b" ", 2)[1])
    length = next(
        int(line.split(b":", 1)[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length:")
    )
    return status, await asyncio.wait_for(reader.readexactly(length), 5)


async def test_answers_and_keeps_a_scraper_connection_alive_between_requests() -> None:
    async with server() as s:
        conn = await connect(s)
        assert (await get(conn))[0] == 200
        status, body = await get(conn, "/readyz")
        assert status == 200 and json.loads(body)["checks"] == {"consumer": True}
        status, body = await get(conn, "/metrics")
        assert status == 200 and b"lis_jobs_total" in body
        assert (await get(conn, "/nothing"))[0] == 404
        conn[1].close()


async def test_an_idle_connection_is_closed_within_the_timeout() -> None:
    async with server(idle_timeout_s=0.5) as s:
        reader, writer = await connect(s)
        assert await closed_by_server(reader, 5)
        assert await poll(lambda: s.connections == 0, 5)
        # after an answer, the connection may idle for the timeout again, then it is closed
        conn = await connect(s)
        assert (await get(conn))[0] == 200
        assert await closed_by_server(conn[0], 5)
        writer.close()


async def test_a_request_sent_a_byte_at_a_time_is_cut() -> None:
    async with server(idle_timeout_s=0.5) as s:
        reader, writer = await connect(s)
        sent = 0
        with contextlib.suppress(ConnectionError):
            for byte in REQUEST * 4:  # 4 requests at 10 bytes a second: over 10 s
                writer.write(bytes([byte]))
                await writer.drain()
                sent += 1
                if reader.at_eof() or await closed_by_server(reader, 0.1):
                    break
        assert sent < len(REQUEST), sent  # cut before a single request was complete
        writer.close()


async def test_connections_over_the_cap_are_closed_at_once() -> None:
    async with server(max_connections=3, idle_timeout_s=60) as s:
        held = [await connect(s) for _ in range(3)]
        assert await poll(lambda: s.connections == 3, 5)
        extra = await connect(s)
        assert await closed_by_server(extra[0], 5)  # long before the 60 s idle timeout
        assert (await get(held[0]))[0] == 200  # those under the cap still answer
        held[1][1].close()
        assert await poll(lambda: s.connections == 2, 5)
        fresh = await connect(s)  # room again
        assert (await get(fresh))[0] == 200
        for _, writer in [*held, fresh]:
            writer.close()


@pytest.mark.parametrize(
    "request_bytes",
    [
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(64) + b"\r\n\r\n",  # TLS hello
        b"GET /healthz HTTP/1.1\r\nHost: probe\r\nBad Header\r\n\r\n",
        b"GET /healthz HTTP/9.9\r\n\r\n",
        b"GET /" + b"a" * 10_000 + b" HTTP/1.1\r\n\r\n",  # request line over the limit
        b"GET /healthz HTTP/1.1\r\nX-Big: " + b"b" * 10_000 + b"\r\n\r\n",  # header too
        b"GET /healthz HTTP/1.1\r\n" + b"".join(b"X-%d: 1\r\n" % i for i in range(200)) + b"\r\n",
        b"\x00\x01\x02\x03garbage\xff\r\n\r\n",
    ],
    ids=["tls", "bad-header", "bad-version", "long-line", "long-header", "many-headers", "bin"],
)
async def test_malformed_requests_are_refused_without_an_error_line(
    caplog: pytest.LogCaptureFixture, request_bytes: bytes
) -> None:
    caplog.set_level(logging.DEBUG)
    async with server() as s:
        for _ in range(50):
            reader, writer = await connect(s)
            writer.write(request_bytes)
            with contextlib.suppress(ConnectionError):
                await writer.drain()
            assert await closed_by_server(reader, 5)
            writer.close()
        # and it still answers
        conn = await connect(s)
        assert (await get(conn))[0] == 200
        conn[1].close()
    loud = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert loud == [], [r.getMessage() for r in loud]
    assert not [r for r in caplog.records if r.levelno > logging.DEBUG and r.exc_info]


async def test_a_failure_of_its_own_is_an_error_and_a_500(
    caplog: pytest.LogCaptureFixture,
) -> None:
    def checks() -> dict[str, bool]:
        raise RuntimeError("a bug")

    s = HealthServer(checks, None, host="127.0.0.1", port=0)
    await s.start()
    try:
        conn = await connect(s)
        assert (await get(conn, "/readyz"))[0] == 500
        conn[1].close()
    finally:
        await s.close()
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert [r.name for r in errors] == ["lis_async.health"] and errors[0].exc_info


def test_the_open_files_limit_is_raised_to_the_hard_limit_at_start_up() -> None:
    """`lis-async run` raises its soft limit (often 1,024) to the hard one, so that idle
    connections cannot take the descriptors RabbitMQ, OpenCTI and LastInfoSec need."""
    code = (
        "import resource; from lis_async.cli import raise_open_files_limit as r; "
        "print(r(), resource.getrlimit(resource.RLIMIT_NOFILE))"
    )

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, 2048))

    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, preexec_fn=limit, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "(256, 2048) (2048, 2048)"
