"""Bundle building: LastInfoSec answers + the enriched observable -> one STIX 2.1 bundle.

Pure functions, no I/O, plain dicts only (no ``stix2`` objects on the hot path; ``stix2`` and pycti
are not even imported here). Inputs are never mutated: the LastInfoSec answer may be cached and
shared between jobs, and the :data:`~lis_async.enrichment.job.Job` is immutable by contract.
Everything put in the output is a fresh copy, so callers (pycti's splitter adds ``nb_deps`` and
prunes refs) may mutate the result freely.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Final

from lis_async.enrichment.ids import relationship_id
from lis_async.enrichment.job import (
    LEGACY_HOSTNAME,
    OBSERVABLE_TYPES,
    STIX_EXT_OCTI,
    STIX_EXT_OCTI_SCO,
    SUPPORTED_TYPES,
    Job,
    Observable,
    PlaybookJob,
)
from lis_async.enrichment.nesting import json_copy
from lis_async.enrichment.vetting import AUTHOR, AUTHOR_ID, summary, vet

__all__ = [
    "EXTERNAL_REFERENCE",
    "Built",
    "build",
    "build_bundle",
    "playbook_passthrough",
    "propagate_organisations",
    "relationship_id",
]

# The External-Reference the upstream connector links to every enriched observable. OpenCTI derives
# an External-Reference's id from its url, so keeping this exact url reuses the existing object.
EXTERNAL_REFERENCE: Final[Mapping[str, str]] = MappingProxyType(
    {
        "source_name": "Last Info Sec",
        "description": "LastInfoSec Threat Feed",
        "url": "https://api.client.lastinfosec.com/v2/stix21/search/",
    }
)

# Our own namespace for deterministic bundle ids.
_BUNDLE_NS: Final = uuid.UUID("105dcb5e-2b4e-49b4-b8b9-f5c806d5aeb2")

_LEGACY_HOSTNAME: Final = LEGACY_HOSTNAME
_LEGACY_HOSTNAME_PREFIX: Final = _LEGACY_HOSTNAME + "--"

# Returned knowledge the observable is tied to with a `related-to` relationship.
_RELATED_TYPES: Final = frozenset({"malware", "intrusion-set", "threat-actor", "tool"})
_HOST_TYPES: Final = frozenset(
    {t.stix_type for t in OBSERVABLE_TYPES if t.lookup == "host"} | {_LEGACY_HOSTNAME}
)

# Fields of the OpenCTI extension kept on the enriched observable outside playbooks. The others are
# the platform's internal bookkeeping (internal id, timestamps, creator/assignee/participant ids,
# workflow, file uris, metrics...) that an import must not replay; `is_inferred: true` would even
# make pycti skip the object entirely ("Ignoring inferred item during import").
_OCTI_EXT_KEEP: Final = frozenset({"extension_type", "type", "granted_refs"})
# Flat (pycti-regenerated) shape: internal id and downloaded files (re-uploading them would add
# file versions on every enrichment).
# The GraphQL marking nodes of a deferred read (kept on the entity for the gate) go too.
_FLAT_DROP: Final = frozenset(
    {
        "x_opencti_id",
        "x_opencti_files",
        "x_opencti_is_inferred",
        "nb_deps",
        "objectMarking",
        "objectMarkingIds",
    }
)

# One comparison of a STIX pattern: `<object-type>:<path> = '<string literal>'`.
_COMPARISON: Final = re.compile(
    r"([a-z0-9][a-z0-9-]*):([A-Za-z0-9_.'\"-]+?)\s*=\s*'((?:[^'\\]|\\.)*)'"
)
_UNESCAPE: Final = re.compile(r"\\(.)")


# --------------------------------------------------------------------------------------------------
# Small helpers


def _norm_host(value: str) -> str:
    return value.strip().rstrip(".").casefold()


# --------------------------------------------------------------------------------------------------
# Organisation sharing (docs/protocol.md §4.6)


def propagate_organisations(objects: list[dict[str, Any]], orgs: Sequence[str] | None) -> None:
    """Share every object with ``orgs``, in place, as pycti's ``send_stix2_bundle`` does.

    ``None``: nothing to do. Otherwise objects with an OpenCTI extension get
    ``extensions[STIX_EXT_OCTI].granted_refs = existing ∪ orgs``, the others
    ``x_opencti_granted_refs = existing ∪ orgs``; an empty ``orgs`` still sets the key (to the
    existing refs, or ``[]``). pycti unions through a Python ``set`` (random order); we sort, so the
    output is stable and golden-testable.
    """
    if orgs is None:
        return
    base = set(orgs)
    for item in objects:
        if not isinstance(item, dict):
            continue
        exts = item.get("extensions")
        target: dict[str, Any] = item
        key = "x_opencti_granted_refs"
        if isinstance(exts, dict) and STIX_EXT_OCTI in exts:
            ext = exts[STIX_EXT_OCTI]
            if isinstance(ext, dict):
                target, key = ext, "granted_refs"
        existing = target.get(key)
        merged = set(base)
        if isinstance(existing, list):
            merged.update(x for x in existing if isinstance(x, str))
        target[key] = sorted(merged)


# --------------------------------------------------------------------------------------------------
# The enriched observable


def observable_from_platform(record: Mapping[str, Any], entity_id: str) -> dict[str, Any]:
    """The platform's GraphQL ``stixCyberObservable`` record (deferred resolution,
    docs/protocol.md §3.5 and §8.4) as a flat STIX entity in pycti's legacy shape, which
    :func:`lis_async.enrichment.job.parse_observable` reads."""
    etype = str(record.get("entity_type", ""))
    entity: dict[str, Any] = {
        "id": record.get("standard_id") or entity_id,
        "spec_version": "2.1",
        "type": SUPPORTED_TYPES.get(etype, etype.lower()),
        "x_opencti_id": record.get("id"),
        "x_opencti_type": etype,
        "object_marking_refs": _standard_ids(record.get("objectMarking")),
    }
    nodes = record.get("objectMarking")
    if isinstance(nodes, list):  # what each marking is, for the gate (dropped from the output)
        entity["objectMarking"] = [dict(m) for m in nodes if isinstance(m, Mapping)]
    for key in ("value", "name"):
        if record.get(key) is not None:
            entity[key] = record[key]
    hashes = record.get("hashes")
    if isinstance(hashes, list):  # GraphQL's [{algorithm, hash}]; pycti imports a STIX dict
        hashes = {
            h["algorithm"]: h["hash"]
            for h in hashes
            if isinstance(h, Mapping)
            and isinstance(h.get("algorithm"), str)
            and isinstance(h.get("hash"), str)
        }
    if hashes:
        entity["hashes"] = hashes
    orgs = _standard_ids(record.get("objectOrganization"))
    if orgs:
        entity["x_opencti_granted_refs"] = orgs
    return entity


def _standard_ids(items: Any) -> list[Any]:
    """The ``standard_id`` of each GraphQL object in ``items`` (anything else is ignored)."""
    if not isinstance(items, list):
        return []
    return [m["standard_id"] for m in items if isinstance(m, Mapping) and m.get("standard_id")]


def _add_external_reference(entity: dict[str, Any]) -> None:
    """Attach :data:`EXTERNAL_REFERENCE` where pycti's import will read it.

    pycti (``OpenCTIStix2.extract_embedded_relationships``) reads a top-level
    ``external_references`` if present, else ``get_attribute_in_extension("external_references")``
    (the OpenCTI extension, then the SCO extension). We append to the first of those that already
    exists, else create it where the platform's converter puts it: the SCO extension, except for the
    custom Hostname SCO whose converter puts it top-level.
    """
    ref = dict(EXTERNAL_REFERENCE)
    exts = entity.get("extensions")
    if not isinstance(exts, dict):
        exts = None
    holder: dict[str, Any] | None = None
    if isinstance(entity.get("external_references"), list):
        holder = entity
    elif exts is not None:
        for ext_id in (STIX_EXT_OCTI, STIX_EXT_OCTI_SCO):
            ext = exts.get(ext_id)
            if isinstance(ext, dict) and isinstance(ext.get("external_references"), list):
                holder = ext
                break
    if holder is None:
        if entity.get("type") == "hostname" or (exts is None and "x_opencti_type" in entity):
            # Hostname: the platform's own shape. Flat pycti shape: no extensions to hang it on.
            holder = entity
        else:
            if exts is None:
                exts = entity["extensions"] = {}
            sco = exts.get(STIX_EXT_OCTI_SCO)
            if not isinstance(sco, dict):
                sco = exts[STIX_EXT_OCTI_SCO] = {"extension_type": "property-extension"}
            holder = sco
        holder["external_references"] = []
    refs: list[Any] = holder["external_references"]
    for existing in refs:
        if (
            isinstance(existing, Mapping)
            and existing.get("url") == ref["url"]
            and existing.get("source_name") == ref["source_name"]
        ):
            return
    refs.append(ref)


def _enriched_observable(observable: Observable, *, strip_internal: bool) -> dict[str, Any]:
    """The entity as received (copied), carrying the LastInfoSec external reference."""
    entity: dict[str, Any] = json_copy(dict(observable.stix))
    if entity.get("type") == _LEGACY_HOSTNAME:
        entity["type"] = "hostname"
    ident = entity.get("id")
    if isinstance(ident, str) and ident.startswith(_LEGACY_HOSTNAME_PREFIX):
        entity["id"] = "hostname--" + ident[len(_LEGACY_HOSTNAME_PREFIX) :]
    if strip_internal:
        for key in _FLAT_DROP.intersection(entity):
            del entity[key]
        exts = entity.get("extensions")
        if isinstance(exts, dict):
            octi = exts.get(STIX_EXT_OCTI)
            if isinstance(octi, dict):
                exts[STIX_EXT_OCTI] = {k: v for k, v in octi.items() if k in _OCTI_EXT_KEEP}
    _add_external_reference(entity)
    return entity


def _observable_id(observable: Observable) -> str:
    ident = observable.stix_id
    if ident.startswith(_LEGACY_HOSTNAME_PREFIX):
        return "hostname--" + ident[len(_LEGACY_HOSTNAME_PREFIX) :]
    return ident


# --------------------------------------------------------------------------------------------------
# Indicator pattern matching


class _Matcher:
    """Does an indicator's STIX pattern designate the observable? Exact value matches only."""

    __slots__ = ("hashes", "host", "name", "needles", "stix_type", "value")

    def __init__(self, observable: Observable) -> None:
        self.stix_type = observable.stix_type
        self.value = observable.value
        self.hashes = frozenset(h.lower() for h in observable.hashes.values())
        self.host = _norm_host(observable.value) if observable.value else None
        self.name = observable.value if observable.stix_type == "file" else None
        # Cheap prefilter: a matching pattern contains one of these (case-folded) strings, unless
        # the value needs escaping in a STIX string literal (then no prefilter).
        candidates = [*self.hashes, *([self.host] if self.host else [])]
        if self.stix_type not in _HOST_TYPES and self.value:
            candidates.append(self.value)
        self.needles: tuple[str, ...] | None = tuple(c.casefold() for c in candidates if c)
        if any("'" in c or "\\" in c for c in candidates):
            self.needles = None

    def matches(self, pattern: str) -> bool:
        if self.needles is not None:
            folded = pattern.casefold()
            if not any(n in folded for n in self.needles):
                return False
        for m in _COMPARISON.finditer(pattern):
            obj_type, path, raw = m.group(1), m.group(2), m.group(3)
            literal = _UNESCAPE.sub(r"\1", raw) if "\\" in raw else raw
            if self._compare(obj_type, path, literal):
                return True
        return False

    def _compare(self, obj_type: str, path: str, literal: str) -> bool:
        if self.stix_type == "file":
            if obj_type != "file":
                return False
            if path.startswith("hashes."):
                return literal.strip().lower() in self.hashes
            return path == "name" and self.name is not None and literal == self.name
        if path != "value":
            return False
        if self.stix_type in _HOST_TYPES:
            return (
                obj_type in _HOST_TYPES
                and self.host is not None
                and (_norm_host(literal) == self.host)
            )
        return obj_type == self.stix_type and literal == self.value


