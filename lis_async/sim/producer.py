"""Enrichment-job producer: publishes listen-queue messages exactly as the OpenCTI platform does.

Wire format (docs/protocol.md §1.4, §3): UTF-8 JSON body (``JSON.stringify`` style: compact,
non-ASCII kept), AMQP properties ``delivery_mode=2`` and nothing else, published to the
registration's listen exchange with the listen routing key over a publisher-confirm channel.

For every job that carries a work, the work is created in the :class:`PlatformSim` first and the
entity is stored there (``put_entity``) so the connector's GraphQL reads succeed. Playbook jobs get
no work but their entity is stored too (pycti reads it through ``stixCoreObject`` in playbook mode).

Everything about a job except its work id is a pure function of ``(seed, i)``. With
``repeat_share`` above 0, that share of jobs (drawn per index, deterministically) carry the entity
of an earlier job (the same observable, hence the same lookup value), as an observable enriched
again would; their kind, work and draft are their own.
"""

from __future__ import annotations

import asyncio
import hashlib
import random
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from types import TracebackType
from typing import Any, Final, Protocol

import aio_pika
import aiormq
import orjson
from aio_pika.abc import AbstractChannel, AbstractExchange, AbstractRobustConnection


class PlatformLike(Protocol):
    """The part of :class:`lis_async.sim.opencti.PlatformSim` the producer uses."""

    def create_work(self, connector_id: str, name: str = ...) -> str: ...

    def put_entity(self, stix_entity: dict[str, Any], draft_id: str | None = None) -> None: ...

    def registration(self, connector_id: str) -> dict[str, Any]: ...


STIX_EXT_OCTI: Final = "extension-definition--ea279b3e-5c71-4632-ac08-831c66a786ba"
STIX_EXT_OCTI_SCO: Final = "extension-definition--f93e2c80-4231-4f9a-af8b-95c9bd566a82"
AUTOMATION_USER_ID: Final = "c49fe040-2dad-412d-af07-ce639204ad55"
ADMIN_USER_ID: Final = "88ec0c6a-13ce-5e39-b486-354fe4a7084f"
OASIS_NAMESPACE: Final = uuid.UUID("00abedb4-aa42-466c-9c01-fed23315a9b7")
_PRIVATE_NAMESPACE: Final = uuid.UUID("5b0f7c3e-2a41-4d8e-9c6b-1f2e3d4c5b6a")

TLP_IDS: Final[dict[str, str]] = {
    "CLEAR": "marking-definition--613f2e26-407d-48c7-9eca-b8e91df99dc9",
    "GREEN": "marking-definition--34098fce-860f-48ae-8e50-ebd3cc5e41da",
    "AMBER": "marking-definition--f88d31f6-486f-44da-b317-01333bde0b82",
    "AMBER+STRICT": "marking-definition--826578e1-40ad-459f-bc73-ede076f81f37",
    "RED": "marking-definition--5e57c739-391a-4eb3-b6be-7d15ca92d5ed",
}

# (standard id, internal id) of organisations entities can be shared with.
ORGANISATIONS: Final[tuple[tuple[str, str], ...]] = (
    ("identity--7b1c2d3e-4f5a-5b6c-9d7e-8f9a0b1c2d3e", "5d2a8e2b-4f1c-4b7e-9a3d-2c1b0a9f8e7d"),
    ("identity--2c6a1f0e-8d3b-5e47-9a12-6b4c8d0e2f13", "9e1d3c5b-7a2f-4e6d-8c0b-1a3e5f7d9b2c"),
    ("identity--e4b7d2a9-1c5f-5a38-b6e0-3d9f7c1a5e82", "3f8a6c4e-2d0b-4a9f-b7e5-c3a1e9f7d5b3"),
)
AUTHORS: Final[tuple[str, ...]] = (
    "identity--c1a5c3ad-5b63-5b8e-8b4b-3e0a0e2d1f55",
    "identity--a8e2b4c6-d0f1-5a3b-9c7e-5f1d3b9a7e0c",
)

