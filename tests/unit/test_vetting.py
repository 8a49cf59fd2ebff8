"""A LastInfoSec answer cannot reshape the platform (lis_async.enrichment.vetting, through stix.build): the
hostile answer of the security review, object by object."""

from __future__ import annotations

import json
from typing import Any

import pytest
from pycti import Identity, Malware, Report

from lis_async.enrichment.bundle import build
from lis_async.enrichment.job import Job, parse_job
from lis_async.enrichment.vetting import AUTHOR_ID
from tests.helpers import (
    CHOSEN_REPORT_ID,
    CUSTOM_MARKING,
    FOREIGN_FILE,
    FOREIGN_INTRUSION_SET,
    FOREIGN_MALWARE,
    FOREIGN_ORG,
    HOSTILE_T,
    IMPOSTOR_ID,
    TLP_CLEAR_ID,
    hostile_answer,
    job_body,
    opencti_keys,
)

DOMAIN_ID = "domain-name--3e9b2c71-4f0a-5d6e-8c1b-9a7f6e5d4c3b"
GREEN = "marking-definition--34098fce-860f-48ae-8e50-ebd3cc5e41da"
RED = "marking-definition--5e57c739-391a-4eb3-b6be-7d15ca92d5ed"
ORG = "identity--7b1c2d3e-4f5a-5b6c-9d7e-8f9a0b1c2d3e"
MALWARE_ID = Malware.generate_id("Hostileware")


def job(name: str = "auto_create_domain_green") -> Job:
    return parse_job(job_body(f"{name}.json"))


def built(j: Job | None = None) -> tuple[dict[str, Any], dict[str, int], dict[str, Any]]:
    j = j or job()
    result = build(j, [hostile_answer(DOMAIN_ID, "bad.example.com")], confidence=50)
    return result.bundle, dict(result.dropped), {o["id"]: o for o in result.bundle["objects"]}


def test_no_marking_definition_and_no_foreign_marking_reference() -> None:
    bundle, dropped, _ = built()
    assert not [o for o in bundle["objects"] if o["type"] == "marking-definition"]
    assert CUSTOM_MARKING not in json.dumps(bundle)
    assert dropped["marking"] == 1  # the custom one; the standard TLP:CLEAR copy is not news
    assert dropped["marking_ref"] == 1


def test_one_fixed_author_and_no_foreign_identity() -> None:
    bundle, dropped, _ = built()
    identities = {o["id"]: o for o in bundle["objects"] if o["type"] == "identity"}
    sector = Identity.generate_id("Finance", "class")
    assert set(identities) == {AUTHOR_ID, sector}  # sectors are knowledge: they stay
    assert AUTHOR_ID == Identity.generate_id("LastInfoSec", "organization")
    assert identities[AUTHOR_ID]["name"] == "LastInfoSec"
    for obj in bundle["objects"]:
        if obj["id"] not in (DOMAIN_ID, AUTHOR_ID) and obj["type"] not in ("domain-name",):
            assert obj.get("created_by_ref") == AUTHOR_ID, obj["id"]
    text = json.dumps(bundle)
    assert IMPOSTOR_ID not in text and FOREIGN_ORG not in text
    assert dropped["identity"] == 1  # ACME Corp; the impostor is replaced, not reported


def test_no_relationship_or_reference_outside_the_bundle() -> None:
    bundle, dropped, by_id = built()
    ids = set(by_id)
    for obj in bundle["objects"]:
        for key, val in obj.items():
            if key in ("created_by_ref", "object_marking_refs"):
                continue
            if key.endswith("_ref"):
                assert val in ids, (obj["id"], key, val)
            elif key.endswith("_refs"):
                assert set(val) <= ids, (obj["id"], key, val)
    text = json.dumps(bundle)
    for foreign in (FOREIGN_INTRUSION_SET, FOREIGN_MALWARE, FOREIGN_FILE):
        assert foreign not in text
    # the uses relationship between two unrelated entities, and the sighting by ACME
    assert dropped["edge"] == 2
    assert not [o for o in bundle["objects"] if o["type"] == "sighting"]
    assert dropped["ref"] == 2  # the report's ref to the foreign malware, the malware's sample


