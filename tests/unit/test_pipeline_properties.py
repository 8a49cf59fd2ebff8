"""Property-based: whatever the body and whatever LastInfoSec answers, ``Pipeline.handle`` enriches,
skips or fails the work cleanly. It returns a Result, never raises anything but FatalError, and
no input leaves a work unreported: toProcessed is sent exactly once for a job with a work id, and
a playbook step whose ids can be read is answered exactly once.

Hostile bodies (CR/LF and oversized ids, nesting past every serialiser's limit, broken playbook
steps) and hostile answers (nested 255-1023 levels, more objects than allowed, the review's
answer that tries to reshape the platform, lookups failing in ways nobody foresaw) included."""

from __future__ import annotations

import asyncio
import copy
import json
from dataclasses import dataclass
from typing import Any

import orjson
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from lis_async.enrichment.job import PlaybookJob, parse_job
from lis_async.enrichment.pipeline import INTERNAL_ERROR, Outcome, Result
from lis_async.errors import (
    FatalError,
    JobError,
    LisBadAnswer,
    LisError,
    LisFatalError,
    LisRetriesExhausted,
    WorkNotAlive,
)
from lis_async.retry import Backoff
from tests.fakes import FakePlatform, ParsingLookup, make_pipeline
from tests.helpers import FIXTURES, hostile_answer

FIXTURE_BODIES = [p.read_bytes() for p in sorted((FIXTURES / "jobs").iterdir())]
FIXTURE_DOCS = [orjson.loads(p.read_bytes()) for p in sorted((FIXTURES / "jobs").glob("*.json"))]

# ------------------------------------------------------------------------------------------
# strategies

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**63), 2**63 - 1),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=20),
)
json_values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
STIX_TYPES = [
    "malware",
    "indicator",
    "identity",
    "intrusion-set",
    "threat-actor",
    "tool",
    "relationship",
    "report",
    "marking-definition",
    "domain-name",
    "url",
    "file",
    "hostname",
    "x-opencti-hostname",
    "attack-pattern",
    "x-weird",
    "",
    "bundle",
]
stix_ids = st.one_of(
    st.builds(lambda t, u: f"{t}--{u}", st.sampled_from(STIX_TYPES), st.uuids()),
    st.text(max_size=12),
    st.integers(-1000, 1000),
    st.none(),
)
stix_objects = st.fixed_dictionaries(
    {},
    optional={
        "type": st.one_of(st.sampled_from(STIX_TYPES), json_values),
        "id": stix_ids,
        "spec_version": st.just("2.1"),
        "created": st.one_of(st.just("2026-10-14T08:12:03.000Z"), json_values),
        "modified": st.just("2026-10-14T08:12:03.000Z"),
        "name": st.one_of(st.text(max_size=10), json_values),
        "pattern": st.one_of(
            st.just("[domain-name:value = 'bad.example.com']"),
            st.just(
                "[file:hashes.'SHA-256' = 'e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855']"
            ),
            st.text(max_size=40),
        ),
        "pattern_type": st.sampled_from(["stix", "yara", 3]),
        "source_ref": stix_ids,
        "target_ref": stix_ids,
        "created_by_ref": stix_ids,
        "object_refs": st.one_of(st.lists(stix_ids, max_size=3), json_values),
        "object_marking_refs": st.one_of(st.lists(stix_ids, max_size=2), json_values),
        "relationship_type": st.sampled_from(["uses", "based-on", "indicates"]),
        "x_extra": json_values,
    },
)
bundles = st.fixed_dictionaries(
    {"objects": st.one_of(st.lists(st.one_of(stix_objects, json_values), max_size=6), json_values)},
    optional={"type": st.sampled_from(["bundle", "report", 1]), "id": stix_ids},
)
answer_docs = st.one_of(
    st.builds(lambda b: {"message": b}, st.lists(bundles, max_size=3)),
    st.lists(st.one_of(bundles, json_values), max_size=3),
    bundles,
    st.builds(lambda m: {"message": m}, json_values),
    json_values,
)
MAX_OBJECTS = 50