# --------------------------------------------------------------------------------------------------
# Relationships


def _markings(*groups: Any) -> list[str]:
    out: list[str] = []
    for group in groups:
        if isinstance(group, list | tuple):
            for ref in group:
                if isinstance(ref, str) and ref not in out:
                    out.append(ref)
    return out


def _relationship(
    relationship_type: str,
    source_ref: str,
    target_ref: str,
    *,
    knowledge: Mapping[str, Any],
    observable_markings: Sequence[str],
    confidence: int,
    created_by_ref: str | None,
) -> dict[str, Any]:
    """A relationship between the observable and ``knowledge`` (the LastInfoSec object)."""
    rel: dict[str, Any] = {
        "type": "relationship",
        "spec_version": "2.1",
        "id": relationship_id(relationship_type, source_ref, target_ref),
    }
    # STIX requires created/modified; "now" would make the bundle non-deterministic, so the
    # relationship is dated like the LastInfoSec knowledge it states (OpenCTI upserts by id anyway).
    created = knowledge.get("created")
    modified = knowledge.get("modified")
    if isinstance(created, str):
        rel["created"] = created
        rel["modified"] = modified if isinstance(modified, str) else created
    rel["relationship_type"] = relationship_type
    rel["source_ref"] = source_ref
    rel["target_ref"] = target_ref
    rel["confidence"] = confidence
    if created_by_ref is not None:
        rel["created_by_ref"] = created_by_ref
    # Markings: the observable's (the user chose how restricted that entity is, and the relationship
    # reveals something about it), plus those of the LastInfoSec object at the other end (the link
    # is LastInfoSec knowledge, e.g. an AMBER malware tied to a GREEN domain must not read GREEN).
    # OpenCTI keeps the most restrictive marking per definition type, so the union is the safest.
    markings = _markings(observable_markings, knowledge.get("object_marking_refs"))
    if markings:
        rel["object_marking_refs"] = markings
    return rel