def test_report_cannot_choose_its_id() -> None:
    bundle, _, _ = built()
    (report,) = [o for o in bundle["objects"] if o["type"] == "report"]
    assert report["id"] == Report.generate_id("Internal incident 42", HOSTILE_T)
    assert CHOSEN_REPORT_ID not in json.dumps(bundle)
    assert report["object_refs"] == [DOMAIN_ID, MALWARE_ID]


def test_opencti_properties_from_the_answer_are_stripped() -> None:
    bundle, dropped, by_id = built()
    for obj in bundle["objects"]:
        if obj["id"] != DOMAIN_ID:  # the enriched observable keeps the platform's own extension
            assert opencti_keys(obj) == [], obj["id"]
    malware = by_id[MALWARE_ID]
    assert "sample_refs" not in malware or malware["sample_refs"] == []
    assert dropped["octi"] == 1
    assert dropped["type"] == 1  # the note


def test_what_comes_from_the_answer_is_marked_at_least_like_the_observable() -> None:
    _, _, by_id = built()
    assert by_id[MALWARE_ID]["object_marking_refs"] == [GREEN]  # TLP:CLEAR went up to GREEN
    red, _, red_by_id = built(job("auto_update_hostname_red_draft"))
    for obj in red["objects"]:
        if obj["id"] != AUTHOR_ID:  # the author says nothing about the observable
            assert RED in obj.get("object_marking_refs", []), obj["id"]
    assert TLP_CLEAR_ID not in json.dumps(red_by_id[MALWARE_ID])


def test_organisation_sharing_is_the_connectors_own() -> None:
    body = json.loads(job_body("manual_url_stix_objects_string.json"))  # shared with ORG
    shared = parse_job(json.dumps(body).encode())
    assert shared.observable is not None
    result = build(shared, [hostile_answer(shared.observable.stix_id, "x")], confidence=50)
    for obj in result.bundle["objects"]:
        ext = obj.get("extensions", {}).get(
            "extension-definition--ea279b3e-5c71-4632-ac08-831c66a786ba"
        )
        granted = ext["granted_refs"] if ext else obj["x_opencti_granted_refs"]
        assert granted == [ORG], obj["id"]


def test_the_work_message_says_what_was_left_out() -> None:
    result = build(job(), [hostile_answer(DOMAIN_ID, "bad.example.com")], confidence=50)
    assert result.left_out() == (
        "; left out of the LastInfoSec answer: objects of a type LastInfoSec does not send 1, "
        "marking definitions 1, identities other than LastInfoSec 1, relationships or "
        "sightings to objects outside the answer 2, references to objects outside the answer 2, "
        "references to unknown markings 1, objects stripped of OpenCTI properties 1"
    )
    clean = build(job(), [], confidence=50)
    assert clean.left_out() == ""


def test_an_answer_object_cannot_replace_the_observable() -> None:
    impostor = {
        "type": "domain-name",
        "spec_version": "2.1",
        "id": DOMAIN_ID,
        "value": "evil.example",
        "x_opencti_score": 100,
    }
    bundle = build(
        job(), [{"type": "bundle", "id": "bundle--1", "objects": [impostor]}], confidence=50
    ).bundle
    (obs,) = [o for o in bundle["objects"] if o["id"] == DOMAIN_ID]
    assert obs["value"] == "bad.example.com"


