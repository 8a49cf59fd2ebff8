"""Everything spoken to OpenCTI over GraphQL, configured by pycti's ``OpenCTIApiClient``.

pycti builds the connection: URL, ``Authorization``, ``User-Agent: pycti/<version>``,
``OPENCTI_CUSTOM_HEADERS``, TLS verification, client certificate, proxies. Two transports use it:

* the per-job work reports (``toReceived``, ``addExpectations``, ``toProcessed``, ``ping``) go
  out on the event loop through one pooled aiohttp session with exactly pycti's request (same
  URL, headers, GraphQL documents and variables). Sent through pycti's synchronous ``requests``
  in a thread pool, every job would pay for GIL hand-offs between the pool and the loop;
* everything else (registration, heartbeat, the queue-threshold check, playbook steps, entity
  reads) runs through pycti's own ``requests`` session in this module's bounded thread pool,
  never on the event loop.

Per-job context (the draft id) travels with each call as a header of that request only: nothing
per job is ever set on the shared pycti client, whose headers are global. We post the documents
ourselves instead of calling ``api.work.*`` because those helpers swallow errors (a failed
``addExpectations`` would be invisible) and only take global headers.
"""

from __future__ import annotations

import asyncio
import logging
import os
import ssl
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Final, NamedTuple, Protocol, TypeVar

import aiohttp
import orjson

from lis_async.broker.connection import AmqpParams
from lis_async.enrichment.job import PlaybookContext
from lis_async.enrichment.ports import PlatformHealthPort
from lis_async.errors import PlatformAuthError, PlatformError, PlatformUnavailable, WorkNotAlive
from lis_async.settings.model import Settings

log = logging.getLogger("lis_async.platform")
T = TypeVar("T")

# The oldest OpenCTI whose schema knows every field this connector sends and selects
# (docs/protocol.md §2.1); pyproject.toml's pycti floor is the same version.
OPENCTI_FLOOR: Final = "6.8.9"

