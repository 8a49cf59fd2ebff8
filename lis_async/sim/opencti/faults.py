"""Fault injection of the simulated platform's GraphQL endpoint.

The knobs live in :class:`~lis_async.sim.opencti.config.PlatformSimConfig` (``outage``,
``latency_s``, ``error_rate``/``error_scope``/``error_code``); :class:`FaultInjector` applies
them and adds the timed outage of :meth:`FaultInjector.outage_for`. Refused connections act on
the HTTP listener, see :meth:`lis_async.sim.opencti.server.PlatformSim.set_refuse_connections`;
emulating an older schema is ``missing_fields``, applied by the GraphQL endpoint.
"""

from __future__ import annotations

import asyncio
import random
import time

from lis_async.sim.opencti.config import PlatformSimConfig
from lis_async.sim.opencti.errors import SimGraphQLError
from lis_async.sim.opencti.graphql import WORK_MUTATIONS

__all__ = ["FaultInjector"]


class FaultInjector:
    """Outage, latency and injected errors, read from the (mutable) config on every call."""

    def __init__(self, config: PlatformSimConfig) -> None:
        self._config = config
        self._rng = random.Random(config.seed)
        self._outage_until = 0.0

    def outage_for(self, seconds: float) -> None:
        """Answer HTTP 503 to every GraphQL call for ``seconds`` (independent of ``outage``)."""
        self._outage_until = time.monotonic() + seconds

    @property
    def in_outage(self) -> bool:
        return self._config.outage or time.monotonic() < self._outage_until

    async def delay(self) -> None:
        """The configured latency (``latency_s``), before any answer but the outage's."""
        if self._config.latency_s > 0:
            await asyncio.sleep(self._config.latency_s)

    def maybe_fail(self, canonical: str) -> None:
        """Raise the configured error for a share ``error_rate`` of the calls in scope."""
        cfg = self._config
        if (
            cfg.error_rate > 0
            and (cfg.error_scope == "all" or canonical in WORK_MUTATIONS)
            and self._rng.random() < cfg.error_rate
        ):
            raise SimGraphQLError(cfg.error_code, "A database error has occurred (sim)", 500)
