"""The pipeline with in-memory fakes: call order, outcomes, retries, playbooks."""

from __future__ import annotations

import base64
import threading
from typing import Any

import orjson
import pytest

from lis_async.enrichment import job as job_module
from lis_async.enrichment import pipeline as pipeline_module
from lis_async.enrichment.job import Job
from lis_async.enrichment.pipeline import PARSE_INLINE_BYTES, Outcome
from lis_async.errors import (
    FatalError,
    LisFatalError,
    LisRetriesExhausted,
    NothingToLookUp,
    PlatformError,
    WorkNotAlive,
)
from tests.fakes import FakeLookup, make_pipeline
from tests.helpers import FIXTURES, hostile_answer, job_body

ANSWER = orjson.loads((FIXTURES / "lastinfosec" / "search_hash_200.json").read_bytes())["message"]
HOST_ANSWER = orjson.loads(
    (FIXTURES / "lastinfosec" / "search_host_200_two_bundles.json").read_bytes()
)["message"]
WORK = "work_6f0e1b2c-3d4e-4f50-8a6b-7c8d9e0f1a2b_2026-11-20T10:00:02.415Z"


def decode(body: bytes) -> dict[str, Any]:
    msg = orjson.loads(body)
    msg["bundle"] = orjson.loads(base64.b64decode(msg["content"]))
    return msg


async def test_received_is_reported_before_expectations_even_when_slow() -> None:
    """toReceived runs alongside the lookup but always lands before addExpectations."""
    pipeline, platform, _ = make_pipeline(FakeLookup(ANSWER))
    platform.fail = {"received": [PlatformError("HTTP 502")] * 3}  # retried while the lookup runs
    result = await pipeline.handle(job_body("manual_stixfile_amber_shared.json"))
    assert result.outcome is Outcome.ENRICHED
    assert platform.names() == ["received", "expectations", "processed"]


@pytest.mark.parametrize(
    ("fixture", "urgent"),
    [
        ("manual_stixfile_amber_shared.json", True),
        ("playbook_url.json", True),
        ("auto_create_domain_green.json", False),
    ],
)
async def test_manual_and_playbook_lookups_are_urgent(fixture: str, urgent: bool) -> None:
    """An analyst or a playbook waits on these: their lookups go first at the rate limiter."""
    lookup = FakeLookup(ANSWER)
    pipeline, _, _ = make_pipeline(lookup)
    await pipeline.handle(job_body(fixture))
    assert lookup.urgent == [urgent]


async def test_dead_work_at_received_drops_the_job_without_publishing() -> None:
    pipeline, platform, publisher = make_pipeline(FakeLookup(ANSWER))
    platform.fail = {"received": [WorkNotAlive()]}
    result = await pipeline.handle(job_body("manual_stixfile_amber_shared.json"))
    assert result.outcome is Outcome.DROPPED
    assert publisher.published == [] and platform.names() == []


async def test_enriched_job_reports_in_protocol_order() -> None:
    pipeline, platform, publisher = make_pipeline(FakeLookup(ANSWER))
    result = await pipeline.handle(job_body("manual_stixfile_amber_shared.json"))
    assert result.outcome is Outcome.ENRICHED
    n = len(publisher.published)
    assert n > 10 and result.bundles == n
    assert platform.names() == ["received", "expectations", "processed"]
    assert platform.calls[1] == ("expectations", WORK, n)
    assert platform.calls[2] == ("processed", WORK, f"Sent {n} object(s) in {n} bundle(s)", False)
    messages = [decode(b) for b in publisher.published]
    assert {m["work_id"] for m in messages} == {WORK}
    assert {m["applicant_id"] for m in messages} == {
        "connector-user"
    }  # job has none: registration's user
    org = "identity--7b1c2d3e-4f5a-5b6c-9d7e-8f9a0b1c2d3e"
    for m in messages:
        (obj,) = m["bundle"]["objects"]
        ext = obj.get("extensions", {}).get(
            "extension-definition--ea279b3e-5c71-4632-ac08-831c66a786ba", {}
        )
        assert org in (ext.get("granted_refs") or obj.get("x_opencti_granted_refs") or []), obj[
            "id"
        ]


async def test_not_found_completes_with_a_message() -> None:
    pipeline, platform, publisher = make_pipeline(FakeLookup(()))
    result = await pipeline.handle(job_body("auto_create_domain_green.json"))
    assert result.outcome is Outcome.NOT_FOUND
    assert platform.calls[-1] == (
        "processed",
        WORK,
        "bad.example.com not found in LastInfoSec",
        False,
    )
    assert publisher.published == [] and "expectations" not in platform.names()


