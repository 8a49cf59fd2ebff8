"""Enrichment jobs: a listen-queue body (bytes) parsed into an immutable :class:`Job`.

Pure data, no I/O. Every malformed body raises :class:`~lis_async.errors.JobError` (carrying the
work id when it could be read); nothing else escapes :func:`parse_job`. This module also holds
the one list of observable types the connector enriches (:data:`OBSERVABLE_TYPES`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Final, Literal

import orjson

from lis_async.errors import JobError

STIX_EXT_OCTI: Final = "extension-definition--ea279b3e-5c71-4632-ac08-831c66a786ba"
STIX_EXT_OCTI_SCO: Final = "extension-definition--f93e2c80-4231-4f9a-af8b-95c9bd566a82"

# TLP marking standard ids (docs/protocol.md §0), in increasing order of restriction.
TLP_MARKINGS: Final[Mapping[str, str]] = MappingProxyType(
    {
        "marking-definition--613f2e26-407d-48c7-9eca-b8e91df99dc9": "TLP:CLEAR",
        "marking-definition--34098fce-860f-48ae-8e50-ebd3cc5e41da": "TLP:GREEN",
        "marking-definition--f88d31f6-486f-44da-b317-01333bde0b82": "TLP:AMBER",
        "marking-definition--826578e1-40ad-459f-bc73-ede076f81f37": "TLP:AMBER+STRICT",
        "marking-definition--5e57c739-391a-4eb3-b6be-7d15ca92d5ed": "TLP:RED",
    }
)
TLP_ORDER: Final[tuple[str, ...]] = (
    "TLP:CLEAR",
    "TLP:GREEN",
    "TLP:AMBER",
    "TLP:AMBER+STRICT",
    "TLP:RED",
)
TLP_ALIASES: Final[Mapping[str, str]] = MappingProxyType({"TLP:WHITE": "TLP:CLEAR"})


@dataclass(frozen=True, slots=True)
class ObservableType:
    """An observable type this connector enriches: the one list every module derives from."""

    entity_type: str  # OpenCTI's name (scope, work messages)
    stix_type: str  # the STIX 2.1 type
    lookup: Literal["hash", "host", "url"]  # what is sent to LastInfoSec


OBSERVABLE_TYPES: Final[tuple[ObservableType, ...]] = (
    ObservableType("StixFile", "file", "hash"),
    ObservableType("Domain-Name", "domain-name", "host"),
    ObservableType("Hostname", "hostname", "host"),
    ObservableType("Url", "url", "url"),
)
BY_ENTITY_TYPE: Final[Mapping[str, ObservableType]] = MappingProxyType(
    {t.entity_type: t for t in OBSERVABLE_TYPES}
)
# OpenCTI entity type -> STIX type.
SUPPORTED_TYPES: Final[Mapping[str, str]] = MappingProxyType(
    {t.entity_type: t.stix_type for t in OBSERVABLE_TYPES}
)
# Older platforms send hostnames as the custom type x-opencti-hostname.
LEGACY_HOSTNAME: Final = "x-opencti-hostname"
STIX_TO_ENTITY: Final[Mapping[str, str]] = MappingProxyType(
    {t.stix_type: t.entity_type for t in OBSERVABLE_TYPES} | {LEGACY_HOSTNAME: "Hostname"}
)

HASH_KEYS: Final[Mapping[str, str]] = MappingProxyType(
    {
        "md5": "MD5",
        "sha-1": "SHA-1",
        "sha1": "SHA-1",
        "sha-256": "SHA-256",
        "sha256": "SHA-256",
        "sha-512": "SHA-512",
        "sha512": "SHA-512",
    }
)

MAX_BODY_BYTES: Final = 16 * 1024 * 1024
MAX_VALUE_CHARS: Final = 8192


def normalise_tlp(name: str) -> str:
    """``tlp:amber`` / ``TLP:WHITE`` -> ``TLP:AMBER`` / ``TLP:CLEAR``; ValueError if unknown."""
    up = name.strip().upper()
    if not up.startswith("TLP:"):
        up = "TLP:" + up
    up = TLP_ALIASES.get(up, up)
    if up not in TLP_ORDER:
        raise ValueError(f"unknown TLP {name!r} (expected one of {', '.join(TLP_ORDER)})")
    return up


def tlp_rank(tlp: str) -> int:
    return TLP_ORDER.index(tlp)


@dataclass(frozen=True, slots=True)
class Observable:
    """The entity to enrich, read from ``event.stix_entity`` (or the playbook bundle)."""

    entity_type: str  # OpenCTI type: StixFile, Domain-Name, Hostname, Url (or an unsupported one)
    stix_type: str  # file, domain-name, hostname, url
    stix_id: str
    value: str | None  # domain/hostname/url value; the file name for files
    hashes: Mapping[str, str]  # canonical keys MD5, SHA-1, SHA-256, SHA-512; values lower-case
    tlp: str  # most restrictive TLP among the markings; TLP:CLEAR when none
    marking_refs: tuple[str, ...]
    granted_refs: tuple[str, ...] | None  # organisations the entity is shared with; None = unshared
    stix: Mapping[str, Any] = field(repr=False, compare=False)  # the entity as received

    @property
    def supported(self) -> bool:
        return self.entity_type in SUPPORTED_TYPES

    @property
    def display(self) -> str:
        """A short human label for messages: the value, else the strongest hash."""
        for key in ("SHA-256", "SHA-1", "MD5"):
            if key in self.hashes:
                return self.hashes[key]
        return self.value or self.stix_id


@dataclass(frozen=True, slots=True)
class PlaybookContext:
    event_id: str
    execution_id: str
    playbook_id: str
    data_instance_id: str
    step_id: str
    previous_step_id: str
    bundle: Mapping[str, Any] = field(repr=False, compare=False)  # event.bundle as received


@dataclass(frozen=True, slots=True)
class Job:
    work_id: str | None
    applicant_id: str | None
    draft_id: str | None
    mode: str | None  # "manual" | "auto"
    trigger: str | None  # "create" | "update"
    entity_id: str
    entity_type: str | None  # absent in playbook jobs
    observable: Observable | None  # None when the platform sent no stix_entity (deferred)
    playbook: PlaybookContext | None = None

    @property
    def is_playbook(self) -> bool:
        return self.playbook is not None


def _opt_str(obj: Mapping[str, Any], key: str, what: str, work_id: str | None) -> str | None:
    val = obj.get(key)
    if val is None or isinstance(val, str):
        return val
    raise JobError(f"{what}.{key} must be a string or null, got {type(val).__name__}", work_id)


def _req_str(obj: Mapping[str, Any], key: str, what: str, work_id: str | None) -> str:
    val = obj.get(key)
    if isinstance(val, str) and val:
        return val
    if val is None:
        raise JobError(f"{what}.{key} is missing", work_id)
    raise JobError(f"{what}.{key} must be a non-empty string, got {type(val).__name__}", work_id)


def _marking_tlp(refs: tuple[str, ...]) -> str:
    best = 0
    for ref in refs:
        name = TLP_MARKINGS.get(ref)
        if name is not None:
            best = max(best, TLP_ORDER.index(name))
    return TLP_ORDER[best]


def _granted_refs(entity: Mapping[str, Any]) -> tuple[str, ...] | None:
    """Organisations as pycti reads them (docs/protocol.md §4.6), first match wins."""
    candidates: list[Any] = [entity.get("x_opencti_granted_refs")]
    exts = entity.get("extensions")
    if isinstance(exts, Mapping):
        for ext_id in (STIX_EXT_OCTI, STIX_EXT_OCTI_SCO):
            ext = exts.get(ext_id)
            if isinstance(ext, Mapping):
                candidates.append(ext.get("granted_refs"))
    candidates.append(entity.get("granted_refs"))
    for cand in candidates:
        if isinstance(cand, list):
            return tuple(str(x) for x in cand if isinstance(x, str))
    return None


def _entity_type(entity: Mapping[str, Any], fallback: str | None) -> str:
    exts = entity.get("extensions")
    if isinstance(exts, Mapping):
        ext = exts.get(STIX_EXT_OCTI)
        if isinstance(ext, Mapping) and isinstance(ext.get("type"), str):
            return str(ext["type"])
    flat = entity.get("x_opencti_type")
    if isinstance(flat, str):
        return flat
    stix_type = entity.get("type")
    if isinstance(stix_type, str) and stix_type in STIX_TO_ENTITY:
        return STIX_TO_ENTITY[stix_type]
    if fallback:
        return fallback
    return str(stix_type) if isinstance(stix_type, str) else "Unknown"


def _hashes(raw: Any) -> dict[str, str]:
    """Hashes under their canonical names, lower-case: from STIX's ``{algorithm: hash}`` or
    GraphQL's ``[{algorithm, hash}]``; anything unreadable is left out."""
    pairs: list[tuple[Any, Any]] = []
    if isinstance(raw, Mapping):
        pairs = list(raw.items())
    elif isinstance(raw, list):
        pairs = [(i.get("algorithm", ""), i.get("hash")) for i in raw if isinstance(i, Mapping)]
    hashes: dict[str, str] = {}
    for algo, digest in pairs:
        key = HASH_KEYS.get(str(algo).lower())
        if key and isinstance(digest, str) and digest.strip():
            hashes[key] = digest.strip().lower()
    return hashes


