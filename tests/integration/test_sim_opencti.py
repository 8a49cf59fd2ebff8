"""Integration tests of the simulated OpenCTI platform (real RabbitMQ on 127.0.0.1:5672).

The most important tests are the pycti conformance ones at the end: pycti's own
``OpenCTIApiClient`` and ``OpenCTIConnectorHelper`` run unchanged against the double.
"""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import threading
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import aio_pika
import aiohttp
import aiormq
import orjson
import pytest
from jwt import PyJWKSet

from lis_async.sim.opencti import (
    STIX_EXT_OCTI,
    STIX_EXT_OCTI_SCO,
    PlatformSim,
    PlatformSimConfig,
    WorkNotAlive,
)

pytestmark = pytest.mark.rabbitmq

AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/"
TLP_AMBER = "marking-definition--f88d31f6-486f-44da-b317-01333bde0b82"
TLP_GREEN = "marking-definition--34098fce-860f-48ae-8e50-ebd3cc5e41da"

REGISTER = """
mutation RegisterConnector($input: RegisterConnectorInput) {
  registerConnector(input: $input) {
    id connector_state jwks connector_user_id
    config {
      connection { host vhost use_ssl port user pass }
      s3 { endpoint port use_ssl bucket_name bucket_region access_key secret_key }
      listen listen_routing listen_exchange push push_routing push_exchange
    }
  }
}"""
PING = """
mutation PingConnector($id: ID!, $state: String, $connectorInfo: ConnectorInfoInput ) {
  pingConnector(id: $id, state: $state, connectorInfo: $connectorInfo) {
    id connector_state
    connector_info { run_and_terminate buffering queue_threshold queue_messages_size
                     next_run_datetime last_run_datetime }
  }
}"""
TO_RECEIVED = """mutation workToReceived($id: ID!, $message: String) {
  workEdit(id: $id) { toReceived (message: $message) } }"""
ADD_EXPECTATIONS = """mutation addExpectations($id: ID!, $expectations: Int) {
  workEdit(id: $id) { addExpectations(expectations: $expectations) } }"""
REPORT_EXPECTATION = """mutation reportExpectation($id: ID!, $error: WorkErrorInput) {
  workEdit(id: $id) { reportExpectation(error: $error) } }"""
TO_PROCESSED = """mutation workToProcessed($id: ID!, $message: String, $inError: Boolean) {
  workEdit(id: $id) { toProcessed (message: $message, inError: $inError) } }"""
READ_SCO = """query StixCyberObservable($id: String!) { stixCyberObservable(id: $id) {
  id standard_id entity_type objectMarking { definition_type definition }
  ... on StixFile { hashes { algorithm hash } } } }"""
PLAYBOOK = """mutation PlaybookStepExecution($execution_id: ID!, $event_id: ID!,
  $execution_start: DateTime!, $data_instance_id: ID!, $playbook_id: ID!,
  $previous_step_id: ID!, $step_id: ID!, $previous_bundle: String!, $bundle: String!) {
  playbookStepExecution(execution_id: $execution_id, event_id: $event_id,
    execution_start: $execution_start, data_instance_id: $data_instance_id,
    playbook_id: $playbook_id, previous_step_id: $previous_step_id, step_id: $step_id,
    previous_bundle: $previous_bundle, bundle: $bundle) }"""

DOMAIN_ENTITY: dict[str, Any] = {
    "id": "domain-name--3e9b2c71-4f0a-5d6e-8c1b-9a7f6e5d4c3b",
    "spec_version": "2.1",
    "type": "domain-name",
    "value": "bad.example.com",
    "object_marking_refs": [TLP_GREEN],
    "extensions": {
        STIX_EXT_OCTI: {
            "extension_type": "property-extension",
            "id": "a7c1e3f5-2b4d-4c6e-8f0a-1b3d5f7a9c2e",
            "type": "Domain-Name",
            "created_at": "2025-05-02T10:00:00.000Z",
            "updated_at": "2025-05-02T10:00:01.000Z",
            "is_inferred": False,
            "creator_ids": ["88ec0c6a-13ce-5e39-b486-354fe4a7084f"],
        },
        STIX_EXT_OCTI_SCO: {"extension_type": "property-extension", "score": 50},
    },
}
FILE_ENTITY: dict[str, Any] = {
    "id": "file--9d8c7b6a-5f4e-5d3c-8b2a-1f0e9d8c7b6a",
    "spec_version": "2.1",
    "type": "file",
    "hashes": {
        "MD5": "44d88612fea8a8f36de82e1278abb02f",
        "SHA-256": "275a021bbfb6489e54d471899f7db9d1663fc695ec2fe2a2c4538aabf651fd0f",
    },
    "size": 68,
    "name": "eicar.com",
    "object_marking_refs": [TLP_AMBER],
    "extensions": {
        STIX_EXT_OCTI: {
            "extension_type": "property-extension",
            "id": "0c9b8a7d-6e5f-4a3b-9c2d-1e0f9a8b7c6d",
            "type": "StixFile",
            "created_at": "2025-05-02T10:00:00.000Z",
            "updated_at": "2025-05-02T10:00:01.000Z",
            "is_inferred": False,
            "creator_ids": ["88ec0c6a-13ce-5e39-b486-354fe4a7084f"],
            "granted_refs": ["identity--7b1c2d3e-4f5a-5b6c-9d7e-8f9a0b1c2d3e"],
            "granted_refs_ids": ["5d2a8e2b-4f1c-4b7e-9a3d-2c1b0a9f8e7d"],
        },
        STIX_EXT_OCTI_SCO: {
            "extension_type": "property-extension",
            "labels": ["malware"],
            "score": 80,
        },
    },
}


# ------------------------------------------------------------------------------------ fixtures


@pytest.fixture
async def sim() -> AsyncIterator[PlatformSim]:
    s = PlatformSim(PlatformSimConfig(amqp_url=AMQP_URL))
    await s.start()
    try:
        yield s
    finally:
        await s.delete_connector_queues()
        await s.close()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


@pytest.fixture
async def amqp() -> AsyncIterator[aio_pika.abc.AbstractConnection]:
    conn = await aio_pika.connect(AMQP_URL)
    try:
        yield conn
    finally:
        await conn.close()


async def gql(
    http: aiohttp.ClientSession,
    sim: PlatformSim,
    query: str,
    variables: dict[str, Any] | None = None,
    token: str | None = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, Any]:
    hdrs = {"Authorization": f"Bearer {sim.config.token if token is None else token}"}
    hdrs.update(headers or {})
    async with http.post(
        sim.graphql_url, json={"query": query, "variables": variables or {}}, headers=hdrs
    ) as resp:
        text = await resp.text()
        try:
            return resp.status, json.loads(text)
        except json.JSONDecodeError:
            return resp.status, text


def register_input(cid: str, name: str = "LastInfoSec test") -> dict[str, Any]:
    return {
        "input": {
            "id": cid,
            "name": name,
            "type": "INTERNAL_ENRICHMENT",
            "scope": ["StixFile", "Domain-Name", "Hostname", "Url"],
            "auto": True,
            "auto_update": False,
            "enrichment_resolution": "none",
            "only_contextual": False,
            "playbook_compatible": True,
            "listen_callback_uri": None,
            "version": None,
            "slug": None,
        }
    }


