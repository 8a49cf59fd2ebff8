"""RabbitMQ connection parameters and connections (shared by the consumer and the publisher).

The parameters come from the platform's registration answer, overridden by pycti's ``MQ_*``
settings (docs/protocol.md §1.6, §2.1); the connector never computes them. With ``use_ssl`` the
TLS context follows pycti's ``MQ_USE_SSL_*`` settings (:mod:`lis_async.tls`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import aio_pika
from aio_pika.abc import AbstractRobustConnection

from lis_async.tls import AmqpTls, mq_context


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
