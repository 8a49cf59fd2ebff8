"""The health server: ``/healthz``, ``/readyz`` and ``/metrics`` (aiohttp's low-level server).

It listens on every interface by default, so it is built not to be exhausted by whoever can
reach it (docs/telemetry.md, "Health server limits"): at most :data:`MAX_CONNECTIONS`
connections (any more are closed at once, before a byte is read), each closed when it has not
brought a whole request within :data:`IDLE_TIMEOUT_S` (from its opening or its last answer: an idle
connection, and a request sent a byte at a time, are cut alike), request lines and headers
capped to a few KiB, and a malformed request is the client's problem: logged at DEBUG, never
with a traceback at ERROR.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any, Final

from aiohttp import web
from aiohttp.web_protocol import RequestHandler

from lis_async.ops.metrics import Metrics

log: Final = logging.getLogger("lis_async.health")

#: Connections open at once: a few probes and scrapers need a handful; the rest are closed at
#: once, so that the worker's file descriptors stay for RabbitMQ, OpenCTI and LastInfoSec.
MAX_CONNECTIONS: Final = 64
#: Seconds a connection may stay without a whole request (idle, or headers still coming):
#: probes and scrapes send theirs at once; a client that keeps a connection alive reopens it.
IDLE_TIMEOUT_S: Final = 5.0
#: Request line and each header at most 4 KiB, at most 32 headers (a probe sends a few).
MAX_LINE_BYTES: Final = 4096
MAX_HEADERS: Final = 32

_Handler = Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]


class _ClientErrorsAtDebug(logging.LoggerAdapter):  # type: ignore[type-arg]
    """aiohttp's server log: what it reports are the clients' errors (a malformed, oversized or
    cut request), so at DEBUG. The handlers' own errors are logged by :class:`HealthServer`."""

    def log(self, level: int, msg: object, *args: Any, **kwargs: Any) -> None:
        super().log(min(level, logging.DEBUG), msg, *args, **kwargs)


def _handler_options() -> dict[str, Any]:
    """The limits, for the aiohttp version installed: an option its request handler does not
    take would make aiohttp drop every option (it then retries without them)."""
    wanted: dict[str, Any] = {
        "keepalive_timeout": IDLE_TIMEOUT_S,
        "max_line_size": MAX_LINE_BYTES,
        "max_field_size": MAX_LINE_BYTES,
        "max_headers": MAX_HEADERS,
        "logger": _ClientErrorsAtDebug(logging.getLogger("lis_async.health.http"), {}),
        "access_log": None,
    }
    accepted = inspect.signature(RequestHandler.__init__).parameters
    return {k: v for k, v in wanted.items() if k in accepted}


class _Refused(asyncio.Protocol):
    """A connection over the cap: closed as soon as it is made, nothing read."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport.close()


class _GuardedServer(web.Server):
    """aiohttp's server with the connection cap and the idle timeout."""

    def __init__(
        self, handler: _Handler, max_connections: int, idle_timeout_s: float, **options: Any
    ) -> None:
        super().__init__(handler, **options)
        self._max = max_connections
        self._idle_timeout_s = idle_timeout_s
        # handler -> monotonic time it was made for an accepted socket, until its
        # connection_made (in the same loop iteration; the sweep drops one that never came)
        self._unmade: dict[RequestHandler, float] = {}
        # handler -> monotonic time since which it waits for a request; absent while answering
        self._waiting: MutableMapping[RequestHandler, float] = {}
        self.refused = 0

    def __call__(self) -> RequestHandler:
        """The protocol of each accepted socket: over the cap, one that closes it at once."""
        if len(self.connections) + len(self._unmade) >= self._max:
            self.refused += 1
            return _Refused()  # type: ignore[return-value]
        handler = super().__call__()
        self._unmade[handler] = time.monotonic()
        return handler

    def connection_made(self, handler: RequestHandler, transport: asyncio.Transport) -> None:
        self._unmade.pop(handler, None)
        super().connection_made(handler, transport)
        self._waiting[handler] = time.monotonic()

    def connection_lost(self, handler: RequestHandler, exc: BaseException | None = None) -> None:
        self._waiting.pop(handler, None)
        super().connection_lost(handler, exc)

    def answering(self, handler: RequestHandler | None, busy: bool) -> None:
        """A request of ``handler``'s connection is being answered (``busy``) or was answered."""
        if handler is None:
            return
        if busy:
            self._waiting.pop(handler, None)
        elif handler.transport is not None:
            self._waiting[handler] = time.monotonic()

    def close_idle(self) -> int:
        """Close every connection that waited longer than the idle timeout; how many."""
        limit = time.monotonic() - self._idle_timeout_s
        for handler in [h for h, made in self._unmade.items() if made < limit]:
            del self._unmade[handler]
        idle = [h for h, since in self._waiting.items() if since < limit]
        for handler in idle:
            self._waiting.pop(handler, None)
            handler.force_close()
        return len(idle)