async def register(http: aiohttp.ClientSession, sim: PlatformSim, cid: str) -> dict[str, Any]:
    status, body = await gql(http, sim, REGISTER, register_input(cid))
    assert status == 200, body
    assert "errors" not in body, body
    return dict(body["data"]["registerConnector"])


async def rabbitmqctl_queue_arguments(queue: str) -> dict[str, Any] | None:
    """The queue's arguments as the broker stores them (None if rabbitmqctl is unavailable)."""
    if shutil.which("rabbitmqctl") is None:
        return None
    try:
        proc = await asyncio.create_subprocess_exec(
            *("rabbitmqctl", "-q", "list_queues", "name", "arguments", "--formatter", "json"),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.DEVNULL,
        )
        out, _ = await asyncio.wait_for(proc.communicate(), 20)
        rows = json.loads(out)
    except (OSError, TimeoutError, json.JSONDecodeError):
        return None
    for row in rows:
        if row["name"] == queue:
            return {arg[0]: arg[2] for arg in row["arguments"]}
    return None


def error_code(body: Any) -> str:
    return str(body["errors"][0]["extensions"]["code"])


# ------------------------------------------------------------------------ registration / queues


async def test_registration_answer_and_real_queues(
    sim: PlatformSim, http: aiohttp.ClientSession, amqp: aio_pika.abc.AbstractConnection
) -> None:
    cid = str(uuid.uuid4())
    ans = await register(http, sim, cid)
    assert ans["id"] == cid
    assert ans["connector_state"] is None
    assert ans["connector_user_id"] == sim.config.connector_user_id
    jwks = PyJWKSet.from_json(ans["jwks"])  # what pycti does unconditionally
    assert len(jwks.keys) == 1
    cfg = ans["config"]
    assert cfg["connection"] == {
        "host": "127.0.0.1",
        "vhost": "/",
        "use_ssl": False,
        "port": 5672,
        "user": "guest",
        "pass": "guest",
    }
    assert set(cfg["s3"]) >= {"endpoint", "bucket_name", "access_key", "secret_key"}
    assert cfg["listen"] == f"listen_{cid}"
    assert cfg["listen_routing"] == f"listen_routing_{cid}"
    assert cfg["listen_exchange"] == "amqp.connector.exchange"
    assert cfg["push"] == f"push_{cid}"
    assert cfg["push_routing"] == f"push_routing_{cid}"
    assert cfg["push_exchange"] == "amqp.worker.exchange"
    reg = sim.registration(cid)
    assert {k: reg[k] for k in cfg if k not in ("connection", "s3")} == {
        k: v for k, v in cfg.items() if k not in ("connection", "s3")
    }

    rec = sim.connectors[cid]
    assert rec.scope == ["StixFile", "Domain-Name", "Hostname", "Url"]
    assert rec.auto is True and rec.auto_update is False
    assert rec.playbook_compatible is True
    assert rec.enrichment_resolution == "none"
    assert rec.type == "INTERNAL_ENRICHMENT"
    assert rec.name == "LastInfoSec test"
    assert rec.active

    # the queues exist for real: a passive declare works and the binding routes
    ch = await amqp.channel()
    listen = await ch.declare_queue(cfg["listen"], passive=True)
    push = await ch.declare_queue(cfg["push"], passive=True)
    lx = await ch.get_exchange(cfg["listen_exchange"], ensure=False)
    px = await ch.get_exchange(cfg["push_exchange"], ensure=False)
    await lx.publish(aio_pika.Message(b'{"x":1}'), routing_key=cfg["listen_routing"])
    await px.publish(aio_pika.Message(b'{"y":2}'), routing_key=cfg["push_routing"])
    got = await listen.get(timeout=5, fail=True)
    assert got is not None and got.body == b'{"x":1}'
    await got.ack()
    got = await push.get(timeout=5, fail=True)
    assert got is not None and got.body == b'{"y":2}'
    await got.ack()

    # ...declared durable with the platform's x- arguments: a client that actively declares
    # with aio-pika defaults (durable=False) or another queue type is refused with 406.
    # (RabbitMQ 3.10 does not compare the non-"x-" arguments name/config, see below.)
    with pytest.raises(aiormq.exceptions.ChannelPreconditionFailed) as exc:
        await ch.declare_queue(cfg["listen"])
    assert "PRECONDITION_FAILED" in str(exc.value)
    ch = await amqp.channel()
    with pytest.raises(aiormq.exceptions.ChannelPreconditionFailed):
        await ch.declare_queue(cfg["push"], durable=True, arguments={"x-queue-type": "quorum"})
    ch2 = await amqp.channel()
    same_args = sim.queue_arguments(rec)
    assert same_args == {
        "name": "LastInfoSec test",
        "config": {"id": cid, "type": "INTERNAL_ENRICHMENT", "scope": rec.scope},
        "x-queue-type": "classic",
    }
    await ch2.declare_queue(cfg["listen"], durable=True, arguments=same_args)  # identical: ok
    broker_args = await rabbitmqctl_queue_arguments(cfg["listen"])
    if broker_args is not None:  # the exotic table arguments really are on the queue
        assert set(broker_args) == {"name", "config", "x-queue-type"}
        assert broker_args["name"] == "LastInfoSec test"

    # re-registration and ping re-assert without error; state survives re-registration
    await gql(http, sim, PING, {"id": cid, "state": '{"a": 1}', "connectorInfo": None})
    ans2 = await register(http, sim, cid)
    assert ans2["connector_state"] == '{"a": 1}'
    assert sim.connectors[cid].register_count == 2
    assert sim.amqp_errors == []


async def test_queue_prefix(
    sim: PlatformSim, http: aiohttp.ClientSession, amqp: aio_pika.abc.AbstractConnection
) -> None:
    prefix = "t" + uuid.uuid4().hex[:8]
    sim.config.queue_prefix = prefix
    cid = str(uuid.uuid4())
    try:
        cfg = (await register(http, sim, cid))["config"]
        assert cfg["listen"] == f"{prefix}_listen_{cid}"
        assert cfg["listen_routing"] == f"{prefix}_listen_routing_{cid}"
        assert cfg["listen_exchange"] == f"{prefix}_amqp.connector.exchange"
        assert cfg["push"] == f"{prefix}_push_{cid}"
        assert cfg["push_routing"] == f"{prefix}_push_routing_{cid}"
        assert cfg["push_exchange"] == f"{prefix}_amqp.worker.exchange"
        ch = await amqp.channel()
        q = await ch.declare_queue(cfg["listen"], passive=True)
        x = await ch.declare_exchange(cfg["listen_exchange"], passive=True)
        await x.publish(aio_pika.Message(b"{}"), routing_key=cfg["listen_routing"])
        msg = await q.get(timeout=5, fail=True)
        assert msg is not None
        await msg.ack()
        # the unprefixed names were not created
        with pytest.raises(aiormq.exceptions.ChannelNotFoundEntity):
            await (await amqp.channel()).declare_queue(f"listen_{cid}", passive=True)
    finally:
        await sim.delete_connector_queues(cid)
        ch = await amqp.channel()
        await ch.exchange_delete(f"{prefix}_amqp.connector.exchange")
        await ch.exchange_delete(f"{prefix}_amqp.worker.exchange")


