"""Integration tests of the simulation harness: job producer, worker emulation, SimWorld.

Real RabbitMQ on 127.0.0.1:5672; every test uses its own connector id and the world deletes the
connector's queues on exit.
"""

from __future__ import annotations

import asyncio
import base64
import json
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

import aio_pika
import aiormq
import pytest
import stix2
from pycti import OpenCTIApiClient, OpenCTIStix2Splitter
from pycti.connector.opencti_connector import OpenCTIConnector

from lis_async.sim.opencti import PlatformSim
from lis_async.sim.producer import (
    AUTOMATION_USER_ID,
    HOSTILE_KINDS,
    STIX_EXT_OCTI,
    STIX_EXT_OCTI_SCO,
    TLP_IDS,
    JobProducer,
    ProducedJob,
)
from lis_async.sim.world import SimWorld
from tests.helpers import FIXTURES

pytestmark = pytest.mark.rabbitmq

AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/"
JOBS = FIXTURES / "jobs"
STIX_TYPE = {"StixFile": "file", "Domain-Name": "domain-name", "Hostname": "hostname", "Url": "url"}


# ---------------------------------------------------------------------------------- helpers


def _register_sync(world: SimWorld) -> dict[str, Any]:
    api = OpenCTIApiClient(world.opencti_url, world.opencti_token, log_level="error")
    connector = OpenCTIConnector(
        connector_id=world.connector_id,
        connector_name=world.connector_name,
        connector_type="INTERNAL_ENRICHMENT",
        scope=world.scope,
        auto=False,
        only_contextual=False,
        playbook_compatible=True,
        auto_update=False,
        enrichment_resolution="none",
    )
    result: dict[str, Any] = api.connector.register(connector)
    return result


async def register(world: SimWorld) -> dict[str, Any]:
    """Register the world's connector through pycti (what the connector itself does)."""
    return await asyncio.to_thread(_register_sync, world)


@pytest.fixture
async def world() -> AsyncIterator[SimWorld]:
    async with SimWorld() as w:
        yield w


@pytest.fixture
async def registered(world: SimWorld) -> SimWorld:
    await register(world)
    await world.start_worker_emulation(timeout=30)
    return world


def push_envelope(bundle: dict[str, Any], work_id: str | None, **overrides: Any) -> bytes:
    """pycti's push envelope (docs/protocol.md §5.1), keys in pycti's order."""
    env: dict[str, Any] = {
        "bundle_type": "QUEUE_BUNDLE",
        "applicant_id": "1f2e3d4c-5b6a-4798-8a7b-6c5d4e3f2a1b",
        "action_sequence": 1,
        "entities_types": [],
        "content": base64.b64encode(json.dumps(bundle).encode("utf-8")).decode("utf-8"),
        "update": False,
        "draft_id": None,
        "no_split": False,
    }
    if work_id is not None:
        env["work_id"] = work_id
    env.update(overrides)
    return json.dumps(env).encode("utf-8")


async def publish_push(world: SimWorld, body: bytes) -> None:
    names = world.names()
    async with await aio_pika.connect(AMQP_URL) as conn:
        channel = await conn.channel(publisher_confirms=True)
        exchange = await channel.get_exchange(names["push_exchange"], ensure=False)
        await exchange.publish(
            aio_pika.Message(body, delivery_mode=2, content_encoding="utf-8"),
            names["push_routing"],
        )


def entity_of(job: ProducedJob) -> dict[str, Any]:
    event = job.json()["event"]
    if job.playbook:
        obj: dict[str, Any] = event["bundle"]["objects"][0]
        return obj
    decoded: dict[str, Any] = json.loads(event["stix_entity"])
    return decoded


MARKING_AMBER = {
    "type": "marking-definition",
    "spec_version": "2.1",
    "id": TLP_IDS["AMBER"],
    "created": "2017-01-20T00:00:00.000Z",
    "definition_type": "tlp",
    "name": "TLP:AMBER",
    "definition": {"tlp": "amber"},
}


# ---------------------------------------------------------------------------------- producer


def _fixture_keys(name: str) -> tuple[set[str], set[str]]:
    data = json.loads((JOBS / name).read_text())
    return set(data["internal"]), set(data["event"])