ENTITY_TYPES: Final[tuple[str, ...]] = ("StixFile", "Domain-Name", "Hostname", "Url")
STIX_TYPES: Final[dict[str, str]] = {
    "StixFile": "file",
    "Domain-Name": "domain-name",
    "Hostname": "hostname",
    "Url": "url",
}
JOB_KINDS: Final[tuple[str, ...]] = (
    "manual",
    "auto_create",
    "auto_update",
    "draft",
    "playbook",
    "stix_objects_string",
    "deferred",
)
HOSTILE_KINDS: Final[tuple[str, ...]] = (
    # structurally broken bodies (ProducedJob.malformed = True)
    "not_json",
    "not_utf8",
    "empty_body",
    "json_array",
    "json_null",
    "wrong_types",
    "missing_internal",
    "missing_event",
    "missing_entity_id",
    "missing_applicant_id",
    "stix_entity_object",
    "stix_entity_not_json",
    # well-formed jobs with hostile content (ProducedJob.malformed = False)
    "huge_stix_entity",
    "unknown_entity_type",
    "out_of_scope_type",
    "entity_id_mismatch",
    "unknown_work",
    "path_traversal",
    "query_chars",
    "encoded_slash",
    "hash_path_traversal",
    "control_chars",
    "very_long_value",
    "idn_value",
)
_MALFORMED_KINDS: Final = frozenset(HOSTILE_KINDS[:12])

HUGE_STIX_ENTITY_BYTES: Final = 2 * 1024 * 1024
VERY_LONG_VALUE_CHARS: Final = 100_000

_BASE_TIME: Final = datetime(2026, 11, 20, 10, 0, 0, tzinfo=UTC)

_WORDS: Final = (
    "secure", "login", "update", "cdn", "mail", "account", "verify", "portal", "cloud",
    "support", "billing", "office", "drive", "sync", "auth", "pay", "bank", "shop", "track",
    "delivery", "invoice", "docs", "files", "service", "online", "help", "id", "my", "web", "app",
)  # fmt: skip
_BRANDS: Final = (
    "micros0ft", "paypa1", "app1e", "amaz0n", "dropbox", "docusign", "dhl", "fedex", "netflix",
    "adobe", "office365", "outlook", "wellsfargo", "chase", "linkedin", "steam", "binance",
)  # fmt: skip
_TLDS: Final = (
    "com", "net", "org", "info", "xyz", "top", "ru", "cn", "io", "co", "biz", "online", "site",
    "club", "live", "su", "tk",
)  # fmt: skip
_HOST_PREFIXES: Final = ("srv", "ws", "dc", "mail-gw", "vpn", "db", "web", "c2-node", "proxy", "ns")
_CORPS: Final = ("corp.example", "acme.local", "contoso.com", "fabrikam.net", "initech.lan")
_SITES: Final = ("", "emea.", "amer.", "apac.", "lab.", "dmz.")
_URL_PATHS: Final = (
    "/login.php", "/wp-admin/includes/update.php", "/gate.php", "/download/invoice_{n}.zip",
    "/payload.exe", "/index.html", "/api/v1/check", "/secure/account/verify", "/dl/{n}/setup.msi",
    "/panel/admin.php", "/.well-known/pki-validation/{n}.txt", "/images/logo_{n}.png",
)  # fmt: skip
_FILE_NAMES: Final = (
    "invoice_{n}.pdf.exe", "setup.exe", "update.dll", "report_Q{q}.docm", "payload.bin",
    "eicar.com", "installer.msi", "photo_{n}.jpg.scr", "loader.ps1", "agent.elf", "svchost.exe",
    "readme_{n}.lnk", "macro_{n}.xlsm", "invoice.iso",
)  # fmt: skip
_LABELS: Final = ("malware", "phishing", "c2", "ransomware", "botnet", "suspicious")


def _json(value: Any) -> bytes:
    """JSON.stringify-equivalent encoding: compact separators, UTF-8, non-ASCII unescaped."""
    return orjson.dumps(value)


def _json_str(value: Any) -> str:
    return orjson.dumps(value).decode("utf-8")


def _canonical(value: Any) -> str:
    return orjson.dumps(value, option=orjson.OPT_SORT_KEYS).decode("utf-8")


def standard_id(stix_type: str, contributing: dict[str, Any]) -> str:
    """Deterministic SCO id: uuid5 (OASIS namespace) of the canonical JSON of ``contributing``."""
    return f"{stix_type}--{uuid.uuid5(OASIS_NAMESPACE, _canonical(contributing))}"


def _rand_uuid(rng: random.Random) -> str:
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


def _ts(i: int, offset_s: float = 0.0) -> str:
    moment = _BASE_TIME + timedelta(seconds=i, milliseconds=offset_s * 1000)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


@dataclass(frozen=True)
class ProducedJob:
    """One listen-queue message, as published, with what the test needs to know about it."""

    kind: str
    work_id: str | None
    entity_type: str | None
    entity_id: str | None
    value: str | None
    tlp: str
    granted_refs: tuple[str, ...]
    body: bytes
    playbook: bool
    malformed: bool
    draft_id: str | None = None

    def json(self) -> dict[str, Any]:
        """The decoded body (raises for the non-JSON hostile kinds)."""
        decoded = orjson.loads(self.body)
        if not isinstance(decoded, dict):
            raise TypeError("body is not a JSON object")
        return decoded


