"""A whole simulated world for one connector: platform, LastInfoSec API, worker, job producer.

Used by the demo, the end-to-end tests and the benchmark::

    async with SimWorld() as world:
        proc = start_connector(env=world.env())        # the connector registers itself
        await world.start_worker_emulation()           # push queue exists only after that
        jobs = await world.producer.publish_many(100)
        assert await world.platform.wait_works([j.work_id for j in jobs if j.work_id])

On exit everything is stopped and the connector's queues (listen, push, the worker's priority
lane) are deleted from RabbitMQ.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator, Mapping
from types import TracebackType
from typing import Any, Final

import aio_pika
import aiormq
from aio_pika.abc import AbstractChannel, AbstractRobustConnection

from lis_async.broker.lanes import lane_name
from lis_async.sim.lastinfosec import LastInfoSecSim, LisSimConfig
from lis_async.sim.opencti import PlatformSim, PlatformSimConfig
from lis_async.sim.producer import JobProducer
from lis_async.sim.worker import WorkerEmulation

log = logging.getLogger(__name__)

DEFAULT_AMQP_URL: Final = "amqp://guest:guest@127.0.0.1:5672/"
DEFAULT_SCOPE: Final = "StixFile,Domain-Name,Hostname,Url"


async def rabbit_reachable(url: str = DEFAULT_AMQP_URL) -> bool:
    """True if RabbitMQ accepts a connection at ``url`` (within 5 s)."""
    try:
        conn = await aio_pika.connect(url, timeout=5)
    except Exception:
        return False
    await conn.close()
    return True


class SimWorld:
    """PlatformSim + LastInfoSecSim + WorkerEmulation + JobProducer for one connector id."""

    def __init__(
        self,
        connector_id: str | None = None,
        *,
        platform_config: PlatformSimConfig | None = None,
        lis_config: LisSimConfig | None = None,
        amqp_url: str = DEFAULT_AMQP_URL,
        connector_name: str = "LastInfoSec",
        scope: str = DEFAULT_SCOPE,
        seed: int = 0,
        producer_options: Mapping[str, Any] | None = None,
        worker_options: Mapping[str, Any] | None = None,
        host: str = "127.0.0.1",
    ) -> None:
        self.connector_id = connector_id or str(uuid.uuid4())
        self.connector_name = connector_name
        self.scope = scope
        self.amqp_url = amqp_url
        self.host = host
        if platform_config is None:
            platform_config = PlatformSimConfig(amqp_url=amqp_url)
        self.platform = PlatformSim(platform_config)
        self.lis = LastInfoSecSim(lis_config)
        self.producer = JobProducer(
            self.platform,
            self.connector_id,
            amqp_url=amqp_url,
            seed=seed,
            **dict(producer_options or {}),
        )
        self.worker = WorkerEmulation(
            self.platform, self.connector_id, amqp_url=amqp_url, **dict(worker_options or {})
        )
        self.opencti_url = ""
        self.lis_base_url = ""
        self._admin: AbstractRobustConnection | None = None
        self._worker_started = False
        self._started = False

    # ------------------------------------------------------------------ properties
    @property
    def opencti_token(self) -> str:
        return self.platform.config.token

    @property
    def lis_api_key(self) -> str:
        return self.lis.config.api_key

    @property
    def registered(self) -> bool:
        return self.connector_id in self.platform.connectors

    def names(self) -> dict[str, str]:
        """Queue / exchange / routing names of the connector (registration-provided)."""
        reg = self.platform.registration(self.connector_id)
        keys = ("listen", "listen_exchange", "listen_routing", "push", "push_exchange")
        names = {k: str(reg[k]) for k in (*keys, "push_routing")}
        names["lane"] = lane_name(self.connector_id)  # the worker's own, with priority lanes
        return names

    def env(self) -> dict[str, str]:
        """Environment variables that point a connector at this world."""
        return {
            "OPENCTI_URL": self.opencti_url,
            "OPENCTI_TOKEN": self.opencti_token,
            "CONNECTOR_ID": self.connector_id,
            "CONNECTOR_NAME": self.connector_name,
            "CONNECTOR_SCOPE": self.scope,
            "CONFIG_LIS_APIKEY_CTI": self.lis_api_key,
            "LASTINFOSEC_BASE_URL": self.lis_base_url,
            # The LastInfoSec double serves plain http on loopback.
            "LASTINFOSEC_ALLOW_HTTP": "true",
        }

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        if self._started:
            return
        self._started = True
        try:
            self.opencti_url = await self.platform.start(self.host, 0)
            self.lis_base_url = await self.lis.start(self.host, 0)
            self._admin = await aio_pika.connect_robust(self.amqp_url)
            await self.producer.start()
        except BaseException:
            await self.close()
            raise

    async def close(self) -> None:
        """Stop everything (idempotent) and delete the connector's queues."""
        if not self._started:
            return
        self._started = False
        with contextlib.suppress(Exception):
            await self.worker.close()
        self._worker_started = False
        with contextlib.suppress(Exception):
            await self.producer.close()
        # stop the HTTP servers first: no registration/ping can re-declare the queues afterwards
        with contextlib.suppress(Exception):
            await self.platform.close()
        with contextlib.suppress(Exception):
            await self.lis.close()
        try:
            await self._delete_broker_objects()
        finally:
            admin, self._admin = self._admin, None
            if admin is not None:
                with contextlib.suppress(Exception):
                    await admin.close()

    async def __aenter__(self) -> SimWorld:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    # ------------------------------------------------------------------ worker emulation
    async def wait_registration(self, timeout: float = 30.0) -> bool:  # noqa: ASYNC109
        """True once the connector registered and its push queue exists on the broker."""
        if not await self.platform.wait_until(lambda: self.registered, timeout):
            return False
        deadline = time.monotonic() + timeout
        push = self.names()["push"]
        while True:
            if await self._queue_exists(push):
                return True
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(0.05)

    async def start_worker_emulation(self, timeout: float = 30.0) -> WorkerEmulation:  # noqa: ASYNC109
        """Wait (bounded) for the connector's registration, then consume its push queue."""
        if self._worker_started:
            return self.worker
        if not await self.wait_registration(timeout):
            raise TimeoutError(
                f"connector {self.connector_id} did not register within {timeout:.0f} s"
            )
        await self.worker.start()
        self._worker_started = True
        return self.worker

    # ------------------------------------------------------------------ broker housekeeping
    def _admin_connection(self) -> AbstractRobustConnection:
        if self._admin is None:
            raise RuntimeError("SimWorld is not started")
        return self._admin

    @contextlib.asynccontextmanager
    async def admin_channel(self) -> AsyncIterator[AbstractChannel]:
        """A fresh channel on the world's own broker connection (not the connector's), closed on
        exit. For inspecting the connector's queues, e.g. a passive ``declare_queue`` to read
        its message count; an operation the broker refuses closes the channel, not the
        connection."""
        channel = await self._admin_connection().channel()
        try:
            yield channel
        finally:
            if not channel.is_closed:
                await channel.close()

    async def _queue_exists(self, name: str) -> bool:
        channel = await self._admin_connection().channel()
        try:
            await channel.declare_queue(name, passive=True)
        except aiormq.exceptions.ChannelNotFoundEntity:
            return False
        finally:
            if not channel.is_closed:
                await channel.close()
        return True

    async def purge(self) -> dict[str, int]:
        """Empty the connector's queues (listen, push, lane); return the dropped messages."""
        names = self.names()
        out: dict[str, int] = {}
        for key in ("listen", "push", "lane"):
            channel = await self._admin_connection().channel()
            try:
                queue = await channel.get_queue(names[key], ensure=False)
                result = await queue.purge()
                out[names[key]] = int(result.message_count or 0)
            except aiormq.exceptions.ChannelNotFoundEntity:
                out[names[key]] = 0
            finally:
                if not channel.is_closed:
                    await channel.close()
        return out

    async def _delete_broker_objects(self) -> None:
        if self._admin is None:
            return
        names = self.names()
        for key in ("listen", "push", "lane"):
            channel = await self._admin.channel()
            try:
                await channel.queue_delete(names[key])
            except Exception as exc:  # an absent queue closes the channel
                log.debug("queue_delete %s: %s", names[key], exc)
            finally:
                if not channel.is_closed:
                    await channel.close()
        if not self.platform.config.queue_prefix:
            return  # the unprefixed exchanges are shared with every other connector
        for key in ("listen_exchange", "push_exchange"):
            channel = await self._admin.channel()
            try:
                await channel.exchange_delete(names[key], if_unused=True)
            except Exception as exc:  # still bound (another world with the same prefix)
                log.debug("exchange_delete %s: %s", names[key], exc)
            finally:
                if not channel.is_closed:
                    await channel.close()
