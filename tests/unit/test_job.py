from __future__ import annotations

import dataclasses
import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from lis_async.enrichment.job import (
    MAX_BODY_BYTES,
    Job,
    PlaybookContext,
    PlaybookJob,
    WorkJob,
    normalise_tlp,
    parse_job,
    parse_observable,
    read_internal,
)
from lis_async.enrichment.markings import MarkingDef
from lis_async.enrichment.nesting import MAX_VALUES
from lis_async.errors import JobError
from tests.helpers import FIXTURES, job_body

WORK = "work_6f0e1b2c-3d4e-4f50-8a6b-7c8d9e0f1a2b_2026-11-20T10:00:02.415Z"
ORG = "identity--7b1c2d3e-4f5a-5b6c-9d7e-8f9a0b1c2d3e"
GREEN = "marking-definition--34098fce-860f-48ae-8e50-ebd3cc5e41da"
AMBER = "marking-definition--f88d31f6-486f-44da-b317-01333bde0b82"
RED = "marking-definition--5e57c739-391a-4eb3-b6be-7d15ca92d5ed"


def test_manual_stixfile_amber_shared() -> None:
    job = parse_job(job_body("manual_stixfile_amber_shared.json"))
    assert isinstance(job, WorkJob)
    assert (job.work_id, job.applicant_id, job.draft_id) == (WORK, None, None)
    assert (job.mode, job.trigger) == ("manual", "update")
    assert job.entity_type == "StixFile" and job.entity_id.startswith("file--")
    obs = job.observable
    assert obs is not None
    assert obs.stix_type == "file" and obs.value == "eicar.com"
    assert obs.hashes["SHA-256"].startswith("275a021b") and set(obs.hashes) == {
        "MD5",
        "SHA-1",
        "SHA-256",
    }
    assert obs.marking_refs == (AMBER,)
    assert obs.granted_refs == (ORG,)
    assert isinstance(job, WorkJob) and job.urgent  # manual: an analyst waits
    with pytest.raises(dataclasses.FrozenInstanceError):
        job.work_id = "x"  # type: ignore[misc]


def test_auto_create_domain_green_unshared() -> None:
    job = parse_job(job_body("auto_create_domain_green.json"))
    assert job.observable is not None
    assert (job.mode, job.trigger) == ("auto", "create")
    assert job.observable.value == "bad.example.com"
    assert job.observable.marking_refs == (GREEN,)
    assert job.observable.granted_refs is None


def test_auto_update_hostname_red_in_draft() -> None:
    job = parse_job(job_body("auto_update_hostname_red_draft.json"))
    assert job.draft_id == "e1f2a3b4-c5d6-4e7f-8a9b-0c1d2e3f4a5b"
    assert job.observable is not None
    assert job.observable.stix_type == "hostname" and job.observable.entity_type == "Hostname"
    assert job.observable.marking_refs == (RED,)


def test_deferred_resolution_has_no_observable() -> None:
    job = parse_job(job_body("auto_create_domain_deferred_resolution.json"))
    assert job.observable is None and job.entity_type == "Domain-Name" and job.work_id == WORK


def test_stixfile_without_hash() -> None:
    job = parse_job(job_body("manual_stixfile_no_hash.json"))
    assert job.observable is not None and dict(job.observable.hashes) == {}
    assert job.observable.value == "invoice.pdf.exe"


def test_url_with_stix_objects_string() -> None:
    job = parse_job(job_body("manual_url_stix_objects_string.json"))
    assert job.observable is not None
    assert job.observable.value == "http://bad.example.com/gate.php"
    assert job.observable.granted_refs == (ORG,)


def test_playbook_job() -> None:
    job = parse_job(job_body("playbook_url.json"))
    assert isinstance(job, PlaybookJob) and job.urgent
    assert job.applicant_id == "c49fe040-2dad-412d-af07-ce639204ad55"
    assert job.playbook.step_id == "c8d7e6f5-a4b3-4c2d-9e1f-0a9b8c7d6e5f"
    assert job.playbook.bundle["id"].startswith("bundle--")
    assert job.observable is not None and job.observable.entity_type == "Url"
    assert job.entity_type == "Url"  # from the entity, the message has none


