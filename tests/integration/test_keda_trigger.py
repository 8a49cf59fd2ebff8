"""The KEDA trigger of deploy/kubernetes/cluster against the real RabbitMQ: the management API
query it describes (its queue regex, with a connector id set in the overlay's connector.env; its
vhost; the sum; unacknowledged messages left out) counts the jobs waiting in the listen queue
and in the priority lane together, and nothing else.

Needs the management plugin (HTTP API on 127.0.0.1:15672; .ci/run enables it)."""

from __future__ import annotations

import asyncio
import shutil
import urllib.parse
import uuid
from pathlib import Path
from typing import Any

import aio_pika
import aiohttp
import pytest

from lis_async.broker.lanes import lane_arguments, lane_name
from tests.helpers import poll
from tests.kube import KIT, one, render_dir

pytestmark = [pytest.mark.rabbitmq]

AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/"
API = "http://127.0.0.1:15672"
AUTH = aiohttp.BasicAuth("guest", "guest")


def trigger_for(connector_id: str, tmp_path: Path) -> dict[str, Any]:
    """The trigger's metadata as the cluster overlay renders it once an operator has set
    CONNECTOR_ID in base/connector.env (in a copy of the kit)."""
    kit = tmp_path / "kubernetes"
    shutil.copytree(KIT, kit)
    env = kit / "base" / "connector.env"
    lines = env.read_text(encoding="utf-8").splitlines()
    assert "CONNECTOR_ID=ChangeMe" in lines
    lines[lines.index("CONNECTOR_ID=ChangeMe")] = f"CONNECTOR_ID={connector_id}"
    env.write_text("\n".join(lines) + "\n", encoding="utf-8")
    (trigger,) = one(render_dir(kit / "cluster"), "ScaledObject")["spec"]["triggers"]
    meta: dict[str, Any] = trigger["metadata"]
    return meta


async def keda_count(session: aiohttp.ClientSession, meta: dict[str, Any]) -> tuple[int, set[str]]:
    """What KEDA's rabbitmq scaler computes in http mode with useRegex: one page of
    ``/api/queues/<vhost>`` filtered by the regex, each queue's ready messages (all messages
    without excludeUnacknowledged), combined by the operation; and the queues it counted."""
    params = {
        "page": "1",
        "use_regex": "true",
        "pagination": "false",
        "name": meta["queueName"],
        "page_size": "100",
    }
    vhost = meta.get("vhostName", "/")
    async with session.get(
        f"{API}/api/queues/{urllib.parse.quote(vhost, safe='')}", params=params, auth=AUTH
    ) as resp:
        resp.raise_for_status()
        body = await resp.json()
    field = "messages_ready" if meta.get("excludeUnacknowledged") == "true" else "messages"
    counts = [int(q.get(field) or 0) for q in body["items"]]
    assert meta["operation"] == "sum"
    return sum(counts), {q["name"] for q in body["items"]}


async def management_api_up() -> bool:
    try:
        async with (
            aiohttp.ClientSession() as session,
            session.get(f"{API}/api/overview", auth=AUTH, timeout=aiohttp.ClientTimeout(5)) as r,
        ):
            return r.status == 200
    except (aiohttp.ClientError, TimeoutError):
        return False


async def test_trigger_counts_the_listen_queue_and_the_lane(tmp_path: Path) -> None:
    if not await management_api_up():
        pytest.skip(
            "RabbitMQ's management API is not on 127.0.0.1:15672: "
            "rabbitmq-plugins enable rabbitmq_management (.ci/run does it)"
        )
    connector_id = str(uuid.uuid4())
    meta = trigger_for(connector_id, tmp_path)
    assert connector_id in meta["queueName"]
    listen, lane, push = f"listen_{connector_id}", lane_name(connector_id), f"push_{connector_id}"
    in_lane, in_listen = 7, 5
    connection = await aio_pika.connect(AMQP_URL)
    try:
        channel = await connection.channel()
        queues = {
            listen: await channel.declare_queue(listen, auto_delete=True),
            lane: await channel.declare_queue(
                lane, durable=False, auto_delete=True, arguments=lane_arguments(600)
            ),
            # Neither counts: the push queue (OpenCTI's) and a queue whose name only contains
            # the lane's.
            push: await channel.declare_queue(push, auto_delete=True),
            f"x.{lane}": await channel.declare_queue(f"x.{lane}", auto_delete=True),
        }
        for name, n in ((lane, in_lane + 1), (listen, in_listen), (push, 4), (f"x.{lane}", 3)):
            for i in range(n):
                await channel.default_exchange.publish(
                    aio_pika.Message(b"{}", priority=i % 2), routing_key=name
                )
        # One lane job taken and not acknowledged: in flight, not waiting.
        held = await queues[lane].get(no_ack=False)
        assert held is not None
        async with aiohttp.ClientSession() as session:
            # The management API's figures lag by its statistics interval (5 s by default).
            last: list[tuple[int, set[str]]] = []

            async def settled() -> bool:
                last.append(await keda_count(session, meta))
                return last[-1][0] == in_lane + in_listen

            assert await poll(settled, timeout=30, every=0.5), last[-5:]
            assert last[-1][1] == {listen, lane}  # both queues, and no other
        await held.ack()
    finally:
        await asyncio.wait_for(connection.close(), 10)
