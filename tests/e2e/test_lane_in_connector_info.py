"""With priority lanes the backlog waits in the connector's lane, which OpenCTI does not count:
the heartbeat adds the lane's size to ``connector_info.queue_messages_size`` (the "Server
capacity" of OpenCTI's connector page, in MB), with pycti's fields and types unchanged
(docs/protocol.md §2.2, docs/deployment/kubernetes.md)."""

from __future__ import annotations

import pytest

from lis_async.platform.client import BYTES_PER_MB
from lis_async.sim.world import SimWorld
from tests.helpers import app_only, poll

pytestmark = [pytest.mark.rabbitmq]

PYCTI_FIELDS = {
    "run_and_terminate",
    "buffering",
    "queue_threshold",
    "queue_messages_size",
    "next_run_datetime",
    "last_run_datetime",
}


async def test_the_heartbeat_reports_the_lane() -> None:
    async with (
        SimWorld() as world,
        app_only(world, {"CONNECTOR_HEARTBEAT_INTERVAL_S": "1"}) as run,
    ):
        consumer = run.app.consumer
        assert consumer is not None
        await consumer.hold_intake("test", True)  # the jobs stay in the lane
        jobs = await world.producer.publish_many(40)
        expected_mb = sum(len(j.body) for j in jobs) / BYTES_PER_MB
        connector = world.platform.connectors[run.app.settings.connector.id]

        def reported() -> float:
            info = connector.connector_info or {}
            return float(info.get("queue_messages_size") or 0.0)

        # The lane's depth is sampled every 5 s, the heartbeat every second.
        assert await poll(lambda: reported() == pytest.approx(expected_mb), timeout=30), (
            reported(),
            expected_mb,
            run.app.lane_depth,
        )
        info = connector.connector_info
        assert info is not None and set(info) == PYCTI_FIELDS
        assert info["buffering"] is False  # the threshold's hold only
        assert isinstance(info["queue_messages_size"], float)
        # Drained: the figure goes back down (the jobs' bundles wait in the push queue, which
        # the platform counts itself).
        await consumer.hold_intake("test", False)
        assert await poll(lambda: run.app.lane_depth == 0, timeout=30)
        assert await poll(lambda: (run.app.lane_size_mb() or 0.0) == 0.0, timeout=5)
