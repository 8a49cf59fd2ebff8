"""Simulated OpenCTI platform: an aiohttp GraphQL endpoint plus real RabbitMQ declarations.

Used by end-to-end tests, the demo and the benchmark. It implements the subset of the platform
that an internal-enrichment connector (pycti's ``OpenCTIConnectorHelper`` or ``lis_async``) talks
to (see ``docs/opencti-protocol.md`` §10):

* ``POST /graphql`` dispatched on the root field (and the ``workEdit`` sub-field) found with a
  precompiled regex; the dispatch decision is cached per query text, so a request costs one
  ``orjson.loads``, a dict lookup and one ``orjson.dumps``. No GraphQL library: the answers are
  fixed super-sets of what pycti selects, and arguments must be passed as *variables*.
* Bearer token check (``AUTH_REQUIRED`` as HTTP 200 GraphQL error, like the platform).
* Connector registration / heartbeat, with the platform's queue topology really declared on
  RabbitMQ (aio-pika) on every ``registerConnector`` and ``pingConnector``.
* Works (jobs) with the platform's expectation accounting and ``WORK_NOT_ALIVE``.
* An entity store answering ``stixCyberObservable`` / ``stixCoreObject`` in pycti's shape.
* ``playbookStepExecution`` recording and validation.
* Fault knobs: latency, error rate, outage (HTTP 503), refused connections.

Call counters (``PlatformSim.calls``) use *canonical* operation names, i.e. the operation names
pycti uses (``healthCheck``, ``RegisterConnector``, ``PingConnector``, ``StixCyberObservable``,
``workToReceived``, ``addExpectations``, ``reportExpectation``, ``workToProcessed``, ``pingWork``,
``PlaybookStepExecution`` …) whatever name the client gave its operation, so that pycti and
lis_async runs can be compared. The name the client sent is kept in
``RecordedRequest.operation_name``.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import contextlib
import functools
import logging
import random
import re
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

import aio_pika
import jwt
import orjson
from aiohttp import web
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

__all__ = [
    "STIX_EXT_OCTI",
    "STIX_EXT_OCTI_SCO",
    "TLP_MARKINGS",
    "ConnectorRecord",
    "PlatformSim",
    "PlatformSimConfig",
    "RecordedRequest",
    "SimGraphQLError",
    "Work",
    "WorkNotAlive",
]

log = logging.getLogger(__name__)

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

WORK_NOT_ALIVE_MESSAGE = (
    "Work is no longer alive, no request can be done within the context of this work"
)

_NS = uuid.UUID("0b0d8f6e-6a53-4c42-9f1e-2f6b5e0c7a11")  # namespace for derived internal ids
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

# --------------------------------------------------------------------------------------------
# data model
# --------------------------------------------------------------------------------------------


@dataclass
class PlatformSimConfig:
    """Runtime-mutable knobs of the simulated platform."""

    token: str = "sim-token-0c1d2e3f"
    connector_user_id: str = "1f2e3d4c-5b6a-4798-8a7b-6c5d4e3f2a1b"
    platform_version: str = "6.8.12"
    #: ``rabbitmq:queue_prefix``: names become ``<prefix>_amqp.connector.exchange`` etc.
    queue_prefix: str = ""
    queue_type: str = "classic"
    #: adds ``x-max-length`` + ``x-overflow: reject-publish`` to push queues declared from now on
    push_queue_max_length: int | None = None
    #: seconds added to every GraphQL answer
    latency_s: float = 0.0
    #: share of calls answered with ``error_code`` (``error_scope``: work mutations or all calls)
    error_rate: float = 0.0
    error_scope: Literal["work", "all"] = "work"
    error_code: str = "DATABASE_ERROR"
    #: while true every GraphQL call gets HTTP 503 with a non-JSON body
    outage: bool = False
    #: where the sim declares queues; ``None`` disables all broker interaction
    amqp_url: str | None = "amqp://guest:guest@127.0.0.1:5672/"
    # RabbitMQ settings handed out in the registration answer
    rabbit_host: str = "127.0.0.1"
    rabbit_port: int = 5672
    rabbit_user: str = "guest"
    rabbit_pass: str = "guest"
    rabbit_vhost: str = "/"
    rabbit_use_ssl: bool = False
    #: reject ``playbookStepExecution`` whose bundle is not valid STIX / lacks the instance
    strict_playbook: bool = True
    #: when set, ``registerConnector`` input keys outside this set are rejected (older schema)
    register_input_fields: frozenset[str] | None = None
    #: ``close()`` deletes the listen/push queues this sim declared
    delete_queues_on_close: bool = False
    max_recorded_requests: int = 100_000
    seed: int | None = None


@dataclass
class Work:
    id: str
    connector_id: str
    name: str
    status: str = "wait"
    expected: int = 0
    processed: int = 0
    in_error: bool = False
    messages: list[str] = field(default_factory=list)
    errors: list[dict[str, Any]] = field(default_factory=list)
    received_time: float | None = None
    processed_time: float | None = None
    completed_time: float | None = None
    created_time: float = field(default_factory=time.time)
    # extras (not in the platform's Work type, useful for assertions)
    updated_time: float | None = None
    pings: int = 0
    draft_context: str | None = None
    killed: bool = False

    @property
    def complete(self) -> bool:
        return self.status == "complete"


@dataclass
class ConnectorRecord:
    id: str
    name: str
    type: str
    scope: list[str]
    auto: bool = False
    auto_update: bool = False
    playbook_compatible: bool = False
    enrichment_resolution: str | None = None
    only_contextual: bool = False
    listen_callback_uri: str | None = None
    version: str | None = None
    slug: str | None = None
    input: dict[str, Any] = field(default_factory=dict)
    state: str | None = None
    state_reset_pending: bool = False
    connector_info: dict[str, Any] | None = None
    register_count: int = 0
    registered_time: float = 0.0
    #: epoch timestamps of every ``pingConnector``
    pings: list[float] = field(default_factory=list)
    #: last heartbeat (registration or ping), epoch seconds
    last_seen: float = 0.0
    deleted: bool = False
    names: dict[str, str] = field(default_factory=dict)
    push_queue_max_length: int | None = None

    @property
    def active(self) -> bool:
        """Platform liveness rule: heartbeat younger than 5 minutes."""
        return not self.deleted and time.time() - self.last_seen < 300


@dataclass(slots=True)
class RecordedRequest:
    time: float
    #: canonical operation (pycti's name), e.g. ``workToProcessed``
    operation: str
    #: operation name as sent by the client (None if anonymous)
    operation_name: str | None
    variables: dict[str, Any]
    draft_id: str | None
    applicant_id: str | None
    user_agent: str | None
    work_id_header: str | None
    #: "ok", an error code ("AUTH_REQUIRED", "DATABASE_ERROR", …) or "http_503"
    outcome: str = "ok"


class SimGraphQLError(Exception):
    """An error answered the platform way: HTTP 200 + ``errors[0].extensions.code``."""

    def __init__(
        self,
        code: str,
        message: str,
        http_status: int = 500,
        genre: str = "TECHNICAL",
        data: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.http_status = http_status
        self.genre = genre
        self.data = data or {}

    def payload(self) -> dict[str, Any]:
        return {
            "errors": [
                {
                    "message": self.message,
                    "name": self.code,
                    "extensions": {
                        "code": self.code,
                        "data": {"http_status": self.http_status, "genre": self.genre, **self.data},
                    },
                }
            ],
            "data": None,
        }


class WorkNotAlive(SimGraphQLError):
    def __init__(self, work_id: str) -> None:
        super().__init__(
            "WORK_NOT_ALIVE", WORK_NOT_ALIVE_MESSAGE, 400, "TECHNICAL", {"work_id": work_id}
        )
        self.work_id = work_id


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def _signing_key() -> tuple[Ed25519PrivateKey, str, str]:
    """One Ed25519 key per process: (private key, kid, JWK Set JSON text)."""
    key = Ed25519PrivateKey.generate()
    raw = key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    x = base64.urlsafe_b64encode(raw).rstrip(b"=").decode()
    kid = "sim-" + uuid.uuid5(_NS, x).hex[:16]
    jwks = {
        "keys": [{"kty": "OKP", "crv": "Ed25519", "x": x, "kid": kid, "use": "sig", "alg": "EdDSA"}]
    }
    return key, kid, orjson.dumps(jwks).decode()


def _iso(ts: float) -> str:
    dt = datetime.fromtimestamp(ts, UTC)
    return dt.strftime("%Y-%m-%dT%H:%M:%S.") + f"{dt.microsecond // 1000:03d}Z"


def _derived_id(value: str) -> str:
    return str(uuid.uuid5(_NS, value))


def _as_str_list(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [s.strip() for s in value.split(",") if s.strip()]
    return [str(v) for v in value]


_OP_RE = re.compile(r"^\s*(?:(query|mutation|subscription)\b\s*([_A-Za-z]\w*)?)?")
_ROOT_RE = re.compile(r"\{\s*(?:[_A-Za-z]\w*\s*:\s*)?([_A-Za-z]\w*)")
_WORK_SUB_RE = re.compile(r"workEdit\s*(?:\([^)]*\))?\s*\{\s*(?:[_A-Za-z]\w*\s*:\s*)?(\w+)")

_ROOT_CANONICAL: dict[str, str] = {
    "about": "healthCheck",
    "registerConnector": "RegisterConnector",
    "pingConnector": "PingConnector",
    "deleteConnector": "ConnectorDeletionMutation",
    "connector": "GetConnector",
    "connectorsForWorker": "GetConnectors",
    "stixCyberObservable": "StixCyberObservable",
    "stixCoreObject": "StixCoreObject",
    "stixNestedRefRelationships": "StixNestedRefRelationships",
    "playbookStepExecution": "PlaybookStepExecution",
    "workAdd": "workAdd",
    "isWorkAlive": "isWorkAlive",
    "stixBundlePush": "StixBundlePush",
}
_WORK_CANONICAL: dict[str, str] = {
    "toReceived": "workToReceived",
    "addExpectations": "addExpectations",
    "reportExpectation": "reportExpectation",
    "toProcessed": "workToProcessed",
    "ping": "pingWork",
    "addDraftContext": "addDraftContext",
}
WORK_MUTATIONS = frozenset(_WORK_CANONICAL.values())


@functools.lru_cache(maxsize=4096)
def classify_query(query: str) -> tuple[str, str | None, str]:
    """Return (canonical operation, operation name in the document, root field)."""
    m = _OP_RE.match(query)
    op_name = m.group(2) if m else None
    root_m = _ROOT_RE.search(query)
    root = root_m.group(1) if root_m else ""
    if root == "workEdit":
        sub = _WORK_SUB_RE.search(query)
        canonical = _WORK_CANONICAL.get(sub.group(1), "workEdit") if sub else "workEdit"
    else:
        canonical = _ROOT_CANONICAL.get(root, root or (op_name or "unknown"))
    return canonical, op_name, root


_Handler = Callable[["_Ctx", dict[str, Any]], Awaitable[Any]]


@dataclass(slots=True)
class _Ctx:
    root: str
    draft_id: str | None
    applicant_id: str | None
    work_id_header: str | None


# --------------------------------------------------------------------------------------------
# the simulator
# --------------------------------------------------------------------------------------------


class PlatformSim:
    """Simulated OpenCTI platform (GraphQL over aiohttp + queue declarations on RabbitMQ)."""

    def __init__(self, config: PlatformSimConfig | None = None) -> None:
        self.config = config or PlatformSimConfig()
        self.works: dict[str, Work] = {}
        self.connectors: dict[str, ConnectorRecord] = {}
        self.calls: collections.Counter[str] = collections.Counter()
        self.requests: collections.deque[RecordedRequest] = collections.deque(
            maxlen=self.config.max_recorded_requests
        )
        self.playbook_calls: list[dict[str, Any]] = []
        self.bundle_pushes: list[dict[str, Any]] = []
        #: broker errors seen while declaring (message strings)
        self.amqp_errors: list[str] = []
        #: raw bytes served at ``GET /storage/get/<id>``
        self.files: dict[str, bytes] = {}
        self.base_url: str = ""
        self._entities: dict[tuple[str | None, str], dict[str, Any]] = {}
        self._nodes: dict[tuple[str | None, str], dict[str, Any]] = {}
        self._rng = random.Random(self.config.seed)
        self._outage_until = 0.0
        self._last_work_ms = 0
        self._changed = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._runner: web.AppRunner | None = None
        self._site: web.TCPSite | None = None
        self._host = "127.0.0.1"
        self._port = 0
        self._amqp: aio_pika.abc.AbstractRobustConnection | None = None
        self._amqp_channel: aio_pika.abc.AbstractChannel | None = None
        self._amqp_lock = asyncio.Lock()
        self._declared_queues: set[str] = set()
        self._handlers: dict[str, _Handler] = {
            "healthCheck": self._op_health,
            "RegisterConnector": self._op_register,
            "PingConnector": self._op_ping,
            "ConnectorDeletionMutation": self._op_delete_connector,
            "GetConnector": self._op_get_connector,
            "GetConnectors": self._op_connectors_for_worker,
            "StixCyberObservable": self._op_read_sco,
            "StixCoreObject": self._op_read_sco,
            "StixNestedRefRelationships": self._op_nested_refs,
            "workToReceived": self._op_to_received,
            "addExpectations": self._op_add_expectations,
            "reportExpectation": self._op_report_expectation,
            "workToProcessed": self._op_to_processed,
            "pingWork": self._op_ping_work,
            "addDraftContext": self._op_add_draft_context,
            "workAdd": self._op_work_add,
            "isWorkAlive": self._op_is_work_alive,
            "PlaybookStepExecution": self._op_playbook_step,
            "StixBundlePush": self._op_bundle_push,
        }

    # ---------------------------------------------------------------- lifecycle

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        """Start the HTTP server (and the broker connection); return the base URL."""
        self._loop = asyncio.get_running_loop()
        if self.config.amqp_url is not None:
            self._amqp = await aio_pika.connect_robust(self.config.amqp_url)
        app = web.Application(client_max_size=256 * 1024 * 1024)
        app.router.add_post("/graphql", self._handle_graphql)
        app.router.add_get("/_sim/state", self._handle_state)
        app.router.add_get("/storage/get/{file_id:.+}", self._handle_file)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        self._site = web.TCPSite(self._runner, host, port)
        await self._site.start()
        addr = self._runner.addresses[0]
        self._host, self._port = host, int(addr[1])
        self.base_url = f"http://{host}:{self._port}"
        return self.base_url

    @property
    def graphql_url(self) -> str:
        return self.base_url + "/graphql"

    async def close(self) -> None:
        if self.config.delete_queues_on_close and self._amqp is not None:
            with contextlib.suppress(Exception):
                await self.delete_connector_queues()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
            self._site = None
        if self._amqp is not None:
            with contextlib.suppress(Exception):
                await self._amqp.close()
            self._amqp = None
            self._amqp_channel = None

    async def __aenter__(self) -> PlatformSim:
        if self._runner is None:
            await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # ---------------------------------------------------------------- fault helpers

    def outage_for(self, seconds: float) -> None:
        """Answer HTTP 503 to every GraphQL call for ``seconds`` (independent of ``outage``)."""
        self._outage_until = time.monotonic() + seconds

    @property
    def in_outage(self) -> bool:
        return self.config.outage or time.monotonic() < self._outage_until

    async def set_refuse_connections(self, refuse: bool) -> None:
        """Close (or reopen) the listening socket; open keep-alive connections are dropped."""
        if self._runner is None:
            raise RuntimeError("PlatformSim not started")
        if refuse:
            if self._site is not None:
                await self._site.stop()
                self._site = None
                server = self._runner.server
                if server is not None:
                    await server.shutdown(0.1)
        elif self._site is None:
            self._site = web.TCPSite(self._runner, self._host, self._port, reuse_address=True)
            await self._site.start()

    def connector_jwt(self, ttl_s: int = 3600) -> str:
        """A JWT signed with the key published in ``jwks`` (API listen protocol tests)."""
        key, kid, _ = _signing_key()
        now = int(time.time())
        return jwt.encode(
            {"iss": "opencti", "sub": "connector", "iat": now, "exp": now + ttl_s},
            key,
            algorithm="EdDSA",
            headers={"kid": kid},
        )

    # ---------------------------------------------------------------- change notification

    def _notify(self) -> None:
        """Wake every ``wait_*`` coroutine (callable from any thread)."""
        loop = self._loop
        if loop is not None and not loop.is_closed():
            try:
                running = asyncio.get_running_loop()
            except RuntimeError:
                running = None
            if running is not loop:
                loop.call_soon_threadsafe(self._notify_now)
                return
        self._notify_now()

    def _notify_now(self) -> None:
        ev = self._changed
        self._changed = asyncio.Event()
        ev.set()

    async def wait_until(
        self,
        predicate: Callable[[], bool],
        timeout: float = 30,  # noqa: ASYNC109 - public API takes a plain timeout
    ) -> bool:
        """Wait (event-driven) until ``predicate()`` is true; False on timeout."""
        deadline = time.monotonic() + timeout
        while True:
            if predicate():
                return True
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            ev = self._changed
            try:
                await asyncio.wait_for(ev.wait(), remaining)
            except TimeoutError:
                return predicate()

    async def wait_works(
        self,
        work_ids: Iterable[str] | None = None,
        timeout: float = 30,  # noqa: ASYNC109 - public API takes a plain timeout
    ) -> bool:
        """True once all given works (default: all non-killed works) are complete.

        Returns False at ``timeout``, or early when one of the given works was killed.
        """
        ids = list(work_ids) if work_ids is not None else None

        def done() -> bool:
            if ids is None:
                return all(w.status == "complete" for w in self.works.values() if not w.killed)
            for wid in ids:
                w = self.works.get(wid)
                if w is None or w.status != "complete":
                    return False
            return True

        def hopeless() -> bool:
            return ids is not None and any(
                (w := self.works.get(wid)) is not None and w.killed and w.status != "complete"
                for wid in ids
            )

        ok = await self.wait_until(lambda: done() or hopeless(), timeout)
        return ok and done()

    # ---------------------------------------------------------------- in-process API: works

    def create_work(self, connector_id: str, name: str = "Enrichment") -> str:
        """Create a work like the platform before publishing a job; return its id."""
        ms = int(time.time() * 1000)
        if ms <= self._last_work_ms:  # keep ids unique and in the platform's exact format
            ms = self._last_work_ms + 1
        self._last_work_ms = ms
        work_id = f"work_{connector_id}_{_iso(ms / 1000)}"
        self.works[work_id] = Work(id=work_id, connector_id=connector_id, name=name)
        self._notify()
        return work_id

    def _alive_work(self, work_id: str) -> Work:
        w = self.works.get(work_id)
        if w is None or w.killed:
            raise WorkNotAlive(work_id)
        return w

    def _complete(self, w: Work, now: float) -> None:
        if w.status != "complete":
            w.status = "complete"
            w.completed_time = now

    def add_expectations(self, work_id: str, n: int) -> None:
        w = self._alive_work(work_id)
        w.expected += int(n)
        w.updated_time = time.time()
        self._notify()

    def report_expectation(self, work_id: str, error: dict[str, Any] | None = None) -> None:
        """One imported item (what the worker reports); raises WorkNotAlive."""
        w = self._alive_work(work_id)
        now = time.time()
        w.processed += 1
        w.updated_time = now
        if error:
            if len(w.errors) < 100:
                w.errors.append(
                    {
                        "timestamp": now,
                        "message": error.get("error", error.get("message")),
                        "source": error.get("source"),
                    }
                )
        if w.processed >= w.expected:
            self._complete(w, now)
        self._notify()

    def to_received(self, work_id: str, message: str | None = None) -> None:
        w = self._alive_work(work_id)
        now = time.time()
        w.received_time = now
        w.updated_time = now
        w.status = "progress" if w.status != "complete" else w.status
        if message:
            w.messages.append(message)
        self._notify()

    def to_processed(
        self, work_id: str, message: str | None = None, in_error: bool = False
    ) -> None:
        w = self._alive_work(work_id)
        now = time.time()
        w.processed_time = now
        w.updated_time = now
        if in_error:
            w.in_error = True
            if len(w.errors) < 100:
                w.errors.append({"timestamp": now, "message": message, "source": None})
        elif message:
            w.messages.append(message)
        if w.processed >= w.expected:
            self._complete(w, now)
        self._notify()

    def kill_work(self, work_id: str) -> None:
        """Delete the work on the platform side: later work calls get WORK_NOT_ALIVE."""
        w = self.works.get(work_id)
        if w is not None:  # an unknown work is already "not alive"
            w.killed = True
            self._notify()

    def works_by_status(self) -> dict[str, int]:
        out: dict[str, int] = {"wait": 0, "progress": 0, "complete": 0}
        killed = 0
        for w in self.works.values():
            if w.killed:
                killed += 1
            else:
                out[w.status] = out.get(w.status, 0) + 1
        if killed:
            out["killed"] = killed
        return out

    # ---------------------------------------------------------------- in-process API: connectors

    def _prefix(self) -> str:
        p = self.config.queue_prefix
        return f"{p}_" if p else ""

    def _names(self, connector_id: str) -> dict[str, str]:
        p = self._prefix()
        return {
            "listen": f"{p}listen_{connector_id}",
            "listen_routing": f"{p}listen_routing_{connector_id}",
            "listen_exchange": f"{p}amqp.connector.exchange",
            "push": f"{p}push_{connector_id}",
            "push_routing": f"{p}push_routing_{connector_id}",
            "push_exchange": f"{p}amqp.worker.exchange",
            "dead_letter_routing": f"{p}listen_routing_too-large-bundle",
        }

    def registration(self, connector_id: str) -> dict[str, Any]:
        """The ``config`` block of the registration answer for that connector."""
        rec = self.connectors.get(connector_id)
        names = rec.names if rec is not None and rec.names else self._names(connector_id)
        c = self.config
        return {
            "connection": {
                "host": c.rabbit_host,
                "vhost": c.rabbit_vhost,
                "use_ssl": c.rabbit_use_ssl,
                "port": c.rabbit_port,
                "user": c.rabbit_user,
                "pass": c.rabbit_pass,
            },
            "s3": {
                "endpoint": "127.0.0.1",
                "port": 9000,
                "use_ssl": False,
                "bucket_name": "opencti-bucket",
                "bucket_region": "us-east-1",
                "access_key": "sim-access-key",
                "secret_key": "sim-secret-key",
            },
            "listen": names["listen"],
            "listen_routing": names["listen_routing"],
            "listen_exchange": names["listen_exchange"],
            "listen_callback_uri": rec.listen_callback_uri if rec is not None else None,
            "push": names["push"],
            "push_routing": names["push_routing"],
            "push_exchange": names["push_exchange"],
            "dead_letter_routing": names["dead_letter_routing"],
        }

    def reset_state(self, connector_id: str) -> None:
        """Admin "reset state": the next ping stores and returns ``connector_state: ""``."""
        rec = self.connectors.get(connector_id)
        if rec is None:
            raise KeyError(connector_id)
        rec.state_reset_pending = True

    def queue_arguments(self, rec: ConnectorRecord, push: bool = False) -> dict[str, Any]:
        """The arguments the platform declares the connector queues with."""
        args: dict[str, Any] = {
            "name": rec.name,
            "config": {"id": rec.id, "type": rec.type, "scope": list(rec.scope)},
            "x-queue-type": self.config.queue_type,
        }
        if push and rec.push_queue_max_length is not None:
            args["x-max-length"] = rec.push_queue_max_length
            args["x-overflow"] = "reject-publish"
        return args

    async def _channel(self) -> aio_pika.abc.AbstractChannel:
        if self._amqp is None:
            raise RuntimeError("no broker connection")
        ch = self._amqp_channel
        if ch is None or ch.is_closed:
            ch = await self._amqp.channel(publisher_confirms=True)
            self._amqp_channel = ch
        return ch

    async def declare_connector_queues(self, connector_id: str) -> None:
        """Assert exchanges, queues and bindings exactly like the platform does."""
        rec = self.connectors[connector_id]
        if self._amqp is None:
            return
        n = rec.names
        async with self._amqp_lock:
            try:
                ch = await self._channel()
                cx = await ch.declare_exchange(
                    n["listen_exchange"], aio_pika.ExchangeType.DIRECT, durable=True, timeout=10
                )
                wx = await ch.declare_exchange(
                    n["push_exchange"], aio_pika.ExchangeType.DIRECT, durable=True, timeout=10
                )
                lq = await ch.declare_queue(
                    n["listen"],
                    durable=True,
                    exclusive=False,
                    auto_delete=False,
                    arguments=self.queue_arguments(rec),
                    timeout=10,
                )
                pq = await ch.declare_queue(
                    n["push"],
                    durable=True,
                    exclusive=False,
                    auto_delete=False,
                    arguments=self.queue_arguments(rec, push=True),
                    timeout=10,
                )
                await lq.bind(cx, routing_key=n["listen_routing"], timeout=10)
                await pq.bind(wx, routing_key=n["push_routing"], timeout=10)
                self._declared_queues.update((n["listen"], n["push"]))
            except Exception as exc:
                self.amqp_errors.append(f"{type(exc).__name__}: {exc}")
                self._amqp_channel = None
                raise

    async def delete_connector_queues(self, connector_id: str | None = None) -> None:
        """Delete the listen/push queues declared for one connector (default: all of them)."""
        if self._amqp is None:
            return
        if connector_id is None:
            names = sorted(self._declared_queues)
        else:
            rec = self.connectors.get(connector_id)
            n = rec.names if rec is not None and rec.names else self._names(connector_id)
            names = [n["listen"], n["push"]]
        async with self._amqp_lock:
            for name in names:
                try:
                    ch = await self._channel()
                    await ch.queue_delete(name, timeout=10)
                except Exception as exc:  # absent queue closes the channel
                    log.debug("queue_delete %s: %s", name, exc)
                    self._amqp_channel = None
                self._declared_queues.discard(name)

    # ---------------------------------------------------------------- in-process API: entities

    def put_entity(self, stix_entity: dict[str, Any], draft_id: str | None = None) -> None:
        """Store a platform-style STIX entity (§3.3), readable by standard and internal id."""
        sid = stix_entity["id"]
        key_draft = draft_id or None
        self._entities[(key_draft, sid)] = stix_entity
        node = self._build_node(stix_entity)
        self._nodes[(key_draft, sid)] = node
        self._nodes[(key_draft, node["id"])] = node

    def put_file(self, file_id: str, content: bytes) -> None:
        self.files[file_id] = content

    def get_entity(self, entity_id: str, draft_id: str | None = None) -> dict[str, Any] | None:
        """The GraphQL node for an entity (draft store first, then live), or None."""
        if draft_id:
            node = self._nodes.get((draft_id, entity_id))
            if node is not None:
                return node
        return self._nodes.get((None, entity_id))

    def _identity_node(self, ref: str) -> dict[str, Any]:
        ent = self._entities.get((None, ref)) or {}
        cls = ent.get("identity_class", "organization")
        etype = {"organization": "Organization", "individual": "Individual"}.get(cls, "Identity")
        ext = (ent.get("extensions") or {}).get(STIX_EXT_OCTI) or {}
        return {
            "id": ext.get("id") or _derived_id(ref),
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

    def _marking_node(self, ref: str) -> dict[str, Any]:
        tlp = TLP_MARKINGS.get(ref)
        if tlp is not None:
            dtype, definition, order, color = tlp
        else:
            ent = self._entities.get((None, ref)) or {}
            dtype = str(ent.get("definition_type") or "statement").upper()
            definition = str(ent.get("name") or ref)
            order, color = 0, "#ffffff"
        return {
            "id": _derived_id(ref),
            "standard_id": ref,
            "entity_type": "Marking-Definition",
            "definition_type": dtype,
            "definition": definition,
            "created": "2017-01-20T00:00:00.000Z",
            "modified": "2017-01-20T00:00:00.000Z",
            "x_opencti_order": order,
            "x_opencti_color": color,
        }

    def _build_node(self, e: dict[str, Any]) -> dict[str, Any]:
        exts = e.get("extensions") or {}
        octi = exts.get(STIX_EXT_OCTI) or {}
        sco = exts.get(STIX_EXT_OCTI_SCO) or {}
        stype = str(e["type"])
        sid = str(e["id"])
        entity_type = octi.get("type") or _STIX_TO_ENTITY_TYPE.get(stype) or stype.title()
        internal_id = octi.get("id") or _derived_id(sid)
        now_iso = _iso(time.time())
        granted = octi.get("granted_refs") or e.get("x_opencti_granted_refs") or []
        granted_ids = octi.get("granted_refs_ids") or []
        orgs = []
        for i, ref in enumerate(granted):
            org = self._entities.get((None, ref)) or {}
            orgs.append(
                {
                    "id": granted_ids[i] if i < len(granted_ids) else _derived_id(ref),
                    "standard_id": ref,
                    "name": org.get("name") or f"Organization {ref[-12:]}",
                }
            )
        labels = sco.get("labels") or e.get("labels") or []
        score = sco.get("score", e.get("score"))
        created_by = sco.get("created_by_ref") or e.get("created_by_ref")
        ext_refs = sco.get("external_references") or e.get("external_references") or []
        files = octi.get("files") or []
        node: dict[str, Any] = {
            "id": internal_id,
            "standard_id": sid,
            "entity_type": entity_type,
            "parent_types": _PARENT_SCO if stype in _SCO_STIX_TYPES else _PARENT_SDO,
            "spec_version": "2.1",
            "created_at": octi.get("created_at", now_iso),
            "updated_at": octi.get("updated_at", now_iso),
            "objectOrganization": orgs,
            "creators": [{"id": c, "name": "admin"} for c in octi.get("creator_ids") or []],
            "createdBy": self._identity_node(created_by) if created_by else None,
            "objectMarking": [self._marking_node(r) for r in e.get("object_marking_refs") or []],
            "objectLabel": [
                {"id": _derived_id("label:" + lb), "value": lb, "color": "#ff8178"} for lb in labels
            ],
            "externalReferences": {
                "edges": [
                    {
                        "node": {
                            "id": _derived_id("extref:" + orjson.dumps(r).decode()),
                            "standard_id": "external-reference--"
                            + _derived_id(orjson.dumps(r).decode()),
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
                    for r in ext_refs
                ]
            },
            "x_opencti_description": sco.get("description", e.get("description")),
            "x_opencti_score": score,
            "indicators": {"edges": []},
            "importFiles": {
                "edges": [
                    {
                        "node": {
                            "id": str(f.get("uri", "")).removeprefix("/storage/get/"),
                            "name": f.get("name"),
                            "size": len(
                                self.files.get(
                                    str(f.get("uri", "")).removeprefix("/storage/get/"), b""
                                )
                            ),
                            "metaData": {"mimetype": f.get("mime_type"), "version": None},
                            "objectMarking": [
                                self._marking_node(r) for r in f.get("object_marking_refs") or []
                            ],
                        }
                    }
                    for f in files
                ]
            },
        }
        for k, v in e.items():
            if k in _STRUCTURAL_KEYS or k.endswith("_ref") or k.endswith("_refs"):
                continue
            node[k] = v
        hashes = e.get("hashes")
        if isinstance(hashes, dict):
            node["hashes"] = [{"algorithm": a, "hash": h} for a, h in hashes.items()]
        if stype == "file":
            node.setdefault("extensions", None)
            node["x_opencti_additional_names"] = sco.get("additional_names")
        value = e.get("value")
        if value is None and isinstance(hashes, dict):
            value = next((hashes[a] for a in _HASH_PREFERENCE if a in hashes), None)
        if value is None:
            value = e.get("name")
        node["observable_value"] = value
        return node

    # ---------------------------------------------------------------- HTTP layer

    def _authorized(self, request: web.Request) -> bool:
        auth = request.headers.get("Authorization", "")
        return auth == "Bearer " + self.config.token

    async def _handle_graphql(self, request: web.Request) -> web.StreamResponse:
        ctype = request.content_type
        try:
            if ctype.startswith("multipart/"):
                form = await request.post()
                body = orjson.loads(str(form.get("operations") or "{}"))
            else:
                body = orjson.loads(await request.read())
            query = body["query"]
            variables = body.get("variables") or {}
            if not isinstance(query, str) or not isinstance(variables, dict):
                raise TypeError("bad body")
        except Exception:
            return web.Response(
                status=400,
                body=orjson.dumps({"errors": [{"message": "Invalid GraphQL request body"}]}),
                content_type="application/json",
            )
        canonical, doc_op_name, root = classify_query(query)
        headers = request.headers
        rec = RecordedRequest(
            time=time.time(),
            operation=canonical,
            operation_name=body.get("operationName") or doc_op_name,
            variables=variables,
            draft_id=headers.get("opencti-draft-id"),
            applicant_id=headers.get("opencti-applicant-id"),
            user_agent=headers.get("User-Agent"),
            work_id_header=headers.get("opencti-work-id"),
        )
        self.requests.append(rec)
        self.calls[canonical] += 1

        if self.in_outage:
            rec.outcome = "http_503"
            return web.Response(status=503, text="503 Service Unavailable: platform outage (sim)")
        cfg = self.config
        if cfg.latency_s > 0:
            await asyncio.sleep(cfg.latency_s)
        try:
            if not self._authorized(request):
                raise SimGraphQLError(
                    "AUTH_REQUIRED", "You must be logged in to do this.", 401, "TECHNICAL"
                )
            if rec.work_id_header:
                self._alive_work(rec.work_id_header)
            if (
                cfg.error_rate > 0
                and (cfg.error_scope == "all" or canonical in WORK_MUTATIONS)
                and self._rng.random() < cfg.error_rate
            ):
                raise SimGraphQLError(cfg.error_code, "A database error has occurred (sim)", 500)
            handler = self._handlers.get(canonical)
            if handler is None:
                raise SimGraphQLError(
                    "UNSUPPORTED_ERROR",
                    f"PlatformSim does not implement operation {canonical!r}",
                    500,
                )
            ctx = _Ctx(root, rec.draft_id, rec.applicant_id, rec.work_id_header)
            data = await handler(ctx, variables)
        except SimGraphQLError as err:
            rec.outcome = err.code
            return web.Response(body=orjson.dumps(err.payload()), content_type="application/json")
        except Exception as exc:  # a bug in a handler or bad variables: UNKNOWN_ERROR
            log.exception("PlatformSim handler %s failed", canonical)
            unknown = SimGraphQLError("UNKNOWN_ERROR", f"{type(exc).__name__}: {exc}", 500)
            rec.outcome = unknown.code
            return web.Response(
                body=orjson.dumps(unknown.payload()), content_type="application/json"
            )
        return web.Response(body=orjson.dumps({"data": data}), content_type="application/json")

    async def _handle_state(self, request: web.Request) -> web.StreamResponse:
        return web.Response(body=orjson.dumps(self.state()), content_type="application/json")

    async def _handle_file(self, request: web.Request) -> web.StreamResponse:
        if not self._authorized(request):
            return web.Response(status=401, text="Unauthorized")
        content = self.files.get(request.match_info["file_id"])
        if content is None:
            return web.Response(status=404, text="Not found")
        return web.Response(body=content, content_type="application/octet-stream")

    def state(self) -> dict[str, Any]:
        now = time.time()
        return {
            "works_by_status": self.works_by_status(),
            "calls": dict(self.calls),
            "connectors": {
                cid: {
                    "name": c.name,
                    "active": c.active,
                    "deleted": c.deleted,
                    "pings": len(c.pings),
                    "last_ping_age_s": (now - c.pings[-1]) if c.pings else None,
                    "last_seen_age_s": now - c.last_seen,
                    "names": c.names,
                }
                for cid, c in self.connectors.items()
            },
            "playbook_calls": len(self.playbook_calls),
            "requests_recorded": len(self.requests),
            "outage": self.in_outage,
            "amqp_errors": len(self.amqp_errors),
        }

    # ---------------------------------------------------------------- GraphQL operations

    async def _op_health(self, ctx: _Ctx, v: dict[str, Any]) -> Any:
        return {"about": {"version": self.config.platform_version}}

    def _connector_answer(self, rec: ConnectorRecord) -> dict[str, Any]:
        _, _, jwks = _signing_key()
        return {
            "id": rec.id,
            "name": rec.name,
            "active": rec.active,
            "auto": rec.auto,
            "only_contextual": rec.only_contextual,
            "connector_type": rec.type,
            "connector_scope": rec.scope,
            "connector_state": rec.state,
            "connector_queue_details": {"messages_number": 0, "messages_size": 0},
            "connector_info": rec.connector_info,
            "connector_user_id": self.config.connector_user_id,
            "connector_user": {"api_tokens": []},
            "connector_priority_group": None,
            "jwks": jwks,
            "config": self.registration(rec.id),
            "built_in": False,
            "created_at": _iso(rec.registered_time),
            "updated_at": _iso(rec.last_seen),
        }

    async def _op_register(self, ctx: _Ctx, v: dict[str, Any]) -> Any:
        inp = v.get("input")
        if not isinstance(inp, dict):
            raise SimGraphQLError("BAD_USER_INPUT", "Variable $input is required", 400, "BUSINESS")
        allowed = self.config.register_input_fields
        if allowed is not None:
            unknown = sorted(set(inp) - allowed)
            if unknown:
                raise SimGraphQLError(
                    "BAD_USER_INPUT",
                    f'Variable "$input" got invalid value; Field "{unknown[0]}" is not defined '
                    'by type "RegisterConnectorInput".',
                    400,
                    "BUSINESS",
                )
        cid = str(inp.get("id") or "")
        name = str(inp.get("name") or "")
        ctype = str(inp.get("type") or "")
        if not cid or not name.strip() or not ctype:
            raise SimGraphQLError(
                "VALIDATION_ERROR", "Invalid connector registration input", 400, "BUSINESS"
            )
        now = time.time()
        rec = self.connectors.get(cid)
        if rec is None or rec.deleted:
            rec = ConnectorRecord(
                id=cid,
                name=name,
                type=ctype,
                scope=_as_str_list(inp.get("scope")),
                registered_time=now,
                names=self._names(cid),
                push_queue_max_length=self.config.push_queue_max_length,
            )
            self.connectors[cid] = rec
        rec.name = name
        rec.type = ctype
        rec.scope = _as_str_list(inp.get("scope"))
        rec.auto = bool(inp.get("auto") or False)
        rec.auto_update = bool(inp.get("auto_update") or False)
        rec.playbook_compatible = bool(inp.get("playbook_compatible") or False)
        rec.enrichment_resolution = inp.get("enrichment_resolution")
        rec.only_contextual = bool(inp.get("only_contextual") or False)
        rec.listen_callback_uri = inp.get("listen_callback_uri")
        rec.version = inp.get("version")
        rec.slug = inp.get("slug")
        rec.input = dict(inp)
        rec.register_count += 1
        rec.last_seen = now
        try:
            await self.declare_connector_queues(cid)
        except Exception as exc:
            raise SimGraphQLError(
                "UNKNOWN_ERROR", f"Cannot register connector queues: {exc}", 500
            ) from exc
        self._notify()
        return {"registerConnector": self._connector_answer(rec)}

    async def _op_ping(self, ctx: _Ctx, v: dict[str, Any]) -> Any:
        cid = str(v.get("id") or "")
        rec = self.connectors.get(cid)
        if rec is None or rec.deleted:
            raise SimGraphQLError(
                "FUNCTIONAL_ERROR",
                "No connector found with the specified ID",
                400,
                "BUSINESS",
                {"id": cid},
            )
        with contextlib.suppress(Exception):  # logged in amqp_errors; the ping still succeeds
            await self.declare_connector_queues(cid)
        now = time.time()
        rec.pings.append(now)
        rec.last_seen = now
        if rec.state_reset_pending:
            rec.state_reset_pending = False
            rec.state = ""
        else:
            rec.state = v.get("state")
        info = v.get("connectorInfo")
        if isinstance(info, dict):
            rec.connector_info = info
        self._notify()
        return {
            "pingConnector": {
                "id": rec.id,
                "connector_state": rec.state,
                "connector_info": rec.connector_info,
            }
        }

    async def _op_delete_connector(self, ctx: _Ctx, v: dict[str, Any]) -> Any:
        cid = str(v.get("id") or "")
        rec = self.connectors.get(cid)
        if rec is not None:
            rec.deleted = True
        self._notify()
        return {"deleteConnector": cid}

    async def _op_get_connector(self, ctx: _Ctx, v: dict[str, Any]) -> Any:
        rec = self.connectors.get(str(v.get("id") or ""))
        if rec is None or rec.deleted:
            return {"connector": None}
        return {"connector": self._connector_answer(rec)}

    async def _op_connectors_for_worker(self, ctx: _Ctx, v: dict[str, Any]) -> Any:
        return {
            "connectorsForWorker": [
                self._connector_answer(r) for r in self.connectors.values() if not r.deleted
            ]
        }

    async def _op_read_sco(self, ctx: _Ctx, v: dict[str, Any]) -> Any:
        entity_id = str(v.get("id") or "")
        node = self.get_entity(entity_id, ctx.draft_id)
        if node is not None and ctx.root == "stixCyberObservable":
            if "Stix-Cyber-Observable" not in node["parent_types"]:
                node = None
        # one handler for both root fields: answer under the field that was asked
        return {ctx.root: node}

    async def _op_nested_refs(self, ctx: _Ctx, v: dict[str, Any]) -> Any:
        return {
            "stixNestedRefRelationships": {
                "edges": [],
                "pageInfo": {
                    "startCursor": "",
                    "endCursor": "",
                    "hasNextPage": False,
                    "hasPreviousPage": False,
                    "globalCount": 0,
                },
            }
        }

    @staticmethod
    def _work_id(v: dict[str, Any]) -> str:
        return str(v.get("id") or "")

    async def _op_to_received(self, ctx: _Ctx, v: dict[str, Any]) -> Any:
        wid = self._work_id(v)
        self.to_received(wid, v.get("message"))
        return {"workEdit": {"toReceived": wid}}

    async def _op_add_expectations(self, ctx: _Ctx, v: dict[str, Any]) -> Any:
        wid = self._work_id(v)
        self.add_expectations(wid, int(v.get("expectations") or 0))
        return {"workEdit": {"addExpectations": wid}}

    async def _op_report_expectation(self, ctx: _Ctx, v: dict[str, Any]) -> Any:
        wid = self._work_id(v)
        err = v.get("error")
        self.report_expectation(wid, err if isinstance(err, dict) else None)
        return {"workEdit": {"reportExpectation": wid}}

    async def _op_to_processed(self, ctx: _Ctx, v: dict[str, Any]) -> Any:
        wid = self._work_id(v)
        self.to_processed(wid, v.get("message"), bool(v.get("inError") or False))
        return {"workEdit": {"toProcessed": wid}}

    async def _op_ping_work(self, ctx: _Ctx, v: dict[str, Any]) -> Any:
        wid = self._work_id(v)
        w = self._alive_work(wid)
        w.pings += 1
        w.updated_time = time.time()
        return {"workEdit": {"ping": wid}}

    async def _op_add_draft_context(self, ctx: _Ctx, v: dict[str, Any]) -> Any:
        wid = self._work_id(v)
        w = self._alive_work(wid)
        w.draft_context = v.get("draftContext")
        return {"workEdit": {"addDraftContext": wid}}

    async def _op_work_add(self, ctx: _Ctx, v: dict[str, Any]) -> Any:
        wid = self.create_work(str(v.get("connectorId") or ""), v.get("friendlyName") or "Work")
        return {"workAdd": {"id": wid}}

    async def _op_is_work_alive(self, ctx: _Ctx, v: dict[str, Any]) -> Any:
        w = self.works.get(self._work_id(v))
        return {"isWorkAlive": w is not None and not w.killed}

    async def _op_playbook_step(self, ctx: _Ctx, v: dict[str, Any]) -> Any:
        keys = (
            "execution_id",
            "event_id",
            "execution_start",
            "data_instance_id",
            "playbook_id",
            "previous_step_id",
            "step_id",
            "previous_bundle",
            "bundle",
        )
        call: dict[str, Any] = {k: v.get(k) for k in keys}
        problems = [f"missing variable {k}" for k in keys if not v.get(k)]
        parsed: Any = None
        try:
            parsed = orjson.loads(v.get("bundle") or "")
            orjson.loads(v.get("previous_bundle") or "")
        except orjson.JSONDecodeError as exc:
            call.update(valid=False, problems=[*problems, f"invalid JSON: {exc}"], parsed=None)
            call["applicant_id"], call["time"] = ctx.applicant_id, time.time()
            self.playbook_calls.append(call)
            self._notify()
            raise SimGraphQLError("FUNCTIONAL_ERROR", f"Invalid bundle JSON: {exc}", 400) from exc
        problems.extend(_check_stix_bundle(parsed, v.get("data_instance_id")))
        call.update(valid=not problems, problems=problems, parsed=parsed)
        call["applicant_id"], call["time"] = ctx.applicant_id, time.time()
        self.playbook_calls.append(call)
        self._notify()
        if problems and self.config.strict_playbook:
            raise SimGraphQLError(
                "VALIDATION_ERROR",
                "Invalid playbook bundle: " + "; ".join(problems),
                400,
                "BUSINESS",
            )
        return {"playbookStepExecution": True}

    async def _op_bundle_push(self, ctx: _Ctx, v: dict[str, Any]) -> Any:
        """``stixBundlePush`` (pycti "api" queue protocol): forward the bundle to the push queue."""
        cid = str(v.get("connectorId") or "")
        raw = v.get("bundle")
        try:
            bundle = orjson.loads(raw or "")
            if bundle.get("type") != "bundle" or not bundle.get("objects"):
                raise ValueError("not a bundle")
        except Exception as exc:
            raise SimGraphQLError("UNSUPPORTED_ERROR", "Invalid bundle", 500) from exc
        rec = self.connectors.get(cid)
        if rec is None:
            raise SimGraphQLError("FUNCTIONAL_ERROR", "No connector found", 400, "BUSINESS")
        work_id = v.get("work_id")
        if not work_id:
            work_id = self.create_work(cid, "Bundle push")
            if len(bundle["objects"]) == 1:
                self.add_expectations(work_id, 1)
        message = {
            "type": "bundle",
            "applicant_id": self.config.connector_user_id,
            "content": base64.b64encode(str(raw).encode()).decode(),
            "work_id": work_id,
            "update": True,
        }
        self.bundle_pushes.append({"connector_id": cid, "work_id": work_id, "bundle": bundle})
        if self._amqp is not None:
            async with self._amqp_lock:
                ch = await self._channel()
                ex = await ch.get_exchange(rec.names["push_exchange"], ensure=False)
                await ex.publish(
                    aio_pika.Message(
                        orjson.dumps(message),
                        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                        content_encoding="utf-8",
                    ),
                    routing_key=rec.names["push_routing"],
                )
        self._notify()
        return {"stixBundlePush": True}


def _check_stix_bundle(bundle: Any, instance_id: Any) -> list[str]:
    """Problems of a playbook output bundle (empty list when fine)."""
    problems: list[str] = []
    if not isinstance(bundle, dict) or bundle.get("type") != "bundle":
        return ["bundle is not a STIX bundle object"]
    objects = bundle.get("objects") or []
    if not any(isinstance(o, dict) and o.get("id") == instance_id for o in objects):
        problems.append(f"bundle lacks the data instance {instance_id}")
    try:
        import stix2

        stix2.parse(bundle, allow_custom=True, version="2.1")
    except Exception as exc:
        problems.append(f"stix2 cannot parse the bundle: {type(exc).__name__}: {exc}")
    return problems