def _deep(depth: int, inside_object: bool) -> bytes:
    """An answer nested ``depth`` levels: parses (orjson reads 1024), breaks orjson.dumps (255)."""
    deep = b"[" * depth + b"]" * depth
    item = (
        b'{"type":"malware","id":"malware--0c7b5b88-8ff7-4a4d-aa9d-feb398cd0061","x":' + deep + b"}"
    )
    return b'{"message":[{"type":"bundle","objects":[' + (item if inside_object else deep) + b"]}]}"


def _many(n: int) -> bytes:
    item = b'{"type":"x-weird","id":"x-weird--0c7b5b88-8ff7-4a4d-aa9d-feb398cd0061"}'
    return b'{"message":[{"type":"bundle","objects":[' + b",".join([item] * n) + b"]}]}"


hostile_answers = st.one_of(
    st.builds(_deep, st.integers(255, 1020), st.booleans()),
    st.integers(MAX_OBJECTS + 1, 3 * MAX_OBJECTS).map(_many),
    st.sampled_from(
        [
            "domain-name--3e9b2c71-4f0a-5d6e-8c1b-9a7f6e5d4c3b",
            "url--5f1e2d3c-4b5a-5968-8776-a5b4c3d2e1f0",
        ]
    ).map(lambda ident: orjson.dumps({"message": [hostile_answer(ident, "bad.example.com")]})),
)
answer_bytes = st.one_of(
    answer_docs.map(orjson.dumps),
    answer_docs.map(orjson.dumps).map(lambda b: b[: max(0, len(b) - 3)]),  # truncated
    st.binary(max_size=40),
    hostile_answers,
)
lookup_errors = st.sampled_from(
    [
        TypeError("Recursion limit reached"),  # what the cache's orjson.dumps used to raise
        ValueError("nobody saw this coming"),
        RuntimeError("a bug"),
        LisRetriesExhausted(
            "LastInfoSec search_host lookup failed after 6 attempts; last cause: HTTP 503",
            attempts=6,
        ),
        LisBadAnswer("LastInfoSec search_host answer is not valid JSON (3 bytes)"),
        LisError("LastInfoSec search_host answered HTTP 418: teapot"),
        LisFatalError("LastInfoSec rejected the API key (HTTP 401): Invalid api key", status=401),
    ]
)


@st.composite
def mutated_fixture(draw: st.DrawFn) -> bytes:
    """A sample body with a few values replaced, removed, or made the wrong type."""
    doc: Any = copy.deepcopy(draw(st.sampled_from(FIXTURE_DOCS)))
    for _ in range(draw(st.integers(1, 4))):
        node, path = doc, []
        while isinstance(node, dict) and node and draw(st.booleans()):
            key = draw(st.sampled_from(sorted(node)))
            path.append(key)
            if isinstance(node[key], str) and node[key].startswith("{") and draw(st.booleans()):
                # stix_entity and friends are JSON strings: mutate inside, then re-encode
                try:
                    inner = orjson.loads(node[key])
                except orjson.JSONDecodeError:
                    break
                if isinstance(inner, dict) and inner:
                    k2 = draw(st.sampled_from(sorted(inner)))
                    inner[k2] = draw(json_values)
                    node[key] = orjson.dumps(inner).decode()
                break
            if not isinstance(node[key], dict):
                break
            node = node[key]
        if isinstance(node, dict) and node:
            key = draw(st.sampled_from(sorted(node)))
            if draw(st.booleans()):
                del node[key]
            else:
                node[key] = draw(json_values)
    return orjson.dumps(doc)


HOSTILE_IDS = st.sampled_from(
    ["e1f2a3b4\r\nX-Injected: 1", "a b", "\x1b[31m", "x" * 300, "", "\n", "work_\u2028"]
)