def _relationships(
    observable_id: str,
    observable: Observable,
    objects: Sequence[Mapping[str, Any]],
    *,
    seen: set[str],
    confidence: int,
    created_by_ref: str | None,
) -> list[dict[str, Any]]:
    matcher = _Matcher(observable)
    markings = observable.marking_refs
    out: list[dict[str, Any]] = []

    def add(rel_type: str, src: str, dst: str, knowledge: Mapping[str, Any]) -> None:
        rel = _relationship(
            rel_type,
            src,
            dst,
            knowledge=knowledge,
            observable_markings=markings,
            confidence=confidence,
            created_by_ref=created_by_ref,
        )
        if rel["id"] not in seen:
            seen.add(rel["id"])
            out.append(rel)

    for obj in objects:
        obj_type = obj["type"]
        if obj_type == "indicator":
            pattern = obj.get("pattern")
            pattern_type = obj.get("pattern_type", "stix")
            if isinstance(pattern, str) and pattern_type == "stix" and matcher.matches(pattern):
                add("based-on", obj["id"], observable_id, obj)
        elif obj_type in _RELATED_TYPES:
            add("related-to", observable_id, obj["id"], obj)
    return out


# --------------------------------------------------------------------------------------------------
# Bundles


def _bundle_id(entity_id: str, object_ids: Iterable[str]) -> str:
    name = "\n".join([entity_id, *sorted(object_ids)])
    return "bundle--" + str(uuid.uuid5(_BUNDLE_NS, name))


