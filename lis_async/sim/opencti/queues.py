"""RabbitMQ side of the simulated platform: the connector queue topology, really declared.

On every ``registerConnector`` and ``pingConnector`` the platform asserts, for the connector,
the two direct exchanges, the ``listen_<id>`` and ``push_<id>`` queues (durable, with the
platform's arguments: ``name``, ``config`` and ``x-queue-type``, plus ``x-max-length`` /
``x-overflow`` on push queues when configured) and their bindings. :class:`BrokerQueues` does
the same over aio-pika, keeps the broker errors it saw, and publishes ``stixBundlePush``
bundles to the push exchange. With ``PlatformSimConfig.amqp_url = None`` it does nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

import aio_pika

from lis_async.sim.opencti.config import ConnectorRecord, PlatformSimConfig

__all__ = ["BrokerQueues", "connector_queue_names"]

log = logging.getLogger(__name__)


def connector_queue_names(queue_prefix: str, connector_id: str) -> dict[str, str]:
    """Queue, exchange and routing key names of a connector (``<prefix>_`` when prefixed)."""
    p = f"{queue_prefix}_" if queue_prefix else ""
    return {
        "listen": f"{p}listen_{connector_id}",
        "listen_routing": f"{p}listen_routing_{connector_id}",
        "listen_exchange": f"{p}amqp.connector.exchange",
        "push": f"{p}push_{connector_id}",
        "push_routing": f"{p}push_routing_{connector_id}",
        "push_exchange": f"{p}amqp.worker.exchange",
        "dead_letter_routing": f"{p}listen_routing_too-large-bundle",
    }


class BrokerQueues:
    """The simulator's broker connection: declarations, deletions and bundle publishing."""

    def __init__(self, config: PlatformSimConfig) -> None:
        self._config = config
        #: broker errors seen while declaring (message strings)
        self.errors: list[str] = []
        self._connection: aio_pika.abc.AbstractRobustConnection | None = None
        self._channel: aio_pika.abc.AbstractChannel | None = None
        self._lock = asyncio.Lock()
        self._declared: set[str] = set()

    @property
    def connected(self) -> bool:
        return self._connection is not None

    @property
    def declared_queues(self) -> list[str]:
        """Names of the queues declared so far and not deleted, sorted."""
        return sorted(self._declared)

    async def connect(self) -> None:
        if self._config.amqp_url is not None:
            self._connection = await aio_pika.connect_robust(self._config.amqp_url)

    async def close(self) -> None:
        if self._connection is not None:
            with contextlib.suppress(Exception):
                await self._connection.close()
            self._connection = None
            self._channel = None

    def queue_arguments(self, rec: ConnectorRecord, push: bool = False) -> dict[str, Any]:
        """The arguments the platform declares the connector queues with."""
        args: dict[str, Any] = {
            "name": rec.name,
            "config": {"id": rec.id, "type": rec.type, "scope": list(rec.scope)},
            "x-queue-type": self._config.queue_type,
        }
        if push and rec.push_queue_max_length is not None:
            args["x-max-length"] = rec.push_queue_max_length
            args["x-overflow"] = "reject-publish"
        return args

    async def _open_channel(self) -> aio_pika.abc.AbstractChannel:
        if self._connection is None:
            raise RuntimeError("no broker connection")
        ch = self._channel
        if ch is None or ch.is_closed:
            ch = await self._connection.channel(publisher_confirms=True)
            self._channel = ch
        return ch

    async def declare(self, rec: ConnectorRecord) -> None:
        """Assert exchanges, queues and bindings exactly like the platform does."""
        if self._connection is None:
            return
        async with self._lock:
            try:
                await self._declare_topology(await self._open_channel(), rec)
            except Exception as exc:
                self.errors.append(f"{type(exc).__name__}: {exc}")
                self._channel = None
                raise

    async def _declare_topology(
        self, ch: aio_pika.abc.AbstractChannel, rec: ConnectorRecord
    ) -> None:
        n = rec.names
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
        self._declared.update((n["listen"], n["push"]))

    async def counts(self, name: str) -> tuple[int, int] | None:
        """(messages ready, consumers) of a queue from a passive declare; None if absent."""
        if self._connection is None:
            return None
        # A channel of its own, closed after: the robust shared one would re-declare the queue
        # after a reconnection, and an absent queue closes the channel.
        ch = await self._connection.channel()
        try:
            queue = await ch.declare_queue(name, passive=True, timeout=10)
        except Exception as exc:
            log.debug("passive declare %s: %s", name, exc)
            return None
        finally:
            if not ch.is_closed:
                await ch.close()
        result = queue.declaration_result
        return int(result.message_count or 0), int(result.consumer_count or 0)

    async def delete(self, names: list[str]) -> None:
        """Delete these queues (an absent one is not an error)."""
        if self._connection is None:
            return
        async with self._lock:
            for name in names:
                try:
                    ch = await self._open_channel()
                    await ch.queue_delete(name, timeout=10)
                except Exception as exc:  # absent queue closes the channel
                    log.debug("queue_delete %s: %s", name, exc)
                    self._channel = None
                self._declared.discard(name)

    async def publish(self, exchange: str, routing_key: str, body: bytes) -> None:
        """Publish a persistent message (as the platform forwards a pushed bundle)."""
        if self._connection is None:
            return
        async with self._lock:
            ch = await self._open_channel()
            ex = await ch.get_exchange(exchange, ensure=False)
            await ex.publish(
                aio_pika.Message(
                    body,
                    delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                    content_encoding="utf-8",
                ),
                routing_key=routing_key,
            )