# Only what the connector reads (docs/protocol.md §2.1): an older schema answers any field it
# lacks with GRAPHQL_VALIDATION_FAILED, and nothing runs.
Q_REGISTER: Final = """
    mutation RegisterConnector($input: RegisterConnectorInput) {
        registerConnector(input: $input) {
            connector_user_id
            config {
                connection { host vhost use_ssl port user pass }
                listen listen_routing listen_exchange
                push push_routing push_exchange
            }
        }
    }
"""
Q_PING: Final = """
    mutation PingConnector($id: ID!, $state: String, $connectorInfo: ConnectorInfoInput) {
        pingConnector(id: $id, state: $state, connectorInfo: $connectorInfo) {
            id
            connector_state
            connector_info {
                run_and_terminate buffering queue_threshold queue_messages_size
                next_run_datetime last_run_datetime
            }
        }
    }
"""
# pycti's connector.read, reduced to what check_connector_buffering reads (docs/protocol.md §2.3).
Q_QUEUE_DETAILS: Final = """
    query GetConnector($id: String!) {
        connector(id: $id) { id connector_queue_details { messages_number messages_size } }
    }
"""
Q_TO_RECEIVED: Final = """
    mutation workToReceived($id: ID!, $message: String) {
        workEdit(id: $id) { toReceived (message: $message) }
    }
"""
Q_ADD_EXPECTATIONS: Final = """
    mutation addExpectations($id: ID!, $expectations: Int) {
        workEdit(id: $id) { addExpectations(expectations: $expectations) }
    }
"""
Q_TO_PROCESSED: Final = """
    mutation workToProcessed($id: ID!, $message: String, $inError: Boolean) {
        workEdit(id: $id) { toProcessed (message: $message, inError: $inError) }
    }
"""
Q_WORK_TRACKING: Final = """
    query WorkTracking($id: ID!) {
        work(id: $id) { id status tracking { import_expected_number import_processed_number } }
    }
"""
Q_PING_WORK: Final = """
    mutation pingWork($id: ID!) { workEdit(id: $id) { ping } }
"""
Q_PLAYBOOK_STEP: Final = """
    mutation PlaybookStepExecution($execution_id: ID!, $event_id: ID!, $execution_start: DateTime!,
        $data_instance_id: ID!, $playbook_id: ID!, $previous_step_id: ID!, $step_id: ID!,
        $previous_bundle: String!, $bundle: String!) {
        playbookStepExecution(execution_id: $execution_id, event_id: $event_id,
            execution_start: $execution_start, data_instance_id: $data_instance_id,
            playbook_id: $playbook_id, previous_step_id: $previous_step_id, step_id: $step_id,
            previous_bundle: $previous_bundle, bundle: $bundle)
    }
"""
Q_READ_OBSERVABLE: Final = """
    query StixCyberObservable($id: String!) {
        stixCyberObservable(id: $id) {
            id standard_id entity_type observable_value
            objectMarking { standard_id definition_type definition x_opencti_order }
            objectOrganization { standard_id }
            ... on DomainName { value }
            ... on Hostname { value }
            ... on Url { value }
            ... on StixFile { name hashes { algorithm hash } }
        }
    }
"""
# pycti's MarkingDefinition.read document, with the fields the gate needs (docs/protocol.md §8.6).
Q_READ_MARKING: Final = """
    query MarkingDefinition($id: String!) {
        markingDefinition(id: $id) {
            id standard_id definition_type definition x_opencti_order
        }
    }
"""
# pycti's ConnectorInfo of a connector that never buffers; queue_threshold is the setting's,
# buffering and queue_messages_size the queue threshold's last check (Platform.info_source).
CONNECTOR_INFO: Final = {
    "run_and_terminate": False,
    "buffering": False,
    "queue_threshold": 500.0,
    "queue_messages_size": 0.0,
    "next_run_datetime": None,
    "last_run_datetime": None,
}
_FATAL_CODES: Final = frozenset({"AUTH_FAILURE", "AUTH_REQUIRED", "FORBIDDEN_ACCESS"})
# The document or its variables do not fit the platform's schema: the same request can never
# succeed, so it is not retried (docs/protocol.md §8.4).
_SCHEMA_CODES: Final = frozenset(
    {"GRAPHQL_VALIDATION_FAILED", "GRAPHQL_PARSE_FAILED", "BAD_USER_INPUT"}
)


#: pycti: ``queue_messages_size_mo = queue_messages_size_byte / 1000000`` (decimal MB).
BYTES_PER_MB: Final = 1_000_000


class QueueDetails(NamedTuple):
    """The platform's ``connector_queue_details`` of this connector."""

    messages: int  # messages_number
    size_bytes: int  # messages_size

    @property
    def size_mb(self) -> float:
        return self.size_bytes / BYTES_PER_MB


class _Session(Protocol):
    """The ``requests.Session`` pycti holds (the part used here)."""

    trust_env: bool

    def post(self, url: str, **kwargs: Any) -> Any: ...
    def mount(self, prefix: str, adapter: Any) -> None: ...
    def close(self) -> None: ...


class PyctiClient(Protocol):
    """The part of pycti's ``OpenCTIApiClient`` this module uses: its connection settings
    (URL, headers with the token and ``User-Agent``, TLS, proxies, timeout) and its session."""

    api_url: str
    request_headers: dict[str, str]
    session: _Session
    ssl_verify: bool | str
    cert: str | tuple[str, str] | None
    proxies: dict[str, str] | None


@dataclass(frozen=True, slots=True)
class Registration:
    connector_user_id: str | None
    listen: str
    listen_exchange: str
    listen_routing: str
    push: str
    push_exchange: str
    push_routing: str
    amqp: AmqpParams