def parse_observable(
    entity: Any, entity_type_hint: str | None = None, work_id: str | None = None
) -> Observable:
    """Read an observable from a STIX entity (extension style or flat ``x_opencti_*`` style)."""
    if not isinstance(entity, Mapping):
        raise JobError(f"stix_entity must be a JSON object, got {type(entity).__name__}", work_id)
    stix_id = _req_str(entity, "id", "stix_entity", work_id)
    stix_type = _req_str(entity, "type", "stix_entity", work_id)
    if stix_type == LEGACY_HOSTNAME:
        stix_type = "hostname"
    entity_type = _entity_type(entity, entity_type_hint)

    value = entity.get("value")
    if stix_type == "file":
        value = entity.get("name")
    if value is not None and not isinstance(value, str):
        raise JobError(f"stix_entity.value must be a string, got {type(value).__name__}", work_id)
    if value is not None and len(value) > MAX_VALUE_CHARS:
        raise JobError(
            f"stix_entity value is {len(value)} characters long (limit {MAX_VALUE_CHARS})", work_id
        )

    hashes = _hashes(entity.get("hashes"))

    raw_refs = entity.get("object_marking_refs") or []
    if not isinstance(raw_refs, list):
        raise JobError("stix_entity.object_marking_refs must be a list", work_id)
    refs = tuple(r for r in raw_refs if isinstance(r, str))

    return Observable(
        entity_type=entity_type,
        stix_type=stix_type,
        stix_id=stix_id,
        value=value,
        hashes=MappingProxyType(hashes),
        tlp=_marking_tlp(refs),
        marking_refs=refs,
        granted_refs=_granted_refs(entity),
        stix=MappingProxyType(dict(entity)),
    )