@st.composite
def hostile_ids(draw: st.DrawFn) -> bytes:
    """A sample body with one identifier made hostile (ids end up in HTTP headers)."""
    doc: Any = copy.deepcopy(draw(st.sampled_from(FIXTURE_DOCS)))
    internal, event = doc.get("internal"), doc.get("event")
    if not isinstance(internal, dict) or not isinstance(event, dict):
        return orjson.dumps(doc)
    spots: list[tuple[dict[str, Any], str]] = [
        (internal, "work_id"),
        (internal, "draft_id"),
        (internal, "applicant_id"),
        (event, "entity_id"),
    ]
    if isinstance(internal.get("playbook"), dict):
        spots += [(internal["playbook"], k) for k in sorted(internal["playbook"])]
    holder, key = draw(st.sampled_from(spots))
    holder[key] = draw(HOSTILE_IDS)
    return orjson.dumps(doc)


def _object_text(value: Any) -> bool:
    try:
        return isinstance(value, str) and isinstance(orjson.loads(value), dict)
    except orjson.JSONDecodeError:
        return False


@st.composite
def deep_bodies(draw: st.DrawFn) -> bytes:
    """A sample body with something nested 65-1000 levels deep somewhere."""
    doc: Any = copy.deepcopy(draw(st.sampled_from(FIXTURE_DOCS)))
    deep: Any = "leaf"
    for _ in range(draw(st.integers(65, 1000))):
        deep = [deep]
    event = doc.get("event")
    if isinstance(event, dict) and isinstance(event.get("bundle"), dict) and draw(st.booleans()):
        event["bundle"]["objects"].append({"type": "note", "x": deep})
    elif isinstance(event, dict) and _object_text(event.get("stix_entity")) and draw(st.booleans()):
        entity = orjson.loads(event["stix_entity"])
        entity["x_deep"] = deep
        event["stix_entity"] = json.dumps(entity)  # orjson would refuse to write it
    else:
        doc["x_deep"] = deep
    return json.dumps(doc).encode()


bodies = st.one_of(
    mutated_fixture(),
    st.sampled_from(FIXTURE_BODIES),
    json_values.map(orjson.dumps),
    st.binary(max_size=60),
    hostile_ids(),
    deep_bodies(),
)

# ------------------------------------------------------------------------------------------
# what LastInfoSec does (tests/fakes.py: ParsingLookup)


@dataclass
class Answer:
    raw: bytes | None = None
    error: Exception | None = None


# ------------------------------------------------------------------------------------------
# the property


def _expected_work(body: bytes) -> tuple[str | None, bool]:
    """(work id the pipeline must report to, is it a playbook step it must answer)."""
    try:
        job = parse_job(body)
    except JobError as exc:
        if exc.playbook is not None:
            return None, True
        return exc.work_id, False
    return (None, True) if isinstance(job, PlaybookJob) else (job.work_id, False)