async def test_red_observable_is_never_looked_up() -> None:
    lookup = FakeLookup(HOST_ANSWER)
    pipeline, platform, _ = make_pipeline(lookup)
    result = await pipeline.handle(job_body("auto_update_hostname_red_draft.json"))
    assert result.outcome is Outcome.SKIPPED and lookup.seen == []
    assert "TLP:RED is above the max TLP TLP:AMBER" in platform.calls[-1][2]
    assert platform.calls[0] == ("received", WORK, "e1f2a3b4-c5d6-4e7f-8a9b-0c1d2e3f4a5b")


async def test_max_tlp_is_configurable() -> None:
    lookup = FakeLookup(())
    pipeline, _, _ = make_pipeline(lookup, max_tlp="TLP:GREEN")
    result = await pipeline.handle(job_body("manual_stixfile_amber_shared.json"))
    assert result.outcome is Outcome.SKIPPED and lookup.seen == []


async def test_nothing_to_look_up_is_skipped() -> None:
    pipeline, platform, _ = make_pipeline(
        FakeLookup(
            error=NothingToLookUp(
                "invoice.pdf.exe has no MD5, SHA-1 or SHA-256: nothing to look up"
            )
        )
    )
    result = await pipeline.handle(job_body("manual_stixfile_no_hash.json"))
    assert result.outcome is Outcome.SKIPPED
    assert platform.calls[-1][3] is False and "nothing to look up" in platform.calls[-1][2]


async def test_exhausted_retries_end_the_work_in_error() -> None:
    pipeline, platform, _ = make_pipeline(
        FakeLookup(
            error=LisRetriesExhausted("LastInfoSec answered 503 after 6 attempts", attempts=6)
        )
    )
    result = await pipeline.handle(job_body("auto_create_domain_green.json"))
    assert result.outcome is Outcome.FAILED
    assert platform.calls[-1] == (
        "processed",
        WORK,
        "LastInfoSec lookup failed: LastInfoSec answered 503 after 6 attempts",
        True,
    )


async def test_invalid_key_is_fatal_and_the_work_is_not_processed() -> None:
    pipeline, platform, _ = make_pipeline(
        FakeLookup(error=LisFatalError("LastInfoSec rejected the API key"))
    )
    with pytest.raises(FatalError):
        await pipeline.handle(job_body("auto_create_domain_green.json"))
    assert "processed" not in platform.names()


async def test_platform_failures_are_retried_until_they_go_through() -> None:
    pipeline, platform, _ = make_pipeline(FakeLookup(ANSWER))
    platform.fail = {
        "received": [PlatformError("OpenCTI unreachable: ConnectionError")] * 3,
        "expectations": [PlatformError("DATABASE_ERROR")],
        "processed": [PlatformError("HTTP 502")] * 2,
    }
    result = await pipeline.handle(job_body("manual_stixfile_amber_shared.json"))
    assert result.outcome is Outcome.ENRICHED
    assert platform.names() == ["received", "expectations", "processed"]


async def test_work_not_alive_drops_the_job() -> None:
    pipeline, platform, _ = make_pipeline(FakeLookup(()))
    platform.fail = {"processed": [WorkNotAlive()]}
    result = await pipeline.handle(job_body("auto_create_domain_green.json"))
    assert result.outcome is Outcome.DROPPED
    assert pipeline.in_flight == {}


async def test_one_delivery_per_job_after_its_expectations() -> None:
    # Retrying unconfirmed messages is the publisher's job (tests/integration/test_amqp.py).
    pipeline, platform, publisher = make_pipeline(FakeLookup(ANSWER))
    platform.fail = {"expectations": [PlatformError("HTTP 502")]}
    result = await pipeline.handle(job_body("manual_stixfile_amber_shared.json"))
    assert result.outcome is Outcome.ENRICHED
    assert publisher.deliveries == 1
    assert len(publisher.published) == result.bundles == len(set(publisher.published))
    assert platform.names() == ["received", "expectations", "processed"]
    assert ("expectations", WORK, result.bundles) in platform.calls


async def test_redelivered_job_does_not_add_expectations_the_work_already_has() -> None:
    pipeline, platform, publisher = make_pipeline(FakeLookup(ANSWER))
    platform.recorded = 100  # the first attempt added them before it was lost
    result = await pipeline.handle(job_body("manual_stixfile_amber_shared.json"), redelivered=True)
    assert result.outcome is Outcome.ENRICHED and publisher.published
    assert platform.names() == ["received", "tracking", "processed"]


