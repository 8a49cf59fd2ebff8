"""Bundle building (lis_async.enrichment.bundle): golden files, ids, relationships, sharing, purity.

Golden files live in tests/fixtures/golden/; regenerate them with ``UPDATE_GOLDEN=1 pytest
tests/unit/test_stix.py`` and review the diff.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from types import MappingProxyType
from typing import Any

import orjson
import pytest
import stix2
from pycti import AttackPattern, Identity, Indicator, IntrusionSet, Malware, ThreatActorGroup, Tool

from lis_async.enrichment.bundle import (
    EXTERNAL_REFERENCE,
    build_bundle,
    playbook_passthrough,
    propagate_organisations,
    relationship_id,
)
from lis_async.enrichment.job import (
    STIX_EXT_OCTI,
    STIX_EXT_OCTI_SCO,
    Job,
    PlaybookJob,
    WorkJob,
    parse_job,
    parse_observable,
)

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
JOBS = FIXTURES / "jobs"
LIS = FIXTURES / "lastinfosec"
GOLDEN = FIXTURES / "golden"
UPDATE_GOLDEN = os.environ.get("UPDATE_GOLDEN") == "1"

ORG = "identity--7b1c2d3e-4f5a-5b6c-9d7e-8f9a0b1c2d3e"
# The one LastInfoSec identity (pycti's id of the Organization "LastInfoSec"), whatever the
# answer's identity says.
LIS_IDENTITY = Identity.generate_id("LastInfoSec", "organization")
TLP_GREEN = "marking-definition--34098fce-860f-48ae-8e50-ebd3cc5e41da"
TLP_AMBER = "marking-definition--f88d31f6-486f-44da-b317-01333bde0b82"
# The answer's objects go out under the ids OpenCTI derives from their content (pycti's
# generate_id is the oracle here), not under the ids the answer chose.
MALWARE = Malware.generate_id("Emotet")
INTRUSION_SET = IntrusionSet.generate_id("TA542")
ATTACK_PATTERN = AttackPattern.generate_id("Spearphishing Attachment")
FILE_ID = "file--9d8c7b6a-5f4e-5d3c-8b2a-1f0e9d8c7b6a"
DOMAIN_ID = "domain-name--3e9b2c71-4f0a-5d6e-8c1b-9a7f6e5d4c3b"
URL_ID = "url--5f1e2d3c-4b5a-5968-8776-a5b4c3d2e1f0"
HOSTNAME_ID = "hostname--01a98dfa-fdb3-5da1-be9a-ed06c3f8e940"
SHA256 = "275a021bbfb6489e54d471899f7db9d1663fc695ec2fe2a2c4538aabf651fd0f"
HASH_INDICATOR = Indicator.generate_id(f"[file:hashes.'SHA-256' = '{SHA256}']")
DOMAIN_INDICATOR = Indicator.generate_id("[domain-name:value = 'bad.example.com']")
URL_INDICATOR = Indicator.generate_id("[url:value = 'http://bad.example.com/gate.php']")
MD5 = "44d88612fea8a8f36de82e1278abb02f"


def load_job(name: str) -> Job:
    return parse_job((JOBS / f"{name}.json").read_bytes())


def load_answer(name: str) -> list[dict[str, Any]]:
    data = json.loads((LIS / f"{name}.json").read_text())
    bundles = data["message"] if isinstance(data, dict) else data
    assert isinstance(bundles, list)
    return bundles


def by_id(bundle: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {o["id"]: o for o in bundle["objects"]}


def rels(bundle: dict[str, Any], rel_type: str) -> list[dict[str, Any]]:
    return [
        o
        for o in bundle["objects"]
        if o["type"] == "relationship" and o["relationship_type"] == rel_type
    ]


def added_rels(bundle: dict[str, Any], rel_type: str, job: Job) -> list[Any]:
    """Relationships of ``rel_type`` this module added: those with the enriched observable at
    one end (LastInfoSec's own tie its objects to its copy of the observable)."""
    assert job.observable is not None
    obs_id = job.observable.stix_id.replace("x-opencti-hostname--", "hostname--")
    return [r for r in rels(bundle, rel_type) if obs_id in (r["source_ref"], r["target_ref"])]


def roundtrip(bundle: dict[str, Any]) -> None:
    parsed = stix2.parse(orjson.loads(orjson.dumps(bundle)), allow_custom=True, version="2.1")
    assert parsed["id"] == bundle["id"]
    assert len(parsed["objects"]) == len(bundle["objects"])


def normalised(bundle: dict[str, Any]) -> dict[str, Any]:
    out = dict(bundle)
    out["objects"] = sorted(bundle["objects"], key=lambda o: o["id"])
    return out


def entity_job(entity: dict[str, Any], base: str = "auto_create_domain_green") -> Job:
    """A job from a fixture body with its stix_entity replaced."""
    body = json.loads((JOBS / f"{base}.json").read_text())
    body["event"]["stix_entity"] = json.dumps(entity)
    body["event"]["entity_id"] = entity["id"]
    body["event"]["entity_type"] = None
    return parse_job(json.dumps(body).encode())


def lis_bundle(*objects: dict[str, Any]) -> dict[str, Any]:
    return {
        "type": "bundle",
        "id": "bundle--00000000-0000-4000-8000-000000000001",
        "objects": list(objects),
    }


def indicator(ident: str, pattern: str) -> dict[str, Any]:
    return {
        "type": "indicator",
        "spec_version": "2.1",
        "id": ident,
        "created": "2026-10-14T08:12:03.000Z",
        "modified": "2026-10-14T08:12:03.000Z",
        "pattern": pattern,
        "pattern_type": "stix",
        "valid_from": "2026-10-14T08:12:03Z",
    }


# --------------------------------------------------------------------------------------------------
# Golden files

CASES = {
    "stixfile_hash": ("manual_stixfile_amber_shared", "search_hash_200"),
    "domain_two_bundles": ("auto_create_domain_green", "search_host_200_two_bundles"),
    "playbook_url": ("playbook_url", "search_host_200_two_bundles"),
    "hostname_red_draft": ("auto_update_hostname_red_draft", "search_host_200_two_bundles"),
}


def build_case(case: str) -> tuple[Job, list[dict[str, Any]], dict[str, Any]]:
    job_name, answer_name = CASES[case]
    job = load_job(job_name)
    answer = load_answer(answer_name)
    return job, answer, build_bundle(job, answer, confidence=75)


@pytest.mark.parametrize("case", sorted(CASES))
def test_golden(case: str) -> None:
    _, _, bundle = build_case(case)
    path = GOLDEN / f"{case}.json"
    if UPDATE_GOLDEN:
        GOLDEN.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(normalised(bundle), indent=2, sort_keys=True) + "\n")
    assert path.exists(), f"missing golden file {path}; run with UPDATE_GOLDEN=1"
    expected = json.loads(path.read_text())
    assert normalised(json.loads(json.dumps(bundle))) == expected