@settings(
    max_examples=400,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(
    body=bodies,
    answer=st.one_of(
        answer_bytes.map(lambda b: Answer(raw=b)), lookup_errors.map(lambda e: Answer(error=e))
    ),
    entity=st.one_of(
        st.none(),
        st.dictionaries(
            st.sampled_from(  # the platform's GraphQL stixCyberObservable record
                [
                    "id",
                    "standard_id",
                    "entity_type",
                    "value",
                    "name",
                    "hashes",
                    "objectMarking",
                    "objectOrganization",
                ]
            ),
            json_values,
        ),
        st.sampled_from(
            [
                {
                    "id": "8a1f6b0e-2c3d-4e5f-9a0b-1c2d3e4f5a6b",
                    "standard_id": "domain-name--3e9b2c71-4f0a-5d6e-8c1b-9a7f6e5d4c3b",
                    "entity_type": "Domain-Name",
                    "value": "bad.example.com",
                    "objectMarking": [
                        {"standard_id": "marking-definition--34098fce-860f-48ae-8e50-ebd3cc5e41da"}
                    ],
                    "objectOrganization": [],
                }
            ]
        ),
    ),
    dead=st.booleans(),
    flaky=st.integers(0, 2),  # an unreadable body gets 3 attempts at reporting its error
    redelivered=st.booleans(),
    markings=st.sampled_from(
        [
            {},
            {  # a custom TLP:RED and a statement, as markingDefinition(id) answers them
                "marking-definition--c0c0c0c0-1111-4222-8333-444455556666": {
                    "definition_type": "TLP",
                    "definition": "TLP:RED",
                },
            },
        ]
    ),
)
@example(  # found by this test: no work id and no playbook context used to raise AssertionError
    body=b'{"internal":{},"event":{"entity_id":"domain-name--3e9b2c71-4f0a-5d6e-8c1b-9a7f6e5d4c3b",'
    b'"entity_type":"Domain-Name","stix_entity":null}}',
    answer=Answer(raw=b'{"message":[]}'),
    entity=None,
    dead=False,
    flaky=0,
    redelivered=False,
    markings={},
)
@example(  # the review's: a deep answer broke the cache, the work stayed "in progress"
    body=(FIXTURES / "jobs" / "auto_create_domain_green.json").read_bytes(),
    answer=Answer(raw=_deep(300, True)),
    entity=None,
    dead=False,
    flaky=0,
    redelivered=False,
    markings={},
)
@example(  # the review's: a CR/LF draft id made aiohttp raise, the work stayed "in progress"
    body=(FIXTURES / "jobs" / "auto_update_hostname_red_draft.json")
    .read_bytes()
    .replace(b"e1f2a3b4-c5d6", b"e1f2a3b4\\r\\nX: 1"),
    answer=Answer(raw=b'{"message":[]}'),
    entity=None,
    dead=False,
    flaky=0,
    redelivered=False,
    markings={},
)
@example(  # a playbook whose lookup fails in a way nobody foresaw is still answered
    body=(FIXTURES / "jobs" / "playbook_url.json").read_bytes(),
    answer=Answer(error=TypeError("Recursion limit reached")),
    entity=None,
    dead=False,
    flaky=0,
    redelivered=False,
    markings={},
)
def test_handle_returns_a_result_or_raises_fatal_only(
    body: bytes,
    answer: Answer,
    entity: Any,
    dead: bool,
    flaky: int,
    redelivered: bool,
    markings: dict[str, Any],
) -> None:
    lookup = ParsingLookup(answer.raw, answer.error, max_objects=MAX_OBJECTS)
    platform = FakePlatform(entity=entity, flaky=flaky, markings=markings)
    if dead:
        platform.fail["received"] = [WorkNotAlive()]
    pipeline, _, publisher = make_pipeline(
        lookup, platform, connector_user_id=None, backoff=Backoff(base_s=0.0, max_s=0.0)
    )
    work_id, playbook = _expected_work(body)
    try:
        result = asyncio.run(pipeline.handle(body, redelivered))
    except FatalError:
        assert isinstance(answer.error, LisFatalError)
        assert "processed" not in platform.names() and "playbook" not in platform.names()
        return
    calls = platform.names()
    assert isinstance(result, Result) and isinstance(result.outcome, Outcome) and result.message
    assert pipeline.in_flight == {}
    if lookup.seen and answer.error is not None and not isinstance(answer.error, LisError):
        assert result.outcome in (Outcome.FAILED, Outcome.INVALID, Outcome.SKIPPED, Outcome.DROPPED)
        if result.outcome is Outcome.FAILED:
            assert result.message == INTERNAL_ERROR
    if playbook:
        assert calls.count("playbook") == 1 and "processed" not in calls
        assert publisher.published == []
    elif work_id is None:
        assert result.outcome is Outcome.INVALID and calls == []
    elif result.outcome is Outcome.DROPPED:
        assert dead and "processed" not in calls
    else:
        assert calls.count("processed") == 1 and calls[-1] == "processed"
        if result.outcome is Outcome.ENRICHED:
            assert len(publisher.published) == result.bundles > 0
            # A redelivery asks the work first: here it recorded nothing, so they are added.
            assert "expectations" in calls
            assert ("tracking" in calls) is redelivered
        else:
            assert publisher.published == []
