"""lis_async.stixids gives exactly pycti's ids (pycti is the oracle): an answer's objects go out
under the ids OpenCTI would derive from their content, not under ids the answer chose."""

from __future__ import annotations

from typing import Any

import pytest
from pycti import (
    AttackPattern,
    Campaign,
    Identity,
    Indicator,
    IntrusionSet,
    Malware,
    Report,
    StixCoreRelationship,
    StixSightingRelationship,
    ThreatActorGroup,
    Tool,
    Vulnerability,
)

from lis_async.enrichment.ids import (
    CONTENT_ID_TYPES,
    content_id,
    identity_id,
    relationship_id,
    sighting_id,
)

ODD = ' Émotet "x"\\ \n\u2028🙂 '  # what JCS and json.dumps must agree on


@pytest.mark.parametrize(
    ("obj", "expected"),
    [
        ({"type": "malware", "name": ODD}, Malware.generate_id(ODD)),
        ({"type": "tool", "name": "Cobalt Strike"}, Tool.generate_id("Cobalt Strike")),
        ({"type": "intrusion-set", "name": "TA542"}, IntrusionSet.generate_id("TA542")),
        ({"type": "campaign", "name": "C"}, Campaign.generate_id("C")),
        ({"type": "vulnerability", "name": "CVE-2024-1"}, Vulnerability.generate_id("CVE-2024-1")),
        ({"type": "threat-actor", "name": "Y"}, ThreatActorGroup.generate_id("Y")),
        ({"type": "attack-pattern", "name": "A"}, AttackPattern.generate_id("A")),
        (
            {"type": "attack-pattern", "name": "A", "x_mitre_id": " T1566.001 "},
            AttackPattern.generate_id("A", " T1566.001 "),
        ),
        (
            {"type": "indicator", "pattern": f"[x:y = '{ODD}']"},
            Indicator.generate_id(f"[x:y = '{ODD}']"),
        ),
        (
            {"type": "report", "name": "R", "published": "2026-10-14T08:12:03Z"},
            Report.generate_id("R", "2026-10-14T08:12:03Z"),
        ),
        (
            {"type": "identity", "name": "Finance", "identity_class": "class"},
            Identity.generate_id("Finance", "class"),
        ),
        (
            {
                "type": "relationship",
                "relationship_type": "uses",
                "source_ref": "a",
                "target_ref": "b",
            },
            StixCoreRelationship.generate_id("uses", "a", "b"),
        ),
        (
            {
                "type": "relationship",
                "relationship_type": "uses",
                "source_ref": "a",
                "target_ref": "b",
                "start_time": "2020-01-01T00:00:00Z",
                "stop_time": "2021-01-01T00:00:00Z",
            },
            StixCoreRelationship.generate_id(
                "uses", "a", "b", "2020-01-01T00:00:00Z", "2021-01-01T00:00:00Z"
            ),
        ),
        (
            {
                "type": "sighting",
                "sighting_of_ref": "a",
                "where_sighted_refs": ["b", "c"],
                "first_seen": "1",
            },
            StixSightingRelationship.generate_id("a", ["b", "c"], "1"),
        ),
    ],
)
def test_content_ids_are_pycti_s(obj: dict[str, Any], expected: str) -> None:
    assert obj["type"] in CONTENT_ID_TYPES
    assert content_id(obj) == expected


def test_relationship_dates_as_pycti_combines_them() -> None:
    # pycti ignores a stop time without a start time
    assert relationship_id("r", "a", "b", None, "2021") == StixCoreRelationship.generate_id(
        "r", "a", "b", None, "2021"
    )
    assert sighting_id("a", ["b"], None, "2") == StixSightingRelationship.generate_id(
        "a", ["b"], None, "2"
    )
    assert identity_id("LastInfoSec", "Organization") == Identity.generate_id(
        "LastInfoSec", "organization"
    )


@pytest.mark.parametrize(
    "obj",
    [
        {"type": "malware"},
        {"type": "malware", "name": "  "},
        {"type": "report", "name": "R"},
        {"type": "indicator", "pattern": 3},
        {"type": "sighting", "sighting_of_ref": "a", "where_sighted_refs": []},
        {"type": "relationship", "source_ref": "a", "target_ref": "b"},
        {"type": "location", "name": "France"},  # not derived: keeps its id
        {"type": "url", "value": "http://x"},
    ],
)
def test_no_id_without_its_content(obj: dict[str, Any]) -> None:
    assert content_id(obj) is None