@pytest.mark.parametrize("case", sorted(CASES))
def test_stix2_round_trip_and_orjson(case: str) -> None:
    _, _, bundle = build_case(case)
    roundtrip(bundle)


@pytest.mark.parametrize("case", sorted(CASES))
def test_deterministic_across_runs(case: str) -> None:
    job, answer, first = build_case(case)
    second = build_bundle(job, copy.deepcopy(answer), confidence=75)
    assert first == second
    assert first["id"].startswith("bundle--")


def test_bundle_id_depends_on_content() -> None:
    job = load_job("auto_create_domain_green")
    full = build_bundle(job, load_answer("search_host_200_two_bundles"), confidence=75)
    one = build_bundle(job, load_answer("search_200_bare_list"), confidence=75)
    assert full["id"] != one["id"]
    assert "spec_version" not in full  # STIX 2.1 bundles have none (stix2 would read it as 2.0)


# --------------------------------------------------------------------------------------------------
# Relationship ids


@pytest.mark.parametrize(
    ("rel_type", "src", "dst"),
    [
        ("based-on", HASH_INDICATOR, FILE_ID),
        ("related-to", DOMAIN_ID, MALWARE),
        ("related-to", 'x"y\\z\n', "é–ü 🙂\u2028"),
    ],
)
def test_relationship_id_matches_pycti(rel_type: str, src: str, dst: str) -> None:
    from pycti.entities.opencti_stix_core_relationship import StixCoreRelationship

    assert relationship_id(rel_type, src, dst) == StixCoreRelationship.generate_id(
        rel_type, src, dst
    )


# --------------------------------------------------------------------------------------------------
# Relationships to the observable


def test_based_on_from_matching_hash_indicator_only() -> None:
    job, _, bundle = build_case("stixfile_hash")
    based_on = added_rels(bundle, "based-on", job)
    assert [(r["source_ref"], r["target_ref"]) for r in based_on] == [(HASH_INDICATOR, FILE_ID)]
    rel = based_on[0]
    assert rel["id"] == relationship_id("based-on", HASH_INDICATOR, FILE_ID)
    assert rel["confidence"] == 75
    assert rel["created_by_ref"] == LIS_IDENTITY
    assert TLP_AMBER in rel["object_marking_refs"]


def test_based_on_domain_only_exact_value() -> None:
    job, _, bundle = build_case("domain_two_bundles")
    based_on = added_rels(bundle, "based-on", job)
    # bad.example.com matches; c2-N.bad.example.com and the url indicator do not.
    assert [(r["source_ref"], r["target_ref"]) for r in based_on] == [(DOMAIN_INDICATOR, DOMAIN_ID)]


def test_based_on_url_exact_value_not_host() -> None:
    job, _, bundle = build_case("playbook_url")
    based_on = added_rels(bundle, "based-on", job)
    assert [(r["source_ref"], r["target_ref"]) for r in based_on] == [(URL_INDICATOR, URL_ID)]


