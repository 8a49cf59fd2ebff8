"""The intake holds as one mechanism (lis_async/intake/hold.py): the platform health gate, the
push-queue watermarks and the queue threshold each hold the consumer's intake under their own
reason, with the same boolean (True: hold), subscribed in one place of the app."""

from __future__ import annotations

import asyncio

from lis_async.app import App
from lis_async.broker.connection import AmqpParams
from lis_async.broker.consumer import Consumer
from lis_async.errors import PlatformUnavailable
from lis_async.intake.backpressure import Backpressure
from lis_async.intake.threshold import QueueThreshold
from lis_async.platform.client import QueueDetails
from lis_async.platform.health import PlatformHealth
from lis_async.settings.model import load_settings
from tests.helpers import OFFLINE_ENV, poll


async def _nothing() -> None:
    return None


def consumer() -> Consumer:
    """A consumer never started: it only records which reasons hold its intake."""
    params = AmqpParams("127.0.0.1", 5672, "/", False, "guest", "guest")
    return Consumer(params, "listen", 1, lambda body, redelivered: _nothing(), lambda r: None)


async def test_every_hold_holds_intake_under_its_reason_until_it_releases() -> None:
    app = App(load_settings(env=OFFLINE_ENV))
    platform_back = asyncio.Event()

    async def probe() -> None:
        if not platform_back.is_set():
            raise PlatformUnavailable("still down")

    depth: list[int | None] = [0]

    async def push_depth() -> int | None:
        return depth[0]

    queue = [QueueDetails(0, 0)]

    async def read_queue() -> QueueDetails:
        return queue[0]

    app.health = PlatformHealth(probe, 0.01)
    app.backpressure = Backpressure(push_depth, high=10, low=5)
    app.queue_threshold = QueueThreshold(read_queue, 0.01, 1.0, push_depth=push_depth)
    assert [h.reason for h in app.holds()] == ["platform", "backpressure", "queue_threshold"]
    c = consumer()
    app._hold_intake(c)
    held = c._holds
    try:
        app.health.unavailable("a test", PlatformUnavailable("down"))
        assert await poll(lambda: held == {"platform"}, 5)
        assert app.health.engaged
        app.backpressure.published(11)  # above the high watermark
        assert await poll(lambda: held == {"platform", "backpressure"}, 5)
        queue[0], depth[0] = QueueDetails(3, 20_000), 3  # 0.02 MB, some output waiting
        await app.queue_threshold.check()
        assert await poll(lambda: held == {"platform", "backpressure", "queue_threshold"}, 5)
        assert c.paused

        platform_back.set()  # the next probe finds it up; then the queue drains
        assert await poll(lambda: held == {"backpressure", "queue_threshold"}, 5)
        assert not app.health.engaged and app.health.up
        queue[0] = QueueDetails(0, 0)
        await app.queue_threshold.check()
        assert await poll(lambda: held == {"backpressure"}, 5)
        assert c.paused
    finally:
        await app.health.close()
        await app.platform.close()


async def test_the_platform_gate_tells_its_listeners_hold_then_release() -> None:
    calls = 0

    async def probe() -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise PlatformUnavailable("still down")

    told: list[bool] = []

    async def listener(hold: bool) -> None:
        told.append(hold)

    gate = PlatformHealth(probe, 0.01)
    gate.add_listener(listener)
    gate.unavailable("a call", PlatformUnavailable("down"))
    try:
        await asyncio.wait_for(gate.wait_up(), 5)
        assert await poll(lambda: told == [True, False], 5)
    finally:
        await gate.close()