@dataclass(frozen=True, slots=True)
class Built:
    """A bundle, and what of the LastInfoSec answer was left out of it (by reason,
    :data:`lis_async.enrichment.vetting.REASONS`)."""

    bundle: dict[str, Any]
    dropped: Mapping[str, int]

    def left_out(self) -> str:
        """For the work message: ``"; left out of the LastInfoSec answer: ..."`` or ``""``."""
        return summary(self.dropped)


def build(job: Job, lis_bundles: Sequence[Mapping[str, Any]], *, confidence: int) -> Built:
    """One STIX 2.1 bundle for ``job`` from every LastInfoSec bundle of the answer.

    Objects: (playbook jobs: the incoming playbook objects first, the entity replaced in place) the
    enriched observable, what the answer may bring (:func:`lis_async.enrichment.vetting.vet`:
    allowed types,
    ids derived from content, ends and references inside the bundle, OpenCTI properties stripped,
    at least the observable's markings), the one LastInfoSec identity that authors them, then
    ``based-on`` (matching indicator -> observable) and ``related-to`` (observable -> malware /
    intrusion-set / threat-actor / tool) relationships with pycti-compatible deterministic ids.
    Organisation sharing is propagated to every object (docs/protocol.md §4.6).

    Raises ``ValueError`` when the job has no observable (deferred resolution: resolve it first).
    """
    observable = job.observable
    if observable is None:
        raise ValueError("job has no observable to enrich (resolve the entity first)")
    obs_id = _observable_id(observable)
    enriched = _enriched_observable(observable, strip_internal=not isinstance(job, PlaybookJob))
    objects, seen = _leading_objects(job, enriched, (obs_id, observable.stix_id))

    vetted = vet(lis_bundles, observable, seen)
    lis_objects = vetted.objects
    objects.extend(lis_objects)
    seen.update(o["id"] for o in lis_objects)
    if lis_objects and AUTHOR_ID not in seen:
        seen.add(AUTHOR_ID)
        objects.append(dict(AUTHOR))

    objects.extend(
        _relationships(
            obs_id,
            observable,
            lis_objects,
            seen=seen,
            confidence=confidence,
            created_by_ref=AUTHOR_ID,
        )
    )
    propagate_organisations(objects, observable.granted_refs)
    return Built(_bundle_of(job, objects), MappingProxyType(dict(vetted.dropped)))