async def test_push_queue_max_length_rejects_publish(
    sim: PlatformSim, http: aiohttp.ClientSession, amqp: aio_pika.abc.AbstractConnection
) -> None:
    sim.config.push_queue_max_length = 1
    cid = str(uuid.uuid4())
    cfg = (await register(http, sim, cid))["config"]
    ch = await amqp.channel(publisher_confirms=True)
    px = await ch.get_exchange(cfg["push_exchange"], ensure=False)
    await px.publish(aio_pika.Message(b"1"), routing_key=cfg["push_routing"])
    with pytest.raises(aio_pika.exceptions.DeliveryError):
        await px.publish(aio_pika.Message(b"2"), routing_key=cfg["push_routing"])
    args = sim.queue_arguments(sim.connectors[cid], push=True)
    assert args["x-max-length"] == 1 and args["x-overflow"] == "reject-publish"


async def test_connector_queue_details_are_the_push_queues_figures(
    sim: PlatformSim, http: aiohttp.ClientSession, amqp: aio_pika.abc.AbstractConnection
) -> None:
    """What pycti's check_connector_buffering reads: the push queue's messages (ready and
    unacknowledged) and body bytes, from the broker; zeros when told not to measure."""
    from pycti import OpenCTIApiClient

    cid = str(uuid.uuid4())
    cfg = (await register(http, sim, cid))["config"]
    api = await asyncio.to_thread(OpenCTIApiClient, sim.base_url, sim.config.token, "error")

    async def read() -> dict[str, int]:
        node = await asyncio.to_thread(api.connector.read, connector_id=cid)
        return dict(node["connector_queue_details"])

    assert await read() == {"messages_number": 0, "messages_size": 0}
    assert sim.queue_meter.listings == 0  # nothing ready: no rabbitmqctl
    ch = await amqp.channel(publisher_confirms=True)
    px = await ch.get_exchange(cfg["push_exchange"], ensure=False)
    for body in (b"a" * 1000, b"b" * 234, b"c" * 5000):
        await px.publish(aio_pika.Message(body, headers={"h": "x" * 100}), cfg["push_routing"])
    assert await read() == {"messages_number": 3, "messages_size": 6234}  # bodies only
    # A consumer holding one unacknowledged message: still counted, as RabbitMQ counts it.
    await ch.set_qos(prefetch_count=1)
    queue = await ch.get_queue(cfg["push"], ensure=False)
    got: asyncio.Queue[aio_pika.abc.AbstractIncomingMessage] = asyncio.Queue()
    await queue.consume(got.put)
    first = await asyncio.wait_for(got.get(), 10)
    await asyncio.sleep(sim.config.queue_details_ttl_s)  # past the listing's lifetime
    assert await read() == {"messages_number": 3, "messages_size": 6234}
    await first.ack()
    await asyncio.sleep(sim.config.queue_details_ttl_s)
    assert await read() == {"messages_number": 2, "messages_size": 5234}
    sim.config.queue_details = "off"
    assert await read() == {"messages_number": 0, "messages_size": 0}


async def test_older_schema_missing_field_fails_validation(
    sim: PlatformSim, http: aiohttp.ClientSession, amqp: aio_pika.abc.AbstractConnection
) -> None:
    """A platform whose schema lacks ``Connector.jwks`` refuses a registration selecting it
    the way OpenCTI's GraphQL validation does, before authentication, and registers nothing."""
    sim.config.missing_fields = frozenset({"Connector.jwks"})
    cid = str(uuid.uuid4())
    expected = {
        "errors": [
            {
                "message": 'Cannot query field "jwks" on type "Connector".',
                "locations": [{"line": 4, "column": 24}],
                "extensions": {"code": "GRAPHQL_VALIDATION_FAILED"},
            }
        ]
    }
    assert REGISTER.splitlines()[3].index("jwks") == 23
    for token in (None, "wrong"):  # validation comes before the token check
        status, body = await gql(http, sim, REGISTER, register_input(cid), token=token)
        assert (status, body) == (200, expected)  # OpenCTI answers 200 when there are errors
    sim.config.validation_error_status = 400  # Apollo Server alone, OpenCTI 3.x
    status, body = await gql(http, sim, REGISTER, register_input(cid))
    assert (status, body) == (400, expected)

    # nothing was done: no connector, no queue; each request is recorded as refused
    assert cid not in sim.connectors
    with pytest.raises(aiormq.exceptions.ChannelNotFoundEntity):
        await (await amqp.channel()).declare_queue(f"listen_{cid}", passive=True)
    assert sim.calls["RegisterConnector"] == 3
    assert [r.outcome for r in sim.requests] == ["GRAPHQL_VALIDATION_FAILED"] * 3

    # the same registration without jwks goes through, and the answer has no jwks
    status, body = await gql(http, sim, REGISTER.replace(" jwks", ""), register_input(cid))
    assert status == 200 and "errors" not in body, body
    assert body["data"]["registerConnector"]["id"] == cid
    assert "jwks" not in body["data"]["registerConnector"]
    assert sim.connectors[cid].register_count == 1

    # pycti reads the (default) HTTP 200 answer as a ValueError named after the code
    from pycti import OpenCTIApiClient
    from pycti.connector.opencti_connector import OpenCTIConnector

    sim.config.validation_error_status = 200
    api = await asyncio.to_thread(OpenCTIApiClient, sim.base_url, sim.config.token, "error")
    connector = OpenCTIConnector(
        connector_id=str(uuid.uuid4()),
        connector_name="old platform",
        connector_type="INTERNAL_ENRICHMENT",
        scope="Domain-Name",
        auto=False,
        only_contextual=False,
        playbook_compatible=False,
        auto_update=False,
        enrichment_resolution="none",
    )
    with pytest.raises(ValueError, match="GRAPHQL_VALIDATION_FAILED") as exc:
        await asyncio.to_thread(api.connector.register, connector)
    assert 'Cannot query field "jwks" on type "Connector".' in str(exc.value)


# ------------------------------------------------------------------------------------- works


