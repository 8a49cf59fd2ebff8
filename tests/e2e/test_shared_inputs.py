"""Issue #20, end to end: what others can write (the listen queue, a lane's name, a playbook's
bundle, an observable's value) is not trusted. The real worker, the platform double, the
LastInfoSec double (which records every request) and the OpenCTI worker emulation, on the real
RabbitMQ."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import orjson
import pytest

from lis_async.sim.producer import ProducedJob
from lis_async.sim.world import SimWorld
from tests.helpers import LIGHT_WORKER, QUIET_PRODUCER, world_with_worker

pytestmark = [pytest.mark.rabbitmq]

CUSTOM_RED = "marking-definition--c0c0c0c0-1111-4222-8333-444455556666"
REFUSED = "TLP:RED is above the max TLP TLP:AMBER: not sent to LastInfoSec"


def edited(
    world: SimWorld, kind: str, entity_type: str, edit: Callable[[dict[str, Any]], None]
) -> ProducedJob:
    """A job of ``kind`` whose body ``edit`` changed (in place, decoded)."""
    job = world.producer.make_job(world.producer.next_index(), kind=kind, entity_type=entity_type)
    body = job.json()
    edit(body)
    return dataclasses.replace(job, body=orjson.dumps(body))


def _entity(body: dict[str, Any]) -> dict[str, Any]:
    event = body["event"]
    if "bundle" in event:
        entity = next(o for o in event["bundle"]["objects"] if o["id"] == event["entity_id"])
        return dict(entity)
    return dict(orjson.loads(event["stix_entity"]))


def _put_entity(body: dict[str, Any], entity: dict[str, Any]) -> None:
    event = body["event"]
    if "bundle" in event:
        objects = event["bundle"]["objects"]
        objects[:] = [entity if o["id"] == entity["id"] else o for o in objects]
    else:
        event["stix_entity"] = orjson.dumps(entity).decode()


# ------------------------------------------------------------------------------------------
# finding 5: a definition carried in the job may only make the verdict stricter


def _lowered_by_node(body: dict[str, Any]) -> None:
    entity = _entity(body)
    entity["object_marking_refs"] = [CUSTOM_RED]
    entity["objectMarking"] = [
        {"standard_id": CUSTOM_RED, "definition_type": "TLP", "definition": "TLP:CLEAR"}
    ]
    _put_entity(body, entity)


def _lowered_by_bundle(body: dict[str, Any]) -> None:
    entity = _entity(body)
    entity["object_marking_refs"] = [CUSTOM_RED]
    _put_entity(body, entity)
    body["event"]["bundle"]["objects"].append(
        {
            "type": "marking-definition",
            "spec_version": "2.1",
            "id": CUSTOM_RED,
            "created": "2024-01-01T00:00:00.000Z",
            # as pycti writes a custom TLP (stix2 knows only the standard TLP ids)
            "definition_type": "statement",
            "definition": {"statement": "TLP:CLEAR"},
            "name": "TLP:CLEAR",
            "x_opencti_definition_type": "TLP",
            "x_opencti_definition": "TLP:CLEAR",
        }
    )


async def test_a_job_cannot_lower_a_custom_red_marking() -> None:
    """The platform says the custom marking is TLP:RED; a manual job's objectMarking node and a
    playbook bundle's marking definition say TLP:CLEAR: neither value reaches LastInfoSec."""
    async with world_with_worker(
        producer_options=QUIET_PRODUCER, worker_options=LIGHT_WORKER
    ) as run:
        world = run.world
        world.lis.config.known_share = 1.0
        world.platform.put_marking(CUSTOM_RED, "TLP", "TLP:RED", 4)
        manual = edited(world, "manual", "Domain-Name", _lowered_by_node)
        playbook = edited(world, "playbook", "Domain-Name", _lowered_by_bundle)
        await world.producer.publish(manual)
        await world.producer.publish(playbook)
        assert manual.work_id is not None
        assert await world.platform.wait_works([manual.work_id], timeout=30)
        assert await world.platform.wait_until(lambda: len(world.platform.playbook_calls) == 1, 30)
        assert manual.value not in world.lis.stats.values
        assert playbook.value not in world.lis.stats.values
        assert world.platform.works[manual.work_id].messages[-1] == REFUSED
        (call,) = world.platform.playbook_calls  # answered with its bundle, unsent
        assert call["valid"]