def test_no_based_on_for_hostname_without_matching_indicator() -> None:
    job, _, bundle = build_case("hostname_red_draft")
    assert added_rels(bundle, "based-on", job) == []


@pytest.mark.parametrize(
    ("pattern", "expected"),
    [
        (f"[file:hashes.'SHA-256' = '{SHA256.upper()}']", True),
        (f"[file:hashes.MD5 = '{MD5}']", True),
        (f"[file:hashes.'SHA-1' = 'ffff' OR file:hashes.MD5 = '{MD5.upper()}']", True),
        ("[file:name = 'eicar.com']", True),
        ("[file:name = 'EICAR.com']", False),
        (
            "[file:hashes.'SHA-256' = 'aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa']",
            False,
        ),
        (f"[url:value = '{SHA256}']", False),
    ],
)
def test_hash_pattern_matching(pattern: str, expected: bool) -> None:
    job = load_job("manual_stixfile_amber_shared")
    bundle = build_bundle(
        job,
        [lis_bundle(indicator("indicator--11111111-1111-4111-8111-111111111111", pattern))],
        confidence=50,
    )
    assert bool(rels(bundle, "based-on")) is expected


@pytest.mark.parametrize(
    ("pattern", "expected"),
    [
        ("[domain-name:value = 'BAD.Example.COM']", True),
        ("[hostname:value = 'bad.example.com']", True),
        ("[domain-name:value = 'bad.example.com.']", True),
        ("[domain-name:value = 'c2.bad.example.com']", False),
        ("[url:value = 'bad.example.com']", False),
        ("[domain-name:value = 'example.com']", False),
    ],
)
def test_domain_pattern_matching(pattern: str, expected: bool) -> None:
    job = load_job("auto_create_domain_green")
    bundle = build_bundle(
        job,
        [lis_bundle(indicator("indicator--11111111-1111-4111-8111-111111111111", pattern))],
        confidence=50,
    )
    assert bool(rels(bundle, "based-on")) is expected


def test_url_pattern_with_escaped_quote() -> None:
    value = "http://bad.example.com/it's\\here"
    entity = {"id": URL_ID, "spec_version": "2.1", "type": "url", "value": value}
    job = entity_job(entity)
    escaped = value.replace("\\", "\\\\").replace("'", "\\'")
    ok = indicator("indicator--11111111-1111-4111-8111-111111111111", f"[url:value = '{escaped}']")
    ko = indicator("indicator--22222222-2222-4222-8222-222222222222", f"[url:value = '{escaped}x']")
    bundle = build_bundle(job, [lis_bundle(ok, ko)], confidence=50)
    assert [r["source_ref"] for r in rels(bundle, "based-on")] == [
        Indicator.generate_id(ok["pattern"])
    ]


def test_related_to_malware_and_intrusion_set() -> None:
    job, _, bundle = build_case("stixfile_hash")
    related = added_rels(bundle, "related-to", job)
    assert {(r["source_ref"], r["target_ref"]) for r in related} == {
        (FILE_ID, MALWARE),
        (FILE_ID, INTRUSION_SET),
    }
    assert all(r["target_ref"] != ATTACK_PATTERN for r in related)
    for rel in related:
        assert rel["id"] == relationship_id("related-to", FILE_ID, rel["target_ref"])
        assert rel["confidence"] == 75
        assert rel["created_by_ref"] == LIS_IDENTITY


def test_related_to_tool_and_threat_actor_and_dedup_across_bundles() -> None:
    job, _, bundle = build_case("domain_two_bundles")
    # Malware and intrusion set are in both bundles: one relationship each.
    assert sorted(r["target_ref"] for r in added_rels(bundle, "related-to", job)) == sorted(
        [INTRUSION_SET, MALWARE]
    )
    job = load_job("auto_create_domain_green")
    tool = {
        "type": "tool",
        "spec_version": "2.1",
        "id": "tool--11111111-1111-4111-8111-111111111111",
        "created": "2026-01-01T00:00:00.000Z",
        "modified": "2026-01-02T00:00:00.000Z",
        "name": "x",
    }
    actor = {
        "type": "threat-actor",
        "spec_version": "2.1",
        "id": "threat-actor--22222222-2222-4222-8222-222222222222",
        "created": "2026-01-01T00:00:00.000Z",
        "modified": "2026-01-01T00:00:00.000Z",
        "name": "y",
        "object_marking_refs": [TLP_AMBER],
    }
    bundle = build_bundle(job, [lis_bundle(tool, actor)], confidence=10)
    related = rels(bundle, "related-to")
    tool_id, actor_id = Tool.generate_id("x"), ThreatActorGroup.generate_id("y")
    assert {r["target_ref"] for r in related} == {tool_id, actor_id}
    for rel in related:
        assert rel["created_by_ref"] == LIS_IDENTITY  # no identity in the answer: the fixed one
        assert rel["confidence"] == 10
    tool_rel = next(r for r in related if r["target_ref"] == tool_id)
    assert (tool_rel["created"], tool_rel["modified"]) == (tool["created"], tool["modified"])
    actor_rel = next(r for r in related if r["target_ref"] == actor_id)
    assert actor_rel["object_marking_refs"] == [TLP_GREEN, TLP_AMBER]
    assert tool_rel["object_marking_refs"] == [TLP_GREEN]
    roundtrip(bundle)