def test_hostile_value_is_kept_verbatim() -> None:
    job = parse_job(job_body("hostile_value_path_traversal.json"))
    assert job.observable is not None and job.observable.value == "../../v2/admin?x=1#"


@pytest.mark.parametrize(
    ("name", "work_id", "fragment"),
    [
        ("malformed_not_json.txt", None, "not valid JSON"),
        ("malformed_missing_event.json", WORK, "event is missing"),
        ("malformed_wrong_types.json", None, "work_id"),
    ],
)
def test_malformed_bodies_raise_job_error(name: str, work_id: str | None, fragment: str) -> None:
    with pytest.raises(JobError) as info:
        parse_job(job_body(name))
    assert info.value.work_id == work_id
    assert fragment in str(info.value)


def test_every_fixture_parses_or_raises_job_error() -> None:
    for path in sorted((FIXTURES / "jobs").iterdir()):
        try:
            assert isinstance(parse_job(path.read_bytes()), Job)
        except JobError:
            assert path.name.startswith("malformed")


@pytest.mark.parametrize(
    "body",
    [
        b"\xff\xfe not utf8",
        b"[]",
        b"null",
        b'{"internal": 1, "event": {}}',
        b'{"internal": {"work_id": "w"}, "event": {"entity_id": "x", "stix_entity": 5}}',
        b'{"internal": {"work_id": "w"}, "event": {"entity_id": "x", "stix_entity": "{\\"id\\": 1}"}}',
        b'{"internal": {"work_id": null, "applicant_id": null}, "event": {"entity_id": "x"}}',
    ],
)
def test_bad_shapes(body: bytes) -> None:
    with pytest.raises(JobError):
        parse_job(body)


def test_bad_stix_entity_carries_work_id() -> None:
    body = {
        "internal": {"work_id": "w1", "applicant_id": None},
        "event": {"entity_id": "x", "stix_entity": "[not json"},
    }
    with pytest.raises(JobError) as info:
        parse_job(json.dumps(body).encode())
    assert info.value.work_id == "w1"


def test_every_marking_and_flat_shape() -> None:
    obs = parse_observable(
        {
            "id": "domain-name--1",
            "type": "domain-name",
            "value": "a.example",
            "x_opencti_type": "Domain-Name",
            "x_opencti_granted_refs": ["identity--o"],
            "object_marking_refs": [GREEN, RED, AMBER],
        }
    )
    assert obs.marking_refs == (GREEN, RED, AMBER) and obs.granted_refs == ("identity--o",)
    assert parse_observable({"id": "url--1", "type": "url", "value": "x"}).marking_refs == ()


def test_markings_are_read_wherever_they_stand() -> None:
    """The gate sees every marking: top level, both OpenCTI extensions, granular markings, pycti's
    and GraphQL's objectMarking shapes, objectMarkingIds; ids compared case-insensitively."""
    ext, sco = (
        "extension-definition--ea279b3e-5c71-4632-ac08-831c66a786ba",
        "extension-definition--f93e2c80-4231-4f9a-af8b-95c9bd566a82",
    )
    custom = "marking-definition--0a0a0a0a-0a0a-4a0a-8a0a-0a0a0a0a0a0a"
    obs = parse_observable(
        {
            "id": "url--1",
            "type": "url",
            "value": "x",
            "object_marking_refs": [GREEN.upper()],
            "granular_markings": [{"marking_ref": AMBER, "selectors": ["value"]}, {"lang": "fr"}],
            "objectMarking": {
                "edges": [
                    {
                        "node": {
                            "standard_id": custom,
                            "definition_type": "TLP",
                            "definition": "TLP:RED",
                        }
                    }
                ]
            },
            "extensions": {
                ext: {"object_marking_refs": [RED, GREEN]},
                sco: {"objectMarkingIds": ["5b7d0a57-1d8c-4f5e-9c1a-3f2e1d0c9b8a"]},
            },
        }
    )
    assert obs.marking_refs == (
        GREEN.upper(),
        AMBER,
        custom,
        RED,
        "5b7d0a57-1d8c-4f5e-9c1a-3f2e1d0c9b8a",
    )
    assert obs.marking_defs == {custom: MarkingDef("TLP", "TLP:RED")}
    assert obs.unreadable_markings == 0
    odd = parse_observable(
        {
            "id": "url--1",
            "type": "url",
            "object_marking_refs": [GREEN, {"id": RED}, 7],
            "extensions": {ext: {"object_marking_refs": "not a list"}},
        }
    )
    assert odd.marking_refs == (GREEN,) and odd.unreadable_markings == 3


