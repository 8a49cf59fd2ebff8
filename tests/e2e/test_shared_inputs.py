"""Issue #20, end to end: what others can write (the listen queue, a lane's name, a playbook's
bundle, an observable's value) is not trusted. The real worker, the platform double, the
LastInfoSec double (which records every request) and the OpenCTI worker emulation, on the real
RabbitMQ."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from typing import Any

import orjson
import pytest

from lis_async.enrichment.job import MAX_BODY_BYTES
from lis_async.enrichment.nesting import MAX_VALUES
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


# ------------------------------------------------------------------------------------------
# findings 6 and 7: values are checked before they are sent; URL credentials never leave


def _set(**fields: Any) -> Callable[[dict[str, Any]], None]:
    def edit(body: dict[str, Any]) -> None:
        entity = _entity(body)
        entity.update(fields)
        _put_entity(body, entity)

    return edit


CREDENTIALS_URL = "https://alice:S3cret@intranet.example/login?token=abc"


async def test_values_are_checked_and_credentials_stripped(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """In ``search`` style (the whole value in a POST body): a 200,000-character "SHA-256" and an
    invalid domain complete their work with a short message and no request; a URL with
    credentials is looked up without them, and no work message or log line shows them."""
    caplog.set_level(logging.INFO, "lis_async")
    env = {"LASTINFOSEC_ENDPOINT_STYLE": "search"}
    async with world_with_worker(
        env=env, producer_options=QUIET_PRODUCER, worker_options=LIGHT_WORKER
    ) as run:
        world = run.world
        world.lis.config.known_share = 0.0  # "not found": the message names the value
        huge = edited(world, "manual", "StixFile", _set(hashes={"SHA-256": "a" * 200_000}))
        bad_host = edited(world, "auto_create", "Domain-Name", _set(value="bad host/../x"))
        url = edited(world, "manual", "Url", _set(value=CREDENTIALS_URL))
        jobs = [huge, bad_host, url]
        for job in jobs:
            await world.producer.publish(job)
        works = [str(j.work_id) for j in jobs]
        assert await world.platform.wait_works(works, timeout=30)
        assert world.lis.stats.values == ["https://intranet.example/login?token=abc"]
        messages = {w: world.platform.works[w].messages[-1] for w in works}
        assert messages[works[0]].startswith("file has no valid hash to look up: SHA-256 aaaa")
        assert messages[works[1]].startswith("Domain-Name value bad host/../x is not a valid")
        assert messages[works[2]] == (
            "https://intranet.example/login?token=abc not found in LastInfoSec"
        )
        for work in works:
            assert not world.platform.works[work].in_error
            assert len(messages[work]) < 500, messages[work]
    assert "S3cret" not in caplog.text and "a" * 1000 not in caplog.text
    job_lines = [r.getMessage() for r in caplog.records if r.name == "lis_async.pipeline"]
    assert len(job_lines) == 3 and max(map(len, job_lines)) < 600, job_lines


# ------------------------------------------------------------------------------------------
# finding 11: vetting keeps what LastInfoSec may say, an indicator's score


async def test_indicators_reach_opencti_with_their_score() -> None:
    """As pycti's connector pushes them: every indicator of the answers carries LastInfoSec's
    score (50, 75 or 90); nothing else OpenCTI-specific comes from the answer."""
    async with world_with_worker(producer_options=QUIET_PRODUCER) as run:
        world = run.world
        world.lis.config.known_share = 1.0
        jobs = [
            world.producer.make_job(world.producer.next_index(), kind="manual", entity_type=t)
            for t in ("StixFile", "Domain-Name", "Hostname", "Url")
        ]
        for job in jobs:
            await world.producer.publish(job)
        works = [str(j.work_id) for j in jobs]
        assert await world.platform.wait_works(works, timeout=30)
        assert await world.worker.wait_idle(timeout=30)
        indicators = [
            o for w in works for o in world.worker.objects_by_work[w] if o["type"] == "indicator"
        ]
        assert len(indicators) >= len(jobs)
        assert {o.get("x_opencti_score") for o in indicators} <= {50, 75, 90}
        assert all("x_opencti_score" in o for o in indicators), indicators


# ------------------------------------------------------------------------------------------
# finding 9: huge bodies neither stall the worker nor get parsed above the limit


async def test_huge_bodies_end_their_work_in_error_and_the_others_go_on() -> None:
    """Through the lane mover and the pipeline: 14 MiB of five million empty lists (under the
    16 MiB limit) and a 17 MiB body, both manual, end their works in error without being
    parsed; the ordinary jobs published with them are enriched."""
    async with world_with_worker(producer_options=QUIET_PRODUCER) as run:
        world = run.world
        world.lis.config.known_share = 1.0

        def entity_text(text: str) -> Callable[[dict[str, Any]], None]:
            def edit(body: dict[str, Any]) -> None:
                body["event"]["stix_entity"] = text

            return edit

        lists = edited(
            world, "manual", "Domain-Name", entity_text("[" + ",".join(["[]"] * 5_000_000) + "]")
        )
        oversize = edited(world, "manual", "Domain-Name", entity_text("x" * (17 * 2**20)))
        assert 14 * 2**20 < len(lists.body) < MAX_BODY_BYTES < len(oversize.body)
        ordinary = [
            world.producer.make_job(world.producer.next_index(), kind="auto_create")
            for _ in range(10)
        ]
        for job in [lists, oversize, *ordinary]:
            await world.producer.publish(job)
        works = [str(j.work_id) for j in [lists, oversize, *ordinary]]
        assert await world.platform.wait_works(works, timeout=60)
        errors = {w: world.platform.works[w].errors for w in works[:2]}
        assert errors[works[0]][-1]["message"] == (
            f"Invalid enrichment job: job body holds more than {MAX_VALUES} JSON values"
        )
        assert errors[works[1]][-1]["message"] == (
            f"Invalid enrichment job: job body is {len(oversize.body)} bytes "
            f"(limit {MAX_BODY_BYTES})"
        )
        assert not [w for w in works[2:] if world.platform.works[w].in_error]
