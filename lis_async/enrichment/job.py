"""Enrichment jobs: a listen-queue body (bytes) parsed into an immutable :data:`Job`: a
:class:`WorkJob` (its work is reported to) or a :class:`PlaybookJob` (its step is answered).

Pure data, no I/O. Every malformed body raises :class:`~lis_async.errors.JobError` (carrying the
work id when it could be read); nothing else escapes :func:`parse_job`. This module also holds
the one list of observable types the connector enriches (:data:`OBSERVABLE_TYPES`).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Final, Literal, TypeAlias

import orjson

from lis_async.enrichment.markings import (
    STIX_EXT_OCTI,
    STIX_EXT_OCTI_SCO,
    TLP_ORDER,
    MarkingDef,
    collect,
    normalise_tlp,
)
from lis_async.enrichment.nesting import MAX_DEPTH, MAX_VALUES, too_deep, too_many_values
from lis_async.errors import JobError

__all__ = [
    "BY_ENTITY_TYPE",
    "HASH_KEYS",
    "LEGACY_HOSTNAME",
    "MAX_BODY_BYTES",
    "MAX_VALUE_CHARS",
    "OBSERVABLE_TYPES",
    "STIX_EXT_OCTI",
    "STIX_EXT_OCTI_SCO",
    "STIX_TO_ENTITY",
    "SUPPORTED_TYPES",
    "TLP_ORDER",
    "Job",
    "Observable",
    "ObservableType",
    "PlaybookContext",
    "PlaybookJob",
    "WorkJob",
    "normalise_tlp",
    "parse_job",
    "parse_observable",
    "read_internal",
]


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
#: How much of a body :func:`read_internal` reads: ``internal`` is a few hundred bytes.
HEAD_BYTES: Final = 64 * 1024
_INTERNAL_FIRST: Final = re.compile(rb'\s*\{\s*"internal"\s*:\s*')
# The standard library's decoder reads one JSON value at an offset and stops at its end
# (raw_decode), which orjson cannot do.
_DECODER: Final = json.JSONDecoder()

# Identifiers as OpenCTI writes them (docs/protocol.md §3.1): work ids `work_<uuid>_<ISO time>`,
# user, draft and playbook ids (UUIDs, stream ids), STIX ids. They end up in HTTP headers (the
# draft id here, the applicant and work ids in the OpenCTI worker's requests) and in log lines, so
# anything else (spaces, CR/LF, controls, 10 KB ids) is refused when the job is read.
MAX_ID_CHARS: Final = 256
_TOKEN_ID: Final = re.compile(rf"[A-Za-z0-9][A-Za-z0-9_.:+\-]{{0,{MAX_ID_CHARS - 1}}}")
_UUID: Final = r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}"
_ENTITY_ID: Final = re.compile(rf"(?:[a-z][a-z0-9-]{{0,63}}--)?{_UUID}")
_TYPE_NAME: Final = re.compile(r"[A-Za-z][A-Za-z0-9_-]{0,63}")
_PLAYBOOK_KEYS: Final = (
    "event_id",
    "execution_id",
    "playbook_id",
    "data_instance_id",
    "step_id",
    "previous_step_id",
)


@dataclass(frozen=True, slots=True)
class Observable:
    """The entity to enrich, read from ``event.stix_entity`` (or the playbook bundle)."""

    entity_type: str  # OpenCTI type: StixFile, Domain-Name, Hostname, Url (or an unsupported one)
    stix_type: str  # file, domain-name, hostname, url
    stix_id: str
    value: str | None  # domain/hostname/url value; the file name for files
    hashes: Mapping[str, str]  # canonical keys MD5, SHA-1, SHA-256, SHA-512; values lower-case
    # Every marking id the entity carries, wherever it stands
    # (lis_async.enrichment.markings.collect);
    # the gate (lis_async.enrichment.gate) judges them, bundles carry them on what the connector
    # creates.
    marking_refs: tuple[str, ...]
    granted_refs: tuple[str, ...] | None  # organisations the entity is shared with; None = unshared
    stix: Mapping[str, Any] = field(repr=False, compare=False)  # the entity as received
    # What the entity itself says some markings are (GraphQL objectMarking), by lower-case id.
    marking_defs: Mapping[str, MarkingDef] = field(default_factory=dict, compare=False)
    unreadable_markings: int = 0  # marking entries that are not an id: the gate refuses them

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
class _JobFields:
    """What both kinds of job carry."""

    applicant_id: str | None
    draft_id: str | None
    mode: str | None  # "manual" | "auto"
    trigger: str | None  # "create" | "update"
    entity_id: str
    entity_type: str | None  # absent in playbook jobs


@dataclass(frozen=True, slots=True)
class WorkJob(_JobFields):
    """An enrichment with a work: reported to with toReceived, addExpectations, toProcessed."""

    work_id: str
    observable: Observable | None  # None when the platform sent no stix_entity (deferred)

    @property
    def urgent(self) -> bool:
        """Someone waits on this job (an analyst's manual enrichment): it takes the priority
        lane and the rate limiter's next request (docs/architecture.md, Priority lanes)."""
        return self.mode == "manual"


@dataclass(frozen=True, slots=True)
class PlaybookJob(_JobFields):
    """A playbook step: answered once with a bundle (playbookStepExecution), no work."""

    playbook: PlaybookContext
    observable: Observable  # event.stix_entity, else its object in the bundle: never deferred

    @property
    def urgent(self) -> bool:
        """A playbook waits on every step: always urgent."""
        return True


#: A parsed job, of one kind or the other.
Job: TypeAlias = WorkJob | PlaybookJob


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


def _checked(value: str, shape: re.Pattern[str], name: str, work_id: str | None) -> str:
    """``value`` if it has the expected shape; else a JobError that does not repeat it (it may be
    10 KB of control characters)."""
    if shape.fullmatch(value):
        return value
    raise JobError(
        f"{name} is not a valid identifier ({len(value)} characters; expected at most "
        f"{MAX_ID_CHARS} letters, digits and _.:+-)",
        work_id,
    )


def _opt_id(obj: Mapping[str, Any], key: str, what: str, work_id: str | None) -> str | None:
    val = _opt_str(obj, key, what, work_id)
    return None if val is None else _checked(val, _TOKEN_ID, f"{what}.{key}", work_id)


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

    raw_refs = entity.get("object_marking_refs")
    if raw_refs and not isinstance(raw_refs, list):
        raise JobError("stix_entity.object_marking_refs must be a list", work_id)
    markings = collect(entity)

    return Observable(
        entity_type=entity_type,
        stix_type=stix_type,
        stix_id=stix_id,
        value=value,
        hashes=MappingProxyType(hashes),
        marking_refs=markings.refs,
        granted_refs=_granted_refs(entity),
        stix=MappingProxyType(dict(entity)),
        marking_defs=markings.definitions,
        unreadable_markings=markings.unreadable,
    )


def _loads(data: bytes | str, what: str, work_id: str | None) -> Any:
    try:
        doc = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise JobError(f"{what} is not valid JSON: {exc.msg}", work_id) from None
    if too_deep(doc):
        raise JobError(f"{what} nests deeper than {MAX_DEPTH} levels", work_id)
    return doc


def _read_work_id(internal: Any) -> str | None:
    """The body's work id when it is one (a string of the right shape), else None."""
    if isinstance(internal, Mapping):
        wid = internal.get("work_id")
        if isinstance(wid, str) and _TOKEN_ID.fullmatch(wid):
            return wid
    return None


def _empty_bundle(received: Any) -> dict[str, Any]:
    """What a playbook gets back when its bundle cannot be: the same id, no objects."""
    bundle_id = received.get("id") if isinstance(received, Mapping) else None
    if not isinstance(bundle_id, str) or not _TOKEN_ID.fullmatch(bundle_id):
        bundle_id = "bundle--00000000-0000-4000-8000-000000000000"
    return {"type": "bundle", "id": bundle_id, "objects": []}


def _playbook_bundle(event: Any, work_id: str | None) -> tuple[dict[str, Any], str | None]:
    """``event.bundle`` (a JSON object or string) and, when it is not a usable STIX bundle, why
    not (with an empty bundle in its place: the playbook must still be answered)."""
    raw = event.get("bundle") if isinstance(event, Mapping) else None
    if isinstance(raw, str):
        try:
            raw = _loads(raw, "event.bundle", work_id)
        except JobError as exc:
            return _empty_bundle(None), str(exc)
    if not isinstance(raw, Mapping) or not isinstance(raw.get("objects"), list):
        return _empty_bundle(raw), "event.bundle must be a STIX bundle with an objects list"
    if too_deep(raw):
        return _empty_bundle(raw), f"event.bundle nests deeper than {MAX_DEPTH} levels"
    return dict(raw), None


def _parse_playbook(
    raw: Any, event: Any, work_id: str | None
) -> tuple[PlaybookContext, str | None]:
    """The playbook step's context, and what is wrong with its bundle (None: nothing). Raises
    JobError only when the six ids cannot be read: then the step cannot be answered at all."""
    if not isinstance(raw, Mapping):
        raise JobError("internal.playbook must be an object", work_id)
    fields = {
        key: _checked(
            _req_str(raw, key, "internal.playbook", work_id),
            _TOKEN_ID,
            f"internal.playbook.{key}",
            work_id,
        )
        for key in _PLAYBOOK_KEYS
    }
    bundle, problem = _playbook_bundle(event, work_id)
    return PlaybookContext(bundle=MappingProxyType(bundle), **fields), problem


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
    """Parse one listen-queue body. Raises :class:`JobError` and nothing else; a JobError of a
    playbook step whose ids could be read carries its context (``playbook``): the step must still
    be answered."""
    try:
        return _parse_job(body)
    except JobError:
        raise
    except Exception as exc:  # defensive: a body must never crash the consumer
        raise JobError(f"unreadable job body ({type(exc).__name__})") from None


def read_internal(body: bytes) -> Any:
    """The body's ``internal`` when the body opens with it, as the platform writes it
    (docs/protocol.md §3), read from its first :data:`HEAD_BYTES` alone: the rest of the body
    is neither read nor parsed, whatever its size. None when it is not there or not readable."""
    head = body[:HEAD_BYTES]
    start = _INTERNAL_FIRST.match(head)
    if start is None:
        return None
    try:  # the match is ASCII: its end is the same offset in the decoded text
        value, _ = _DECODER.raw_decode(head.decode("utf-8", "ignore"), start.end())
    except (ValueError, RecursionError):
        return None
    return value


def _document(body: bytes) -> Mapping[str, Any]:
    if len(body) > MAX_BODY_BYTES:
        work_id = _read_work_id(read_internal(body))
        raise JobError(f"job body is {len(body)} bytes (limit {MAX_BODY_BYTES})", work_id)
    if too_many_values(body):
        work_id = _read_work_id(read_internal(body))
        raise JobError(f"job body holds more than {MAX_VALUES} JSON values", work_id)
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise JobError("job body is not UTF-8") from None
    try:
        data = orjson.loads(text)
    except orjson.JSONDecodeError as exc:
        raise JobError(f"job body is not valid JSON: {exc.msg}") from None
    if not isinstance(data, Mapping):
        raise JobError(f"job body must be a JSON object, got {type(data).__name__}")
    return data


def _check_work_id(internal: Mapping[str, Any]) -> None:
    raw = internal.get("work_id")
    if isinstance(raw, str) and raw:
        _checked(raw, _TOKEN_ID, "internal.work_id", None)
    if raw is not None:
        raise JobError("internal.work_id must be a non-empty string or null")


def _parse_job(body: bytes) -> Job:
    data = _document(body)
    internal, event = data.get("internal"), data.get("event")
    work_id = _read_work_id(internal)
    if not isinstance(internal, Mapping):
        raise JobError("internal is missing or not an object", work_id)
    if work_id is None:
        _check_work_id(internal)
    playbook: PlaybookContext | None = None
    problem: str | None = None
    if "playbook" in internal:
        playbook, problem = _parse_playbook(internal["playbook"], event, work_id)
    elif work_id is None:
        raise JobError("internal.work_id is missing and the job is not a playbook step")
    try:
        if problem is not None:
            raise JobError(problem, work_id)
        if too_deep(data):
            raise JobError(f"job body nests deeper than {MAX_DEPTH} levels", work_id)
        return _job(internal, event, work_id, playbook)
    except JobError as exc:
        exc.playbook = playbook
        raise


def _job(
    internal: Mapping[str, Any], event: Any, work_id: str | None, playbook: PlaybookContext | None
) -> Job:
    if not isinstance(event, Mapping):
        raise JobError("event is missing or not an object", work_id)
    applicant_id = _opt_id(internal, "applicant_id", "internal", work_id)
    draft_id = _opt_id(internal, "draft_id", "internal", work_id)
    mode = _opt_str(internal, "mode", "internal", work_id)
    trigger = _opt_str(internal, "trigger", "internal", work_id)
    entity_id = _checked(
        _req_str(event, "entity_id", "event", work_id), _ENTITY_ID, "event.entity_id", work_id
    )
    entity_type = _opt_str(event, "entity_type", "event", work_id)
    if entity_type is not None:
        entity_type = _checked(entity_type, _TYPE_NAME, "event.entity_type", work_id)
    entity = _job_entity(event, entity_id, playbook, work_id)
    observable = parse_observable(entity, entity_type, work_id) if entity is not None else None
    if entity_type is None and observable is not None:
        entity_type = observable.entity_type
    if playbook is not None:
        if observable is None:  # not reached: _job_entity finds it in the bundle or raises
            raise JobError(f"playbook bundle holds no object with id {entity_id}", work_id)
        return PlaybookJob(
            applicant_id=applicant_id,
            draft_id=draft_id,
            mode=mode,
            trigger=trigger,
            entity_id=entity_id,
            entity_type=entity_type,
            playbook=playbook,
            observable=observable,
        )
    if work_id is None:  # not reached: _parse_job refuses a job with neither
        raise JobError("internal.work_id is missing and the job is not a playbook step")
    return WorkJob(
        applicant_id=applicant_id,
        draft_id=draft_id,
        mode=mode,
        trigger=trigger,
        entity_id=entity_id,
        entity_type=entity_type,
        work_id=work_id,
        observable=observable,
    )