async def test_redelivered_job_adds_the_expectations_the_first_attempt_did_not() -> None:
    pipeline, platform, publisher = make_pipeline(FakeLookup(ANSWER))
    platform.fail = {"tracking": [PlatformError("DATABASE_ERROR")]}  # retried like any report
    result = await pipeline.handle(job_body("manual_stixfile_amber_shared.json"), redelivered=True)
    assert result.outcome is Outcome.ENRICHED
    assert platform.names() == ["received", "tracking", "expectations", "processed"]
    assert ("expectations", WORK, len(publisher.published)) in platform.calls
    # Partly recorded (a different answer the first time): only the difference is added.
    pipeline, platform, publisher = make_pipeline(FakeLookup(ANSWER))
    platform.recorded = 2
    await pipeline.handle(job_body("manual_stixfile_amber_shared.json"), redelivered=True)
    assert ("expectations", WORK, len(publisher.published) - 2) in platform.calls


async def test_same_job_twice_gives_the_same_ids() -> None:
    ids = []
    for _ in range(2):
        pipeline, _, publisher = make_pipeline(FakeLookup(ANSWER))
        await pipeline.handle(job_body("manual_stixfile_amber_shared.json"))
        ids.append(sorted(decode(b)["bundle"]["objects"][0]["id"] for b in publisher.published))
    assert ids[0] == ids[1]


async def test_playbook_answers_with_the_whole_bundle_and_publishes_nothing() -> None:
    pipeline, platform, publisher = make_pipeline(FakeLookup(HOST_ANSWER))
    result = await pipeline.handle(job_body("playbook_url.json"))
    assert result.outcome is Outcome.ENRICHED and publisher.published == []
    (call,) = platform.calls
    assert call[0] == "playbook" and call[1] == "c8d7e6f5-a4b3-4c2d-9e1f-0a9b8c7d6e5f"
    ids = {o["id"] for o in call[2]["objects"]}
    assert "url--5f1e2d3c-4b5a-5968-8776-a5b4c3d2e1f0" in ids and len(ids) > 5


@pytest.mark.parametrize(
    "lookup", [FakeLookup(()), FakeLookup(error=LisRetriesExhausted("down", attempts=3))]
)
async def test_playbook_gets_its_bundle_back_when_nothing_is_added(lookup: FakeLookup) -> None:
    pipeline, platform, publisher = make_pipeline(lookup)
    body = orjson.loads(job_body("playbook_url.json"))
    result = await pipeline.handle(job_body("playbook_url.json"))
    assert result.outcome in (Outcome.NOT_FOUND, Outcome.FAILED)
    (call,) = platform.calls
    assert [o["id"] for o in call[2]["objects"]] == [
        o["id"] for o in body["event"]["bundle"]["objects"]
    ]
    assert publisher.published == []


async def test_malformed_body_marks_its_work_in_error() -> None:
    pipeline, platform, _ = make_pipeline(FakeLookup(()))
    result = await pipeline.handle(job_body("malformed_missing_event.json"))
    assert result.outcome is Outcome.INVALID
    assert platform.calls == [("processed", WORK, result.message, True)]
    result = await pipeline.handle(job_body("malformed_not_json.txt"))
    assert (
        result.outcome is Outcome.INVALID and len(platform.calls) == 1
    )  # no work id: nothing to report


async def test_deferred_resolution_reads_the_entity() -> None:
    lookup = FakeLookup(HOST_ANSWER)
    pipeline, platform, _ = make_pipeline(lookup)
    platform.entity = {  # the platform's GraphQL stixCyberObservable record
        "id": "8a1f6b0e-2c3d-4e5f-9a0b-1c2d3e4f5a6b",
        "standard_id": "domain-name--3e9b2c71-4f0a-5d6e-8c1b-9a7f6e5d4c3b",
        "entity_type": "Domain-Name",
        "value": "bad.example.com",
        "objectMarking": [
            {"standard_id": "marking-definition--34098fce-860f-48ae-8e50-ebd3cc5e41da"}
        ],
    }
    result = await pipeline.handle(job_body("auto_create_domain_deferred_resolution.json"))
    assert result.outcome is Outcome.ENRICHED
    names = platform.names()
    assert sorted(names[:2]) == ["read", "received"] and names[2:] == ["expectations", "processed"]
    assert lookup.seen[0].value == "bad.example.com"