@dataclass(frozen=True)
class _Entity:
    entity_type: str
    stix: dict[str, Any]
    value: str | None
    tlp: str
    granted_refs: tuple[str, ...]


@dataclass(frozen=True)
class _EntityDraws:
    """The random parts every entity has, whatever its type."""

    tlp: str
    orgs: tuple[tuple[str, str], ...]
    internal_id: str
    labels: list[str]
    score: int | None
    author: str | None

    @property
    def granted_refs(self) -> tuple[str, ...]:
        return tuple(o[0] for o in self.orgs)


# A file's id is made from its first hash in _ID_HASH_ORDER, its lookup uses the strongest one.
_ID_HASH_ORDER: Final = ("MD5", "SHA-1", "SHA-256")
_LOOKUP_HASH_ORDER: Final = ("SHA-256", "SHA-1", "MD5")


def _content_hashes(content: bytes) -> dict[str, str]:
    return {
        "MD5": hashlib.md5(content).hexdigest(),
        "SHA-1": hashlib.sha1(content).hexdigest(),
        "SHA-256": hashlib.sha256(content).hexdigest(),
    }


def _file_contributing(hashes: dict[str, str]) -> dict[str, Any]:
    """The id-contributing part of a file with (non-empty) ``hashes``."""
    first = next((k for k in _ID_HASH_ORDER if k in hashes), None)
    return {"hashes": {first: hashes[first]}} if first else {"hashes": hashes}


def _file_lookup(hashes: dict[str, str]) -> str:
    """The hash the connector looks a file up by: the strongest known one, else the first."""
    return next((hashes[k] for k in _LOOKUP_HASH_ORDER if k in hashes), next(iter(hashes.values())))


def _octi_extension(i: int, entity_type: str, draws: _EntityDraws) -> dict[str, Any]:
    """The OpenCTI extension: internal id, type, timestamps, creator, organisation sharing."""
    octi: dict[str, Any] = {
        "extension_type": "property-extension",
        "id": draws.internal_id,
        "type": entity_type,
        "created_at": _ts(i),
        "updated_at": _ts(i, 1.0),
        "is_inferred": False,
        "creator_ids": [ADMIN_USER_ID],
    }
    if draws.orgs:
        octi["granted_refs"] = list(draws.granted_refs)
        octi["granted_refs_ids"] = [o[1] for o in draws.orgs]
    return octi


def _sco_extension(stix_type: str, draws: _EntityDraws, pad_bytes: int) -> dict[str, Any]:
    """The OpenCTI SCO extension; a hostname's (a custom SCO) is empty (docs/protocol.md §3.3)."""
    if stix_type == "hostname":
        return {"extension_type": "new-sco"}
    sco: dict[str, Any] = {"extension_type": "property-extension"}
    if draws.labels:
        sco["labels"] = draws.labels
    if draws.score is not None:
        sco["score"] = draws.score
    if draws.author:
        sco["created_by_ref"] = draws.author
    if pad_bytes:
        sco["description"] = "A" * pad_bytes
    return sco


# ---------------------------------------------------------------------- hostile bodies
_NOT_UTF8_TEXT: Final = (
    '{"internal":{"work_id":null,"applicant_id":null,"draft_id":null,"mode":"manual",'
    '"trigger":"update"},"event":{"event_type":"INTERNAL_ENRICHMENT",'
    '"entity_id":"domain-name--3e9b2c71-4f0a-5d6e-8c1b-9a7f6e5d4c3b",'
    '"entity_type":"Domain-Name","stix_entity":"{\\"value\\":\\"caf\xe9.example\\"}",'
    '"stix_objects":null}}'
)
#: Bodies built without an entity or a work (all malformed).
_RAW_HOSTILE_BODIES: Final[dict[str, bytes]] = {
    "not_json": b'{"internal": {"work_id": "work_x", "applicant_id": null}, "event": '
    b'{"entity_id": ',
    "not_utf8": b"\xff\xfe" + _NOT_UTF8_TEXT.encode("latin-1"),
    "empty_body": b"",
    "json_array": b"[]",
    "json_null": b"null",
    "wrong_types": _json(
        {
            "internal": {"work_id": 42, "applicant_id": []},
            "event": {"entity_id": {"x": 1}, "entity_type": None, "stix_entity": "[not json"},
        }
    ),
}