@pytest.mark.parametrize(
    ("kind", "fixture"),
    [
        ("manual", "manual_stixfile_amber_shared.json"),
        ("auto_create", "auto_create_domain_green.json"),
        ("auto_update", "auto_update_hostname_red_draft.json"),
        ("draft", "auto_update_hostname_red_draft.json"),
        ("stix_objects_string", "manual_url_stix_objects_string.json"),
        ("deferred", "auto_create_domain_deferred_resolution.json"),
        ("playbook", "playbook_url.json"),
    ],
)
@pytest.mark.parametrize("entity_type", ["StixFile", "Domain-Name", "Hostname", "Url"])
def test_job_bodies_have_platform_shapes(kind: str, fixture: str, entity_type: str) -> None:
    platform = PlatformSim()
    producer = JobProducer(platform, "c0ffee00-0000-4000-8000-000000000001", seed=3)
    job = producer.make_job(11, kind=kind, entity_type=entity_type)
    data = job.json()
    assert list(data) == ["internal", "event"]
    internal, event = data["internal"], data["event"]
    want_internal, want_event = _fixture_keys(fixture)
    assert set(internal) == want_internal
    assert set(event) == want_event
    assert job.kind == kind and not job.malformed and job.entity_type == entity_type
    assert event["entity_id"] == job.entity_id
    assert job.entity_id is not None and job.entity_id.startswith(STIX_TYPE[entity_type] + "--")
    assert "applicant_id" in internal

    if kind == "playbook":
        assert job.playbook and job.work_id is None and internal["work_id"] is None
        assert internal["applicant_id"] == AUTOMATION_USER_ID
        assert "event_type" not in event and "entity_type" not in event
        assert "draft_id" not in internal
        assert set(internal["playbook"]) == {
            "event_id",
            "execution_id",
            "playbook_id",
            "data_instance_id",
            "step_id",
            "previous_step_id",
        }
        assert all(isinstance(v, str) for v in internal["playbook"].values())
        assert internal["playbook"]["data_instance_id"] == job.entity_id
        bundle = event["bundle"]
        assert isinstance(bundle, dict) and bundle["type"] == "bundle"
        assert [o["id"] for o in bundle["objects"]] == [job.entity_id]
        assert not platform.works  # no work for playbooks
        assert platform.get_entity(job.entity_id) is not None  # pycti reads it anyway
        return

    assert not job.playbook
    assert event["event_type"] == "INTERNAL_ENRICHMENT"
    assert event["entity_type"] == entity_type
    assert job.work_id is not None and internal["work_id"] == job.work_id
    assert job.work_id in platform.works and platform.works[job.work_id].status == "wait"
    assert internal["applicant_id"] is None
    assert internal["mode"] in ("manual", "auto") and internal["trigger"] in ("create", "update")
    if kind == "manual":
        assert (internal["mode"], internal["trigger"]) == ("manual", "update")
    if kind == "auto_create":
        assert (internal["mode"], internal["trigger"]) == ("auto", "create")
    if kind == "auto_update":
        assert (internal["mode"], internal["trigger"]) == ("auto", "update")
    if kind == "draft":
        assert isinstance(internal["draft_id"], str) and internal["draft_id"] == job.draft_id
        assert platform.get_entity(job.entity_id, internal["draft_id"]) is not None
    else:
        assert internal["draft_id"] is None
        assert platform.get_entity(job.entity_id) is not None
    if kind == "deferred":
        assert event["stix_entity"] is None and event["stix_objects"] is None
        return
    assert isinstance(event["stix_entity"], str)  # a JSON *string*, not an object
    if kind == "stix_objects_string":
        assert isinstance(event["stix_objects"], str)
        assert [o["id"] for o in json.loads(event["stix_objects"])] == [job.entity_id]
    else:
        assert event["stix_objects"] is None