def test_one_fixed_lastinfosec_identity_authors_everything() -> None:
    """Whatever identity the answer sends (a LastInfoSec one under any id, or none), the one fixed
    identity authors the relationships and the answer's objects, and is sent once."""
    job = load_job("auto_create_domain_green")
    malware = {
        "type": "malware",
        "spec_version": "2.1",
        "id": MALWARE,
        "name": "m",
        "is_family": True,
        "created": "2026-01-01T00:00:00.000Z",
        "modified": "2026-01-01T00:00:00.000Z",
    }
    impostor = {
        "type": "identity",
        "spec_version": "2.1",
        "id": "identity--33333333-3333-4333-8333-333333333333",
        "name": "Last Info Sec",
        "identity_class": "organization",
        "created": "2026-01-01T00:00:00.000Z",
        "modified": "2026-01-01T00:00:00.000Z",
    }
    for answer in (
        [lis_bundle(malware)],
        [lis_bundle(impostor, malware | {"created_by_ref": impostor["id"]})],
    ):
        bundle = build_bundle(job, answer, confidence=50)
        identities = [o for o in bundle["objects"] if o["type"] == "identity"]
        assert [i["id"] for i in identities] == [LIS_IDENTITY]
        assert identities[0]["name"] == "LastInfoSec"
        assert rels(bundle, "related-to")[0]["created_by_ref"] == LIS_IDENTITY
        assert by_id(bundle)[Malware.generate_id("m")]["created_by_ref"] == LIS_IDENTITY
        roundtrip(bundle)
    # Nothing from LastInfoSec: no author either.
    assert [o["type"] for o in build_bundle(job, [], confidence=50)["objects"]] == ["domain-name"]


def test_relationship_already_in_answer_is_not_duplicated() -> None:
    job = load_job("auto_create_domain_green")
    malware = {
        "type": "malware",
        "spec_version": "2.1",
        "id": MALWARE,
        "name": "m",
        "is_family": True,
        "created": "2026-01-01T00:00:00.000Z",
        "modified": "2026-01-01T00:00:00.000Z",
    }
    existing = {
        "type": "relationship",
        "spec_version": "2.1",
        "id": relationship_id("related-to", DOMAIN_ID, MALWARE),
        "relationship_type": "related-to",
        "source_ref": DOMAIN_ID,
        "target_ref": MALWARE,
        "created": "2025-01-01T00:00:00.000Z",
        "modified": "2025-01-01T00:00:00.000Z",
        "description": "from LastInfoSec",
    }
    bundle = build_bundle(job, [lis_bundle(malware, existing)], confidence=50)
    related = rels(bundle, "related-to")
    assert len(related) == 1
    assert related[0]["description"] == "from LastInfoSec"


# --------------------------------------------------------------------------------------------------
# The observable


def test_observable_keeps_identity_and_carries_external_reference() -> None:
    job, _, bundle = build_case("stixfile_hash")
    obs = by_id(bundle)[FILE_ID]
    entity = job.observable.stix if job.observable else {}
    for key in ("id", "type", "spec_version", "hashes", "name", "size", "object_marking_refs"):
        assert obs[key] == entity[key]
    sco = obs["extensions"][STIX_EXT_OCTI_SCO]
    assert sco["external_references"] == [dict(EXTERNAL_REFERENCE)]
    assert sco["labels"] == ["malware"]
    assert sco["score"] == 80
    octi = obs["extensions"][STIX_EXT_OCTI]
    # Internal bookkeeping is not replayed; is_inferred would make pycti skip the object.
    assert set(octi) == {"extension_type", "type", "granted_refs"}


def test_observable_replaces_lastinfosec_object_with_same_id() -> None:
    job = load_job("auto_create_domain_green")
    impostor = {
        "type": "domain-name",
        "spec_version": "2.1",
        "id": DOMAIN_ID,
        "value": "other.example",
    }
    bundle = build_bundle(job, [lis_bundle(impostor)], confidence=50)
    assert [o["id"] for o in bundle["objects"]] == [DOMAIN_ID]
    assert bundle["objects"][0]["value"] == "bad.example.com"


def test_existing_external_references_are_kept_and_not_duplicated() -> None:
    entity = {
        "id": DOMAIN_ID,
        "spec_version": "2.1",
        "type": "domain-name",
        "value": "bad.example.com",
        "extensions": {
            STIX_EXT_OCTI_SCO: {
                "extension_type": "property-extension",
                "external_references": [
                    {"source_name": "x", "url": "https://x.example"},
                    dict(EXTERNAL_REFERENCE),
                ],
            }
        },
    }
    bundle = build_bundle(entity_job(entity), [], confidence=50)
    refs = bundle["objects"][0]["extensions"][STIX_EXT_OCTI_SCO]["external_references"]
    assert refs == [{"source_name": "x", "url": "https://x.example"}, dict(EXTERNAL_REFERENCE)]