@dataclass(frozen=True)
class _HostileEntity:
    """How to make the entity of a hostile job: type, forced value, hashes and padding.

    A ``value`` or ``hashes`` left ``None`` is drawn at random like any entity's.
    """

    entity_type: str = "Domain-Name"
    value: str | None = None
    hashes: tuple[tuple[str, str], ...] | None = None
    pad_bytes: int = 0


_DEFAULT_HOSTILE_ENTITY: Final = _HostileEntity()
_HOSTILE_ENTITIES: Final[dict[str, _HostileEntity]] = {
    "huge_stix_entity": _HostileEntity(pad_bytes=HUGE_STIX_ENTITY_BYTES),
    "unknown_entity_type": _HostileEntity("X-Unknown-Observable", "something-odd"),
    "out_of_scope_type": _HostileEntity("IPv4-Addr", "203.0.113.66"),
    "path_traversal": _HostileEntity(value="../../v2/admin?x=1#"),
    "query_chars": _HostileEntity(
        "Url", "http://bad.example.com/a?apikey=leak&x=1#frag/../../v2/lis?q=%2F"
    ),
    "encoded_slash": _HostileEntity(value="..%2F..%2Fv2%2Fadmin%3Fx%3D1%23.example.com"),
    "hash_path_traversal": _HostileEntity(
        "StixFile", hashes=(("SHA-256", "../../../v2/stix21/search_host/evil.com?x=#"),)
    ),
    "control_chars": _HostileEntity(
        "Hostname", "srv01.corp.example\r\nX-Injected: 1\x00\x1b[31m\t\x7f"
    ),
    "very_long_value": _HostileEntity(
        value=("a" * 63 + ".") * (VERY_LONG_VALUE_CHARS // 64 + 1) + "example.com"
    ),
    "idn_value": _HostileEntity(value="xn--exemple-sécurisé.münchen-bank.de"),
}

#: Builds the message of a hostile body from its ``internal``, ``event`` and entity parts.
_MessageBuilder = Callable[[dict[str, Any], dict[str, Any], dict[str, Any]], dict[str, Any]]


def _whole_message(
    internal: dict[str, Any], event: dict[str, Any], stix: dict[str, Any]
) -> dict[str, Any]:
    return {"internal": internal, "event": event}


def _without_event(
    internal: dict[str, Any], event: dict[str, Any], stix: dict[str, Any]
) -> dict[str, Any]:
    return {"internal": internal}


def _without_internal(
    internal: dict[str, Any], event: dict[str, Any], stix: dict[str, Any]
) -> dict[str, Any]:
    return {"event": event}


def _without_entity_id(
    internal: dict[str, Any], event: dict[str, Any], stix: dict[str, Any]
) -> dict[str, Any]:
    del event["entity_id"]
    return _whole_message(internal, event, stix)


def _without_applicant_id(
    internal: dict[str, Any], event: dict[str, Any], stix: dict[str, Any]
) -> dict[str, Any]:
    del internal["applicant_id"]
    return _whole_message(internal, event, stix)


def _stix_entity_object(
    internal: dict[str, Any], event: dict[str, Any], stix: dict[str, Any]
) -> dict[str, Any]:
    event["stix_entity"] = stix
    return _whole_message(internal, event, stix)


def _stix_entity_not_json(
    internal: dict[str, Any], event: dict[str, Any], stix: dict[str, Any]
) -> dict[str, Any]:
    event["stix_entity"] = '{"id": "domain-name--' + stix["id"][13:] + '", "value": '
    return _whole_message(internal, event, stix)


def _entity_id_mismatch(
    internal: dict[str, Any], event: dict[str, Any], stix: dict[str, Any]
) -> dict[str, Any]:
    event["entity_id"] = standard_id("domain-name", {"value": "other.example.org"})
    return _whole_message(internal, event, stix)


#: Kinds whose message is not the whole, unchanged ``{"internal": ..., "event": ...}``.
_HOSTILE_MESSAGES: Final[dict[str, _MessageBuilder]] = {
    "missing_event": _without_event,
    "missing_internal": _without_internal,
    "missing_entity_id": _without_entity_id,
    "missing_applicant_id": _without_applicant_id,
    "stix_entity_object": _stix_entity_object,
    "stix_entity_not_json": _stix_entity_not_json,
    "entity_id_mismatch": _entity_id_mismatch,
}


class JobProducer:
    """Publishes enrichment jobs for one connector, like the platform's ``pushToConnector``."""

    def __init__(
        self,
        platform: PlatformLike,
        connector_id: str,
        amqp_url: str = "amqp://guest:guest@127.0.0.1:5672/",
        seed: int = 0,
        red_share: float = 0.1,
        shared_share: float = 0.2,
        playbook_share: float = 0.05,
        draft_share: float = 0.05,
        no_hash_share: float = 0.02,
        repeat_share: float = 0.0,
        *,
        max_concurrent_publishes: int = 256,
        mandatory: bool = True,
    ) -> None:
        self.platform = platform
        self.connector_id = connector_id
        self.amqp_url = amqp_url
        self.seed = seed
        self.red_share = red_share
        self.shared_share = shared_share
        self.playbook_share = playbook_share
        self.draft_share = draft_share
        self.no_hash_share = no_hash_share
        if not 0.0 <= repeat_share <= 1.0:
            raise ValueError(f"repeat_share must be within 0..1, not {repeat_share}")
        self.repeat_share = repeat_share
        self.max_concurrent_publishes = max_concurrent_publishes
        # The platform publishes non-mandatory; mandatory (+ on_return_raises) makes a job lost for
        # lack of a binding an error here instead of a silent drop. Invisible to the consumer.
        self.mandatory = mandatory
        self.published = 0
        self._next_i = 0
        self._connection: AbstractRobustConnection | None = None
        self._channel: AbstractChannel | None = None
        self._exchange: AbstractExchange | None = None
        self._routing_key: str | None = None
        self._lock = asyncio.Lock()

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        if self._connection is not None:
            return
        self._connection = await aio_pika.connect_robust(self.amqp_url)
        self._channel = await self._connection.channel(
            publisher_confirms=True, on_return_raises=True
        )

    async def close(self) -> None:
        connection, self._connection = self._connection, None
        self._channel = None
        self._exchange = None
        if connection is not None:
            await connection.close()

    async def __aenter__(self) -> JobProducer:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    # ------------------------------------------------------------------ publishing
    async def _target(self) -> tuple[AbstractExchange, str]:
        if self._exchange is not None and self._routing_key is not None:
            return self._exchange, self._routing_key
        async with self._lock:
            if self._exchange is None or self._routing_key is None:
                if self._channel is None:
                    raise RuntimeError("JobProducer.start() was not called")
                reg = self.platform.registration(self.connector_id)
                self._exchange = await self._channel.get_exchange(
                    reg["listen_exchange"], ensure=False
                )
                self._routing_key = str(reg["listen_routing"])
            return self._exchange, self._routing_key

    async def publish(self, job: ProducedJob) -> None:
        """Publish one body with ``delivery_mode=2`` only and wait for the broker's confirm."""
        exchange, routing_key = await self._target()
        await exchange.publish(_PlatformMessage(job.body), routing_key, mandatory=self.mandatory)
        self.published += 1

    async def publish_many(self, n: int, **kw: Any) -> list[ProducedJob]:
        """Make ``n`` jobs (next indices) and publish them concurrently with confirms."""
        start = self._next_i
        self._next_i += n
        jobs = [self.make_job(start + k, **kw) for k in range(n)]
        await self.publish_all(jobs)
        return jobs

    async def publish_all(self, jobs: Sequence[ProducedJob]) -> None:
        """Publish ``jobs`` (made already) concurrently with confirms, as fast as the broker
        confirms them (``max_concurrent_publishes`` at a time)."""
        sem = asyncio.Semaphore(self.max_concurrent_publishes)

        async def one(job: ProducedJob) -> None:
            async with sem:
                await self.publish(job)

        await asyncio.gather(*(one(job) for job in jobs))

    def next_index(self) -> int:
        """Reserve the next job index (the one ``publish_many`` would use)."""
        i = self._next_i
        self._next_i += 1
        return i

    # ------------------------------------------------------------------ jobs
    def _rng(self, i: int, purpose: str) -> random.Random:
        return random.Random(f"lis-sim:{self.seed}:{i}:{purpose}")

    def _job_draws(
        self, i: int, kind: str | None, entity_type: str | None
    ) -> tuple[random.Random, str, str]:
        """Job ``i``'s random source, and its kind and entity type (drawn unless given)."""
        rng = self._rng(i, "job")
        if kind is None:
            kind = self._pick_kind(rng)
        if entity_type is None:
            entity_type = rng.choice(ENTITY_TYPES)
        return rng, kind, entity_type

    def entity_source(self, i: int) -> int:
        """The index of the job whose entity job ``i`` carries: ``i`` itself, or, for a
        ``repeat_share`` of the jobs after the first, an earlier job drawn uniformly (followed
        back to a job that carries its own). Draws nothing when ``repeat_share`` is 0."""
        while i > 0 and self.repeat_share > 0:
            rng = self._rng(i, "repeat")
            if rng.random() >= self.repeat_share:
                break
            i = rng.randrange(i)
        return i

    def _pick_kind(self, rng: random.Random) -> str:
        r = rng.random()
        if r < self.playbook_share:
            return "playbook"
        r -= self.playbook_share
        if r < self.draft_share:
            return "draft"
        return rng.choices(
            ("manual", "auto_create", "auto_update", "stix_objects_string"),
            weights=(0.4, 0.3, 0.2, 0.1),
        )[0]

    def _pick_tlp(self, rng: random.Random) -> str:
        if rng.random() < self.red_share:
            return rng.choice(("AMBER+STRICT", "RED"))
        return rng.choices(("CLEAR", "GREEN", "AMBER"), weights=(0.3, 0.4, 0.3))[0]

    def make_job(
        self, i: int, kind: str | None = None, entity_type: str | None = None
    ) -> ProducedJob:
        """Build job ``i`` (deterministic from ``seed`` and ``i``); register its work and entity.

        With ``repeat_share``, job ``i`` may carry the entity of an earlier job instead of its
        own (see :meth:`entity_source`); given a ``kind`` or an ``entity_type``, that earlier
        job's entity is the one it has when made with the same arguments.
        """
        requested = (kind, entity_type)
        rng, kind, entity_type = self._job_draws(i, *requested)
        if kind not in JOB_KINDS:
            raise ValueError(f"unknown job kind {kind!r}; expected one of {JOB_KINDS}")
        if entity_type not in STIX_TYPES:
            raise ValueError(f"unsupported entity type {entity_type!r}")
        source = self.entity_source(i)
        if source != i:
            entity_type = self._job_draws(source, *requested)[2]
        entity = self._make_entity(source, entity_type)
        draft_id = _rand_uuid(rng) if kind == "draft" else None
        if kind == "playbook":
            return self._playbook_job(i, rng, entity)
        if kind == "draft":
            mode, trigger = rng.choice(
                (("manual", "update"), ("auto", "create"), ("auto", "update"))
            )
        elif kind in ("manual", "stix_objects_string"):
            mode, trigger = "manual", "update"
        elif kind in ("auto_create", "deferred"):
            mode, trigger = "auto", "create"
        else:
            mode, trigger = "auto", "update"
        stix_entity: str | None = _json_str(entity.stix)
        stix_objects: str | None = None
        if kind == "stix_objects_string":
            stix_objects = _json_str([entity.stix])
        elif kind == "deferred":
            stix_entity = None
        work_id = self._register(entity, mode, draft_id)
        body = _json(
            {
                "internal": {
                    "work_id": work_id,
                    "applicant_id": None,
                    "draft_id": draft_id,
                    "mode": mode,
                    "trigger": trigger,
                },
                "event": {
                    "event_type": "INTERNAL_ENRICHMENT",
                    "entity_id": entity.stix["id"],
                    "entity_type": entity.entity_type,
                    "stix_entity": stix_entity,
                    "stix_objects": stix_objects,
                },
            }
        )
        return self._produced(kind, work_id, entity, body, draft_id=draft_id)

    def _register(self, entity: _Entity, mode: str, draft_id: str | None) -> str:
        sid = entity.stix["id"]
        name = "Manual enrichment" if mode == "manual" else f"Enrichment ({sid})"
        if draft_id is not None:
            name += f" in draft {draft_id}"
        work_id = self.platform.create_work(self.connector_id, name)
        self.platform.put_entity(entity.stix, draft_id)
        return work_id

    @staticmethod
    def _produced(
        kind: str,
        work_id: str | None,
        entity: _Entity,
        body: bytes,
        *,
        draft_id: str | None = None,
        playbook: bool = False,
        malformed: bool = False,
    ) -> ProducedJob:
        return ProducedJob(
            kind=kind,
            work_id=work_id,
            entity_type=entity.entity_type,
            entity_id=entity.stix.get("id"),
            value=entity.value,
            tlp=entity.tlp,
            granted_refs=entity.granted_refs,
            body=body,
            playbook=playbook,
            malformed=malformed,
            draft_id=draft_id,
        )

    def _playbook_job(self, i: int, rng: random.Random, entity: _Entity) -> ProducedJob:
        self.platform.put_entity(entity.stix, None)
        sid = entity.stix["id"]
        event_ms = int((_BASE_TIME + timedelta(seconds=i)).timestamp() * 1000)
        body = _json(
            {
                "internal": {
                    "work_id": None,
                    "playbook": {
                        "event_id": f"{event_ms}-{i % 1000}",
                        "execution_id": _rand_uuid(rng),
                        "playbook_id": _rand_uuid(rng),
                        "data_instance_id": sid,
                        "step_id": _rand_uuid(rng),
                        "previous_step_id": _rand_uuid(rng),
                    },
                    "applicant_id": AUTOMATION_USER_ID,
                    # "create" because the base object carries an OCTI-extension id
                    # (docs/protocol.md §3.1)
                    "trigger": "create",
                    "mode": "auto",
                },
                "event": {
                    "entity_id": sid,
                    "bundle": {
                        "type": "bundle",
                        "id": f"bundle--{_rand_uuid(rng)}",
                        "spec_version": "2.1",
                        "objects": [entity.stix],
                    },
                },
            }
        )
        return self._produced("playbook", None, entity, body, playbook=True)

    # ------------------------------------------------------------------ entities
    def _make_entity(
        self,
        i: int,
        entity_type: str,
        *,
        value: str | None = None,
        hashes: dict[str, str] | None = None,
        pad_bytes: int = 0,
    ) -> _Entity:
        """The platform converter's STIX 2.1 + extensions view of an observable
        (docs/protocol.md §3.3)."""
        rng = self._rng(i, "entity")
        draws = self._draw_common(rng)
        stix_type = STIX_TYPES.get(entity_type, entity_type.lower())
        obj: dict[str, Any] = {"id": "", "spec_version": "2.1", "type": stix_type}
        if entity_type == "StixFile":
            contributing, lookup = self._fill_file(obj, rng, i, hashes)
        else:
            contributing, lookup = self._fill_value(obj, rng, entity_type, value, draws)
        obj["id"] = standard_id(stix_type, contributing)
        obj["object_marking_refs"] = [TLP_IDS[draws.tlp]]
        obj["extensions"] = {
            STIX_EXT_OCTI: _octi_extension(i, entity_type, draws),
            STIX_EXT_OCTI_SCO: _sco_extension(stix_type, draws, pad_bytes),
        }
        return _Entity(entity_type, obj, lookup, draws.tlp, draws.granted_refs)

    def _draw_common(self, rng: random.Random) -> _EntityDraws:
        """The draws every entity makes first, in a fixed order (the order fixes the output)."""
        tlp = self._pick_tlp(rng)
        shared = rng.random() < self.shared_share
        orgs = tuple(rng.sample(ORGANISATIONS, rng.choice((1, 1, 2)))) if shared else ()
        internal_id = _rand_uuid(rng)
        labels = [rng.choice(_LABELS)] if rng.random() < 0.3 else []
        score = rng.choice((None, 10, 25, 40, 50, 60, 70, 80, 100))
        author = rng.choice(AUTHORS) if rng.random() < 0.3 else None
        return _EntityDraws(tlp, orgs, internal_id, labels, score, author)

    def _fill_file(
        self, obj: dict[str, Any], rng: random.Random, i: int, hashes: dict[str, str] | None
    ) -> tuple[dict[str, Any], str | None]:
        """Add a file's hashes, size and name to ``obj``; its id-contributing part and lookup.

        Without given ``hashes``, the file gets the hashes of random content unless it is one of
        the ``no_hash_share`` files known by name only (which have no lookup value).
        """
        name = rng.choice(_FILE_NAMES).format(n=rng.randint(1, 99999), q=rng.randint(1, 4))
        if hashes is None and rng.random() >= self.no_hash_share:
            size = rng.randint(64, 4096)
            hashes = _content_hashes(random.Random(f"content:{self.seed}:{i}").randbytes(size))
            obj["hashes"] = hashes
            obj["size"] = size
        elif hashes:
            obj["hashes"] = hashes
        obj["name"] = name
        if not hashes:
            return {"name": name}, None
        return _file_contributing(hashes), _file_lookup(hashes)

    def _fill_value(
        self,
        obj: dict[str, Any],
        rng: random.Random,
        entity_type: str,
        value: str | None,
        draws: _EntityDraws,
    ) -> tuple[dict[str, Any], str]:
        """Add a valued observable's value (random unless given) and top-level extras to ``obj``."""
        if value is None:
            value = self._make_value(rng, entity_type)
        obj["value"] = value
        stix_type = obj["type"]
        if stix_type in ("hostname", "url") and draws.score is not None:
            obj["score"] = draws.score
        if stix_type == "hostname":
            # a custom SCO: labels and author at the top level, not in the extension
            # (docs/protocol.md §3.3)
            if draws.labels:
                obj["labels"] = draws.labels
            if draws.author:
                obj["created_by_ref"] = draws.author
        return {"value": value}, value

    def _make_value(self, rng: random.Random, entity_type: str) -> str:
        if entity_type == "Domain-Name":
            return self._domain(rng)
        if entity_type == "Hostname":
            if rng.random() < 0.6:
                prefix = rng.choice(_HOST_PREFIXES)
                num = rng.randint(1, 999)
                return f"{prefix}{num:02d}.{rng.choice(_SITES)}{rng.choice(_CORPS)}"
            return f"{rng.choice(_HOST_PREFIXES)}{rng.randint(1, 99)}.{self._domain(rng)}"
        if entity_type == "Url":
            scheme = rng.choice(("http", "https", "https"))
            if rng.random() < 0.15:
                host = ".".join(str(rng.randint(1, 254)) for _ in range(4))
                if rng.random() < 0.5:
                    host += f":{rng.choice((8080, 8443, 4444, 81))}"
            else:
                host = self._domain(rng)
            path = rng.choice(_URL_PATHS).format(n=rng.randint(1, 99999))
            query = f"?id={rng.getrandbits(32):08x}" if rng.random() < 0.3 else ""
            return f"{scheme}://{host}{path}{query}"
        return self._domain(rng)

    @staticmethod
    def _domain(rng: random.Random) -> str:
        word = rng.choice(_WORDS)
        brand = rng.choice(_BRANDS)
        style = rng.randint(0, 3)
        if style == 0:
            base = f"{word}-{brand}"
        elif style == 1:
            base = f"{brand}-{word}{rng.randint(1, 999)}"
        elif style == 2:
            base = f"{word}{brand}{rng.randint(10, 99)}"
        else:
            base = f"{brand}.{word}-{rng.choice(_WORDS)}"
        sub = f"{rng.choice(_WORDS)}." if rng.random() < 0.25 else ""
        return f"{sub}{base}.{rng.choice(_TLDS)}"

    # ------------------------------------------------------------------ hostile bodies
    def make_hostile(self, name: str) -> ProducedJob:
        """A malformed or hostile body; see :data:`HOSTILE_KINDS`.

        Bodies with a readable string work id get a real work (and their entity is stored), so a
        test can check the connector reported an error on it; ``unknown_work`` uses a work id the
        platform never created.
        """
        if name not in HOSTILE_KINDS:
            raise ValueError(f"unknown hostile kind {name!r}; expected one of {HOSTILE_KINDS}")
        raw = _RAW_HOSTILE_BODIES.get(name)
        if raw is not None:
            return ProducedJob(name, None, None, None, None, "", (), raw, False, True)
        i = 1_000_000 + HOSTILE_KINDS.index(name)
        spec = _HOSTILE_ENTITIES.get(name, _DEFAULT_HOSTILE_ENTITY)
        entity = self._make_entity(
            i,
            spec.entity_type,
            value=spec.value,
            hashes=dict(spec.hashes) if spec.hashes is not None else None,
            pad_bytes=spec.pad_bytes,
        )
        work_id = self._hostile_work(name, i, entity)
        stix = dict(entity.stix)
        internal: dict[str, Any] = {
            "work_id": work_id,
            "applicant_id": None,
            "draft_id": None,
            "mode": "manual",
            "trigger": "update",
        }
        event: dict[str, Any] = {
            "event_type": "INTERNAL_ENRICHMENT",
            "entity_id": stix["id"],
            "entity_type": spec.entity_type,
            "stix_entity": _json_str(stix),
            "stix_objects": None,
        }
        message = _HOSTILE_MESSAGES.get(name, _whole_message)(internal, event, stix)
        return self._produced(
            name, work_id, entity, _json(message), malformed=name in _MALFORMED_KINDS
        )

    def _hostile_work(self, name: str, i: int, entity: _Entity) -> str | None:
        """Store the entity and return the body's work id (a real work unless said otherwise)."""
        if name == "unknown_work":
            self.platform.put_entity(entity.stix, None)
            return f"work_{uuid.uuid5(_PRIVATE_NAMESPACE, str(self.seed))}_{_ts(i)}"
        if name == "missing_internal":
            self.platform.put_entity(entity.stix, None)  # no readable work id: no work
            return None
        return self._register(entity, "manual", None)


class _PlatformMessage(aio_pika.Message):
    """A message whose only AMQP property is ``delivery_mode=2`` (no headers, no priority)."""

    @property
    def properties(self) -> aiormq.spec.Basic.Properties:
        return aiormq.spec.Basic.Properties(delivery_mode=2)