async def test_completion_rule(sim: PlatformSim, http: aiohttp.ClientSession) -> None:
    cid = str(uuid.uuid4())
    wid = sim.create_work(cid)
    w = sim.works[wid]
    assert wid.startswith(f"work_{cid}_") and wid.endswith("Z") and w.status == "wait"

    _, body = await gql(http, sim, TO_RECEIVED, {"id": wid, "message": "ready"})
    assert body == {"data": {"workEdit": {"toReceived": wid}}}
    assert w.status == "progress" and w.received_time is not None and w.messages == ["ready"]
    await gql(http, sim, ADD_EXPECTATIONS, {"id": wid, "expectations": 2})
    assert w.expected == 2
    await gql(http, sim, REPORT_EXPECTATION, {"id": wid, "error": None})
    assert (w.processed, w.status) == (1, "progress")
    _, body = await gql(http, sim, TO_PROCESSED, {"id": wid, "message": "done", "inError": False})
    assert body == {"data": {"workEdit": {"toProcessed": wid}}}
    assert w.status == "progress" and w.processed_time is not None
    assert not await sim.wait_works([wid], timeout=0.05)
    waiter = asyncio.create_task(sim.wait_works([wid], timeout=5))
    await asyncio.sleep(0)
    await gql(http, sim, REPORT_EXPECTATION, {"id": wid, "error": None})
    assert await waiter
    assert w.status == "complete" and w.completed_time is not None
    assert w.messages == ["ready", "done"] and not w.in_error
    assert sim.calls["reportExpectation"] == 2 and sim.calls["workToProcessed"] == 1
    assert sim.works_by_status() == {"wait": 0, "progress": 0, "complete": 1}

    # nothing expected: toProcessed completes immediately
    wid2 = sim.create_work(cid)
    assert wid2 != wid
    await gql(http, sim, TO_RECEIVED, {"id": wid2, "message": None})
    await gql(http, sim, TO_PROCESSED, {"id": wid2, "message": "nothing", "inError": False})
    assert sim.works[wid2].status == "complete"
    assert await sim.wait_works(timeout=1)


async def test_work_ids_unique_and_in_platform_format(sim: PlatformSim) -> None:
    ids = [sim.create_work("c0ffee") for _ in range(200)]
    assert len(set(ids)) == 200
    for wid in ids[:3]:
        ts = wid.removeprefix("work_c0ffee_")
        assert len(ts) == len("2025-05-02T10:00:02.415Z") and ts[10] == "T" and ts[19] == "."


async def test_in_error_keeps_message_in_errors(
    sim: PlatformSim, http: aiohttp.ClientSession
) -> None:
    wid = sim.create_work("c1")
    await gql(http, sim, TO_RECEIVED, {"id": wid, "message": "ready"})
    await gql(http, sim, TO_PROCESSED, {"id": wid, "message": "boom", "inError": True})
    w = sim.works[wid]
    assert w.in_error and w.status == "complete"
    assert [e["message"] for e in w.errors] == ["boom"]
    assert "boom" not in w.messages
    # expectation errors are kept too, capped at 100
    wid2 = sim.create_work("c1")
    sim.add_expectations(wid2, 150)
    await gql(
        http,
        sim,
        REPORT_EXPECTATION,
        {"id": wid2, "error": {"error": "Incompatible element", "source": "x"}},
    )
    for _ in range(120):
        sim.report_expectation(wid2, {"error": "bad", "source": "y"})
    w2 = sim.works[wid2]
    assert w2.errors[0]["message"] == "Incompatible element" and w2.errors[0]["source"] == "x"
    assert len(w2.errors) == 100 and w2.processed == 121 and w2.status == "wait"


async def test_work_not_alive(sim: PlatformSim, http: aiohttp.ClientSession) -> None:
    wid = sim.create_work("c2")
    sim.kill_work(wid)
    for query, variables in (
        (TO_RECEIVED, {"id": wid, "message": "m"}),
        (ADD_EXPECTATIONS, {"id": wid, "expectations": 1}),
        (REPORT_EXPECTATION, {"id": wid, "error": None}),
        (TO_PROCESSED, {"id": wid, "message": "m", "inError": False}),
        (ADD_EXPECTATIONS, {"id": "work_unknown_2025-01-01T00:00:00.000Z", "expectations": 1}),
    ):
        status, body = await gql(http, sim, query, variables)
        assert status == 200
        assert body["data"] is None
        err = body["errors"][0]
        assert err["extensions"]["code"] == "WORK_NOT_ALIVE" == err["name"]
        assert err["message"] == (
            "Work is no longer alive, no request can be done within the context of this work"
        )
        assert err["extensions"]["data"]["http_status"] == 400
    with pytest.raises(WorkNotAlive):
        sim.report_expectation(wid)
    assert not await sim.wait_works([wid], timeout=5)  # killed: returns early, not complete
    assert sim.works_by_status()["killed"] == 1
    # the worker's opencti-work-id header of a dead work is refused on any request
    status, body = await gql(
        http, sim, "query healthCheck { about { version } }", headers={"opencti-work-id": wid}
    )
    assert error_code(body) == "WORK_NOT_ALIVE"


# The document the connector sends to follow a work (the double answers a superset).
WORK_TRACKING = """query WorkTracking($id: ID!) { work(id: $id) {
  id status tracking { import_expected_number import_processed_number } } }"""
ISO_Z = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z"


async def work_answer(http: aiohttp.ClientSession, sim: PlatformSim, wid: str) -> Any:
    status, body = await gql(http, sim, WORK_TRACKING, {"id": wid})
    assert status == 200 and "errors" not in body, body
    return body["data"]["work"]


def tracking(node: dict[str, Any]) -> tuple[Any, Any]:
    t = node["tracking"]
    return t["import_expected_number"], t["import_processed_number"]


async def test_work_query_follows_the_lifecycle(
    sim: PlatformSim, http: aiohttp.ClientSession
) -> None:
    wid = sim.create_work("c5", "Enrichment (x)")
    fresh = await work_answer(http, sim, wid)
    assert fresh["id"] == wid and fresh["status"] == "wait" and fresh["name"] == "Enrichment (x)"
    # the work's timestamp is the one in its id; running counters nobody wrote read null
    assert fresh["timestamp"] == wid.removeprefix("work_c5_")
    assert fresh["received_time"] is None and fresh["processed_time"] is None
    assert fresh["completed_time"] is None and tracking(fresh) == (None, None)
    assert fresh["messages"] == [] and fresh["errors"] == []
    assert fresh["user"]["id"] == sim.config.connector_user_id

    await gql(http, sim, TO_RECEIVED, {"id": wid, "message": "ready"})
    received = await work_answer(http, sim, wid)
    assert received["status"] == "progress" and re.fullmatch(ISO_Z, received["received_time"])
    assert [m["message"] for m in received["messages"]] == ["ready"]
    assert re.fullmatch(ISO_Z, received["messages"][0]["timestamp"])
    assert tracking(received) == (None, None)

    await gql(http, sim, ADD_EXPECTATIONS, {"id": wid, "expectations": 2})
    assert tracking(await work_answer(http, sim, wid)) == (2, None)
    await gql(http, sim, REPORT_EXPECTATION, {"id": wid, "error": {"error": "e", "source": "s"}})
    reported = await work_answer(http, sim, wid)
    assert reported["status"] == "progress" and tracking(reported) == (2, 1)
    assert re.fullmatch(ISO_Z, reported["tracking"]["import_last_processed"])
    assert [(e["message"], e["source"]) for e in reported["errors"]] == [("e", "s")]

    await gql(http, sim, TO_PROCESSED, {"id": wid, "message": "done", "inError": False})
    processed = await work_answer(http, sim, wid)
    assert processed["status"] == "progress" and processed["processed_time"] is not None
    assert processed["completed_time"] is None and tracking(processed) == (2, 1)

    await gql(http, sim, REPORT_EXPECTATION, {"id": wid, "error": None})
    done = await work_answer(http, sim, wid)
    assert done["status"] == "complete" and re.fullmatch(ISO_Z, done["completed_time"])
    assert tracking(done) == (2, 2) and done["completed_number"] == 2
    assert [m["message"] for m in done["messages"]] == ["ready", "done"]

    # a work that completed with nothing expected answers numbers, not nulls
    wid0 = sim.create_work("c5")
    sim.to_processed(wid0, "nothing to do")
    assert tracking(await work_answer(http, sim, wid0)) == (0, 0)

    # recorded like the other operations, under pycti's operation name
    assert sim.calls["WorkQuery"] == 7
    last = sim.requests[-1]
    assert (last.operation, last.operation_name, last.variables) == (
        "WorkQuery",
        "WorkTracking",
        {"id": wid0},
    )