def test_flat_pycti_shape_gets_top_level_reference_and_granted_refs() -> None:
    entity = {
        "id": FILE_ID,
        "spec_version": "2.1",
        "type": "file",
        "x_opencti_score": 50,
        "name": "eicar.com",
        "hashes": {"MD5": MD5, "SHA-256": SHA256},
        "x_opencti_id": "0c9b8a7d-6e5f-4a3b-9c2d-1e0f9a8b7c6d",
        "x_opencti_type": "StixFile",
        "x_opencti_granted_refs": [ORG],
        "object_marking_refs": [TLP_AMBER],
    }
    bundle = build_bundle(entity_job(entity), load_answer("search_hash_200"), confidence=50)
    obs = by_id(bundle)[FILE_ID]
    assert obs["external_references"] == [dict(EXTERNAL_REFERENCE)]
    assert "x_opencti_id" not in obs
    assert obs["x_opencti_granted_refs"] == [ORG]
    assert rels(bundle, "based-on")
    roundtrip(bundle)


def test_hostname_job_never_emits_x_opencti_hostname() -> None:
    job = load_job("auto_update_hostname_red_draft")
    legacy = {
        "type": "x-opencti-hostname",
        "spec_version": "2.1",
        "id": "x-opencti-hostname--01a98dfa-fdb3-5da1-be9a-ed06c3f8e940",
        "value": "srv01.corp.example",
    }
    malware = {
        "type": "malware",
        "spec_version": "2.1",
        "id": MALWARE,
        "name": "m",
        "is_family": True,
        "created": "2026-01-01T00:00:00.000Z",
        "modified": "2026-01-01T00:00:00.000Z",
    }
    rel_to_legacy = {
        "type": "relationship",
        "spec_version": "2.1",
        "id": "relationship--44444444-4444-4444-8444-444444444444",
        "relationship_type": "related-to",
        "source_ref": legacy["id"],
        "target_ref": MALWARE,
        "created": "2026-01-01T00:00:00.000Z",
        "modified": "2026-01-01T00:00:00.000Z",
    }
    rel_to_rel = {
        "type": "relationship",
        "spec_version": "2.1",
        "id": "relationship--55555555-5555-4555-8555-555555555555",
        "relationship_type": "related-to",
        "source_ref": MALWARE,
        "target_ref": rel_to_legacy["id"],
        "created": "2026-01-01T00:00:00.000Z",
        "modified": "2026-01-01T00:00:00.000Z",
    }
    report: dict[str, Any] = {
        "type": "report",
        "spec_version": "2.1",
        "id": "report--66666666-6666-4666-8666-666666666666",
        "name": "r",
        "published": "2026-01-01T00:00:00Z",
        "created": "2026-01-01T00:00:00.000Z",
        "modified": "2026-01-01T00:00:00.000Z",
        "object_refs": [legacy["id"], MALWARE, rel_to_legacy["id"], rel_to_rel["id"]],
    }
    bundle = build_bundle(
        job, [lis_bundle(legacy, malware, rel_to_legacy, rel_to_rel, report)], confidence=50
    )
    text = json.dumps(bundle)
    assert "x-opencti-hostname" not in text
    objects = by_id(bundle)
    assert objects[HOSTNAME_ID]["type"] == "hostname"
    assert objects[HOSTNAME_ID]["external_references"] == [dict(EXTERNAL_REFERENCE)]
    malware_id = Malware.generate_id("m")
    (report_out,) = (o for o in bundle["objects"] if o["type"] == "report")
    assert report_out["object_refs"] == [malware_id]
    (related,) = rels(bundle, "related-to")  # the two relationships via the legacy object went
    assert (related["source_ref"], related["target_ref"]) == (HOSTNAME_ID, malware_id)
    roundtrip(bundle)


def test_legacy_hostname_entity_is_emitted_as_hostname() -> None:
    entity = {
        "id": "x-opencti-hostname--01a98dfa-fdb3-5da1-be9a-ed06c3f8e940",
        "spec_version": "2.1",
        "type": "x-opencti-hostname",
        "value": "srv01.corp.example",
    }
    bundle = build_bundle(entity_job(entity), [], confidence=50)
    assert [o["id"] for o in bundle["objects"]] == [HOSTNAME_ID]
    assert bundle["objects"][0]["type"] == "hostname"


# --------------------------------------------------------------------------------------------------
# Organisations


def test_every_object_carries_the_organisation_when_shared() -> None:
    _, _, bundle = build_case("stixfile_hash")
    for obj in bundle["objects"]:
        octi = obj.get("extensions", {}).get(STIX_EXT_OCTI)
        refs = octi["granted_refs"] if octi is not None else obj["x_opencti_granted_refs"]
        assert refs == [ORG], obj["id"]