# --------------------------------------------------------------------------------------------------
# Identifiers and nesting: refused at parse time, the work (or playbook) still reachable


def _body(**internal: object) -> dict[str, Any]:
    body = json.loads(job_body("auto_create_domain_green.json"))
    body["internal"].update(internal)
    return body


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("draft_id", "e1f2a3b4\r\nX-Injected: 1"),
        ("draft_id", "draft id with spaces"),
        ("draft_id", "d" * 300),
        ("applicant_id", "c49fe040\n"),
        ("applicant_id", "\x1b[31mred"),
    ],
)
def test_hostile_ids_fail_the_job_on_its_work(field: str, value: str) -> None:
    with pytest.raises(JobError) as info:
        parse_job(json.dumps(_body(**{field: value})).encode())
    assert info.value.work_id == WORK  # the work can still be ended in error
    assert f"internal.{field} is not a valid identifier" in str(info.value)
    assert value not in str(info.value)  # the message does not repeat the hostile text


def test_hostile_entity_id_and_work_id() -> None:
    body = _body()
    body["event"]["entity_id"] = "domain-name--3e9b2c71\r\n"
    with pytest.raises(JobError) as info:
        parse_job(json.dumps(body).encode())
    assert info.value.work_id == WORK and "event.entity_id" in str(info.value)
    with pytest.raises(JobError) as info:
        parse_job(json.dumps(_body(work_id=WORK + "\r\nX: 1")).encode())
    assert info.value.work_id is None  # not a work id: nothing to report to


def test_rejected_playbook_job_carries_its_context() -> None:
    """A playbook step that cannot run must still be answered: the error carries what is needed."""
    body = json.loads(job_body("playbook_url.json"))
    body["event"]["entity_id"] = "url--00000000-0000-4000-8000-000000000000"  # not in the bundle
    with pytest.raises(JobError) as info:
        parse_job(json.dumps(body).encode())
    ctx = info.value.playbook
    assert (
        isinstance(ctx, PlaybookContext) and ctx.step_id == body["internal"]["playbook"]["step_id"]
    )
    assert ctx.bundle["id"] == body["event"]["bundle"]["id"]
    body["internal"]["playbook"]["step_id"] = "step\r\n"  # unreadable ids: nothing to answer
    with pytest.raises(JobError) as info:
        parse_job(json.dumps(body).encode())
    assert info.value.playbook is None


def _nested(depth: int) -> object:
    value: object = "leaf"
    for _ in range(depth):
        value = {"x": [value]}
    return value


def test_deep_nesting_is_refused_where_it_comes_in() -> None:
    # 255-1023 levels parse with orjson but break its serialiser (and Python's recursion).
    body = _body()
    entity = json.loads(body["event"]["stix_entity"])
    entity["x_deep"] = _nested(200)
    body["event"]["stix_entity"] = json.dumps(entity)
    with pytest.raises(JobError) as info:
        parse_job(json.dumps(body).encode())
    assert info.value.work_id == WORK and "nests deeper than 64 levels" in str(info.value)

    playbook = json.loads(job_body("playbook_url.json"))
    playbook["event"]["bundle"]["objects"][0]["x_deep"] = _nested(200)
    with pytest.raises(JobError) as info:
        parse_job(json.dumps(playbook).encode())
    ctx = info.value.playbook
    assert isinstance(ctx, PlaybookContext)  # answered, with an empty bundle of the same id
    assert dict(ctx.bundle) == {
        "type": "bundle",
        "id": playbook["event"]["bundle"]["id"],
        "objects": [],
    }