@pytest.mark.parametrize("entity_type", ["StixFile", "Domain-Name", "Hostname", "Url"])
def test_stix_entity_is_platform_style(entity_type: str) -> None:
    producer = JobProducer(PlatformSim(), "c0ffee00-0000-4000-8000-000000000002", seed=5)
    for i in range(40):
        job = producer.make_job(i, kind="manual", entity_type=entity_type)
        ent = entity_of(job)
        assert ent["id"] == job.entity_id and ent["spec_version"] == "2.1"
        assert ent["type"] == STIX_TYPE[entity_type]
        assert ent["object_marking_refs"] == [TLP_IDS[job.tlp]]
        octi = ent["extensions"][STIX_EXT_OCTI]
        assert octi["extension_type"] == "property-extension"
        assert octi["type"] == entity_type and uuid.UUID(octi["id"])
        assert octi["is_inferred"] is False and octi["created_at"].endswith("Z")
        assert tuple(octi.get("granted_refs", ())) == job.granted_refs
        sco = ent["extensions"][STIX_EXT_OCTI_SCO]
        if entity_type == "Hostname":
            assert sco == {"extension_type": "new-sco"}
        else:
            assert sco["extension_type"] == "property-extension"
        stix2.parse(ent, allow_custom=True)
        if entity_type == "StixFile":
            if "hashes" in ent:
                hashes = ent["hashes"]
                assert [len(hashes[k]) for k in ("MD5", "SHA-1", "SHA-256")] == [32, 40, 64]
                assert job.value == hashes["SHA-256"] and ent["size"] > 0
                assert ent["id"] == stix2.File(hashes={"MD5": hashes["MD5"]}).id
            else:
                assert job.value is None
            assert ent["name"]
        else:
            assert job.value == ent["value"]
        if entity_type in ("Domain-Name", "Url"):
            cls = stix2.DomainName if entity_type == "Domain-Name" else stix2.URL
            assert ent["id"] == cls(value=ent["value"]).id


def test_make_job_is_deterministic_and_honours_shares() -> None:
    cid = "c0ffee00-0000-4000-8000-000000000003"
    a = JobProducer(PlatformSim(), cid, seed=7)
    b = JobProducer(PlatformSim(), cid, seed=7)
    c = JobProducer(PlatformSim(), cid, seed=8)
    for i in range(30):
        ja, jb = a.make_job(i), b.make_job(i)
        strip = {"work_id": None}
        assert ja.kind == jb.kind and ja.value == jb.value and ja.entity_id == jb.entity_id
        assert ja.json()["event"] == jb.json()["event"]
        assert {**ja.json()["internal"], **strip} == {**jb.json()["internal"], **strip}
    assert [a.make_job(i).value for i in range(20)] != [c.make_job(i).value for i in range(20)]

    n = 2000
    producer = JobProducer(
        PlatformSim(),
        cid,
        seed=1,
        red_share=0.3,
        shared_share=0.5,
        playbook_share=0.1,
        draft_share=0.1,
        no_hash_share=0.25,
    )
    jobs = [producer.make_job(i) for i in range(n)]
    kinds = Counter(j.kind for j in jobs)
    assert 0.07 < kinds["playbook"] / n < 0.13
    assert 0.07 < kinds["draft"] / n < 0.13
    assert {"manual", "auto_create", "auto_update", "stix_objects_string"} <= set(kinds)
    above_amber = sum(j.tlp in ("AMBER+STRICT", "RED") for j in jobs)
    assert 0.25 < above_amber / n < 0.35
    assert 0.45 < sum(bool(j.granted_refs) for j in jobs) / n < 0.55
    files = [j for j in jobs if j.entity_type == "StixFile"]
    assert 0.18 < sum(j.value is None for j in files) / len(files) < 0.32
    assert Counter(j.entity_type for j in jobs).keys() == set(STIX_TYPE)
    assert len({j.value for j in jobs if j.value}) > 0.9 * sum(1 for j in jobs if j.value)


def test_repeat_share_reuses_earlier_observables() -> None:
    """With ``repeat_share``, that share of jobs carry an earlier job's entity (same observable,
    same lookup value); the others are exactly the jobs made without it."""
    cid = "c0ffee00-0000-4000-8000-000000000005"
    plain = JobProducer(PlatformSim(), cid, seed=4)
    rep = JobProducer(PlatformSim(), cid, seed=4, repeat_share=0.5)
    n = 400
    jobs = [rep.make_job(i) for i in range(n)]
    again = JobProducer(PlatformSim(), cid, seed=4, repeat_share=0.5)
    assert [j.json()["event"] for j in jobs] == [
        again.make_job(i).json()["event"] for i in range(n)
    ]
    repeats = 0
    for i, job in enumerate(jobs):
        source = rep.entity_source(i)
        if source == i:
            assert job.json()["event"] == plain.make_job(i).json()["event"]
            continue
        repeats += 1
        assert source < i and rep.entity_source(source) == source
        assert (job.entity_type, job.entity_id, job.value) == (
            jobs[source].entity_type,
            jobs[source].entity_id,
            jobs[source].value,
        )
        assert job.kind == plain.make_job(i).kind  # its kind is its own
    assert 0.42 < repeats / n < 0.58
    assert len({j.value for j in jobs if j.value}) < 0.6 * sum(1 for j in jobs if j.value)
    # a given kind: the earlier job's entity as made with the same kind
    i = next(i for i in range(1, n) if rep.entity_source(i) != i)
    assert rep.make_job(i, kind="manual").entity_id == (
        rep.make_job(rep.entity_source(i), kind="manual").entity_id
    )
    with pytest.raises(ValueError, match="repeat_share"):
        JobProducer(PlatformSim(), cid, repeat_share=1.5)