def build_bundle(
    job: Job, lis_bundles: Sequence[Mapping[str, Any]], *, confidence: int
) -> dict[str, Any]:
    """:func:`build`'s bundle alone."""
    return build(job, lis_bundles, confidence=confidence).bundle


def _leading_objects(
    job: Job, enriched: dict[str, Any], entity_ids: tuple[str, str]
) -> tuple[list[dict[str, Any]], set[str]]:
    """What comes before the LastInfoSec objects, and the ids already taken: the enriched
    observable alone, or (playbook jobs) the incoming playbook objects with the entity replaced
    in place by the enriched observable."""
    objects: list[dict[str, Any]] = []
    seen: set[str] = set(entity_ids)
    if not isinstance(job, PlaybookJob):
        return [enriched], seen
    incoming = job.playbook.bundle.get("objects")
    placed = False
    for item in json_copy(incoming if isinstance(incoming, list) else []):
        ident = item.get("id") if isinstance(item, dict) else None
        if ident in entity_ids:
            if placed:
                continue
            item, placed = enriched, True
        objects.append(item)
        if isinstance(ident, str):
            seen.add(ident)
    if not placed:
        objects.append(enriched)
    return objects, seen


def _bundle_of(job: Job, objects: list[dict[str, Any]]) -> dict[str, Any]:
    """The bundle around ``objects``: a deterministic id, or the playbook bundle's own id and
    properties."""
    playbook = job.playbook if isinstance(job, PlaybookJob) else None
    if playbook is not None and isinstance(playbook.bundle.get("id"), str):
        bundle_id = str(playbook.bundle["id"])
    else:
        bundle_id = _bundle_id(
            job.entity_id,
            (o["id"] for o in objects if isinstance(o, dict) and isinstance(o.get("id"), str)),
        )
    # No `spec_version` on a STIX 2.1 bundle (that property exists in 2.0 only; stix2 would then
    # parse the bundle as 2.0). Playbook bundles keep whatever the platform sent.
    if playbook is not None:
        extra: dict[str, Any] = json_copy(
            {k: v for k, v in playbook.bundle.items() if k not in ("type", "id", "objects")}
        )
        return {"type": "bundle", **extra, "id": bundle_id, "objects": objects}
    return {"type": "bundle", "id": bundle_id, "objects": objects}


def playbook_passthrough(job: PlaybookJob) -> dict[str, Any]:
    """The incoming playbook bundle, copied, with the entity's organisations propagated.

    For playbook jobs that found nothing or were skipped: the playbook step must still answer with
    the whole bundle (docs/protocol.md §7), and pycti propagates ``granted_refs`` to playbook
    bundles too.
    """
    bundle: dict[str, Any] = json_copy(dict(job.playbook.bundle))
    objects = bundle.get("objects")
    if isinstance(objects, list):
        propagate_organisations(objects, job.observable.granted_refs)
    return bundle
