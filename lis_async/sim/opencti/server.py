"""The simulated platform itself: the aiohttp app and :class:`PlatformSim` composing the parts.

:class:`PlatformSim` owns one of each part and keeps the public API tests, the demo and the
benchmark use (``create_work``, ``put_entity``, ``wait_works``, ``outage_for``, ``state`` …),
delegating to the part in charge. :class:`HttpListener` is the aiohttp runner and socket, which
``set_refuse_connections`` closes and reopens on the same port. Routes:

* ``POST /graphql``: :class:`~lis_async.sim.opencti.endpoint.GraphQLEndpoint`;
* ``GET /_sim/state``: :meth:`PlatformSim.state` as JSON (no token needed);
* ``GET /storage/get/<id>``: file contents stored with ``put_file`` (token needed).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from aiohttp import web

from lis_async.sim.opencti import signing
from lis_async.sim.opencti.bundles import BundleIntake
from lis_async.sim.opencti.changes import ChangeNotifier
from lis_async.sim.opencti.config import ConnectorRecord, PlatformSimConfig, RecordedRequest, Work
from lis_async.sim.opencti.connectors import ConnectorRegistry
from lis_async.sim.opencti.endpoint import GraphQLEndpoint, json_response
from lis_async.sim.opencti.entities import EntityStore
from lis_async.sim.opencti.faults import FaultInjector
from lis_async.sim.opencti.graphql import Handler, RequestContext
from lis_async.sim.opencti.meter import QueueMeter
from lis_async.sim.opencti.queues import BrokerQueues
from lis_async.sim.opencti.works import EarlyCompletion, WorkTracker

__all__ = ["HttpListener", "PlatformSim"]


class HttpListener:
    """The aiohttp runner and its TCP site; the site can be closed and reopened (same port)."""

    def __init__(self) -> None:
        self.base_url = ""
        self._runner: web.AppRunner | None = None
        self._site: web.TCPSite | None = None
        self._host = "127.0.0.1"
        self._port = 0

    @property
    def started(self) -> bool:
        return self._runner is not None

    async def start(self, app: web.Application, host: str, port: int) -> str:
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        self._site = web.TCPSite(self._runner, host, port)
        await self._site.start()
        addr = self._runner.addresses[0]
        self._host, self._port = host, int(addr[1])
        self.base_url = f"http://{host}:{self._port}"
        return self.base_url

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
            self._site = None

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


class PlatformSim:
    """Simulated OpenCTI platform (GraphQL over aiohttp + queue declarations on RabbitMQ)."""

    def __init__(self, config: PlatformSimConfig | None = None) -> None:
        self._config = config or PlatformSimConfig()
        cfg = self._config
        self._changes = ChangeNotifier()
        self._faults = FaultInjector(cfg)
        self._broker = BrokerQueues(cfg)
        self._works = WorkTracker(self._changes, cfg)
        self._connectors = ConnectorRegistry(cfg, self._broker, self._changes)
        self._store = EntityStore()
        self._intake = BundleIntake(cfg, self._connectors, self._works, self._broker, self._changes)
        handlers: dict[str, Handler] = {"healthCheck": self._op_health}
        for part in (self._connectors, self._store, self._works, self._intake):
            handlers.update(part.handlers())
        self._endpoint = GraphQLEndpoint(cfg, self._faults, self._works, handlers)
        self._listener = HttpListener()

    # ---------------------------------------------------------------- recorded state

    @property
    def config(self) -> PlatformSimConfig:
        """The knobs (mutable in place: every part reads them on each request)."""
        return self._config

    @property
    def works(self) -> dict[str, Work]:
        return self._works.works

    @property
    def connectors(self) -> dict[str, ConnectorRecord]:
        return self._connectors.connectors

    @property
    def calls(self) -> collections.Counter[str]:
        """Requests by canonical operation name (pycti's names)."""
        return self._endpoint.calls

    @property
    def requests(self) -> collections.deque[RecordedRequest]:
        return self._endpoint.requests

    @property
    def playbook_calls(self) -> list[dict[str, Any]]:
        return self._intake.playbook_calls

    @property
    def bundle_pushes(self) -> list[dict[str, Any]]:
        return self._intake.bundle_pushes

    @property
    def queue_meter(self) -> QueueMeter:
        """Where ``connector_queue_details`` come from (its ``listings`` count the broker calls)."""
        return self._connectors.meter

    @property
    def amqp_errors(self) -> list[str]:
        """Broker errors seen while declaring (message strings)."""
        return self._broker.errors

    @property
    def files(self) -> dict[str, bytes]:
        """Raw bytes served at ``GET /storage/get/<id>``."""
        return self._store.files

    @property
    def base_url(self) -> str:
        return self._listener.base_url

    @property
    def graphql_url(self) -> str:
        return self.base_url + "/graphql"

    # ---------------------------------------------------------------- lifecycle

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        """Start the HTTP server (and the broker connection); return the base URL."""
        self._changes.bind_loop(asyncio.get_running_loop())
        await self._broker.connect()
        app = web.Application(client_max_size=256 * 1024 * 1024)
        app.router.add_post("/graphql", self._endpoint.handle)
        app.router.add_get("/_sim/state", self._handle_state)
        app.router.add_get("/storage/get/{file_id:.+}", self._handle_file)
        return await self._listener.start(app, host, port)

    async def close(self) -> None:
        if self._config.delete_queues_on_close and self._broker.connected:
            with contextlib.suppress(Exception):
                await self.delete_connector_queues()
        await self._listener.close()
        await self._broker.close()

    async def __aenter__(self) -> PlatformSim:
        if not self._listener.started:
            await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # ---------------------------------------------------------------- faults

    def outage_for(self, seconds: float) -> None:
        """Answer HTTP 503 to every GraphQL call for ``seconds`` (independent of ``outage``)."""
        self._faults.outage_for(seconds)

    @property
    def in_outage(self) -> bool:
        return self._faults.in_outage

    async def set_refuse_connections(self, refuse: bool) -> None:
        """Close (or reopen) the listening socket; open keep-alive connections are dropped."""
        await self._listener.set_refuse_connections(refuse)

    def connector_jwt(self, ttl_s: int = 3600) -> str:
        """A JWT signed with the key published in ``jwks`` (API listen protocol tests).

        Needs the optional packages PyJWT and cryptography.
        """
        return signing.connector_jwt(ttl_s)

    # ---------------------------------------------------------------- waiting

    async def wait_until(
        self,
        predicate: Callable[[], bool],
        timeout: float = 30,  # noqa: ASYNC109 - public API takes a plain timeout
    ) -> bool:
        """Wait (event-driven) until ``predicate()`` is true; False on timeout."""
        return await self._changes.wait_until(predicate, timeout)

    async def wait_works(
        self,
        work_ids: Iterable[str] | None = None,
        timeout: float = 30,  # noqa: ASYNC109 - public API takes a plain timeout
    ) -> bool:
        """True once all given works (default: all non-killed works) are complete.

        Returns False at ``timeout``, or early when one of the given works was killed.
        """
        return await self._works.wait(work_ids, timeout)

    # ---------------------------------------------------------------- works

    def create_work(
        self, connector_id: str, name: str = "Enrichment", multipart: bool = False
    ) -> str:
        """Create a work like the platform before publishing a job; return its id."""
        return self._works.create(connector_id, name, multipart)

    def add_expectations(self, work_id: str, n: int) -> None:
        self._works.add_expectations(work_id, n)

    def report_expectation(self, work_id: str, error: dict[str, Any] | None = None) -> None:
        """One imported item (what the worker reports); raises WorkNotAlive."""
        self._works.report_expectation(work_id, error)

    def to_received(self, work_id: str, message: str | None = None) -> None:
        self._works.to_received(work_id, message)

    def to_processed(
        self, work_id: str, message: str | None = None, in_error: bool = False
    ) -> None:
        self._works.to_processed(work_id, message, in_error)

    def kill_work(self, work_id: str) -> None:
        """Delete the work on the platform side: later work calls get WORK_NOT_ALIVE."""
        self._works.kill(work_id)

    def works_by_status(self) -> dict[str, int]:
        return self._works.by_status()

    def early_completions(
        self, work_ids: Iterable[str] | None = None, imported: Mapping[str, int] | None = None
    ) -> list[EarlyCompletion]:
        """Works ever seen complete while they expected fewer objects than were finally imported.

        The "work reads complete before its objects are imported" defect, found in each work's
        ``history``. ``work_ids`` defaults to every work; ``imported`` (objects finally imported
        per work, e.g. counted by the worker emulation) defaults to each work's final processed
        count. ``str()`` of an entry explains it, history included.
        """
        return self._works.early_completions(work_ids, imported)

    # ---------------------------------------------------------------- connectors and queues

    def registration(self, connector_id: str) -> dict[str, Any]:
        """The ``config`` block of the registration answer for that connector."""
        return self._connectors.registration(connector_id)

    def reset_state(self, connector_id: str) -> None:
        """Admin "reset state": the next ping stores and returns ``connector_state: ""``."""
        self._connectors.reset_state(connector_id)

    def queue_arguments(self, rec: ConnectorRecord, push: bool = False) -> dict[str, Any]:
        """The arguments the platform declares the connector queues with."""
        return self._broker.queue_arguments(rec, push)

    async def declare_connector_queues(self, connector_id: str) -> None:
        """Assert exchanges, queues and bindings exactly like the platform does."""
        await self._broker.declare(self.connectors[connector_id])

    async def delete_connector_queues(self, connector_id: str | None = None) -> None:
        """Delete the listen/push queues declared for one connector (default: all of them)."""
        if not self._broker.connected:
            return
        if connector_id is None:
            names = self._broker.declared_queues
        else:
            n = self._connectors.known_names(connector_id)
            names = [n["listen"], n["push"]]
        await self._broker.delete(names)

    # ---------------------------------------------------------------- entities

    def put_entity(self, stix_entity: dict[str, Any], draft_id: str | None = None) -> None:
        """Store a platform-style STIX entity, readable by standard and internal id."""
        self._store.put_entity(stix_entity, draft_id)

    def put_file(self, file_id: str, content: bytes) -> None:
        self._store.put_file(file_id, content)

    def put_marking(
        self, standard_id: str, definition_type: str, definition: str, order: int = 0
    ) -> None:
        """A custom marking definition, served by ``markingDefinition(id)`` and in entities'
        ``objectMarking``."""
        self._store.put_marking(standard_id, definition_type, definition, order)

    def get_entity(self, entity_id: str, draft_id: str | None = None) -> dict[str, Any] | None:
        """The GraphQL node for an entity (draft store first, then live), or None."""
        return self._store.get_entity(entity_id, draft_id)

    # ---------------------------------------------------------------- HTTP routes

    async def _op_health(self, ctx: RequestContext, v: dict[str, Any]) -> Any:
        return {"about": {"version": self._config.platform_version}}

    async def _handle_state(self, request: web.Request) -> web.StreamResponse:
        return json_response(self.state())

    async def _handle_file(self, request: web.Request) -> web.StreamResponse:
        if not self._endpoint.authorized(request):
            return web.Response(status=401, text="Unauthorized")
        content = self.files.get(request.match_info["file_id"])
        if content is None:
            return web.Response(status=404, text="Not found")
        return web.Response(body=content, content_type="application/octet-stream")

    def state(self) -> dict[str, Any]:
        """A JSON-able summary: works by status, calls, connectors, counters, outage."""
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