def test_hostile_bodies() -> None:
    platform = PlatformSim()
    producer = JobProducer(platform, "c0ffee00-0000-4000-8000-000000000004")
    jobs = {name: producer.make_hostile(name) for name in HOSTILE_KINDS}
    with pytest.raises(ValueError):
        json.loads(jobs["not_json"].body)
    with pytest.raises(UnicodeDecodeError):
        jobs["not_utf8"].body.decode("utf-8")
    assert jobs["empty_body"].body == b""
    assert json.loads(jobs["json_array"].body) == [] and json.loads(jobs["json_null"].body) is None
    wrong = json.loads(jobs["wrong_types"].body)
    assert wrong["internal"]["work_id"] == 42 and isinstance(wrong["event"]["entity_id"], dict)
    assert "event" not in jobs["missing_event"].json()
    assert "internal" not in jobs["missing_internal"].json()
    assert "entity_id" not in jobs["missing_entity_id"].json()["event"]
    assert "applicant_id" not in jobs["missing_applicant_id"].json()["internal"]
    assert isinstance(jobs["stix_entity_object"].json()["event"]["stix_entity"], dict)
    with pytest.raises(ValueError):
        json.loads(jobs["stix_entity_not_json"].json()["event"]["stix_entity"])
    for name, job in jobs.items():
        assert job.malformed == (HOSTILE_KINDS.index(name) < 12), name

    huge = jobs["huge_stix_entity"]
    assert len(huge.body) > 2_000_000
    assert isinstance(huge.json()["event"]["stix_entity"], str)

    def value(name: str) -> str:
        ent = json.loads(jobs[name].json()["event"]["stix_entity"])
        return str(ent["hashes"]["SHA-256"] if "hashes" in ent else ent["value"])

    assert "../" in value("path_traversal") and "?" in value("path_traversal")
    assert "#" in value("path_traversal")
    assert all(c in value("query_chars") for c in ("?", "#", "%2F"))
    assert "%2F" in value("encoded_slash")
    assert value("hash_path_traversal").startswith("../")
    assert {"\r", "\n", "\x00", "\x1b"} <= set(value("control_chars"))
    assert len(value("very_long_value")) >= 100_000
    assert not value("idn_value").isascii()
    assert jobs["unknown_entity_type"].json()["event"]["entity_type"] == "X-Unknown-Observable"
    assert jobs["out_of_scope_type"].json()["event"]["entity_type"] == "IPv4-Addr"
    mismatch = jobs["entity_id_mismatch"].json()["event"]
    assert mismatch["entity_id"] != json.loads(mismatch["stix_entity"])["id"]

    # a work exists exactly for the bodies whose work id can be read
    for name, job in jobs.items():
        if name == "unknown_work":
            assert job.work_id is not None and job.work_id not in platform.works
        elif job.work_id is not None:
            assert job.work_id in platform.works, name
            assert job.json()["internal"]["work_id"] == job.work_id
    readable = {n for n, j in jobs.items() if j.work_id is not None} - {"unknown_work"}
    assert readable == set(HOSTILE_KINDS[7:]) - {"unknown_work"}
    with pytest.raises(ValueError):
        producer.make_hostile("nope")


async def test_publish_is_platform_like(world: SimWorld) -> None:
    await register(world)
    job = world.producer.make_job(0, kind="manual", entity_type="Domain-Name")
    await world.producer.publish(job)
    conn = await aiormq.connect(AMQP_URL)
    try:
        channel = await conn.channel()
        msg = await channel.basic_get(world.names()["listen"], no_ack=True)
        assert msg.body == job.body
        props = msg.header.properties
        assert props.delivery_mode == 2
        assert props.content_type is None and props.content_encoding is None
        assert props.headers is None and props.priority is None and props.expiration is None
        # aiormq always stamps a random message_id (it correlates returns); nothing else is set
        assert isinstance(msg.delivery, aiormq.spec.Basic.GetOk)
        assert msg.delivery.routing_key == world.names()["listen_routing"]
        assert msg.delivery.exchange == world.names()["listen_exchange"]
    finally:
        await conn.close()


