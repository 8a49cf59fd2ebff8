"""How the simulated platform renders a stored STIX entity as a GraphQL node.

The node has the shape pycti's ``stix_cyber_observable.read`` / ``stix_core_object.read``
select (a fixed super-set): internal and standard ids, entity and parent types, markings,
labels, author, organisations, external references, import files, the OpenCTI extension
values (score, description) and the entity's own STIX properties, plus ``hashes`` as a list
and ``observable_value``. Authors and non-TLP markings are looked up in the live store.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import orjson

from lis_async.sim.opencti.formats import derived_id, iso

__all__ = ["PAP_MARKINGS", "STIX_EXT_OCTI", "STIX_EXT_OCTI_SCO", "TLP_MARKINGS", "NodeRenderer"]

STIX_EXT_OCTI = "extension-definition--ea279b3e-5c71-4632-ac08-831c66a786ba"
STIX_EXT_OCTI_SCO = "extension-definition--f93e2c80-4231-4f9a-af8b-95c9bd566a82"

# standard id -> (definition_type, definition, x_opencti_order, x_opencti_color)
TLP_MARKINGS: dict[str, tuple[str, str, int, str]] = {
    "marking-definition--613f2e26-407d-48c7-9eca-b8e91df99dc9": ("TLP", "TLP:CLEAR", 1, "#ffffff"),
    "marking-definition--34098fce-860f-48ae-8e50-ebd3cc5e41da": ("TLP", "TLP:GREEN", 2, "#2e7d32"),
    "marking-definition--f88d31f6-486f-44da-b317-01333bde0b82": ("TLP", "TLP:AMBER", 3, "#d84315"),
    "marking-definition--826578e1-40ad-459f-bc73-ede076f81f37": (
        "TLP",
        "TLP:AMBER+STRICT",
        3,
        "#d84315",
    ),
    "marking-definition--5e57c739-391a-4eb3-b6be-7d15ca92d5ed": ("TLP", "TLP:RED", 4, "#c62828"),
}

# The PAP markings every platform creates (ids derived from {definition_type, definition}).
PAP_MARKINGS: dict[str, tuple[str, str, int, str]] = {
    "marking-definition--4cdff7eb-acb8-543f-8573-829eb9fe8b34": ("PAP", "PAP:CLEAR", 1, "#ffffff"),
    "marking-definition--89484dde-e3d2-547f-a6c6-d14824429eb1": ("PAP", "PAP:GREEN", 2, "#2e7d32"),
    "marking-definition--a6f20d4d-0360-59b6-ba22-3b48707828b1": ("PAP", "PAP:AMBER", 3, "#d84315"),
    "marking-definition--4e4e3b84-de45-53df-9d9b-b21207699fd8": ("PAP", "PAP:RED", 4, "#c62828"),
}
_BUILT_IN_MARKINGS = TLP_MARKINGS | PAP_MARKINGS

_PARENT_SCO = ["Basic-Object", "Stix-Object", "Stix-Core-Object", "Stix-Cyber-Observable"]
_PARENT_SDO = ["Basic-Object", "Stix-Object", "Stix-Core-Object", "Stix-Domain-Object"]
_STIX_TO_ENTITY_TYPE: dict[str, str] = {
    "file": "StixFile",
    "domain-name": "Domain-Name",
    "hostname": "Hostname",
    "url": "Url",
    "ipv4-addr": "IPv4-Addr",
    "ipv6-addr": "IPv6-Addr",
    "email-addr": "Email-Addr",
    "mac-addr": "Mac-Addr",
    "autonomous-system": "Autonomous-System",
    "artifact": "Artifact",
    "directory": "Directory",
    "mutex": "Mutex",
    "network-traffic": "Network-Traffic",
    "process": "Process",
    "software": "Software",
    "user-account": "User-Account",
    "user-agent": "User-Agent",
    "windows-registry-key": "Windows-Registry-Key",
    "x509-certificate": "X509-Certificate",
    "cryptocurrency-wallet": "Cryptocurrency-Wallet",
    "cryptographic-key": "Cryptographic-Key",
    "text": "Text",
    "phone-number": "Phone-Number",
    "bank-account": "Bank-Account",
    "payment-card": "Payment-Card",
    "media-content": "Media-Content",
    "credential": "Credential",
    "tracking-number": "Tracking-Number",
    "email-message": "Email-Message",
    "identity": "Identity",
    "indicator": "Indicator",
    "malware": "Malware",
    "report": "Report",
    "note": "Note",
    "vulnerability": "Vulnerability",
}
_SCO_STIX_TYPES = frozenset(
    k
    for k, v in _STIX_TO_ENTITY_TYPE.items()
    if v not in {"Identity", "Indicator", "Malware", "Report", "Note", "Vulnerability"}
)
# top-level STIX keys never copied verbatim into the GraphQL node
_STRUCTURAL_KEYS = frozenset(
    {
        "id",
        "type",
        "spec_version",
        "object_marking_refs",
        "extensions",
        "labels",
        "score",
        "description",
        "created_by_ref",
        "external_references",
        "granted_refs",
        "x_opencti_granted_refs",
        "hashes",
    }
)
_HASH_PREFERENCE = ("SHA-256", "SHA-1", "MD5", "SHA-512", "SHA3-256", "SSDEEP")
_STORAGE_PREFIX = "/storage/get/"


class NodeRenderer:
    """Renders entities; reads the live store (authors, markings) and the file store (sizes)."""

    def __init__(
        self,
        entities: Mapping[tuple[str | None, str], dict[str, Any]],
        files: Mapping[str, bytes],
    ) -> None:
        self._entities = entities
        self._files = files

    def _live(self, ref: str) -> dict[str, Any]:
        return self._entities.get((None, ref)) or {}

    def node(self, e: dict[str, Any]) -> dict[str, Any]:
        """The GraphQL node of the STIX entity ``e``."""
        exts = e.get("extensions") or {}
        octi = exts.get(STIX_EXT_OCTI) or {}
        sco = exts.get(STIX_EXT_OCTI_SCO) or {}
        stype = str(e["type"])
        sid = str(e["id"])
        now_iso = iso(time.time())
        created_by = sco.get("created_by_ref") or e.get("created_by_ref")
        node: dict[str, Any] = {
            "id": octi.get("id") or derived_id(sid),
            "standard_id": sid,
            "entity_type": octi.get("type") or _STIX_TO_ENTITY_TYPE.get(stype) or stype.title(),
            "parent_types": _PARENT_SCO if stype in _SCO_STIX_TYPES else _PARENT_SDO,
            "spec_version": "2.1",
            "created_at": octi.get("created_at", now_iso),
            "updated_at": octi.get("updated_at", now_iso),
            "objectOrganization": self._organisations(e, octi),
            "creators": [{"id": c, "name": "admin"} for c in octi.get("creator_ids") or []],
            "createdBy": self.identity(created_by) if created_by else None,
            "objectMarking": [self.marking(r) for r in e.get("object_marking_refs") or []],
            "objectLabel": [
                {"id": derived_id("label:" + lb), "value": lb, "color": "#ff8178"}
                for lb in sco.get("labels") or e.get("labels") or []
            ],
            "externalReferences": _external_references(
                sco.get("external_references") or e.get("external_references") or [], now_iso
            ),
            "x_opencti_description": sco.get("description", e.get("description")),
            "x_opencti_score": sco.get("score", e.get("score")),
            "indicators": {"edges": []},
            "importFiles": {"edges": [self._import_file(f) for f in octi.get("files") or []]},
        }
        _add_stix_properties(node, e, sco)
        return node

    def _organisations(self, e: dict[str, Any], octi: dict[str, Any]) -> list[dict[str, Any]]:
        granted = octi.get("granted_refs") or e.get("x_opencti_granted_refs") or []
        granted_ids = octi.get("granted_refs_ids") or []
        return [
            {
                "id": granted_ids[i] if i < len(granted_ids) else derived_id(ref),
                "standard_id": ref,
                "name": self._live(ref).get("name") or f"Organization {ref[-12:]}",
            }
            for i, ref in enumerate(granted)
        ]

    def _import_file(self, f: dict[str, Any]) -> dict[str, Any]:
        file_id = str(f.get("uri", "")).removeprefix(_STORAGE_PREFIX)
        return {
            "node": {
                "id": file_id,
                "name": f.get("name"),
                "size": len(self._files.get(file_id, b"")),
                "metaData": {"mimetype": f.get("mime_type"), "version": None},
                "objectMarking": [self.marking(r) for r in f.get("object_marking_refs") or []],
            }
        }

    def identity(self, ref: str) -> dict[str, Any]:
        """The author (``createdBy``) node of an identity standard id."""
        ent = self._live(ref)
        cls = ent.get("identity_class", "organization")
        etype = {"organization": "Organization", "individual": "Individual"}.get(cls, "Identity")
        ext = (ent.get("extensions") or {}).get(STIX_EXT_OCTI) or {}
        return {
            "id": ext.get("id") or derived_id(ref),
            "standard_id": ref,
            "entity_type": etype,
            "parent_types": [*_PARENT_SDO, "Identity"],
            "spec_version": "2.1",
            "identity_class": cls,
            "name": ent.get("name") or f"Identity {ref[-12:]}",
            "description": ent.get("description"),
            "roles": ent.get("roles"),
            "contact_information": ent.get("contact_information"),
            "x_opencti_aliases": None,
            "created": ent.get("created", "2024-01-01T00:00:00.000Z"),
            "modified": ent.get("modified", "2024-01-01T00:00:00.000Z"),
            "objectLabel": [],
            "x_opencti_organization_type": None,
            "x_opencti_reliability": None,
        }

    def known_marking(self, ref: str) -> dict[str, Any] | None:
        """What ``markingDefinition(id)`` answers: the node of a built-in TLP or PAP, or of a
        marking stored with ``put_marking``/``put_entity`` (standard id, or the internal id
        derived from it); None for an id the platform does not know."""
        if ref in _BUILT_IN_MARKINGS:
            return self.marking(ref)
        for (draft, ident), ent in self._entities.items():
            if draft is None and ent.get("type") == "marking-definition":
                if ref in (ident, derived_id(ident)):
                    return self.marking(ident)
        return None

    def marking(self, ref: str) -> dict[str, Any]:
        """The marking-definition node of a standard id (TLPs and PAPs built in, others from the
        store; an id in neither renders as a statement)."""
        built_in = _BUILT_IN_MARKINGS.get(ref)
        if built_in is not None:
            dtype, definition, order, color = built_in
        else:
            ent = self._live(ref)
            dtype = str(ent.get("definition_type") or "statement").upper()
            definition = str(ent.get("name") or ref)
            order, color = int(ent.get("x_opencti_order") or 0), "#ffffff"
        return {
            "id": derived_id(ref),
            "standard_id": ref,
            "entity_type": "Marking-Definition",
            "definition_type": dtype,
            "definition": definition,
            "created": "2017-01-20T00:00:00.000Z",
            "modified": "2017-01-20T00:00:00.000Z",
            "x_opencti_order": order,
            "x_opencti_color": color,
        }


def _external_references(refs: list[dict[str, Any]], now_iso: str) -> dict[str, Any]:
    edges: list[dict[str, Any]] = []
    for r in refs:
        text = orjson.dumps(r).decode()
        edges.append(
            {
                "node": {
                    "id": derived_id("extref:" + text),
                    "standard_id": "external-reference--" + derived_id(text),
                    "entity_type": "External-Reference",
                    "source_name": r.get("source_name"),
                    "description": r.get("description"),
                    "url": r.get("url"),
                    "hash": None,
                    "external_id": r.get("external_id"),
                    "created": now_iso,
                    "modified": now_iso,
                    "importFiles": {"edges": []},
                }
            }
        )
    return {"edges": edges}


def _add_stix_properties(node: dict[str, Any], e: dict[str, Any], sco: dict[str, Any]) -> None:
    """Copy the entity's own properties; ``hashes`` as a list; ``observable_value``."""
    for k, v in e.items():
        if k in _STRUCTURAL_KEYS or k.endswith("_ref") or k.endswith("_refs"):
            continue
        node[k] = v
    hashes = e.get("hashes")
    if isinstance(hashes, dict):
        node["hashes"] = [{"algorithm": a, "hash": h} for a, h in hashes.items()]
    if e["type"] == "file":
        node.setdefault("extensions", None)
        node["x_opencti_additional_names"] = sco.get("additional_names")
    value = e.get("value")
    if value is None and isinstance(hashes, dict):
        value = next((hashes[a] for a in _HASH_PREFERENCE if a in hashes), None)
    if value is None:
        value = e.get("name")
    node["observable_value"] = value