async def test_unreadable_deferred_entity_fails_the_work() -> None:
    pipeline, platform, _ = make_pipeline(FakeLookup(HOST_ANSWER))
    result = await pipeline.handle(job_body("auto_create_domain_deferred_resolution.json"))
    assert result.outcome is Outcome.FAILED and platform.calls[-1][3] is True


# ------------------------------------------------------------------------------------------
# The gate in the pipeline, and what LastInfoSec's answer may not do

CUSTOM_RED = "marking-definition--c0c0c0c0-1111-4222-8333-444455556666"


def with_entity(name: str, **changes: Any) -> bytes:
    body = orjson.loads(job_body(name))
    entity = orjson.loads(body["event"]["stix_entity"])
    entity.update(changes)
    body["event"]["stix_entity"] = orjson.dumps(entity).decode()
    return orjson.dumps(body)


async def test_custom_red_marking_is_resolved_and_never_looked_up() -> None:
    lookup = FakeLookup(HOST_ANSWER)
    pipeline, platform, publisher = make_pipeline(lookup)
    platform.markings[CUSTOM_RED] = {"definition_type": "TLP", "definition": "TLP:RED"}
    body = with_entity("auto_create_domain_green.json", object_marking_refs=[CUSTOM_RED])
    result = await pipeline.handle(body)
    assert result.outcome is Outcome.SKIPPED and lookup.seen == [] and publisher.published == []
    assert ("marking", CUSTOM_RED) in platform.calls
    assert platform.calls[-1] == (
        "processed",
        WORK,
        "TLP:RED is above the max TLP TLP:AMBER: not sent to LastInfoSec",
        False,
    )


async def test_pap_gate_in_the_pipeline() -> None:
    pap_red = "marking-definition--4e4e3b84-de45-53df-9d9b-b21207699fd8"
    body = with_entity("auto_create_domain_green.json", object_marking_refs=[pap_red])
    lookup = FakeLookup(())
    pipeline, _, _ = make_pipeline(lookup)  # no PAP gate by default: looked up
    assert (await pipeline.handle(body)).outcome is Outcome.NOT_FOUND and lookup.seen
    lookup = FakeLookup(())
    pipeline, platform, _ = make_pipeline(lookup, max_pap="PAP:AMBER")
    assert (await pipeline.handle(body)).outcome is Outcome.SKIPPED and lookup.seen == []
    assert "PAP:RED is above the max PAP PAP:AMBER" in platform.calls[-1][2]


async def test_playbook_above_the_max_gets_its_bundle_back_unsent() -> None:
    body = orjson.loads(job_body("playbook_url.json"))
    body["event"]["bundle"]["objects"][0]["object_marking_refs"] = [CUSTOM_RED]
    lookup = FakeLookup(HOST_ANSWER)
    pipeline, platform, _ = make_pipeline(lookup)  # the platform does not know CUSTOM_RED: refused
    result = await pipeline.handle(orjson.dumps(body))
    assert result.outcome is Outcome.SKIPPED and lookup.seen == []
    assert "cannot be resolved" in result.message
    (call,) = [c for c in platform.calls if c[0] == "playbook"]
    assert [o["id"] for o in call[2]["objects"]] == [
        o["id"] for o in body["event"]["bundle"]["objects"]
    ]


async def test_work_message_says_what_was_left_out_of_the_answer() -> None:
    answer = [
        hostile_answer("domain-name--3e9b2c71-4f0a-5d6e-8c1b-9a7f6e5d4c3b", "bad.example.com")
    ]
    pipeline, platform, publisher = make_pipeline(FakeLookup(answer))
    result = await pipeline.handle(job_body("auto_create_domain_green.json"))
    assert result.outcome is Outcome.ENRICHED and publisher.published
    message = platform.calls[-1][2]
    assert message.startswith(f"Sent {result.objects} object(s) in {result.bundles} bundle(s)")
    assert "; left out of the LastInfoSec answer: " in message
    assert "marking definitions 1" in message and "identities other than LastInfoSec 1" in message


# ------------------------------------------------------------------------------------------
# Nothing escapes unreported


def boom() -> FakeLookup:
    """A lookup failing the way nobody foresaw (say, the cache's serialiser on a deep answer)."""
    return FakeLookup(error=TypeError("Recursion limit reached"))


async def test_unexpected_error_ends_the_work_in_error_with_a_generic_message(
    caplog: pytest.LogCaptureFixture,
) -> None:
    pipeline, platform, publisher = make_pipeline(boom())
    result = await pipeline.handle(job_body("auto_create_domain_green.json"))
    assert result.outcome is Outcome.FAILED and publisher.published == []
    assert platform.calls[-1] == ("processed", WORK, "internal error, see the connector log", True)
    assert [c[0] for c in platform.calls].count("processed") == 1
    assert pipeline.in_flight == {}
    assert any(
        r.exc_info and "Recursion limit reached" in str(r.exc_info[1]) for r in caplog.records
    )