class HealthServer:
    """``/healthz`` (the loop answers), ``/readyz`` (checks pass), ``/metrics`` (when enabled).

    ``max_connections`` and ``idle_timeout_s`` default to :data:`MAX_CONNECTIONS` and
    :data:`IDLE_TIMEOUT_S` (tests lower them)."""

    def __init__(
        self,
        checks: Callable[[], dict[str, bool]],
        metrics: Metrics | None,
        host: str = "0.0.0.0",
        port: int = 9096,
        details: Callable[[], dict[str, Any]] | None = None,
        *,
        max_connections: int = MAX_CONNECTIONS,
        idle_timeout_s: float = IDLE_TIMEOUT_S,
    ) -> None:
        self._checks = checks
        self._details = details
        self._metrics = metrics
        self._host, self._port = host, port
        self._max_connections = max_connections
        self._idle_timeout_s = idle_timeout_s
        self._routes: dict[str, _Handler] = {"/healthz": self._healthz, "/readyz": self._readyz}
        if metrics is not None:
            self._routes["/metrics"] = self._metrics_view
        self._server: _GuardedServer | None = None
        self._runner: web.ServerRunner | None = None
        self._sweeper: asyncio.Task[None] | None = None
        self.started = time.time()
        self.port: int | None = None

    @property
    def connections(self) -> int:
        """Connections open now."""
        return len(self._server.connections) if self._server is not None else 0

    async def start(self) -> None:
        self._server = server = _GuardedServer(
            self._route, self._max_connections, self._idle_timeout_s, **_handler_options()
        )
        self._runner = web.ServerRunner(server, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self._host, self._port)
        await site.start()
        sockets = getattr(site._server, "sockets", None) or []
        self.port = sockets[0].getsockname()[1] if sockets else self._port
        self._sweeper = asyncio.get_running_loop().create_task(self._sweep())
        self._sweeper.set_name("health-idle-sweep")

    async def close(self) -> None:
        sweeper, self._sweeper = self._sweeper, None
        if sweeper is not None:
            sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sweeper
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()

    async def _sweep(self) -> None:
        """Forever: close the connections idle for longer than the timeout (checked a few
        times per timeout: one is closed within 1.25 timeouts)."""
        every = self._idle_timeout_s / 4
        while True:
            await asyncio.sleep(every)
            if self._server is not None:
                self._server.close_idle()

    async def _route(self, request: web.BaseRequest) -> web.StreamResponse:
        server = self._server
        assert server is not None
        server.answering(request.protocol, busy=True)
        try:
            handler = self._routes.get(request.path)
            if handler is None:
                return web.Response(status=404, text="404: Not Found")
            if request.method not in ("GET", "HEAD"):
                return web.Response(status=405, text="405: Method Not Allowed")
            try:
                return await handler(request)
            except Exception:  # a bug of ours, not the client's: worth an ERROR
                log.exception("the health server failed to answer %s", request.path)
                return web.Response(status=500, text="500: Internal Server Error")
        finally:
            server.answering(request.protocol, busy=False)

    async def _healthz(self, _: web.BaseRequest) -> web.Response:
        return web.json_response({"status": "ok", "uptime_s": round(time.time() - self.started)})

    async def _readyz(self, _: web.BaseRequest) -> web.Response:
        checks = self._checks()
        ok = all(checks.values())
        body: dict[str, Any] = {"status": "ready" if ok else "not ready", "checks": checks}
        if self._details is not None:
            body["details"] = self._details()
        return web.json_response(body, status=200 if ok else 503)

    async def _metrics_view(self, _: web.BaseRequest) -> web.Response:
        assert self._metrics is not None
        return web.Response(body=self._metrics.render(), content_type="text/plain")