def test_playbook_objects_carry_the_organisation() -> None:
    _, _, bundle = build_case("playbook_url")
    for obj in bundle["objects"]:
        octi = obj.get("extensions", {}).get(STIX_EXT_OCTI)
        refs = octi["granted_refs"] if octi is not None else obj["x_opencti_granted_refs"]
        assert refs == [ORG], obj["id"]


@pytest.mark.parametrize("case", ["domain_two_bundles", "hostname_red_draft"])
def test_no_organisation_when_not_shared(case: str) -> None:
    _, _, bundle = build_case(case)
    for obj in bundle["objects"]:
        assert "x_opencti_granted_refs" not in obj
        assert "granted_refs" not in obj.get("extensions", {}).get(STIX_EXT_OCTI, {})


def test_propagate_organisations_semantics() -> None:
    objects: list[dict[str, Any]] = [
        {"id": "a", "extensions": {STIX_EXT_OCTI: {"granted_refs": ["identity--z"]}}},
        {"id": "b", "extensions": {STIX_EXT_OCTI: {}}},
        {"id": "c", "x_opencti_granted_refs": ["identity--z", "identity--a"]},
        {"id": "d"},
        {"id": "e", "extensions": {STIX_EXT_OCTI_SCO: {}}},
    ]
    untouched = copy.deepcopy(objects)
    propagate_organisations(objects, None)
    assert objects == untouched

    propagate_organisations(objects, ["identity--m", "identity--a", "identity--m"])
    assert objects[0]["extensions"][STIX_EXT_OCTI]["granted_refs"] == [
        "identity--a",
        "identity--m",
        "identity--z",
    ]
    assert objects[1]["extensions"][STIX_EXT_OCTI]["granted_refs"] == ["identity--a", "identity--m"]
    assert "x_opencti_granted_refs" not in objects[0]
    assert objects[2]["x_opencti_granted_refs"] == ["identity--a", "identity--m", "identity--z"]
    assert objects[3]["x_opencti_granted_refs"] == ["identity--a", "identity--m"]
    assert objects[4]["x_opencti_granted_refs"] == ["identity--a", "identity--m"]

    empty: list[dict[str, Any]] = [{"id": "x"}, {"id": "y", "extensions": {STIX_EXT_OCTI: {}}}]
    propagate_organisations(empty, [])
    assert empty == [
        {"id": "x", "x_opencti_granted_refs": []},
        {"id": "y", "extensions": {STIX_EXT_OCTI: {"granted_refs": []}}},
    ]


# --------------------------------------------------------------------------------------------------
# Purity and edge cases


@pytest.mark.parametrize("case", sorted(CASES))
def test_inputs_not_mutated(case: str) -> None:
    job_name, answer_name = CASES[case]
    job = load_job(job_name)
    answer = load_answer(answer_name)
    answer_before = copy.deepcopy(answer)
    assert job.observable is not None
    entity_before = copy.deepcopy(dict(job.observable.stix))
    playbook = job.playbook if isinstance(job, PlaybookJob) else None
    playbook_before = copy.deepcopy(dict(playbook.bundle)) if playbook else None

    bundle = build_bundle(job, answer, confidence=75)
    assert answer == answer_before
    assert dict(job.observable.stix) == entity_before
    if playbook:
        assert dict(playbook.bundle) == playbook_before

    # The output shares nothing with the inputs: mutating it (as pycti's splitter does) is safe.
    for obj in bundle["objects"]:
        obj["nb_deps"] = 1
        for value in obj.values():
            if isinstance(value, list):
                value.append("mutated")
            elif isinstance(value, dict):
                value["mutated"] = True
                for inner in value.values():
                    if isinstance(inner, dict):
                        inner["mutated"] = True
    assert answer == answer_before
    assert dict(job.observable.stix) == entity_before
    if playbook:
        assert dict(playbook.bundle) == playbook_before
    assert build_bundle(job, answer, confidence=75) == build_case(case)[2]


def test_empty_answer_gives_only_the_observable() -> None:
    job = load_job("manual_stixfile_amber_shared")
    bundle = build_bundle(job, [], confidence=75)
    assert [o["id"] for o in bundle["objects"]] == [FILE_ID]
    assert bundle["objects"][0]["extensions"][STIX_EXT_OCTI_SCO]["external_references"] == [
        dict(EXTERNAL_REFERENCE)
    ]
    roundtrip(bundle)


def test_empty_answer_playbook_gives_incoming_objects_plus_reference() -> None:
    job = load_job("playbook_url")
    assert isinstance(job, PlaybookJob)
    bundle = build_bundle(job, [], confidence=75)
    assert bundle["id"] == job.playbook.bundle["id"]
    assert [o["id"] for o in bundle["objects"]] == [o["id"] for o in job.playbook.bundle["objects"]]
    obs = bundle["objects"][0]
    assert obs["extensions"][STIX_EXT_OCTI_SCO]["external_references"] == [dict(EXTERNAL_REFERENCE)]
    # Playbook bundles keep the entity's OpenCTI extension (later steps may read its internal id).
    assert obs["extensions"][STIX_EXT_OCTI]["id"] == "c3d4e5f6-a7b8-4c9d-8e0f-1a2b3c4d5e6f"
    roundtrip(bundle)