async def test_work_query_unknown_or_killed_is_null(
    sim: PlatformSim, http: aiohttp.ClientSession
) -> None:
    unknown = "work_c6_2025-01-01T00:00:00.000Z"
    status, body = await gql(http, sim, WORK_TRACKING, {"id": unknown})
    assert (status, body) == (200, {"data": {"work": None}})
    wid = sim.create_work("c6")
    sim.add_expectations(wid, 1)
    assert (await work_answer(http, sim, wid))["status"] == "wait"
    sim.kill_work(wid)
    status, body = await gql(http, sim, WORK_TRACKING, {"id": wid})
    assert (status, body) == (200, {"data": {"work": None}})  # null, not WORK_NOT_ALIVE
    assert [r.outcome for r in sim.requests] == ["ok", "ok", "ok"]


async def test_work_query_faults(sim: PlatformSim, http: aiohttp.ClientSession) -> None:
    wid = sim.create_work("c7")
    sim.config.outage = True
    status, _ = await gql(http, sim, WORK_TRACKING, {"id": wid})
    assert status == 503 and sim.requests[-1].outcome == "http_503"
    sim.config.outage = False
    sim.config.error_rate = 1.0  # default scope: work mutations only, not this query
    assert (await work_answer(http, sim, wid))["id"] == wid
    sim.config.error_scope = "all"
    status, body = await gql(http, sim, WORK_TRACKING, {"id": wid})
    assert status == 200 and error_code(body) == "DATABASE_ERROR"
    assert sim.requests[-1].outcome == "DATABASE_ERROR"
    assert sim.calls["WorkQuery"] == 3


async def test_pycti_get_work(sim: PlatformSim) -> None:
    """pycti's get_work selection is answered in full; wait_for_work_to_finish returns."""
    from pycti import OpenCTIApiClient

    api = await asyncio.to_thread(OpenCTIApiClient, sim.base_url, sim.config.token, "error")
    wid = sim.create_work("c8", "Enrichment")
    sim.to_received(wid, "ready")
    sim.add_expectations(wid, 1)
    work = await asyncio.to_thread(api.work.get_work, wid)
    assert set(work) >= {
        "id", "name", "user", "timestamp", "status", "event_source_id", "received_time",
        "processed_time", "completed_time", "tracking", "messages", "errors",
    }  # fmt: skip
    assert work["status"] == "progress" and work["user"]["name"]
    assert set(work["messages"][0]) >= {"timestamp", "message", "sequence", "source"}
    sim.report_expectation(wid)
    assert await asyncio.to_thread(api.work.wait_for_work_to_finish, wid) is None
    assert sim.requests[-1].operation_name == "WorkQuery"
    sim.kill_work(wid)
    assert await asyncio.to_thread(api.work.get_work, wid) is None


async def test_completion_rule_without_to_processed(sim: PlatformSim) -> None:
    """docs/protocol.md §6.2: complete as soon as processed >= expected, on a report too."""
    wid = sim.create_work("c9")
    sim.to_received(wid)
    sim.add_expectations(wid, 2)
    sim.report_expectation(wid)
    assert sim.works[wid].status == "progress"
    sim.report_expectation(wid)
    w = sim.works[wid]
    assert w.status == "complete" and w.processed_time is None and w.completed_time is not None
    # a report before any addExpectations completes the work at once (processed 1 >= 0)
    early = sim.create_work("c9")
    sim.to_received(early)
    sim.report_expectation(early)
    assert sim.works[early].status == "complete"
    # a complete work stays complete when more expectations come
    sim.add_expectations(early, 3)
    assert sim.works[early].status == "complete"


async def test_multipart_work_completes_after_to_processed(
    sim: PlatformSim, http: aiohttp.ClientSession
) -> None:
    _, body = await gql(
        http,
        sim,
        """mutation workAdd($connectorId: String!, $friendlyName: String,
             $isMultiPartWork: Boolean) { workAdd(connectorId: $connectorId,
             friendlyName: $friendlyName, isMultiPartWork: $isMultiPartWork) { id } }""",
        {"connectorId": "c10", "friendlyName": "multi", "isMultiPartWork": True},
    )
    wid = body["data"]["workAdd"]["id"]
    w = sim.works[wid]
    assert w.multipart and w.name == "multi"
    sim.add_expectations(wid, 1)
    sim.report_expectation(wid)
    assert w.status == "wait"  # all reported, but toProcessed has not come
    sim.add_expectations(wid, 1)
    sim.to_processed(wid, "sent")
    assert w.status == "wait"  # processed 1 < expected 2
    sim.report_expectation(wid)
    assert w.status == "complete"


async def test_history_and_early_completion(sim: PlatformSim) -> None:
    # toProcessed with 0 expectations, then the imports: complete before its objects
    early = sim.create_work("c11")
    sim.to_received(early, "ready")
    sim.to_processed(early, "2 bundles sent")
    sim.report_expectation(early)
    sim.report_expectation(early)
    w = sim.works[early]
    assert [s[1:] for s in w.history] == [
        ("wait", 0, 0),
        ("progress", 0, 0),
        ("complete", 0, 0),
        ("complete", 0, 1),
        ("complete", 0, 2),
    ]
    assert [s.time for s in w.history] == sorted(s.time for s in w.history)

    # addExpectations before publishing: never complete before the last import
    proper = sim.create_work("c11")
    sim.to_received(proper, "ready")
    sim.add_expectations(proper, 2)
    sim.report_expectation(proper)
    sim.report_expectation(proper)
    sim.to_processed(proper, "2 bundles sent")
    assert [s[1:] for s in sim.works[proper].history] == [
        ("wait", 0, 0),
        ("progress", 0, 0),
        ("progress", 2, 0),
        ("progress", 2, 1),
        ("complete", 2, 2),
    ]

    [found] = sim.early_completions()
    assert found.work_id == early and found.imported == 2
    assert (found.state.status, found.state.expected, found.state.processed) == ("complete", 0, 0)
    assert found.history == tuple(w.history)
    text = str(found)
    assert early in text and "0 expected and 0 processed" in text and "2 object(s)" in text
    assert "complete 0/0" in text and "complete 2/0" in text  # processed/expected
    assert sim.early_completions([proper]) == []
    with pytest.raises(KeyError):
        sim.early_completions(["work_nope_2025-01-01T00:00:00.000Z"])