def test_relationship_cycles_and_chains() -> None:
    """An edge may point at an edge (kept when the chain ends in the bundle); a cycle of edges
    has no end anywhere and goes."""
    sdo = {"spec_version": "2.1", "created": HOSTILE_T, "modified": HOSTILE_T}
    malware = {**sdo, "type": "malware", "id": "malware--1a1a1a1a-1111-4222-8333-000000000001",
               "name": "m", "is_family": True}  # fmt: skip
    r1 = {**sdo, "type": "relationship", "id": "relationship--1a1a1a1a-1111-4222-8333-000000000002",
          "relationship_type": "related-to", "source_ref": DOMAIN_ID, "target_ref": malware["id"]}  # fmt: skip
    r2 = {**sdo, "type": "relationship", "id": "relationship--1a1a1a1a-1111-4222-8333-000000000003",
          "relationship_type": "related-to", "source_ref": malware["id"], "target_ref": r1["id"]}  # fmt: skip
    c1 = {**sdo, "type": "relationship", "id": "relationship--1a1a1a1a-1111-4222-8333-000000000004",
          "relationship_type": "related-to", "source_ref": malware["id"],
          "target_ref": "relationship--1a1a1a1a-1111-4222-8333-000000000005"}  # fmt: skip
    c2 = {**c1, "id": "relationship--1a1a1a1a-1111-4222-8333-000000000005", "target_ref": c1["id"]}
    result = build(
        job(),
        [{"type": "bundle", "id": "bundle--1", "objects": [r2, c1, c2, r1, malware]}],
        confidence=50,
    )
    rels = [o for o in result.bundle["objects"] if o["type"] == "relationship"]
    r1_out = next(r for r in rels if r["source_ref"] == DOMAIN_ID)
    assert any(r["target_ref"] == r1_out["id"] for r in rels)  # r2, pointing at r1's new id
    assert result.dropped["edge"] == 2  # the cycle


# ------------------------------------------------------------------------------------------
# what LastInfoSec may set of OpenCTI's own properties (issue #20, finding 11)


def _answer_with(indicator_props: dict[str, Any], **others: Any) -> dict[str, Any]:
    sdo = {"spec_version": "2.1", "created": HOSTILE_T, "modified": HOSTILE_T}
    indicator = {
        **sdo,
        "type": "indicator",
        "id": "indicator--2b2b2b2b-1111-4222-8333-000000000001",
        "pattern": "[domain-name:value = 'bad.example.com']",
        "pattern_type": "stix",
        "valid_from": HOSTILE_T,
        **indicator_props,
    }
    malware = {
        **sdo,
        "type": "malware",
        "id": "malware--2b2b2b2b-1111-4222-8333-000000000002",
        "name": "Scored",
        "is_family": True,
        **others,
    }
    return {"type": "bundle", "id": "bundle--1", "objects": [indicator, malware]}


def _vetted(answer: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any], dict[str, int]]:
    result = build(job(), [answer], confidence=50)
    by_type = {o["type"]: o for o in result.bundle["objects"] if o["id"] != DOMAIN_ID}
    return by_type["indicator"], by_type["malware"], dict(result.dropped)


@pytest.mark.parametrize(
    ("score", "kept"),
    [(50, 50), (75, 75), (90, 90), (0, 0), (100, 100), (150, 100), (-5, 0)],
)
def test_an_indicator_keeps_its_score_clamped(score: int, kept: int) -> None:
    indicator, _, dropped = _vetted(_answer_with({"x_opencti_score": score}))
    assert indicator["x_opencti_score"] == kept
    assert dropped.get("octi", 0) == 0


@pytest.mark.parametrize("score", ["90", 90.0, 75.5, True, None, [90], {"score": 90}])
def test_a_score_that_is_not_an_integer_is_dropped(score: Any) -> None:
    indicator, _, dropped = _vetted(_answer_with({"x_opencti_score": score}))
    assert "x_opencti_score" not in indicator
    assert dropped["octi"] == 1


def test_only_the_allowed_properties_stay() -> None:
    """The score stays on the indicator; everything else OpenCTI-specific goes, on the indicator
    and elsewhere (a malware's score included)."""
    indicator, malware, dropped = _vetted(
        _answer_with(
            {
                "x_opencti_score": 75,
                "x_opencti_files": [{"name": "x.exe", "data": "TVqQ"}],
                "x_opencti_workflow_id": "b9a4bf09-0000-4000-8000-000000000000",
                "x_opencti_id": "b9a4bf09-0000-4000-8000-000000000001",
                "x_opencti_granted_refs": [FOREIGN_ORG],
                "x_opencti_detection": True,
            },
            x_opencti_score=100,
        )
    )
    assert [k for k in opencti_keys(indicator) if k != "x_opencti_granted_refs"] == [
        "x_opencti_score"
    ]
    assert indicator["x_opencti_score"] == 75
    assert FOREIGN_ORG not in json.dumps(indicator)
    assert opencti_keys(malware) == []
    assert dropped["octi"] == 2