def test_playbook_incoming_objects_first_and_entity_replaced_in_place() -> None:
    body = json.loads((JOBS / "playbook_url.json").read_text())
    extra = {
        "type": "marking-definition",
        "spec_version": "2.1",
        "id": TLP_AMBER,
        "created": "2017-01-20T00:00:00.000Z",
        "definition_type": "tlp",
        "name": "TLP:AMBER",
        "definition": {"tlp": "amber"},
        "x_incoming": True,
    }
    body["event"]["bundle"]["objects"].insert(0, extra)
    job = parse_job(json.dumps(body).encode())
    answer = load_answer("search_host_200_two_bundles")
    bundle = build_bundle(job, answer, confidence=75)
    ids = [o["id"] for o in bundle["objects"]]
    assert ids[:2] == [TLP_AMBER, URL_ID]
    assert ids.count(TLP_AMBER) == 1 and ids.count(URL_ID) == 1
    assert bundle["objects"][0]["x_incoming"] is True  # incoming copy wins over LastInfoSec's
    assert bundle["id"] == body["event"]["bundle"]["id"]
    assert bundle["spec_version"] == "2.1"  # the platform's bundle keys are kept


def test_garbage_items_are_skipped_and_first_duplicate_wins() -> None:
    job = load_job("auto_create_domain_green")
    first = {
        "type": "malware",
        "spec_version": "2.1",
        "id": MALWARE,
        "name": "first",
        "is_family": True,
        "created": "2026-01-01T00:00:00.000Z",
        "modified": "2026-01-01T00:00:00.000Z",
    }
    second = dict(first, name="second")
    answer: list[Any] = [
        "not a bundle",
        {"type": "bundle", "objects": "nope"},
        {
            "type": "bundle",
            "objects": [
                1,
                None,
                "x",
                {"id": 3, "type": "malware"},
                {"id": "malware--x"},
                {"type": "malware"},
                first,
            ],
        },
        lis_bundle(second),
    ]
    bundle = build_bundle(job, answer, confidence=50)
    first_id = Malware.generate_id("first")
    assert [o["id"] for o in bundle["objects"] if o["type"] != "relationship"] == [
        DOMAIN_ID,
        first_id,
        LIS_IDENTITY,
    ]
    assert by_id(bundle)[first_id]["name"] == "first"


def test_job_without_observable_is_rejected() -> None:
    job = load_job("auto_create_domain_deferred_resolution")
    with pytest.raises(ValueError):
        build_bundle(job, [], confidence=50)


def test_non_dict_objects_are_skipped() -> None:
    job = load_job("auto_create_domain_green")
    answer = [
        MappingProxyType(
            {
                "type": "bundle",
                "objects": [
                    MappingProxyType(
                        {
                            "type": "malware",
                            "spec_version": "2.1",
                            "id": MALWARE,
                            "name": "m",
                            "is_family": True,
                        }
                    )
                ],
            }
        )
    ]
    bundle = build_bundle(job, answer, confidence=50)
    # Only dict objects are read (parsed JSON); proxies of objects are skipped, bundles are read.
    assert [o["id"] for o in bundle["objects"]] == [DOMAIN_ID]


def test_large_answer() -> None:
    body = json.loads((JOBS / "auto_create_domain_green.json").read_text())
    entity = json.loads(body["event"]["stix_entity"])
    entity["value"] = "big.example.net"
    answer = load_answer("search_host_200_large")
    job = entity_job(entity)
    bundle = build_bundle(job, answer, confidence=50)
    # The observable, the answer without its identity and its (standard) marking definition,
    # the one LastInfoSec identity, and three relationships to the observable.
    assert len(bundle["objects"]) == 1 + len(answer[0]["objects"]) - 2 + 1 + 3
    assert len(added_rels(bundle, "based-on", job)) == 1
    assert len(added_rels(bundle, "related-to", job)) == 2
    roundtrip(bundle)


# --------------------------------------------------------------------------------------------------
# playbook_passthrough


def test_playbook_passthrough() -> None:
    job = load_job("playbook_url")
    assert isinstance(job, PlaybookJob)
    before = copy.deepcopy(dict(job.playbook.bundle))
    out = playbook_passthrough(job)
    assert dict(job.playbook.bundle) == before
    assert out["id"] == before["id"]
    assert [o["id"] for o in out["objects"]] == [o["id"] for o in before["objects"]]
    expected = copy.deepcopy(before["objects"])
    assert out["objects"] == expected  # the entity already carried exactly that organisation
    out["objects"][0]["mutated"] = True
    assert dict(job.playbook.bundle) == before
    roundtrip(out)


