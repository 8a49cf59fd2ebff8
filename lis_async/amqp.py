"""Opening RabbitMQ connections from the registration's parameters (consumer and publisher)."""

from __future__ import annotations

import ssl

import aio_pika
from aio_pika.abc import AbstractRobustConnection

from lis_async.platform import AmqpParams


async def connect(
    params: AmqpParams, name: str, timeout_s: float = 30.0
) -> AbstractRobustConnection:
    """A robust (self-reconnecting) connection; TLS with certificate checks when ``use_ssl``."""
    context = ssl.create_default_context() if params.use_ssl else None
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