async def test_publish_many_and_purge(world: SimWorld) -> None:
    await register(world)
    jobs = await world.producer.publish_many(20)
    assert len(jobs) == 20 and len({j.entity_id for j in jobs}) > 15
    more = await world.producer.publish_many(3)  # continues with the next indices
    assert len(more) == 3 and more[0] != jobs[0]
    assert world.producer.published == 23
    purged = await world.purge()
    assert purged[world.names()["listen"]] == 23
    assert purged[world.names()["push"]] == 0


async def test_publish_before_registration_fails_loudly(world: SimWorld) -> None:
    job = world.producer.make_job(0, kind="manual")
    with pytest.raises(Exception):  # noqa: B017 - unroutable / missing exchange
        await world.producer.publish(job)


# ---------------------------------------------------------------------------------- worker


async def test_worker_imports_one_object_message(registered: SimWorld) -> None:
    world, worker = registered, registered.worker
    job = world.producer.make_job(1, kind="manual", entity_type="StixFile")
    assert job.work_id is not None
    world.platform.add_expectations(job.work_id, 1)
    _, _, bundles = OpenCTIStix2Splitter().split_bundle_with_expectations(
        {
            "type": "bundle",
            "id": f"bundle--{uuid.uuid4()}",
            "spec_version": "2.1",
            "objects": [entity_of(job)],
        },
        use_json=False,
    )
    assert len(bundles) == 1
    await publish_push(world, push_envelope(bundles[0], job.work_id))
    assert await world.platform.wait_works([job.work_id], timeout=30)
    assert await worker.wait_idle(30)
    work = world.platform.works[job.work_id]
    assert (work.expected, work.processed, work.errors) == (1, 1, [])
    [record] = worker.messages
    assert record.outcome == "imported" and record.work_id == job.work_id
    assert record.keys == (
        "bundle_type",
        "applicant_id",
        "action_sequence",
        "entities_types",
        "content",
        "update",
        "draft_id",
        "no_split",
        "work_id",
    )
    assert record.properties["delivery_mode"] == 2
    assert record.properties["content_encoding"] == "utf-8"
    assert record.bundle is not None and record.bundle["objects"][0]["id"] == job.entity_id
    assert [o["id"] for o in worker.objects_by_work[job.work_id]] == [job.entity_id]
    assert worker.counters.acked == 1 and worker.counters.reported_ok == 1
    assert worker.counters.rejected == 0


async def test_worker_rejects_empty_and_broken_messages(registered: SimWorld) -> None:
    world, worker = registered, registered.worker
    job = world.producer.make_job(2, kind="manual")
    assert job.work_id is not None
    world.platform.add_expectations(job.work_id, 1)
    empty = {"type": "bundle", "id": f"bundle--{uuid.uuid4()}", "spec_version": "2.1"}
    await publish_push(world, push_envelope({**empty, "objects": []}, job.work_id))
    await publish_push(world, push_envelope(empty, job.work_id))
    await publish_push(world, b"{not json")
    no_content = json.loads(push_envelope({**empty, "objects": [MARKING_AMBER]}, job.work_id))
    del no_content["content"]
    await publish_push(world, json.dumps(no_content).encode())
    await publish_push(world, push_envelope(empty, job.work_id, content="%%%not-base64"))
    assert await worker.wait_for(lambda w: w.counters.received == 5, timeout=30)
    assert await worker.wait_idle(30)
    assert worker.counters.rejected == 5 and worker.counters.acked == 0
    assert not worker.messages
    reasons = [r.reason for r in worker.rejections]
    assert reasons[0] == "JSON data type is not a STIX2 bundle"
    assert any("not JSON" in r for r in reasons) and "missing content" in reasons
    work = world.platform.works[job.work_id]
    assert work.processed == 0 and work.status != "complete"  # nothing reported