async def test_unexpected_error_in_a_playbook_still_answers_it() -> None:
    pipeline, platform, _ = make_pipeline(boom())
    body = orjson.loads(job_body("playbook_url.json"))
    result = await pipeline.handle(job_body("playbook_url.json"))
    assert (
        result.outcome is Outcome.FAILED
        and result.message == "internal error, see the connector log"
    )
    (call,) = platform.calls
    assert call[0] == "playbook"
    assert [o["id"] for o in call[2]["objects"]] == [
        o["id"] for o in body["event"]["bundle"]["objects"]
    ]


async def test_unexpected_error_from_a_work_report_is_contained() -> None:
    pipeline, platform, _ = make_pipeline(FakeLookup(()))
    platform.fail = {"received": [ValueError("Newline or carriage return detected in headers")]}
    result = await pipeline.handle(job_body("auto_create_domain_green.json"))
    assert result.outcome is Outcome.FAILED
    assert platform.calls == [("processed", WORK, "internal error, see the connector log", True)]


async def test_crlf_draft_id_fails_the_work_without_the_header() -> None:
    body = orjson.loads(job_body("auto_create_domain_green.json"))
    body["internal"]["draft_id"] = "e1f2a3b4\r\nX-Injected: 1"
    pipeline, platform, _ = make_pipeline(FakeLookup(()))
    result = await pipeline.handle(orjson.dumps(body))
    assert result.outcome is Outcome.INVALID
    assert platform.calls == [("processed", WORK, result.message, True)]
    assert "internal.draft_id is not a valid identifier" in result.message


async def test_rejected_playbook_body_is_answered_with_its_bundle() -> None:
    body = orjson.loads(job_body("playbook_url.json"))
    body["event"]["entity_id"] = "url--00000000-0000-4000-8000-000000000000"  # not in the bundle
    pipeline, platform, _ = make_pipeline(FakeLookup(()))
    result = await pipeline.handle(orjson.dumps(body))
    assert result.outcome is Outcome.INVALID
    (call,) = platform.calls
    assert call[0] == "playbook" and call[2] == body["event"]["bundle"]


async def test_entity_type_cannot_forge_log_lines(caplog: pytest.LogCaptureFixture) -> None:
    """The entity type comes from the entity's OpenCTI extension, unchecked: the job's log line
    escapes it."""
    caplog.set_level("INFO", logger="lis_async")
    ext = "extension-definition--ea279b3e-5c71-4632-ac08-831c66a786ba"
    body = orjson.loads(
        with_entity("auto_create_domain_green.json", extensions={ext: {"type": "X\r\nFAKE LINE"}})
    )
    body["event"]["entity_type"] = None
    pipeline, _, _ = make_pipeline(FakeLookup(()))
    result = await pipeline.handle(orjson.dumps(body))
    assert result.outcome is Outcome.SKIPPED
    lines = [r.getMessage() for r in caplog.records if r.name == "lis_async.pipeline"]
    assert any("X\\r\\nFAKE LINE" in line for line in lines), lines
    assert not any("\n" in line or "\r" in line for line in lines)


async def test_a_large_body_is_parsed_off_the_event_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue #20, finding 9: a body over PARSE_INLINE_BYTES is parsed in a thread, so the loop
    serves the other jobs meanwhile; the usual small body stays on the loop (no thread hop)."""
    threads: list[threading.Thread] = []
    real_parse = job_module.parse_job  # the function the pipeline imported

    def parse_and_record(body: bytes) -> Job:
        threads.append(threading.current_thread())
        return real_parse(body)

    monkeypatch.setattr(pipeline_module, "parse_job", parse_and_record)
    lookup = FakeLookup(HOST_ANSWER)
    pipeline, _, _ = make_pipeline(lookup)
    small = job_body("auto_create_domain_green.json")
    large = with_entity("auto_create_domain_green.json", x_padding="a" * PARSE_INLINE_BYTES)
    assert len(small) <= PARSE_INLINE_BYTES < len(large)
    for body in (small, large):
        assert (await pipeline.handle(body)).outcome is Outcome.ENRICHED
    assert threads[0] is threading.main_thread() and threads[1] is not threading.main_thread()
    assert [o.value for o in lookup.seen] == ["bad.example.com"] * 2