def _loads(data: bytes | str, what: str, work_id: str | None) -> Any:
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise JobError(f"{what} is not valid JSON: {exc.msg}", work_id) from None


def _read_work_id(internal: Any) -> str | None:
    if isinstance(internal, Mapping):
        wid = internal.get("work_id")
        if isinstance(wid, str) and wid:
            return wid
    return None


def _parse_playbook(raw: Any, event: Mapping[str, Any], work_id: str | None) -> PlaybookContext:
    if not isinstance(raw, Mapping):
        raise JobError("internal.playbook must be an object", work_id)
    fields = {
        key: _req_str(raw, key, "internal.playbook", work_id)
        for key in (
            "event_id",
            "execution_id",
            "playbook_id",
            "data_instance_id",
            "step_id",
            "previous_step_id",
        )
    }
    bundle = event.get("bundle")
    if isinstance(bundle, str):
        bundle = _loads(bundle, "event.bundle", work_id)
    if not isinstance(bundle, Mapping) or not isinstance(bundle.get("objects"), list):
        raise JobError("event.bundle must be a STIX bundle with an objects list", work_id)
    return PlaybookContext(bundle=MappingProxyType(dict(bundle)), **fields)


def _job_entity(
    event: Mapping[str, Any], entity_id: str, playbook: PlaybookContext | None, work_id: str | None
) -> Any:
    """The entity to enrich: ``event.stix_entity`` (a JSON string, or an object), else for a
    playbook job the bundle's object with the entity's id; None for deferred resolution."""
    raw_entity = event.get("stix_entity")
    entity: Any = None
    if isinstance(raw_entity, str):
        entity = _loads(raw_entity, "event.stix_entity", work_id)
    elif isinstance(raw_entity, Mapping):
        entity = raw_entity
    elif raw_entity is not None:
        raise JobError("event.stix_entity must be a JSON string or null", work_id)
    if entity is None and playbook is not None:
        entity = next(
            (
                o
                for o in playbook.bundle["objects"]
                if isinstance(o, Mapping) and o.get("id") == entity_id
            ),
            None,
        )
        if entity is None:
            raise JobError(f"playbook bundle holds no object with id {entity_id}", work_id)
    return entity