def test_graphql_hash_list_shape() -> None:
    obs = parse_observable(
        {"id": "file--1", "type": "file", "hashes": [{"algorithm": "SHA-256", "hash": "AB"}]}
    )
    assert dict(obs.hashes) == {"SHA-256": "ab"}


def test_normalise_tlp() -> None:
    assert normalise_tlp("amber") == "TLP:AMBER"
    assert normalise_tlp("TLP:WHITE") == "TLP:CLEAR"
    assert normalise_tlp("tlp:amber+strict") == "TLP:AMBER+STRICT"
    with pytest.raises(ValueError):
        normalise_tlp("TLP:PINK")


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=10), children, max_size=3)
    ),
    max_leaves=10,
)


@given(
    internal=json_values
    | st.fixed_dictionaries(
        {}, optional={"work_id": json_values, "applicant_id": json_values, "playbook": json_values}
    ),
    event=json_values
    | st.fixed_dictionaries(
        {},
        optional={
            "entity_id": json_values,
            "stix_entity": json_values | st.text(),
            "bundle": json_values,
        },
    ),
)
def test_parse_job_raises_only_job_error(internal: object, event: object) -> None:
    body = json.dumps({"internal": internal, "event": event}).encode()
    try:
        parse_job(body)
    except JobError:
        pass


@given(st.binary(max_size=200))
def test_parse_job_random_bytes(body: bytes) -> None:
    try:
        parse_job(body)
    except JobError:
        pass


# ------------------------------------------------------------------------------------------
# huge bodies (issue #20, finding 9)


def _with_entity(stix_entity: str) -> bytes:
    body = _body()
    body["event"]["stix_entity"] = stix_entity
    return json.dumps(body).encode()


def test_a_body_of_millions_of_values_is_refused_before_parsing() -> None:
    """14 MiB of empty lists (under the 16 MiB limit) in the entity: refused on its count, on
    its work, not parsed (orjson alone took seconds to build it)."""
    body = _with_entity("[" + ",".join(["[]"] * 5_000_000) + "]")
    assert len(body) < MAX_BODY_BYTES
    with pytest.raises(JobError) as info:
        parse_job(body)
    assert info.value.work_id == WORK
    assert str(info.value) == f"job body holds more than {MAX_VALUES} JSON values"


def test_a_body_within_the_value_limit_parses() -> None:
    entity = json.loads(_body()["event"]["stix_entity"])
    entity["x_padding"] = [0] * (MAX_VALUES - 1000)
    job = parse_job(_with_entity(json.dumps(entity)))
    assert isinstance(job, WorkJob)
    assert job.observable is not None and job.work_id == WORK


def test_a_body_over_the_size_limit_fails_on_its_work() -> None:
    body = _with_entity("x" * MAX_BODY_BYTES)
    with pytest.raises(JobError) as info:
        parse_job(body)
    assert info.value.work_id == WORK
    assert str(info.value) == f"job body is {len(body)} bytes (limit {MAX_BODY_BYTES})"


@pytest.mark.parametrize(
    ("body", "internal"),
    [
        (b'{"internal": {"mode": "manual"}, "event": ' + b"\xff" * 100_000, {"mode": "manual"}),
        (b' \n{ "internal" :\t{"work_id": null}}', {"work_id": None}),
        (b'{"internal": "manual"}', "manual"),
        (b'{"event": {}, "internal": {"mode": "manual"}}', None),  # not first: not read
        (b'{"internal": {"mode": "manual", "x": "' + b"a" * 70_000 + b'"}}', None),  # too long
        (b'{"internal": ' + b"[" * 5000, None),
        (b"[1, 2]", None),
        (b"", None),
    ],
)
def test_read_internal_reads_the_head_only(body: bytes, internal: object) -> None:
    assert read_internal(body) == internal