async def test_worker_splits_multi_object_bundles(registered: SimWorld) -> None:
    world, worker = registered, registered.worker
    job = world.producer.make_job(3, kind="manual", entity_type="Domain-Name")
    assert job.work_id is not None
    ent = entity_of(job)
    ent["object_marking_refs"] = [MARKING_AMBER["id"]]
    bundle = {
        "type": "bundle",
        "id": f"bundle--{uuid.uuid4()}",
        "spec_version": "2.1",
        "objects": [MARKING_AMBER, ent],
    }
    # unsplit without no_split: the worker splits, adds 2 expectations and re-publishes 2 messages
    await publish_push(world, push_envelope(bundle, job.work_id))
    assert await world.platform.wait_works([job.work_id], timeout=30)
    assert await worker.wait_idle(30)
    work = world.platform.works[job.work_id]
    assert (work.expected, work.processed) == (2, 2)
    assert worker.counters.split_messages == 1 and worker.counters.republished == 2
    outcomes = Counter(r.outcome for r in worker.messages)
    assert outcomes == {"split": 1, "imported": 2}
    republished = [r for r in worker.messages if r.outcome == "imported"]
    assert all(r.keys == worker.messages[0].keys for r in republished)
    assert all(r.properties["content_encoding"] == "utf-8" for r in republished)

    # no_split: one message, one report per object
    job2 = world.producer.make_job(4, kind="manual", entity_type="Hostname")
    assert job2.work_id is not None
    world.platform.add_expectations(job2.work_id, 1)
    bundle2 = {**bundle, "objects": [MARKING_AMBER, entity_of(job2)]}
    await publish_push(world, push_envelope(bundle2, job2.work_id, no_split=True))
    assert await worker.wait_for(lambda w: w.counters.received == 4, timeout=30)
    assert await worker.wait_idle(30)
    work2 = world.platform.works[job2.work_id]
    assert (work2.expected, work2.processed, work2.status) == (1, 2, "complete")
    assert len(worker.objects_by_work[job2.work_id]) == 2


async def test_worker_reports_parse_errors_and_drops_dead_works(registered: SimWorld) -> None:
    world, worker = registered, registered.worker
    job = world.producer.make_job(5, kind="manual")
    assert job.work_id is not None
    world.platform.add_expectations(job.work_id, 1)
    bad = {"type": "indicator", "id": f"indicator--{uuid.uuid4()}", "spec_version": "2.1"}
    bundle = {"type": "bundle", "id": f"bundle--{uuid.uuid4()}", "spec_version": "2.1"}
    await publish_push(world, push_envelope({**bundle, "objects": [bad]}, job.work_id))
    assert await world.platform.wait_works([job.work_id], timeout=30)
    work = world.platform.works[job.work_id]
    assert work.processed == 1 and len(work.errors) == 1
    assert worker.counters.reported_error == 1

    dead = world.producer.make_job(6, kind="manual")
    assert dead.work_id is not None
    world.platform.kill_work(dead.work_id)
    await publish_push(world, push_envelope({**bundle, "objects": [entity_of(dead)]}, dead.work_id))
    two = {**bundle, "objects": [MARKING_AMBER, entity_of(dead)]}
    await publish_push(world, push_envelope(two, dead.work_id))
    assert await worker.wait_for(lambda w: w.counters.received == 3, timeout=30)
    assert await worker.wait_idle(30)
    assert worker.counters.dropped_dead == 2 and worker.counters.acked == 3
    assert worker.counters.republished == 0
    assert [r.outcome for r in worker.messages[1:]] == ["dropped", "dropped"]


async def test_worker_cheap_mode_and_max_records() -> None:
    async with SimWorld(worker_options={"validate": False, "max_records": 2}) as world:
        await register(world)
        worker = await world.start_worker_emulation(timeout=30)
        job = world.producer.make_job(0, kind="manual")
        assert job.work_id is not None
        world.platform.add_expectations(job.work_id, 5)
        bundle = {"type": "bundle", "id": f"bundle--{uuid.uuid4()}", "spec_version": "2.1"}
        for _ in range(5):
            await publish_push(
                world, push_envelope({**bundle, "objects": [{"type": "x"}]}, job.work_id)
            )
        assert await world.platform.wait_works([job.work_id], timeout=30)
        assert await worker.wait_idle(30)
        assert worker.counters.reported_ok == 5 and worker.counters.reported_error == 0
        assert len(worker.messages) == 2
        assert sum(len(v) for v in worker.objects_by_work.values()) == 2


# ---------------------------------------------------------------------------------- world