def parse_job(body: bytes) -> Job:
    """Parse one listen-queue body. Raises :class:`JobError` and nothing else."""
    try:
        return _parse_job(body)
    except JobError:
        raise
    except Exception as exc:  # defensive: a body must never crash the consumer
        raise JobError(f"unreadable job body ({type(exc).__name__})") from None


def _parse_job(body: bytes) -> Job:
    if len(body) > MAX_BODY_BYTES:
        raise JobError(f"job body is {len(body)} bytes (limit {MAX_BODY_BYTES})")
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise JobError("job body is not UTF-8") from None
    data = _loads(text, "job body", None)
    if not isinstance(data, Mapping):
        raise JobError(f"job body must be a JSON object, got {type(data).__name__}")
    internal = data.get("internal")
    work_id = _read_work_id(internal)
    if not isinstance(internal, Mapping):
        raise JobError("internal is missing or not an object", work_id)
    if internal.get("work_id") is not None and work_id is None:
        raise JobError("internal.work_id must be a non-empty string or null")
    event = data.get("event")
    if not isinstance(event, Mapping):
        raise JobError("event is missing or not an object", work_id)

    applicant_id = _opt_str(internal, "applicant_id", "internal", work_id)
    draft_id = _opt_str(internal, "draft_id", "internal", work_id)
    mode = _opt_str(internal, "mode", "internal", work_id)
    trigger = _opt_str(internal, "trigger", "internal", work_id)
    entity_id = _req_str(event, "entity_id", "event", work_id)
    entity_type = _opt_str(event, "entity_type", "event", work_id)

    playbook: PlaybookContext | None = None
    if "playbook" in internal:
        playbook = _parse_playbook(internal["playbook"], event, work_id)
    elif work_id is None:
        raise JobError("internal.work_id is missing and the job is not a playbook step")

    entity = _job_entity(event, entity_id, playbook, work_id)
    observable = parse_observable(entity, entity_type, work_id) if entity is not None else None
    return Job(
        work_id=work_id,
        applicant_id=applicant_id,
        draft_id=draft_id,
        mode=mode,
        trigger=trigger,
        entity_id=entity_id,
        entity_type=entity_type or (observable.entity_type if observable else None),
        observable=observable,
        playbook=playbook,
    )
