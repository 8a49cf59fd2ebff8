from __future__ import annotations

import base64

import orjson

from lis_async.enrichment.delivery import envelope, prepare


def _bundle() -> dict:
    marking = {
        "type": "marking-definition",
        "spec_version": "2.1",
        "id": "marking-definition--f88d31f6-486f-44da-b317-01333bde0b82",
        "created": "2017-01-20T00:00:00.000Z",
        "definition_type": "tlp",
        "name": "TLP:AMBER",
        "definition": {"tlp": "amber"},
    }
    domain = {
        "type": "domain-name",
        "spec_version": "2.1",
        "id": "domain-name--3e9b2c71-4f0a-5d6e-8c1b-9a7f6e5d4c3b",
        "value": "bad.example.com",
        "object_marking_refs": [marking["id"]],
    }
    malware = {
        "type": "malware",
        "spec_version": "2.1",
        "id": "malware--0c7b5b88-8ff7-4a4d-aa9d-feb398cd0061",
        "created": "2026-01-01T00:00:00.000Z",
        "modified": "2026-01-01T00:00:00.000Z",
        "name": "Evil",
        "is_family": True,
    }
    rel = {
        "type": "relationship",
        "spec_version": "2.1",
        "id": "relationship--1e0f8d3b-2e8f-4e3c-9a43-2d1b7b1f0a11",
        "created": "2026-01-01T00:00:00.000Z",
        "modified": "2026-01-01T00:00:00.000Z",
        "relationship_type": "related-to",
        "source_ref": domain["id"],
        "target_ref": malware["id"],
    }
    return {
        "type": "bundle",
        "id": "bundle--5b4c0d2e-1f3a-4b5c-8d6e-7f8a9b0c1d2e",
        "objects": [rel, malware, domain, marking],
    }


def test_envelope_is_pycti_shape_in_pycti_order() -> None:
    body = envelope(b'{"a":1}', sequence=3, applicant_id="u1", draft_id=None, work_id="w1")
    msg = orjson.loads(body)
    assert list(msg) == [
        "bundle_type",
        "applicant_id",
        "action_sequence",
        "entities_types",
        "content",
        "update",
        "draft_id",
        "no_split",
        "work_id",
    ]
    assert msg["bundle_type"] == "QUEUE_BUNDLE" and msg["action_sequence"] == 3
    assert msg["entities_types"] == [] and msg["update"] is False and msg["no_split"] is False
    assert base64.b64decode(msg["content"]) == b'{"a":1}'
    assert "work_id" not in orjson.loads(
        envelope(b"{}", sequence=1, applicant_id=None, draft_id="", work_id=None)
    )


def test_prepare_splits_one_object_per_message_dependencies_first() -> None:
    delivery = prepare(_bundle(), applicant_id="u1", draft_id="d1", work_id="w1")
    assert delivery.objects == 4 and len(delivery.bodies) == 4 and delivery.incompatible == 0
    decoded = [orjson.loads(base64.b64decode(orjson.loads(b)["content"])) for b in delivery.bodies]
    types = [d["objects"][0]["type"] for d in decoded]
    assert all(len(d["objects"]) == 1 for d in decoded)
    assert (
        types.index("marking-definition") < types.index("domain-name") < types.index("relationship")
    )
    assert [orjson.loads(b)["action_sequence"] for b in delivery.bodies] == [1, 2, 3, 4]
    assert all(orjson.loads(b)["draft_id"] == "d1" for b in delivery.bodies)


def test_prepare_drops_what_the_splitter_cannot_import() -> None:
    bundle = _bundle()
    bundle["objects"].append(
        {"type": "x-opencti-hostname", "id": "x-opencti-hostname--1", "value": "h"}
    )
    delivery = prepare(bundle, applicant_id=None, draft_id=None, work_id="w")
    assert delivery.incompatible == 1 and delivery.objects == 4
