"""Marking definitions: the standard TLP and PAP ids, where a job's entity carries markings, and
what a marking is (pure data, no I/O; the gate that decides is :mod:`lis_async.enrichment.gate`).

A marking reference is compared case-insensitively: ``MARKING-DEFINITION--5E57…`` is TLP:RED.
An organisation can create its own TLP or PAP markings (same ``definition_type``, its own id), so
an id that is not one of the standard ones says nothing by itself: its definition has to be found
(in the job, in a playbook bundle, or on the platform) before the gate can judge it
(docs/protocol.md §0.1).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Final, Literal

__all__ = [
    "PAP_ORDER",
    "STANDARD_MARKINGS",
    "TLP_ORDER",
    "EntityMarkings",
    "MarkingDef",
    "bundle_definitions",
    "classify",
    "collect",
    "definition_from_node",
    "definition_from_stix",
    "normalise_pap",
    "normalise_tlp",
]

STIX_EXT_OCTI: Final = "extension-definition--ea279b3e-5c71-4632-ac08-831c66a786ba"
STIX_EXT_OCTI_SCO: Final = "extension-definition--f93e2c80-4231-4f9a-af8b-95c9bd566a82"

TLP_ORDER: Final[tuple[str, ...]] = (
    "TLP:CLEAR",
    "TLP:GREEN",
    "TLP:AMBER",
    "TLP:AMBER+STRICT",
    "TLP:RED",
)
PAP_ORDER: Final[tuple[str, ...]] = ("PAP:CLEAR", "PAP:GREEN", "PAP:AMBER", "PAP:RED")
_ALIASES: Final[Mapping[str, str]] = MappingProxyType(
    {"TLP:WHITE": "TLP:CLEAR", "PAP:WHITE": "PAP:CLEAR"}
)

Kind = Literal["TLP", "PAP", "OTHER"]


@dataclass(frozen=True, slots=True)
class MarkingDef:
    """What a marking is: its ``definition_type`` and ``definition``, both upper-case
    (``TLP`` / ``TLP:RED``, ``PAP`` / ``PAP:AMBER``, ``STATEMENT`` / ``...``)."""

    definition_type: str
    definition: str

    @classmethod
    def of(cls, definition_type: str, definition: str) -> MarkingDef:
        return cls(definition_type.strip().upper(), definition.strip().upper())


# Standard ids, lower-case. TLPs: the fixed STIX ids every platform uses. PAPs: the ids OpenCTI
# derives from {definition_type, definition} (pycti's MarkingDefinition.generate_id; a unit test
# pins them against pycti).
STANDARD_MARKINGS: Final[Mapping[str, MarkingDef]] = MappingProxyType(
    {
        "marking-definition--613f2e26-407d-48c7-9eca-b8e91df99dc9": MarkingDef("TLP", "TLP:CLEAR"),
        "marking-definition--34098fce-860f-48ae-8e50-ebd3cc5e41da": MarkingDef("TLP", "TLP:GREEN"),
        "marking-definition--f88d31f6-486f-44da-b317-01333bde0b82": MarkingDef("TLP", "TLP:AMBER"),
        "marking-definition--826578e1-40ad-459f-bc73-ede076f81f37": MarkingDef(
            "TLP", "TLP:AMBER+STRICT"
        ),
        "marking-definition--5e57c739-391a-4eb3-b6be-7d15ca92d5ed": MarkingDef("TLP", "TLP:RED"),
        "marking-definition--4cdff7eb-acb8-543f-8573-829eb9fe8b34": MarkingDef("PAP", "PAP:CLEAR"),
        "marking-definition--89484dde-e3d2-547f-a6c6-d14824429eb1": MarkingDef("PAP", "PAP:GREEN"),
        "marking-definition--a6f20d4d-0360-59b6-ba22-3b48707828b1": MarkingDef("PAP", "PAP:AMBER"),
        "marking-definition--4e4e3b84-de45-53df-9d9b-b21207699fd8": MarkingDef("PAP", "PAP:RED"),
    }
)


def _normalise(name: str, prefix: str, order: tuple[str, ...]) -> str | None:
    up = name.strip().upper()
    if not up.startswith(prefix):
        up = prefix + up
    up = _ALIASES.get(up, up)
    return up if up in order else None


def normalise_tlp(name: str) -> str:
    """``tlp:amber`` / ``TLP:WHITE`` -> ``TLP:AMBER`` / ``TLP:CLEAR``; ValueError if unknown."""
    canon = _normalise(name, "TLP:", TLP_ORDER)
    if canon is None:
        raise ValueError(f"unknown TLP {name!r} (expected one of {', '.join(TLP_ORDER)})")
    return canon


def normalise_pap(name: str) -> str:
    """``pap:amber`` / ``PAP:WHITE`` -> ``PAP:AMBER`` / ``PAP:CLEAR``; ValueError if unknown."""
    canon = _normalise(name, "PAP:", PAP_ORDER)
    if canon is None:
        raise ValueError(f"unknown PAP {name!r} (expected one of {', '.join(PAP_ORDER)})")
    return canon


def classify(marking: MarkingDef) -> tuple[Kind, int | None]:
    """``("TLP", rank)``, ``("PAP", rank)`` or ``("OTHER", None)``. A TLP or PAP whose name is not
    a known level has rank None (the gate refuses it). A marking named like a TLP or PAP counts
    as one whatever its type says: a statement called "TLP:RED" is read as TLP:RED."""
    dtype, name = marking.definition_type, marking.definition
    if dtype == "TLP" or name.startswith("TLP:"):
        tlp = _normalise(name, "TLP:", TLP_ORDER)
        return "TLP", (TLP_ORDER.index(tlp) if tlp is not None else None)
    if dtype == "PAP" or name.startswith("PAP:"):
        pap = _normalise(name, "PAP:", PAP_ORDER)
        return "PAP", (PAP_ORDER.index(pap) if pap is not None else None)
    return "OTHER", None


# --------------------------------------------------------------------------------------------------
# Definitions from the shapes a job may carry


def definition_from_node(node: Mapping[str, Any]) -> MarkingDef | None:
    """A GraphQL ``MarkingDefinition`` node (``{standard_id, definition_type, definition}``)."""
    dtype, definition = node.get("definition_type"), node.get("definition")
    if isinstance(dtype, str) and isinstance(definition, str) and dtype.strip():
        return MarkingDef.of(dtype, definition)
    return None


def definition_from_stix(obj: Mapping[str, Any]) -> MarkingDef | None:
    """A STIX ``marking-definition`` object as OpenCTI or pycti write them: ``definition_type``
    (or ``x_opencti_definition_type``), ``name`` (or ``x_opencti_definition``), else the STIX 2.1
    ``definition`` object (``{"tlp": "red"}``)."""
    dtype = obj.get("x_opencti_definition_type") or obj.get("definition_type")
    name = obj.get("x_opencti_definition") or obj.get("name")
    body = obj.get("definition")
    if not isinstance(dtype, str) and isinstance(body, Mapping) and len(body) == 1:
        dtype = next(iter(body))
    if not isinstance(dtype, str) or not dtype.strip():
        return None
    if not isinstance(name, str) and isinstance(body, Mapping):
        value = body.get(dtype.lower(), body.get(dtype))
        if isinstance(value, str):
            name = value if value.upper().startswith(dtype.upper() + ":") else f"{dtype}:{value}"
    if not isinstance(name, str):
        return None
    return MarkingDef.of(dtype, name)


def bundle_definitions(objects: Iterable[Any]) -> dict[str, MarkingDef]:
    """The ``marking-definition`` objects of a (playbook) bundle, by lower-case id."""
    out: dict[str, MarkingDef] = {}
    for obj in objects:
        if isinstance(obj, Mapping) and obj.get("type") == "marking-definition":
            ident, definition = obj.get("id"), definition_from_stix(obj)
            if isinstance(ident, str) and definition is not None:
                out.setdefault(ident.lower(), definition)
    return out


# --------------------------------------------------------------------------------------------------
# Where an entity carries markings


@dataclass(frozen=True, slots=True)
class EntityMarkings:
    """Every marking an entity carries, wherever it stands.

    ``refs``: the ids, as written, first seen first, without case-insensitive duplicates.
    ``definitions``: what the entity itself says some of them are (GraphQL ``objectMarking``
    nodes), by lower-case id. ``unreadable``: entries that are not an id (the gate refuses an
    entity with any: it cannot tell what they hide)."""

    refs: tuple[str, ...] = ()
    definitions: Mapping[str, MarkingDef] = field(default_factory=dict)
    unreadable: int = 0


class _Collector:
    def __init__(self) -> None:
        self.refs: dict[str, str] = {}  # lower-case id -> as written
        self.definitions: dict[str, MarkingDef] = {}
        self.unreadable = 0

    def ref(self, value: Any) -> None:
        if isinstance(value, str) and value.strip():
            self.refs.setdefault(value.strip().lower(), value.strip())
        else:
            self.unreadable += 1

    def ref_list(self, value: Any) -> None:
        if value is None:
            return
        if not isinstance(value, list):
            self.unreadable += 1
            return
        for item in value:
            self.ref(item)

    def granular(self, value: Any) -> None:
        if value is None:
            return
        if not isinstance(value, list):
            self.unreadable += 1
            return
        for item in value:
            if isinstance(item, Mapping) and "marking_ref" in item:
                self.ref(item.get("marking_ref"))
            elif not (isinstance(item, Mapping) and "lang" in item):  # a language marking
                self.unreadable += 1

    def nodes(self, value: Any) -> None:
        """GraphQL ``objectMarking``: a list of nodes (or of ids), or ``{edges: [{node}]}``."""
        if value is None:
            return
        if isinstance(value, Mapping) and isinstance(value.get("edges"), list):
            value = [e.get("node") if isinstance(e, Mapping) else e for e in value["edges"]]
        if not isinstance(value, list):
            self.unreadable += 1
            return
        for node in value:
            if not isinstance(node, Mapping):
                self.ref(node)
                continue
            ident = node.get("standard_id") or node.get("id")
            self.ref(ident)
            definition = definition_from_node(node)
            if isinstance(ident, str) and definition is not None:
                self.definitions.setdefault(ident.strip().lower(), definition)

    def place(self, holder: Mapping[str, Any]) -> None:
        self.ref_list(holder.get("object_marking_refs"))
        self.granular(holder.get("granular_markings"))
        self.nodes(holder.get("objectMarking"))
        self.ref_list(holder.get("objectMarkingIds"))


def collect(entity: Mapping[str, Any]) -> EntityMarkings:
    """Markings from every place an OpenCTI entity may hold them: ``object_marking_refs``,
    ``granular_markings``, ``objectMarking`` (pycti's and GraphQL's shapes) and
    ``objectMarkingIds``, at the top level and inside both OpenCTI extensions."""
    c = _Collector()
    c.place(entity)
    exts = entity.get("extensions")
    if isinstance(exts, Mapping):
        for ext_id in (STIX_EXT_OCTI, STIX_EXT_OCTI_SCO):
            ext = exts.get(ext_id)
            if isinstance(ext, Mapping):
                c.place(ext)
    return EntityMarkings(tuple(c.refs.values()), MappingProxyType(c.definitions), c.unreadable)
