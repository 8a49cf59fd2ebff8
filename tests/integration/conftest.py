"""What the integration tests share: a robust connection to the local RabbitMQ."""

from __future__ import annotations

from collections.abc import AsyncIterator

import aio_pika
import pytest

AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/"


@pytest.fixture
async def conn() -> AsyncIterator[aio_pika.abc.AbstractRobustConnection]:
    """A robust connection to RabbitMQ, closed after the test (mark the test ``rabbitmq``)."""
    connection = await aio_pika.connect_robust(AMQP_URL)
    yield connection
    await connection.close()