async def test_early_completion_counts_and_long_history(sim: PlatformSim) -> None:
    # a re-imported object is a third report: flagged unless the distinct imports are given
    dup = sim.create_work("c12")
    sim.add_expectations(dup, 2)
    for _ in range(3):
        sim.report_expectation(dup)
    [flagged] = sim.early_completions([dup])
    assert (flagged.state.expected, flagged.state.processed, flagged.imported) == (2, 2, 3)
    assert sim.early_completions([dup], imported={dup: 2}) == []
    # and a missing addExpectations is found with the worker's count too
    assert sim.early_completions([dup], imported={dup: 5})[0].imported == 5

    long = sim.create_work("c12")
    sim.to_processed(long)
    for _ in range(20):
        sim.report_expectation(long)
    [entry] = sim.early_completions([long])
    assert len(entry.history) == 22
    assert "... 11 more ..." in entry.trail() and entry.trail().endswith(
        f"complete 20/0 @+{entry.history[-1].time - entry.history[0].time:.3f}s"
    )


# ------------------------------------------------------------------------------ auth / faults


async def test_bad_or_missing_token(sim: PlatformSim, http: aiohttp.ClientSession) -> None:
    status, body = await gql(http, sim, "query { about { version } }", token="wrong")
    assert status == 200 and body["data"] is None
    assert error_code(body) == "AUTH_REQUIRED" == body["errors"][0]["name"]
    async with http.post(sim.graphql_url, json={"query": "query { about { version } }"}) as r:
        assert r.status == 200
        assert error_code(await r.json()) == "AUTH_REQUIRED"
    status, body = await gql(http, sim, "query { about { version } }")
    assert body == {"data": {"about": {"version": sim.config.platform_version}}}
    # the Authorization value is never recorded
    assert all(sim.config.token not in repr(r) for r in sim.requests)
    assert [r.outcome for r in sim.requests] == ["AUTH_REQUIRED", "AUTH_REQUIRED", "ok"]


async def test_error_rate(sim: PlatformSim, http: aiohttp.ClientSession) -> None:
    wid = sim.create_work("c3")
    sim.config.error_rate = 1.0
    _, body = await gql(http, sim, ADD_EXPECTATIONS, {"id": wid, "expectations": 1})
    assert error_code(body) == "DATABASE_ERROR" == body["errors"][0]["name"]
    assert body["errors"][0]["extensions"]["data"]["http_status"] == 500
    assert sim.works[wid].expected == 0  # the failed mutation changed nothing
    _, body = await gql(http, sim, "query { about { version } }")
    assert "errors" not in body  # default scope: work mutations only
    sim.config.error_scope = "all"
    _, body = await gql(http, sim, "query { about { version } }")
    assert error_code(body) == "DATABASE_ERROR"
    sim.config.error_rate = 0.0
    _, body = await gql(http, sim, ADD_EXPECTATIONS, {"id": wid, "expectations": 1})
    assert "errors" not in body and sim.works[wid].expected == 1


async def test_outage_and_latency(sim: PlatformSim, http: aiohttp.ClientSession) -> None:
    sim.config.outage = True
    async with http.post(
        sim.graphql_url,
        json={"query": "query { about { version } }"},
        headers={"Authorization": f"Bearer {sim.config.token}"},
    ) as r:
        assert r.status == 503
        with pytest.raises(json.JSONDecodeError):
            json.loads(await r.text())
    sim.config.outage = False
    sim.outage_for(0.3)
    status, _ = await gql(http, sim, "query { about { version } }")
    assert status == 503
    await asyncio.sleep(0.35)
    status, body = await gql(http, sim, "query { about { version } }")
    assert status == 200 and "errors" not in body
    sim.config.latency_s = 0.2
    t0 = time.monotonic()
    await gql(http, sim, "query { about { version } }")
    assert time.monotonic() - t0 >= 0.2
    assert sim.requests[0].outcome == "http_503"


async def test_refuse_connections(sim: PlatformSim, http: aiohttp.ClientSession) -> None:
    await sim.set_refuse_connections(True)
    with pytest.raises(aiohttp.ClientConnectionError):
        await gql(http, sim, "query { about { version } }")
    await sim.set_refuse_connections(False)
    status, _ = await gql(http, sim, "query { about { version } }")
    assert status == 200


# ------------------------------------------------------------------------- ping / state


async def test_ping_records_and_reset_state(sim: PlatformSim, http: aiohttp.ClientSession) -> None:
    cid = str(uuid.uuid4())
    await register(http, sim, cid)
    info = {
        "run_and_terminate": False,
        "buffering": False,
        "queue_threshold": 500.0,
        "queue_messages_size": 0.0,
        "next_run_datetime": None,
        "last_run_datetime": None,
    }
    _, body = await gql(http, sim, PING, {"id": cid, "state": "null", "connectorInfo": info})
    assert body["data"]["pingConnector"] == {
        "id": cid,
        "connector_state": "null",
        "connector_info": info,
    }
    _, body = await gql(http, sim, PING, {"id": cid, "state": '{"last": 5}', "connectorInfo": info})
    assert body["data"]["pingConnector"]["connector_state"] == '{"last": 5}'
    rec = sim.connectors[cid]
    assert len(rec.pings) == 2 and rec.pings[0] <= rec.pings[1] <= time.time()
    assert rec.state == '{"last": 5}' and rec.connector_info == info

    sim.reset_state(cid)
    _, body = await gql(http, sim, PING, {"id": cid, "state": '{"last": 5}', "connectorInfo": info})
    assert body["data"]["pingConnector"]["connector_state"] == ""
    _, body = await gql(http, sim, PING, {"id": cid, "state": "null", "connectorInfo": info})
    assert body["data"]["pingConnector"]["connector_state"] == "null"

    _, body = await gql(http, sim, PING, {"id": str(uuid.uuid4()), "state": "null"})
    assert error_code(body) == "FUNCTIONAL_ERROR"

    async with http.get(sim.base_url + "/_sim/state") as r:
        state = await r.json()
    assert state["calls"]["PingConnector"] == 5
    assert state["connectors"][cid]["pings"] == 4
    assert 0 <= state["connectors"][cid]["last_ping_age_s"] < 5
    assert state["playbook_calls"] == 0
    assert state["works_by_status"] == {"wait": 0, "progress": 0, "complete": 0}


# ---------------------------------------------------------------------------------- reads