def _error_from(body: Mapping[str, Any]) -> PlatformError:
    errors = body.get("errors") or [{}]
    first = errors[0] if isinstance(errors[0], Mapping) else {}
    ext = first.get("extensions") or {}
    code = str(first.get("name") or ext.get("code") or "UNKNOWN_ERROR")
    message = str(first.get("message") or "GraphQL error")[:500]
    text = f"{code}: {message}"
    if code == "WORK_NOT_ALIVE":
        return WorkNotAlive(text)
    if code in _FATAL_CODES:
        return PlatformAuthError(text, code=code)
    if code in _SCHEMA_CODES:
        return PlatformError(text, code=code, retriable=False)
    # Anything else (lock, database, validation hiccups): retried with back-off, never dropped.
    return PlatformError(text, code=code, retriable=True)


class Platform:
    """The OpenCTI platform, as seen by this connector (implements
    :class:`~lis_async.enrichment.ports.PlatformPort`, plus registration and the heartbeat). One per
    process; ``start`` and ``close`` are idempotent."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._pool = ThreadPoolExecutor(
            max_workers=settings.opencti.threads, thread_name_prefix="opencti"
        )
        self._api: PyctiClient | None = None
        self._http: aiohttp.ClientSession | None = None
        self._proxy: str | None = None
        self.last_heartbeat: float | None = None  # monotonic time of the last successful ping
        self.pings = 0  # heartbeat pings that went through (pycti's ping_api_total)
        self.ping_errors = 0  # ... and that failed (pycti's ping_api_errors_total)
        # What the heartbeat's connectorInfo adds (the queue threshold's buffering and size).
        self.info_source: Callable[[], Mapping[str, Any]] | None = None

    # -- lifecycle -------------------------------------------------------------------------
    async def start(self) -> None:
        if self._api is None:
            self._api = await self._run(self._make_client)
        if self._http is None:
            self._http = self._make_session(self._client())

    def _make_session(self, api: PyctiClient) -> aiohttp.ClientSession:
        """The aiohttp session for work reports, with pycti's TLS, certificate and proxy."""
        verify = api.ssl_verify
        ssl_opt: ssl.SSLContext | bool = False
        if verify is not False:
            ssl_opt = ssl.create_default_context(cafile=verify if isinstance(verify, str) else None)
            if api.cert:
                cert = (api.cert,) if isinstance(api.cert, str) else tuple(api.cert)
                ssl_opt.load_cert_chain(*cert)
        proxies = api.proxies or {}
        self._proxy = proxies.get("https" if api.api_url.startswith("https") else "http")
        return aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=4 * self._settings.opencti.threads, ssl=ssl_opt),
            timeout=aiohttp.ClientTimeout(total=self._settings.opencti.timeout_s),
            trust_env=False,  # the environment's proxy was resolved once by _make_client
        )

    def _make_client(self) -> PyctiClient:
        from pycti import OpenCTIApiClient  # heavy import, kept off the module import path

        o = self._settings.opencti
        level = self._settings.connector.log_level
        try:
            # Only arguments every supported pycti has (6.8.9 has no requests_timeout: the
            # timeout goes with each request instead).
            api = OpenCTIApiClient(
                o.url,
                o.token.get_secret_value(),
                log_level="warning" if level == "debug" else level,
                ssl_verify=o.ssl_verify,
                # Never pycti's JSON set-up: it replaces the root handler (basicConfig with
                # force=True), dropping ours; ours writes pycti's records in pycti's format
                # already (lis_async/ops/logs.py, docs/telemetry.md).
                json_logging=False,
                custom_headers=o.custom_headers.get_secret_value() if o.custom_headers else None,
                perform_health_check=False,
            )
        except Exception as exc:
            raise PlatformError(f"cannot create the OpenCTI client: {type(exc).__name__}") from None
        # The environment's proxy and CA bundle are resolved once, here: with trust_env,
        # requests scans os.environ on every call (a measurable share of the worker's CPU).
        import requests.adapters
        import requests.utils

        if not api.proxies:
            api.proxies = requests.utils.get_environ_proxies(api.api_url) or None
        ca_bundle = os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get("CURL_CA_BUNDLE")
        if api.ssl_verify is True and ca_bundle:
            api.ssl_verify = ca_bundle
        api.session.trust_env = False
        # Connection pool sized to the thread pool: every thread can hold a connection.

        adapter = requests.adapters.HTTPAdapter(
            pool_connections=2, pool_maxsize=self._settings.opencti.threads
        )
        api.session.mount("http://", adapter)
        api.session.mount("https://", adapter)
        client: PyctiClient = api
        return client

    async def close(self) -> None:
        http, self._http = self._http, None
        if http is not None:
            await http.close()
        api, self._api = self._api, None
        if api is not None:
            await asyncio.get_running_loop().run_in_executor(self._pool, api.session.close)
        self._pool.shutdown(wait=False, cancel_futures=True)

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    # -- transport -------------------------------------------------------------------------
    def _client(self) -> PyctiClient:
        api = self._api
        if api is None:
            raise PlatformError("platform client is not started")
        return api

    def _headers(self, draft_id: str | None) -> dict[str, str]:
        headers = dict(self._client().request_headers)
        headers.pop("opencti-applicant-id", None)
        headers["Content-Type"] = "application/json"
        if draft_id is not None:
            headers["opencti-draft-id"] = draft_id
        return headers

    @staticmethod
    def _decode(status: int, content: bytes) -> Any:
        """pycti's reading of an answer: non-200 and GraphQL errors raise, else ``data``."""
        if status != 200:
            text = content[:200].decode("utf-8", "replace").replace("\n", " ")
            if "WORK_NOT_ALIVE" in text:
                raise WorkNotAlive()
            schema_error = Platform._schema_error(content)
            if schema_error is not None:  # Apollo alone answers validation errors with 400
                raise schema_error
            raise PlatformUnavailable(f"OpenCTI answered HTTP {status}: {text}")
        try:
            body = orjson.loads(content)
        except orjson.JSONDecodeError:
            raise PlatformError("OpenCTI answered a non-JSON body") from None
        if not isinstance(body, Mapping):
            raise PlatformError("OpenCTI answered an unexpected body")
        if body.get("errors"):
            raise _error_from(body)
        return body.get("data")

    @staticmethod
    def _schema_error(content: bytes) -> PlatformError | None:
        try:
            body = orjson.loads(content)
        except orjson.JSONDecodeError:
            return None
        if not isinstance(body, Mapping) or not isinstance(body.get("errors"), list):
            return None
        err = _error_from(body)
        return err if err.code in _SCHEMA_CODES else None

    def _post(self, query: str, variables: Mapping[str, Any], draft_id: str | None) -> Any:
        """Through pycti's ``requests`` session (run in the thread pool)."""
        headers = self._headers(draft_id)
        api = self._client()
        try:
            resp = api.session.post(
                api.api_url,
                data=orjson.dumps({"query": query, "variables": variables}),
                headers=headers,
                verify=api.ssl_verify,
                cert=api.cert,
                proxies=api.proxies,
                timeout=self._settings.opencti.timeout_s,
            )
        except Exception as exc:  # requests' errors: transport, retriable
            raise PlatformUnavailable(f"OpenCTI unreachable: {type(exc).__name__}") from None
        return self._decode(resp.status_code, resp.content)

    async def _post_async(
        self, query: str, variables: Mapping[str, Any], draft_id: str | None
    ) -> Any:
        """The same request on the event loop (work reports, the per-job hot path)."""
        headers = self._headers(draft_id)
        http = self._http
        if http is None:
            raise PlatformError("platform client is not started")
        try:
            async with http.post(
                self._client().api_url,
                data=orjson.dumps({"query": query, "variables": variables}),
                headers=headers,
                proxy=self._proxy,
            ) as resp:
                status, content = resp.status, await resp.read()
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise PlatformUnavailable(f"OpenCTI unreachable: {type(exc).__name__}") from None
        return self._decode(status, content)

    async def query(
        self, query: str, variables: Mapping[str, Any], draft_id: str | None = None
    ) -> Any:
        return await self._run(self._post, query, variables, draft_id)

    # -- connector -------------------------------------------------------------------------
    async def probe(self) -> None:
        """The cheapest call that shows the platform answers (the health gate's probe)."""
        await self._post_async("query { about { version } }", {}, None)

    async def about(self) -> str:
        data = await self.query("query { about { version } }", {})
        return str(((data or {}).get("about") or {}).get("version", "?"))

    async def register(self) -> Registration:
        c = self._settings.connector
        # Null optional fields are omitted, not sent as null (older schemas reject unknown
        # fields, docs/protocol.md §2.1).
        connector_input = {
            "id": c.id,
            "name": c.name,
            "type": c.type,
            "scope": list(c.scope),
            "auto": c.auto,
            "auto_update": c.auto_update,
            "only_contextual": False,
            "playbook_compatible": True,
            "enrichment_resolution": c.enrichment_resolution,
        }
        try:
            data = await self.query(Q_REGISTER, {"input": connector_input})
        except PlatformError as exc:
            if exc.code in _SCHEMA_CODES:
                raise PlatformError(
                    f"OpenCTI rejected the registration ({exc}): its schema lacks a field "
                    f"lis-async sends or reads; supported platforms are OpenCTI {OPENCTI_FLOOR} "
                    "and newer",
                    code=exc.code,
                    retriable=False,
                ) from None
            raise
        reg = (data or {}).get("registerConnector")
        if not isinstance(reg, Mapping) or not isinstance(reg.get("config"), Mapping):
            raise PlatformError("registerConnector returned no configuration", retriable=False)
        cfg = reg["config"]
        conn = cfg.get("connection") or {}
        mq = self._settings.mq
        amqp = AmqpParams(
            host=mq.host or str(conn.get("host", "localhost")),
            port=mq.port or int(conn.get("port", 5672)),
            vhost=mq.vhost or str(conn.get("vhost", "/")),
            use_ssl=mq.use_ssl if mq.use_ssl is not None else bool(conn.get("use_ssl", False)),
            user=mq.user or str(conn.get("user", "guest")),
            password=(mq.password.get_secret_value() if mq.password else str(conn.get("pass", ""))),
            tls=mq.tls,
        )
        try:
            return Registration(
                connector_user_id=reg.get("connector_user_id"),
                listen=str(cfg["listen"]),
                listen_exchange=str(cfg["listen_exchange"]),
                listen_routing=str(cfg["listen_routing"]),
                push=str(cfg["push"]),
                push_exchange=str(cfg["push_exchange"]),
                push_routing=str(cfg["push_routing"]),
                amqp=amqp,
            )
        except KeyError as exc:
            raise PlatformError(
                f"registerConnector returned no {exc.args[0]}", retriable=False
            ) from None

    async def ping_connector(self) -> None:
        info = CONNECTOR_INFO | {"queue_threshold": self._settings.connector.queue_threshold}
        if self.info_source is not None:
            info |= self.info_source()
        await self.query(
            Q_PING, {"id": self._settings.connector.id, "state": "null", "connectorInfo": info}
        )
        self.last_heartbeat = time.monotonic()

    async def queue_details(self) -> QueueDetails:
        """The platform's ``connector_queue_details`` of this connector, as pycti's
        ``check_connector_buffering`` reads them. An answer without them (no such connector,
        a null or non-numeric field) is a :class:`~lis_async.errors.PlatformError`."""
        data = await self.query(Q_QUEUE_DETAILS, {"id": self._settings.connector.id})
        node = (data or {}).get("connector")
        details = node.get("connector_queue_details") if isinstance(node, Mapping) else None
        if not isinstance(details, Mapping):
            raise PlatformError("OpenCTI answered no connector_queue_details for this connector")
        figures = [details.get("messages_number"), details.get("messages_size")]
        numbers = [
            int(v) for v in figures if isinstance(v, int | float) and not isinstance(v, bool)
        ]
        if len(numbers) != 2:
            raise PlatformError(
                f"OpenCTI answered connector_queue_details {dict(details)!r}, not two numbers"
            )
        return QueueDetails(*numbers)

    async def heartbeat(self, health: PlatformHealthPort | None = None) -> None:
        """Ping forever: first at once, then every ``connector.heartbeat_interval_s``
        (auto-enrichment only reaches connectors that pinged lately, docs/protocol.md §2.2).
        A ping that finds the platform unavailable closes the health gate too."""
        interval_s = self._settings.connector.heartbeat_interval_s
        while True:
            try:
                await self.ping_connector()
                self.pings += 1
            except PlatformError as exc:
                self.ping_errors += 1
                log.warning("connector heartbeat failed: %s", exc)
                if health is not None and isinstance(exc, PlatformUnavailable):
                    health.unavailable("heartbeat", exc)
            await asyncio.sleep(interval_s)

    # -- works -----------------------------------------------------------------------------
    async def work_received(self, work_id: str, draft_id: str | None) -> None:
        await self._post_async(
            Q_TO_RECEIVED,
            {"id": work_id, "message": "Connector ready to process the operation"},
            draft_id,
        )

    async def add_expectations(self, work_id: str, n: int, draft_id: str | None) -> None:
        await self._post_async(Q_ADD_EXPECTATIONS, {"id": work_id, "expectations": n}, draft_id)

    async def work_processed(
        self, work_id: str, message: str, in_error: bool, draft_id: str | None
    ) -> None:
        await self._post_async(
            Q_TO_PROCESSED, {"id": work_id, "message": message, "inError": in_error}, draft_id
        )

    async def work_expectations(self, work_id: str, draft_id: str | None) -> int:
        """The expectations the work has recorded (its tracking's ``import_expected_number``;
        null until the first ``addExpectations``: 0). A work the platform no longer has is
        :class:`~lis_async.errors.WorkNotAlive`."""
        data = await self._post_async(Q_WORK_TRACKING, {"id": work_id}, draft_id)
        work = (data or {}).get("work")
        if not isinstance(work, Mapping):
            raise WorkNotAlive()
        tracking = work.get("tracking")
        expected = tracking.get("import_expected_number") if isinstance(tracking, Mapping) else 0
        return int(expected) if isinstance(expected, int | float) else 0

    async def ping_work(self, work_id: str, draft_id: str | None) -> None:
        await self._post_async(Q_PING_WORK, {"id": work_id}, draft_id)

    async def playbook_step(
        self, ctx: PlaybookContext, execution_start: str, bundle_json: str
    ) -> None:
        await self.query(
            Q_PLAYBOOK_STEP,
            {
                "execution_id": ctx.execution_id,
                "event_id": ctx.event_id,
                "execution_start": execution_start,
                "playbook_id": ctx.playbook_id,
                "data_instance_id": ctx.data_instance_id,
                "step_id": ctx.step_id,
                "previous_step_id": ctx.previous_step_id,
                "previous_bundle": orjson.dumps(dict(ctx.bundle)).decode(),
                "bundle": bundle_json,
            },
        )

    async def read_observable(
        self, entity_id: str, draft_id: str | None
    ) -> Mapping[str, Any] | None:
        """The platform's ``stixCyberObservable`` record, or None if it cannot be read."""
        data = await self.query(Q_READ_OBSERVABLE, {"id": entity_id}, draft_id)
        obs = (data or {}).get("stixCyberObservable")
        return obs if isinstance(obs, Mapping) else None

    async def read_marking(self, marking_id: str) -> Mapping[str, Any] | None:
        """The platform's ``markingDefinition`` node (standard or internal id), or None when it
        does not know it or the connector's user may not see it (``FORBIDDEN_ACCESS`` here is
        about this marking, not the token: the gate then refuses the observable)."""
        try:
            data = await self.query(Q_READ_MARKING, {"id": marking_id})
        except PlatformAuthError as exc:
            if exc.code != "FORBIDDEN_ACCESS":
                raise
            return None
        node = (data or {}).get("markingDefinition")
        return node if isinstance(node, Mapping) else None
