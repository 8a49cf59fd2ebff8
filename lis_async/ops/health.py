"""The health server: ``/healthz``, ``/readyz`` and ``/metrics`` (aiohttp.web)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from aiohttp import web

from lis_async.ops.metrics import Metrics


class HealthServer:
    """``/healthz`` (the loop answers), ``/readyz`` (checks pass), ``/metrics`` (when enabled)."""

    def __init__(
        self,
        checks: Callable[[], dict[str, bool]],
        metrics: Metrics | None,
        host: str = "0.0.0.0",
        port: int = 9096,
        details: Callable[[], dict[str, Any]] | None = None,
    ) -> None:
        self._checks = checks
        self._details = details
        self._metrics = metrics
        self._host, self._port = host, port
        self._runner: web.AppRunner | None = None
        self.started = time.time()
        self.port: int | None = None

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/readyz", self._readyz)
        if self._metrics is not None:
            app.router.add_get("/metrics", self._metrics_view)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self._host, self._port)
        await site.start()
        server = site._server
        sockets = getattr(server, "sockets", None) or []
        self.port = sockets[0].getsockname()[1] if sockets else self._port

    async def close(self) -> None:
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()

    async def _healthz(self, _: web.Request) -> web.Response:
        return web.json_response({"status": "ok", "uptime_s": round(time.time() - self.started)})

    async def _readyz(self, _: web.Request) -> web.Response:
        checks = self._checks()
        ok = all(checks.values())
        body: dict[str, Any] = {"status": "ready" if ok else "not ready", "checks": checks}
        if self._details is not None:
            body["details"] = self._details()
        return web.json_response(body, status=200 if ok else 503)

    async def _metrics_view(self, _: web.Request) -> web.Response:
        assert self._metrics is not None
        return web.Response(body=self._metrics.render(), content_type="text/plain")