async def test_stix_cyber_observable_read(sim: PlatformSim, http: aiohttp.ClientSession) -> None:
    sim.put_entity(FILE_ENTITY)
    _, body = await gql(http, sim, READ_SCO, {"id": FILE_ENTITY["id"]})
    node = body["data"]["stixCyberObservable"]
    assert node["id"] == "0c9b8a7d-6e5f-4a3b-9c2d-1e0f9a8b7c6d"
    assert node["standard_id"] == FILE_ENTITY["id"]
    assert node["entity_type"] == "StixFile"
    assert {"algorithm": "MD5", "hash": "44d88612fea8a8f36de82e1278abb02f"} in node["hashes"]
    assert node["objectMarking"][0]["definition_type"] == "TLP"
    assert node["objectMarking"][0]["definition"] == "TLP:AMBER"
    assert node["objectOrganization"] == [
        {
            "id": "5d2a8e2b-4f1c-4b7e-9a3d-2c1b0a9f8e7d",
            "standard_id": "identity--7b1c2d3e-4f5a-5b6c-9d7e-8f9a0b1c2d3e",
            "name": node["objectOrganization"][0]["name"],
        }
    ]
    assert node["x_opencti_score"] == 80
    assert node["objectLabel"][0]["value"] == "malware"
    assert node["externalReferences"] == {"edges": []}
    assert node["observable_value"] == FILE_ENTITY["hashes"]["SHA-256"]
    # by internal id as well, and through stixCoreObject
    _, body = await gql(
        http,
        sim,
        "query StixCoreObject($id: String!) { stixCoreObject(id: $id) { id standard_id } }",
        {"id": node["id"]},
    )
    assert body["data"]["stixCoreObject"]["standard_id"] == FILE_ENTITY["id"]
    # absent -> null (no access)
    _, body = await gql(http, sim, READ_SCO, {"id": "file--00000000-0000-4000-8000-000000000000"})
    assert body == {"data": {"stixCyberObservable": None}}
    # draft store: visible only with the draft header
    sim.put_entity(DOMAIN_ENTITY, draft_id="draft-1")
    _, body = await gql(http, sim, READ_SCO, {"id": DOMAIN_ENTITY["id"]})
    assert body["data"]["stixCyberObservable"] is None
    _, body = await gql(
        http, sim, READ_SCO, {"id": DOMAIN_ENTITY["id"]}, headers={"opencti-draft-id": "draft-1"}
    )
    assert body["data"]["stixCyberObservable"]["value"] == "bad.example.com"
    assert sim.requests[-1].draft_id == "draft-1"
    _, body = await gql(
        http,
        sim,
        "query StixNestedRefRelationships($fromId: String, $first: Int) "
        "{ stixNestedRefRelationships(fromId: $fromId, first: $first) "
        "{ edges { node { id } } pageInfo { hasNextPage } } }",
        {"fromId": node["id"], "first": 500},
    )
    assert body["data"]["stixNestedRefRelationships"]["edges"] == []
    assert body["data"]["stixNestedRefRelationships"]["pageInfo"]["hasNextPage"] is False


async def test_playbook_step_execution(sim: PlatformSim, http: aiohttp.ClientSession) -> None:
    url_id = "url--5f1e2d3c-4b5a-5968-8776-a5b4c3d2e1f0"
    url_obj = {"type": "url", "spec_version": "2.1", "id": url_id, "value": "https://x.example/"}
    bundle = {"type": "bundle", "id": f"bundle--{uuid.uuid4()}", "objects": [url_obj]}
    variables = {
        "execution_id": str(uuid.uuid4()),
        "event_id": "1714644111000-0",
        "execution_start": "2025-05-02T10:00:00+00:00",
        "data_instance_id": url_id,
        "playbook_id": str(uuid.uuid4()),
        "previous_step_id": str(uuid.uuid4()),
        "step_id": str(uuid.uuid4()),
        "previous_bundle": json.dumps(bundle),
        "bundle": json.dumps(bundle),
    }
    _, body = await gql(
        http, sim, PLAYBOOK, variables, headers={"opencti-applicant-id": "automation"}
    )
    assert body == {"data": {"playbookStepExecution": True}}
    call = sim.playbook_calls[0]
    assert call["valid"] and call["problems"] == [] and call["applicant_id"] == "automation"
    assert {k: call[k] for k in variables} == variables
    assert sim.calls["PlaybookStepExecution"] == 1

    other = dict(bundle, objects=[dict(url_obj, id=f"url--{uuid.uuid4()}")])
    _, body = await gql(http, sim, PLAYBOOK, dict(variables, bundle=json.dumps(other)))
    assert error_code(body) == "VALIDATION_ERROR"
    assert not sim.playbook_calls[1]["valid"]
    _, body = await gql(http, sim, PLAYBOOK, dict(variables, bundle="{not json"))
    assert error_code(body) == "FUNCTIONAL_ERROR"
    assert len(sim.playbook_calls) == 3


# ------------------------------------------------------------------------ pycti conformance


async def test_pycti_api_client_conformance(sim: PlatformSim) -> None:
    from pycti import OpenCTIApiClient
    from pycti.connector.opencti_connector import OpenCTIConnector

    api = await asyncio.to_thread(OpenCTIApiClient, sim.base_url, sim.config.token, "error")
    assert await asyncio.to_thread(api.health_check)
    cid = str(uuid.uuid4())
    connector = OpenCTIConnector(
        connector_id=cid,
        connector_name="pycti conformance",
        connector_type="INTERNAL_ENRICHMENT",
        scope="Domain-Name,StixFile",
        auto=False,
        only_contextual=False,
        playbook_compatible=True,
        auto_update=False,
        enrichment_resolution="none",
    )
    reg = await asyncio.to_thread(api.connector.register, connector)
    assert reg["id"] == cid and reg["config"]["push"] == f"push_{cid}"
    PyJWKSet.from_json(reg["jwks"])
    pong = await asyncio.to_thread(api.connector.ping, cid, {"k": 1}, {"buffering": False})
    assert json.loads(pong["connector_state"]) == {"k": 1}
    assert sim.connectors[cid].scope == ["Domain-Name", "StixFile"]

    sim.put_entity(FILE_ENTITY)
    entity = await asyncio.to_thread(
        api.stix_cyber_observable.read, id=FILE_ENTITY["id"], withFiles=True
    )
    assert entity["standard_id"] == FILE_ENTITY["id"]
    assert entity["objectMarking"][0]["definition"] == "TLP:AMBER"
    assert entity["hashes"][0]["algorithm"] in ("MD5", "SHA-256")

    wid = sim.create_work(cid)
    await asyncio.to_thread(api.work.to_received, wid, "Connector ready to process the operation")
    assert await asyncio.to_thread(api.work.add_expectations, wid, 2) is True
    await asyncio.to_thread(api.work.report_expectation, wid, None)
    await asyncio.to_thread(api.work.to_processed, wid, "2 objects sent")
    assert sim.works[wid].status == "progress"
    await asyncio.to_thread(api.work.report_expectation, wid, {"error": "e", "source": "s"})
    assert await sim.wait_works([wid], timeout=5)
    assert sim.works[wid].errors[0]["message"] == "e"
    # pycti recognises the WORK_NOT_ALIVE error by its text
    sim.kill_work(wid)
    assert await asyncio.to_thread(api.work.add_expectations, wid, 1) is False
    # and sees the platform's error format as ValueError with the code as name
    with pytest.raises(ValueError, match="WORK_NOT_ALIVE"):
        await asyncio.to_thread(api.work.to_processed, wid, "late")
    ops = [r.operation for r in sim.requests]
    assert ops[:3] == ["healthCheck", "healthCheck", "RegisterConnector"]
    assert all(r.user_agent and r.user_agent.startswith("pycti/") for r in sim.requests)

    # bad token: pycti's constructor health check fails
    with pytest.raises(ValueError):
        await asyncio.to_thread(OpenCTIApiClient, sim.base_url, "not-the-token", "error")
    # outage: pycti gets a transport-level error (non-200)
    sim.outage_for(5)
    with pytest.raises(ValueError, match="503"):
        await asyncio.to_thread(api.query, "query { about { version } }")


