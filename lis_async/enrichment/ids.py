"""Deterministic STIX ids, computed exactly as pycti's ``generate_id`` functions do.

OpenCTI derives the standard id of most objects from their content (a malware from its name, an
indicator from its pattern, a report from its name and publication date, a relationship from its
type, ends and dates). Giving what LastInfoSec sends those same ids means an answer cannot choose
an id, say the id of an unrelated report already on the platform, and upsert into it.

pycti hashes the RFC 8785 (JCS) canonical JSON of a few fields under one namespace; for objects
of strings and lists of strings with ASCII keys that is exactly ``json.dumps`` with sorted keys,
compact separators and no ASCII escaping. Reimplemented here so that the pure bundle code does
not import pycti (a second of imports; only ``platform`` and ``delivery`` may); unit tests pin
every function against pycti.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Final

__all__ = ["content_id", "identity_id", "relationship_id", "sighting_id"]

_NS: Final = uuid.UUID("00abedb4-aa42-466c-9c01-fed23315a9b7")


def _id(stix_type: str, data: Mapping[str, Any]) -> str:
    text = json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return f"{stix_type}--{uuid.uuid5(_NS, text)}"


def relationship_id(
    relationship_type: str,
    source_ref: str,
    target_ref: str,
    start_time: str | None = None,
    stop_time: str | None = None,
) -> str:
    """pycti's ``StixCoreRelationship.generate_id``."""
    data: dict[str, Any] = {
        "relationship_type": relationship_type,
        "source_ref": source_ref,
        "target_ref": target_ref,
    }
    if start_time is not None:
        data["start_time"] = start_time
        if stop_time is not None:
            data["stop_time"] = stop_time
    return _id("relationship", data)


def sighting_id(
    sighting_of_ref: str,
    where_sighted_refs: Sequence[str],
    first_seen: str | None = None,
    last_seen: str | None = None,
) -> str:
    """pycti's ``StixSightingRelationship.generate_id``."""
    data: dict[str, Any] = {
        "type": "sighting",
        "sighting_of_ref": sighting_of_ref,
        "where_sighted_refs": list(where_sighted_refs),
    }
    if first_seen is not None:
        data["first_seen"] = first_seen
        if last_seen is not None:
            data["last_seen"] = last_seen
    return _id("sighting", data)


def identity_id(name: str, identity_class: str) -> str:
    """pycti's ``Identity.generate_id`` (an Organization: ``identity_class="organization"``)."""
    return _id("identity", {"name": name.lower().strip(), "identity_class": identity_class.lower()})


def _str(obj: Mapping[str, Any], key: str) -> str | None:
    value = obj.get(key)
    return value if isinstance(value, str) and value.strip() else None


def _named(obj: Mapping[str, Any]) -> str | None:
    name = _str(obj, "name")
    return None if name is None else _id(str(obj["type"]), {"name": name.lower().strip()})


def _threat_actor(obj: Mapping[str, Any]) -> str | None:
    # A STIX threat-actor is imported as a Threat-Actor-Group (pycti's ThreatActorGroup).
    name = _str(obj, "name")
    if name is None:
        return None
    return _id("threat-actor", {"name": name.lower().strip(), "opencti_type": "Threat-Actor-Group"})


def _attack_pattern(obj: Mapping[str, Any]) -> str | None:
    mitre_id = _str(obj, "x_mitre_id")
    if mitre_id is not None:
        return _id("attack-pattern", {"x_mitre_id": mitre_id.lower().strip()})
    return _named(obj)


def _indicator(obj: Mapping[str, Any]) -> str | None:
    pattern = _str(obj, "pattern")
    return None if pattern is None else _id("indicator", {"pattern": pattern.strip()})


def _report(obj: Mapping[str, Any]) -> str | None:
    name, published = _str(obj, "name"), _str(obj, "published")
    if name is None or published is None:
        return None
    return _id("report", {"name": name.lower().strip(), "published": published})


def _identity(obj: Mapping[str, Any]) -> str | None:
    name, identity_class = _str(obj, "name"), _str(obj, "identity_class")
    if name is None or identity_class is None:
        return None
    return identity_id(name, identity_class)


def _relationship(obj: Mapping[str, Any]) -> str | None:
    rel_type, src, dst = (_str(obj, k) for k in ("relationship_type", "source_ref", "target_ref"))
    if rel_type is None or src is None or dst is None:
        return None
    return relationship_id(rel_type, src, dst, _str(obj, "start_time"), _str(obj, "stop_time"))


def _sighting(obj: Mapping[str, Any]) -> str | None:
    of_ref, where = _str(obj, "sighting_of_ref"), obj.get("where_sighted_refs")
    if of_ref is None or not isinstance(where, list) or not where:
        return None
    if not all(isinstance(w, str) for w in where):
        return None
    return sighting_id(of_ref, where, _str(obj, "first_seen"), _str(obj, "last_seen"))


_DERIVERS: Final[Mapping[str, Callable[[Mapping[str, Any]], str | None]]] = {
    "malware": _named,
    "tool": _named,
    "intrusion-set": _named,
    "campaign": _named,
    "vulnerability": _named,
    "threat-actor": _threat_actor,
    "attack-pattern": _attack_pattern,
    "indicator": _indicator,
    "report": _report,
    "identity": _identity,
    "relationship": _relationship,
    "sighting": _sighting,
}
#: The types whose id OpenCTI derives from their content: :func:`content_id` knows them all.
CONTENT_ID_TYPES: Final = frozenset(_DERIVERS)


def content_id(obj: Mapping[str, Any]) -> str | None:
    """The id pycti gives ``obj`` from its content; None when its type is not in
    :data:`CONTENT_ID_TYPES` or the fields the id is made of are missing."""
    derive = _DERIVERS.get(str(obj.get("type")))
    return None if derive is None else derive(obj)
