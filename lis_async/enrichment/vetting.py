"""What of a LastInfoSec answer may reach OpenCTI: the answer is vetted, never trusted.

Objects from the answer are imported as the job's applicant, so an answer must not be able to
reshape the platform. :func:`vet` returns fresh copies of what may go, and counts what did not:

* only objects of :data:`ALLOWED_TYPES`, well formed (``<type>--<uuid>`` id of their type, refs
  that are ids); everything else is left out;
* no marking definition is taken from the answer: the standard TLP and PAP markings exist on
  every platform, others are left out, and so are references to them;
* no identity is taken as it is: the answer's LastInfoSec identity is replaced by the one fixed
  :data:`AUTHOR` (``created_by_ref`` of everything the connector sends), other organisations and
  individuals are left out. Sectors (``identity_class: class``) stay: they are knowledge (what a
  threat targets), their id is derived from their name as OpenCTI does, so one can only merge
  with the sector of that name, and they author nothing;
* ids OpenCTI derives from content (malware, indicators, reports, relationships...) are derived
  again (:mod:`lis_async.enrichment.ids`): an answer cannot pick the id of an unrelated object on
  the
  platform and upsert into it;
* relationships and sightings must have both ends in the bundle (the answer, the enriched
  observable, a playbook's objects); other references (a report's ``object_refs``, embedded
  ``*_refs``) to objects outside the bundle are pruned;
* of OpenCTI's own properties, only those LastInfoSec may set (:data:`OPENCTI_ALLOWED`: an
  indicator's ``x_opencti_score``), each with its value checked; every other ``x_opencti_*``
  property (files, granted refs, workflow, ids...), granted refs, the OpenCTI extensions and
  granular markings from the answer are stripped (the connector's own organisation sharing is
  added afterwards, docs/protocol.md §4.6);
* every object gets at least the enriched observable's markings.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Final

from lis_async.enrichment.ids import CONTENT_ID_TYPES, content_id, identity_id
from lis_async.enrichment.job import LEGACY_HOSTNAME, STIX_EXT_OCTI, STIX_EXT_OCTI_SCO, Observable
from lis_async.enrichment.markings import STANDARD_MARKINGS, classify
from lis_async.enrichment.nesting import json_copy

__all__ = [
    "ALLOWED_TYPES",
    "AUTHOR",
    "AUTHOR_ID",
    "OPENCTI_ALLOWED",
    "REASONS",
    "Vetted",
    "summary",
    "vet",
]

AUTHOR_ID: Final = identity_id("LastInfoSec", "organization")
#: The one LastInfoSec identity: ``created_by_ref`` of everything the connector sends. It carries
#: no marking: it says nothing about the observable, and markings on it would restrict the one
#: shared author for every other user.
AUTHOR: Final[Mapping[str, Any]] = MappingProxyType(
    {
        "type": "identity",
        "spec_version": "2.1",
        "id": AUTHOR_ID,
        "created": "2020-01-01T00:00:00.000Z",
        "modified": "2020-01-01T00:00:00.000Z",
        "name": "LastInfoSec",
        "description": "LastInfoSec Threat Feed (Gatewatcher)",
        "identity_class": "organization",
    }
)

_OBSERVABLES: Final = frozenset(
    {"file", "domain-name", "hostname", "url", "ipv4-addr", "ipv6-addr", "email-addr"}
)
#: What LastInfoSec legitimately answers (docs/lastinfosec.md).
ALLOWED_TYPES: Final = _OBSERVABLES | frozenset(
    {
        "report",
        "indicator",
        "malware",
        "tool",
        "intrusion-set",
        "threat-actor",
        "campaign",
        "attack-pattern",
        "vulnerability",
        "identity",
        "location",
        "relationship",
        "sighting",
    }
)


def _score(value: Any) -> int | None:
    """An OpenCTI score: an integer (not a bool, not a float, not a string), clamped to 0-100."""
    if isinstance(value, bool) or not isinstance(value, int):
        return None
    return max(0, min(100, value))


#: The OpenCTI properties LastInfoSec may set, by STIX type: property -> its check (the value
#: to keep, or None: the property is dropped). Everything else named ``x_opencti_*`` is
#: stripped. Documented in docs/security.md ("The answer filter").
#:
#: * ``indicator.x_opencti_score``: how malicious LastInfoSec rates the indicator, 0-100
#:   (LastInfoSec sends 50, 75 or 90 by risk level); OpenCTI shows it as the indicator's score
#:   and its decay rules start from it. pycti's connector pushes it unchanged.
OPENCTI_ALLOWED: Final[Mapping[str, Mapping[str, Callable[[Any], Any]]]] = MappingProxyType(
    {"indicator": MappingProxyType({"x_opencti_score": _score})}
)
_NO_OPENCTI: Final[Mapping[str, Callable[[Any], Any]]] = MappingProxyType({})
_EDGES: Final = frozenset({"relationship", "sighting"})
_NOT_REWRITTEN: Final = frozenset({"created_by_ref", "object_marking_refs"})
_STRIPPED_KEYS: Final = frozenset({"granted_refs", "granted_refs_ids", "granular_markings"})

#: Reason -> how the work message names it.
REASONS: Final[Mapping[str, str]] = MappingProxyType(
    {
        "invalid": "invalid objects",
        "type": "objects of a type LastInfoSec does not send",
        "marking": "marking definitions",
        "identity": "identities other than LastInfoSec",
        "hostname": "x-opencti-hostname objects",
        "edge": "relationships or sightings to objects outside the answer",
        "ref": "references to objects outside the answer",
        "marking_ref": "references to unknown markings",
        "octi": "objects stripped of OpenCTI properties",
    }
)

_STIX_ID: Final = re.compile(
    r"([a-z0-9][a-z0-9-]*)--[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}"
)


@dataclass(slots=True)
class Vetted:
    """What may go (fresh copies, first occurrence of each id) and what was left out, by
    reason (:data:`REASONS`)."""

    objects: list[dict[str, Any]] = field(default_factory=list)
    dropped: Counter[str] = field(default_factory=Counter)


def summary(dropped: Mapping[str, int]) -> str:
    """``"; left out of the LastInfoSec answer: marking definitions 1, ..."`` or ``""``."""
    parts = [f"{label} {dropped[r]}" for r, label in REASONS.items() if dropped.get(r)]
    return "; left out of the LastInfoSec answer: " + ", ".join(parts) if parts else ""


# --------------------------------------------------------------------------------------------------
# Selection


def is_object(item: Any) -> bool:
    """A STIX object OpenCTI can import: ``<type>--<uuid>`` id matching its type, and refs that
    are ids (a non-string ``*_ref`` makes pycti's splitter fail)."""
    if not isinstance(item, dict):
        return False
    ident, stype = item.get("id"), item.get("type")
    if not isinstance(ident, str) or not isinstance(stype, str):
        return False
    m = _STIX_ID.fullmatch(ident)
    if m is None or m.group(1) != stype:
        return False
    for key, val in item.items():
        if key.endswith("_ref"):
            if val is not None and not isinstance(val, str):
                return False
        elif key.endswith("_refs") and (
            not isinstance(val, list) or not all(isinstance(v, str) for v in val)
        ):
            return False
    return True


def is_lastinfosec_identity(obj: Mapping[str, Any]) -> bool:
    name = obj.get("name")
    if obj.get("type") != "identity" or not isinstance(name, str):
        return False
    return re.sub(r"[\s_\-]", "", name).casefold() == "lastinfosec"


def _items(lis_bundles: Sequence[Mapping[str, Any]]) -> Iterator[Any]:
    for bundle in lis_bundles:
        objects = bundle.get("objects") if isinstance(bundle, Mapping) else None
        if isinstance(objects, list):
            yield from objects


def _reason(item: dict[str, Any]) -> str | None:
    """Why an (already well-formed) object is left out; None if it may go."""
    stype = item["type"]
    if stype == LEGACY_HOSTNAME:
        return "hostname"
    if stype == "marking-definition":
        return "" if item["id"].lower() in STANDARD_MARKINGS else "marking"
    if stype == "identity":
        if is_lastinfosec_identity(item):
            return ""  # replaced by AUTHOR
        return None if item.get("identity_class") == "class" else "identity"
    return None if stype in ALLOWED_TYPES else "type"


class _Vetting:
    """One answer being vetted; see :func:`vet`."""

    def __init__(self, observable: Observable, taken: set[str]) -> None:
        self.taken = taken
        self.obs_markings = observable.marking_refs
        self.out = Vetted()
        self.id_map: dict[str, str] = {}  # answer id -> id it goes out with
        self.kept: dict[str, dict[str, Any]] = {}  # final id -> object

    def select(self, lis_bundles: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
        chosen: list[dict[str, Any]] = []
        seen: set[str] = set()
        for item in _items(lis_bundles):
            if not is_object(item):
                self.out.dropped["invalid"] += 1
                continue
            ident = item["id"]
            if ident in seen or ident in self.taken:
                continue
            seen.add(ident)
            reason = _reason(item)
            if reason is None:
                chosen.append(item)
                continue
            if reason:
                self.out.dropped[reason] += 1
            if is_lastinfosec_identity(item):
                self.id_map[ident] = AUTHOR_ID
        copied: list[dict[str, Any]] = json_copy(chosen)
        return copied

    # ---- per-object clean-up --------------------------------------------------------------------

    def clean(self, obj: dict[str, Any]) -> None:
        stripped = False
        allowed = OPENCTI_ALLOWED.get(obj["type"], _NO_OPENCTI)
        for key in [k for k in obj if k.startswith("x_opencti_") or k in _STRIPPED_KEYS]:
            check = allowed.get(key)
            value = check(obj[key]) if check is not None else None
            if value is None:
                del obj[key]
                stripped = True
            else:
                obj[key] = value
        exts = obj.get("extensions")
        if isinstance(exts, dict):
            for ext_id in (STIX_EXT_OCTI, STIX_EXT_OCTI_SCO):
                if exts.pop(ext_id, None) is not None:
                    stripped = True
            if not exts:
                del obj["extensions"]
        if stripped:
            self.out.dropped["octi"] += 1
        if obj["type"] not in _OBSERVABLES or "created_by_ref" in obj:
            obj["created_by_ref"] = AUTHOR_ID
        self._mark(obj)

    def _mark(self, obj: dict[str, Any]) -> None:
        """Standard markings of the answer plus every marking of the observable; of the standard
        TLPs (and PAPs) only the most restrictive stays."""
        refs: list[str] = []
        for ref in obj.get("object_marking_refs") or []:
            if ref.lower() in STANDARD_MARKINGS:
                refs.append(ref.lower())
            else:
                self.out.dropped["marking_ref"] += 1
        refs.extend(self.obs_markings)
        best: dict[str, tuple[int, str]] = {}
        others: dict[str, str] = {}
        for ref in refs:
            standard = STANDARD_MARKINGS.get(ref.lower())
            if standard is None:
                others.setdefault(ref.lower(), ref)
                continue
            kind, rank = classify(standard)
            if kind not in best or (rank or 0) > best[kind][0]:
                best[kind] = (rank or 0, ref.lower())
        marks = [r for _, r in best.values()] + list(others.values())
        if marks:
            obj["object_marking_refs"] = marks
        else:
            obj.pop("object_marking_refs", None)

    # ---- ids ------------------------------------------------------------------------------------

    def keep(self, obj: dict[str, Any], new_id: str) -> None:
        old = obj["id"]
        if new_id in self.kept or new_id in self.taken:  # the same object, twice
            self.id_map[old] = new_id
            return
        obj["id"] = new_id
        self.id_map[old] = new_id
        self.kept[new_id] = obj

    def derive_nodes(self, objects: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
        """Content ids for everything but relationships and sightings; the edges are returned."""
        edges: list[dict[str, Any]] = []
        for obj in objects:
            if obj["type"] in _EDGES:
                edges.append(obj)
                continue
            new_id = content_id(obj) if obj["type"] in CONTENT_ID_TYPES else obj["id"]
            if new_id is None:  # a malware without a name, a report without a date...
                self.out.dropped["invalid"] += 1
                continue
            self.keep(obj, new_id)
        return edges

    def derive_edges(self, edges: list[dict[str, Any]]) -> None:
        """Edges whose ends are settled get their id, pass after pass (an edge may point at an
        edge); what never settles points outside the bundle, or in a cycle."""
        pending = edges
        while pending:
            unsettled = {e["id"] for e in pending}
            waiting: list[dict[str, Any]] = []
            for edge in pending:
                ends = self._ends(edge)
                if any(e in unsettled and e != edge["id"] for e in ends):
                    waiting.append(edge)
                    continue
                unsettled.discard(edge["id"])
                self._settle(edge, ends)
            if len(waiting) == len(pending):  # a cycle: none of them can be placed
                self.out.dropped["edge"] += len(waiting)
                return
            pending = waiting

    def _settle(self, edge: dict[str, Any], ends: list[str]) -> None:
        if not all(self._inside(e) for e in ends):
            self.out.dropped["edge"] += 1
            return
        if edge["type"] == "relationship":
            edge["source_ref"], edge["target_ref"] = ends
        else:
            edge["sighting_of_ref"] = ends[0]
            where = self._where(edge)
            self.out.dropped["ref"] += len(edge["where_sighted_refs"]) - len(where)
            edge["where_sighted_refs"] = where
        new_id = content_id(edge)
        if new_id is None:
            self.out.dropped["invalid"] += 1
            return
        self.keep(edge, new_id)

    def _ends(self, edge: dict[str, Any]) -> list[str]:
        """The edge's ends, as the ids they go out with ("" when missing). A sighting with no
        where-sighted ref inside the bundle has no end."""
        relationship = edge["type"] == "relationship"
        keys = ("source_ref", "target_ref") if relationship else ("sighting_of_ref",)
        ends = [self._mapped(edge.get(key)) for key in keys]
        if not relationship and not self._where(edge):
            ends.append("")
        return ends

    def _where(self, sighting: dict[str, Any]) -> list[str]:
        refs = (self._mapped(r) for r in sighting.get("where_sighted_refs") or [])
        return list(dict.fromkeys(r for r in refs if self._inside(r)))

    def _mapped(self, ref: Any) -> str:
        return self.id_map.get(ref, ref) if isinstance(ref, str) else ""

    def _inside(self, ref: str) -> bool:
        return ref in self.kept or ref in self.taken or ref == AUTHOR_ID

    # ---- other references -----------------------------------------------------------------------

    def prune_refs(self) -> None:
        """Embedded references (``object_refs``, ``sample_refs``...) to objects outside the
        bundle are pruned; a report left with nothing in it goes too."""
        for ident in list(self.kept):
            obj = self.kept[ident]
            for key in [k for k in obj if k.endswith(("_ref", "_refs"))]:
                if key in _NOT_REWRITTEN or (obj["type"] in _EDGES and key in _EDGE_KEYS):
                    continue
                self._prune(obj, key)
            if obj["type"] == "report" and not obj.get("object_refs"):
                del self.kept[ident]
                self.out.dropped["invalid"] += 1

    def _prune(self, obj: dict[str, Any], key: str) -> None:
        value = obj[key]
        if isinstance(value, str):
            ref = self.id_map.get(value, value)
            if self._inside(ref):
                obj[key] = ref
            else:
                del obj[key]
                self.out.dropped["ref"] += 1
            return
        refs = [self.id_map.get(r, r) for r in value]
        inside = list(dict.fromkeys(r for r in refs if self._inside(r)))
        self.out.dropped["ref"] += sum(1 for r in refs if not self._inside(r))
        obj[key] = inside


_EDGE_KEYS: Final = frozenset({"source_ref", "target_ref", "sighting_of_ref", "where_sighted_refs"})


def vet(
    lis_bundles: Sequence[Mapping[str, Any]], observable: Observable, taken: set[str]
) -> Vetted:
    """The objects of every bundle of the answer that may go to OpenCTI, as fresh copies, and
    the counts of what did not (module docstring). ``taken``: ids already in the outgoing bundle
    (the enriched observable, a playbook's objects): they win over the answer's objects of the
    same id, and relationships may end on them."""
    v = _Vetting(observable, taken)
    chosen = v.select(lis_bundles)
    for obj in chosen:
        v.clean(obj)
    v.derive_edges(v.derive_nodes(chosen))
    v.prune_refs()
    v.out.objects = list(v.kept.values())
    return v.out