async def test_pycti_connector_helper_end_to_end(sim: PlatformSim) -> None:
    """pycti's OpenCTIConnectorHelper registers, pings, consumes a job and sends a bundle.

    The push queue is consumed by the worker emulation, which reports one expectation per
    object; the work must complete and toProcessed must land.
    """
    import stix2
    from pycti import OpenCTIConnectorHelper

    from lis_async.sim.worker import WorkerEmulation

    cid = str(uuid.uuid4())
    config = {
        "opencti": {"url": sim.base_url, "token": sim.config.token},
        "connector": {
            "id": cid,
            "type": "INTERNAL_ENRICHMENT",
            "name": "t",
            "scope": "Domain-Name",
            "log_level": "error",
        },
    }
    helper = await asyncio.to_thread(OpenCTIConnectorHelper, config, True)
    assert await sim.wait_until(lambda: len(sim.connectors[cid].pings) >= 1, timeout=5)
    assert sim.connectors[cid].playbook_compatible is True
    assert sim.connectors[cid].state == "null"  # pycti sends json.dumps(None)

    sim.put_entity(DOMAIN_ENTITY)
    work_id = sim.create_work(cid, f"Enrichment ({DOMAIN_ENTITY['id']})")
    seen: dict[str, Any] = {}

    def callback(data: dict[str, Any]) -> str:
        playbook = "event_type" not in data
        seen["playbook" if playbook else "data"] = data
        ent = data["stix_entity"]
        ip = stix2.IPv4Address(value="192.0.2.1")
        rel = stix2.Relationship(
            relationship_type="resolves-to", source_ref=ent["id"], target_ref=ip.id
        )
        objects: list[Any] = [ip, rel]
        if playbook:  # the playbook step must answer with the whole bundle
            objects = [*data["stix_objects"], *objects]
        bundle = stix2.Bundle(objects=objects, allow_custom=True).serialize()
        sent = helper.send_stix2_bundle(bundle)
        return f"{len(sent)} bundles sent"

    listener = threading.Thread(target=helper.listen, args=(callback,), daemon=True)
    listener.start()
    worker = WorkerEmulation(sim, cid, AMQP_URL)
    await worker.start()
    reg = sim.registration(cid)
    conn = await aio_pika.connect(AMQP_URL)
    try:
        job = {
            "internal": {
                "work_id": work_id,
                "applicant_id": None,
                "draft_id": None,
                "trigger": "create",
                "mode": "auto",
            },
            "event": {
                "event_type": "INTERNAL_ENRICHMENT",
                "entity_id": DOMAIN_ENTITY["id"],
                "entity_type": "Domain-Name",
                "stix_entity": json.dumps(DOMAIN_ENTITY),
                "stix_objects": None,
            },
        }
        ch = await conn.channel()
        ex = await ch.get_exchange(reg["listen_exchange"], ensure=False)
        await ex.publish(
            aio_pika.Message(orjson.dumps(job), delivery_mode=aio_pika.DeliveryMode.PERSISTENT),
            routing_key=reg["listen_routing"],
        )
        assert await sim.wait_works([work_id], timeout=20), sim.works[work_id]
        work = sim.works[work_id]
        assert await sim.wait_until(lambda: work.processed_time is not None, timeout=10)
        assert work.expected == 2 and work.processed == 2 and not work.in_error
        assert work.messages == ["Connector ready to process the operation", "2 bundles sent"]
        assert sim.early_completions([work_id]) == []  # pycti adds expectations first
        assert seen["data"]["enrichment_entity"]["standard_id"] == DOMAIN_ENTITY["id"]
        assert seen["data"]["stix_entity"]["x_opencti_score"] == 50

        ops = [r.operation for r in sim.requests]
        assert ops[:4] == ["healthCheck", "healthCheck", "RegisterConnector", "PingConnector"]
        job_ops = ops[4:]
        assert job_ops == [
            "StixCyberObservable",
            "StixNestedRefRelationships",
            "workToReceived",
            "addExpectations",
            "workToProcessed",
        ]
        assert all(r.outcome == "ok" for r in sim.requests)
        # every push message carried the work id and the connector user as applicant
        assert len(worker.messages) == 2
        for rec in worker.messages:
            assert rec.work_id == work_id
            assert rec.applicant_id == sim.config.connector_user_id
            assert rec.properties["delivery_mode"] == 2

        # playbook job: no work, pycti reads through stixCoreObject and answers through
        # playbookStepExecution with the whole bundle, which the sim validates (stix2.parse)
        url_entity = {
            "id": "url--5f1e2d3c-4b5a-5968-8776-a5b4c3d2e1f0",
            "spec_version": "2.1",
            "type": "url",
            "value": "https://bad.example.com/payload.exe",
            "object_marking_refs": [TLP_AMBER],
            "extensions": {
                STIX_EXT_OCTI: {
                    "extension_type": "property-extension",
                    "id": "c3d4e5f6-a7b8-4c9d-8e0f-1a2b3c4d5e6f",
                    "type": "Url",
                    "granted_refs": ["identity--7b1c2d3e-4f5a-5b6c-9d7e-8f9a0b1c2d3e"],
                },
            },
        }
        sim.put_entity(url_entity)
        playbook_job: dict[str, Any] = {
            "internal": {
                "work_id": None,
                "playbook": {
                    "event_id": "1714644111000-0",
                    "execution_id": str(uuid.uuid4()),
                    "playbook_id": str(uuid.uuid4()),
                    "data_instance_id": url_entity["id"],
                    "step_id": str(uuid.uuid4()),
                    "previous_step_id": str(uuid.uuid4()),
                },
                "applicant_id": "c49fe040-2dad-412d-af07-ce639204ad55",
                "trigger": "create",
                "mode": "auto",
            },
            "event": {
                "entity_id": url_entity["id"],
                "bundle": {
                    "type": "bundle",
                    "id": f"bundle--{uuid.uuid4()}",
                    "spec_version": "2.1",
                    "objects": [url_entity],
                },
            },
        }
        n_requests = len(sim.requests)
        await ex.publish(
            aio_pika.Message(
                orjson.dumps(playbook_job), delivery_mode=aio_pika.DeliveryMode.PERSISTENT
            ),
            routing_key=reg["listen_routing"],
        )
        assert await sim.wait_until(lambda: len(sim.playbook_calls) == 1, timeout=10)
        call = sim.playbook_calls[0]
        assert call["valid"], call["problems"]
        assert call["data_instance_id"] == url_entity["id"]
        assert json.loads(call["previous_bundle"]) == playbook_job["event"]["bundle"]
        assert len(call["parsed"]["objects"]) == 3
        assert [r.operation for r in list(sim.requests)[n_requests:]] == [
            "StixCoreObject",
            "PlaybookStepExecution",
        ]
        assert len(worker.messages) == 2  # nothing was published to the push queue
    finally:
        lq = helper.listen_queue
        if lq is not None:
            lq.exit_event.set()
            if lq.pika_connection is not None and lq.channel is not None:
                lq.pika_connection.add_callback_threadsafe(lq.channel.stop_consuming)
        helper.ping.stop()
        await asyncio.to_thread(listener.join, 10)
        if lq is not None and lq.pika_connection is not None and not listener.is_alive():
            lq.pika_connection.close()
        await worker.close()
        await conn.close()
    assert not listener.is_alive()
