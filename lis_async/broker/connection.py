"""RabbitMQ connection parameters and connections (shared by the consumer and the publisher).

The parameters come from the platform's registration answer, overridden by pycti's ``MQ_*``
settings (docs/protocol.md §1.6, §2.1); the connector never computes them. With ``use_ssl`` the
TLS context follows pycti's ``MQ_USE_SSL_*`` settings (:mod:`lis_async.settings.tls`).
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Final

import aio_pika
from aio_pika.abc import AbstractRobustConnection

from lis_async.settings.tls import AmqpTls, mq_context

log = logging.getLogger("lis_async.amqp")


@dataclass(frozen=True, slots=True)
class AmqpParams:
    """Where and how to reach RabbitMQ. The password never shows in repr."""

    host: str
    port: int
    vhost: str
    use_ssl: bool
    user: str
    password: str = field(repr=False)
    tls: AmqpTls = field(default_factory=AmqpTls)


async def connect(
    params: AmqpParams, name: str, timeout_s: float = 30.0
) -> AbstractRobustConnection:
    """A robust (self-reconnecting) connection; TLS as ``params.tls`` says when ``use_ssl``."""
    context = mq_context(params.tls) if params.use_ssl else None
    return await aio_pika.connect_robust(
        host=params.host,
        port=params.port,
        login=params.user,
        password=params.password,
        virtualhost=params.vhost,
        ssl=params.use_ssl,
        ssl_context=context,
        timeout=timeout_s,
        client_properties={"connection_name": name},
    )


def throwaway_channel(conn: AbstractRobustConnection) -> aio_pika.Channel:
    """A plain channel on ``conn`` for one look (a passive declare, a probe), to use as
    ``async with``. Not a robust one: a declare the broker refuses closes the channel, and
    aio-pika would reopen a robust channel in the background while the caller closes it."""
    return aio_pika.Channel(conn, publisher_confirms=False)


async def queue_depth(conn: AbstractRobustConnection | None, queue_name: str) -> int | None:
    """Messages ready in ``queue_name``, or None when it cannot be read. A passive declare on a
    throw-away channel: it never changes the queue (the platform owns it, docs/protocol.md
    §1.3), and an error cannot close a working channel."""
    if conn is None or not conn.connected.is_set():
        return None
    try:
        async with throwaway_channel(conn) as channel:
            queue = await channel.declare_queue(queue_name, passive=True)
            count = queue.declaration_result.message_count
    except Exception as exc:
        log.debug("could not read the depth of %s: %s", queue_name, exc)
        return None
    return int(count) if count is not None else None


class BrokerWatch:
    """One WARNING when a broker connection is lost, one INFO when every one is back (with how
    long it took and how many jobs in flight the broker redelivers), instead of the libraries'
    per-connection errors and tracebacks (:func:`lis_async.ops.logs.setup_logging` quiets
    those)."""

    def __init__(self, in_flight: Callable[[], int] = lambda: 0) -> None:
        self._in_flight = in_flight
        self._down: set[str] = set()
        self._since = 0.0
        self._jobs = 0

    @property
    def down(self) -> bool:
        """True while a watched connection is being restored."""
        return bool(self._down)

    def watch(self, conn: AbstractRobustConnection, name: str) -> None:
        conn.close_callbacks.add(functools.partial(self._closed, name))
        conn.reconnect_callbacks.add(functools.partial(self._reconnected, name))

    def _closed(self, name: str, sender: object, exc: BaseException | None = None) -> None:
        if exc is None or getattr(sender, "close_called", False):
            return  # our own close (shutdown)
        if not self._down:
            self._since = time.monotonic()
            self._jobs = self._in_flight()
            log.warning(
                "broker connection lost (%s: %s): reconnecting; %d job(s) in flight will be "
                "redelivered",
                name,
                reason(exc),
                self._jobs,
            )
        self._down.add(name)

    def _reconnected(self, name: str, sender: object) -> None:
        if name not in self._down:
            return
        self._down.discard(name)
        if not self._down:
            log.info(
                "broker connection back after %.1f s; %d job(s) that were in flight are "
                "redelivered",
                time.monotonic() - self._since,
                self._jobs,
            )


async def settle(op: Awaitable[None]) -> None:
    """Ack, nack or reject a delivery, ignoring a channel that is gone: the broker redelivers
    the message itself. Debug only: the lost connection was logged once, with the jobs it
    redelivers (:class:`BrokerWatch`)."""
    try:
        await op
    except Exception as exc:
        log.debug("could not settle a message (%s); the broker will redeliver it", reason(exc))


def reason(exc: BaseException) -> str:
    """An exception as a log line's cause: its text, cut at 200 characters."""
    text = str(exc) or type(exc).__name__
    return text if len(text) <= 200 else text[:200] + "..."


class ExpectedReconnection(logging.Filter):
    """Drops what aiormq and aio-pika log about a broker connection that closed and is being
    restored (``Unexpected connection close``, the reader's traceback, a robust channel's close
    callback, reconnection attempts): :class:`BrokerWatch` logs one WARNING and one INFO per
    outage instead. Anything else those libraries log, a real bug included, passes.
    """

    _LIBRARIES: Final = ("aiormq", "aio_pika")
    _MESSAGES: Final = (
        "Unexpected connection close from remote",
        "reader exited abnormally",
        "RobustChannel._on_close",
        "Connection attempt to",
        "Reconnect attempt failed",
        "Connection to ",
    )

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.name.startswith(self._LIBRARIES):
            return True
        if record.exc_info and record.exc_info[1] is not None:
            if _is_connection_loss(record.exc_info[1]):
                return False
        message = record.getMessage()
        return not any(m in message for m in self._MESSAGES)


def _is_connection_loss(exc: BaseException) -> bool:
    import aiormq.exceptions

    expected = (
        aiormq.exceptions.ConnectionClosed,
        aiormq.exceptions.ChannelInvalidStateError,
        aiormq.exceptions.AMQPConnectionError,
        ConnectionError,
    )
    return isinstance(exc, expected)