def test_playbook_passthrough_propagates_to_every_object() -> None:
    body = json.loads((JOBS / "playbook_url.json").read_text())
    body["event"]["bundle"]["objects"].append(
        {
            "type": "marking-definition",
            "spec_version": "2.1",
            "id": TLP_AMBER,
            "created": "2017-01-20T00:00:00.000Z",
            "definition_type": "tlp",
            "name": "TLP:AMBER",
            "definition": {"tlp": "amber"},
        }
    )
    job = parse_job(json.dumps(body).encode())
    assert isinstance(job, PlaybookJob)
    out = playbook_passthrough(job)
    assert out["objects"][1]["x_opencti_granted_refs"] == [ORG]


def test_hand_built_job_after_deferred_resolution() -> None:
    # build_bundle only needs job.observable; a Job built by hand (e.g. after a deferred
    # resolution) works the same.
    job = load_job("auto_create_domain_deferred_resolution")
    entity = json.loads(
        json.loads((JOBS / "auto_create_domain_green.json").read_text())["event"]["stix_entity"]
    )
    assert isinstance(job, WorkJob)
    resolved = WorkJob(
        work_id=job.work_id,
        applicant_id=job.applicant_id,
        draft_id=job.draft_id,
        mode=job.mode,
        trigger=job.trigger,
        entity_id=job.entity_id,
        entity_type=job.entity_type,
        observable=parse_observable(entity),
    )
    bundle = build_bundle(resolved, load_answer("search_200_bare_list"), confidence=50)
    assert bundle["objects"][0]["id"] == entity["id"]
    roundtrip(bundle)


def test_objects_opencti_cannot_import_are_dropped() -> None:
    good = {
        "type": "malware",
        "spec_version": "2.1",
        "id": "malware--0c7b5b88-8ff7-4a4d-aa9d-feb398cd0061",
        "created": "2026-01-01T00:00:00.000Z",
        "modified": "2026-01-01T00:00:00.000Z",
        "name": "Evil",
        "is_family": True,
    }
    bad = [
        {**good, "id": "malware--not-a-uuid"},
        {**good, "id": "tool--0c7b5b88-8ff7-4a4d-aa9d-feb398cd0062"},  # id prefix is not its type
        {**good, "id": "malware--0c7b5b88-8ff7-4a4d-aa9d-feb398cd0063", "created_by_ref": 7},
        {
            **good,
            "id": "malware--0c7b5b88-8ff7-4a4d-aa9d-feb398cd0064",
            "object_marking_refs": "marking",
        },
        {
            **good,
            "id": "malware--0c7b5b88-8ff7-4a4d-aa9d-feb398cd0065",
            "object_marking_refs": [None],
        },
    ]
    bundle = build_bundle(
        load_job("auto_create_domain_green"), [lis_bundle(good, *bad)], confidence=50
    )
    ids = set(by_id(bundle))
    assert Malware.generate_id("Evil") in ids
    assert [o["type"] for o in bundle["objects"]].count("malware") == 1
    assert not ids & {b["id"] for b in bad}
    roundtrip(bundle)


def test_platform_record_of_a_file_becomes_a_stix_file_with_a_hashes_dict() -> None:
    """Deferred resolution of a StixFile: GraphQL lists hashes as [{algorithm, hash}], while
    pycti's import reads ``hashes`` as a dict (``observable_data["hashes"].items()``)."""
    from lis_async.enrichment.bundle import observable_from_platform
    from lis_async.enrichment.job import parse_observable

    record = {
        "id": "0d3b8a4e-1f2c-4d5e-8a9b-0c1d2e3f4a5b",
        "standard_id": "file--5e0bc5a2-7b43-5e5c-9a47-5f6c7d8e9f00",
        "entity_type": "StixFile",
        "name": "sample.exe",
        "hashes": [
            {
                "algorithm": "SHA-256",
                "hash": "275a021bbfb6489e54d471899f7db9d1663fc695ec2fe2a2c4538aabf651fd0f",
            },
            {"algorithm": "MD5", "hash": "44d88612fea8a8f36de82e1278abb02f"},
            {"algorithm": None, "hash": "junk"},
        ],
        "objectMarking": [
            {"standard_id": "marking-definition--f88d31f6-486f-44da-b317-01333bde0b82"}
        ],
        "objectOrganization": "not a list",
    }
    entity = observable_from_platform(record, "file--5e0bc5a2-7b43-5e5c-9a47-5f6c7d8e9f00")
    assert entity["type"] == "file" and entity["name"] == "sample.exe"
    assert entity["hashes"] == {
        "SHA-256": "275a021bbfb6489e54d471899f7db9d1663fc695ec2fe2a2c4538aabf651fd0f",
        "MD5": "44d88612fea8a8f36de82e1278abb02f",
    }
    assert "x_opencti_granted_refs" not in entity
    obs = parse_observable(entity)
    assert obs.entity_type == "StixFile"
    assert obs.marking_refs == ("marking-definition--f88d31f6-486f-44da-b317-01333bde0b82",)
    assert obs.hashes["MD5"] == "44d88612fea8a8f36de82e1278abb02f"