async def test_world_round_trip_and_cleanup() -> None:
    async with SimWorld(seed=42) as world:
        env = world.env()
        assert env["OPENCTI_URL"] == world.opencti_url and world.opencti_url.startswith("http://")
        assert env["OPENCTI_TOKEN"] == world.opencti_token
        assert env["CONNECTOR_ID"] == world.connector_id
        assert env["CONNECTOR_SCOPE"] == "StixFile,Domain-Name,Hostname,Url"
        assert env["CONFIG_LIS_APIKEY_CTI"] == world.lis_api_key
        assert env["LASTINFOSEC_BASE_URL"] == world.lis_base_url
        assert world.lis_base_url.endswith("/v2") and env["CONNECTOR_NAME"]

        # the push queue only exists after registration: start the emulation concurrently
        waiter = asyncio.create_task(world.start_worker_emulation(timeout=30))
        reg = await register(world)
        worker = await waiter
        names = world.names()
        assert reg["config"]["listen"] == names["listen"]
        assert reg["config"]["push"] == names["push"] == worker.push_queue

        kinds = ["manual", "auto_create", "auto_update", "draft", "stix_objects_string"]
        jobs = [world.producer.make_job(i, kind=k) for i, k in enumerate(kinds)]
        await asyncio.gather(*(world.producer.publish(j) for j in jobs))

        # play the connector: consume the listen queue, answer each job with one object
        conn = await aio_pika.connect(AMQP_URL)
        try:
            channel = await conn.channel()
            queue = await channel.get_queue(names["listen"], ensure=False)
            exchange = await channel.get_exchange(names["push_exchange"], ensure=False)
            for _ in jobs:
                msg = await queue.get(timeout=30, fail=True)
                assert msg is not None
                data = json.loads(msg.body)
                work_id = data["internal"]["work_id"]
                ent = json.loads(data["event"]["stix_entity"])
                world.platform.to_received(work_id, "Connector ready to process the operation")
                world.platform.add_expectations(work_id, 1)
                bundle = {
                    "type": "bundle",
                    "id": f"bundle--{uuid.uuid4()}",
                    "spec_version": "2.1",
                    "objects": [ent],
                }
                body = push_envelope(bundle, work_id, draft_id=data["internal"]["draft_id"])
                await exchange.publish(
                    aio_pika.Message(body, delivery_mode=2, content_encoding="utf-8"),
                    names["push_routing"],
                )
                world.platform.to_processed(work_id, "done")
                await msg.ack()
        finally:
            await conn.close()

        work_ids = [j.work_id for j in jobs if j.work_id]
        assert len(work_ids) == 5
        assert await world.platform.wait_works(work_ids, timeout=30)
        assert await worker.wait_idle(30)
        assert worker.counters.reported_ok == 5
        for job in jobs:
            assert job.work_id is not None
            assert [o["id"] for o in worker.objects_by_work[job.work_id]] == [job.entity_id]
        [draft] = [r for r in worker.messages if r.draft_id is not None]
        assert draft.draft_id == jobs[3].draft_id

    # queues are gone after exit
    conn2 = await aiormq.connect(AMQP_URL)
    try:
        for name in (names["listen"], names["push"]):
            channel2 = await conn2.channel()
            with pytest.raises(aiormq.exceptions.ChannelNotFoundEntity):
                await channel2.queue_declare(name, passive=True)
    finally:
        await conn2.close()


async def test_world_worker_emulation_times_out_without_connector(world: SimWorld) -> None:
    with pytest.raises(TimeoutError):
        await world.start_worker_emulation(timeout=0.3)


async def test_world_with_queue_prefix_cleans_exchanges() -> None:
    from lis_async.sim.opencti import PlatformSimConfig

    prefix = f"simtest{uuid.uuid4().hex[:8]}"
    async with SimWorld(platform_config=PlatformSimConfig(queue_prefix=prefix)) as world:
        await register(world)
        await world.start_worker_emulation(timeout=30)
        names = world.names()
        assert names["listen"].startswith(prefix + "_")
        jobs = await world.producer.publish_many(2, kind="manual")
        assert len(jobs) == 2
    conn = await aiormq.connect(AMQP_URL)
    try:
        for exchange in (names["listen_exchange"], names["push_exchange"]):
            channel = await conn.channel()
            with pytest.raises(aiormq.exceptions.ChannelNotFoundEntity):
                await channel.exchange_declare(exchange, passive=True)
    finally:
        await conn.close()
