"""The push-queue publisher: pycti's splitter, pycti's envelope, publisher confirms.

One long-lived channel with confirms on its own connection (RabbitMQ flow control blocks
publishing connections; keeping it apart from the consumer's keeps acks flowing). The publishes of
one job go out concurrently and each is confirmed; a nack or an unroutable message is an error.
"""

from __future__ import annotations

import asyncio
import base64
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import aiormq
import aiormq.abc
import orjson
from aio_pika.abc import AbstractRobustChannel, AbstractRobustConnection
from pamqp import commands as spec

from lis_async.amqp import connect
from lis_async.platform import AmqpParams

log = logging.getLogger("lis_async.publisher")


class PublishError(Exception):
    """Some messages of a delivery were not confirmed; ``failed`` are their indexes."""

    def __init__(self, failed: Sequence[int], cause: str) -> None:
        super().__init__(f"{len(failed)} push message(s) not confirmed: {cause}")
        self.failed = tuple(failed)


@dataclass(frozen=True, slots=True)
class Delivery:
    """The push messages of one job, ready to publish (bodies in ``action_sequence`` order)."""

    bodies: tuple[bytes, ...]
    incompatible: int  # objects the splitter dropped (types OpenCTI cannot import)

    @property
    def objects(self) -> int:
        """STIX objects delivered: pycti's splitter puts one object in each message."""
        return len(self.bodies)


def split_bundle(bundle: dict[str, Any]) -> tuple[list[dict[str, Any]], int]:
    """pycti's splitter: one bundle per object, dependencies first. Returns (bundles, dropped)."""
    from pycti.utils.opencti_stix2_splitter import OpenCTIStix2Splitter

    _, incompatible, bundles = OpenCTIStix2Splitter().split_bundle_with_expectations(
        bundle, use_json=False
    )
    return bundles, len(incompatible)


def envelope(
    content: bytes,
    *,
    sequence: int,
    applicant_id: str | None,
    draft_id: str | None,
    work_id: str | None,
) -> bytes:
    """pycti's push message, keys in pycti's order (protocol §5.1)."""
    message: dict[str, Any] = {
        "bundle_type": "QUEUE_BUNDLE",
        "applicant_id": applicant_id,
        "action_sequence": sequence,
        "entities_types": [],
        "content": base64.b64encode(content).decode("ascii"),
        "update": False,
        "draft_id": draft_id,
        "no_split": False,
    }
    if work_id is not None:
        message["work_id"] = work_id
    return orjson.dumps(message)


def prepare(
    bundle: dict[str, Any], *, applicant_id: str | None, draft_id: str | None, work_id: str | None
) -> Delivery:
    bundles, incompatible = split_bundle(bundle)
    bodies = tuple(
        envelope(
            orjson.dumps(b),
            sequence=i,
            applicant_id=applicant_id,
            draft_id=draft_id,
            work_id=work_id,
        )
        for i, b in enumerate(bundles, start=1)
    )
    return Delivery(bodies=bodies, incompatible=incompatible)


class Publisher:
    def __init__(
        self, params: AmqpParams, exchange: str, routing_key: str, confirm_timeout_s: float = 60.0
    ) -> None:
        self._params = params
        self._exchange_name = exchange
        self._routing_key = routing_key
        self._timeout = confirm_timeout_s
        self._conn: AbstractRobustConnection | None = None
        self._channel: AbstractRobustChannel | None = None

    async def start(self) -> None:
        if self._conn is not None:
            return
        self._conn = await connect(self._params, "lis-async publisher")
        channel = await self._conn.channel(publisher_confirms=True, on_return_raises=True)
        self._channel = channel  # type: ignore[assignment]

    async def close(self) -> None:
        conn, self._conn = self._conn, None
        self._channel = None
        if conn is not None:
            await conn.close()

    @property
    def connected(self) -> bool:
        return (
            self._conn is not None
            and not self._conn.is_closed
            and self._channel is not None
            and not self._channel.is_closed
        )

    async def publish(self, bodies: Sequence[bytes], indexes: Sequence[int]) -> None:
        """Publish ``bodies[i]`` for each i in ``indexes``, concurrently; every one confirmed.

        Raises :class:`PublishError` naming the indexes that were not confirmed, so the caller
        retries just those.
        """
        channel = self._channel
        if channel is None or channel.is_closed:
            raise PublishError(indexes, "publisher channel is not open")
        try:
            # aio-pika's Exchange.publish builds a Message object per body only to hand its
            # body and properties to this same aiormq call; with ~11 messages per job that was
            # a measurable share of the worker's CPU (BENCHMARKS.md). The robust channel's
            # current underlying channel is asked for at every delivery (reconnections).
            underlay = await channel.get_underlay_channel()
            # One deadline for the whole delivery rather than a timer per message.
            async with asyncio.timeout(self._timeout):
                results = await asyncio.gather(
                    *(self._publish_one(underlay, bodies[i]) for i in indexes),
                    return_exceptions=True,
                )
        except TimeoutError:
            raise PublishError(indexes, f"no confirm within {self._timeout:.0f}s") from None
        except aiormq.exceptions.AMQPError as exc:
            raise PublishError(indexes, f"{type(exc).__name__}: {exc}"[:300]) from None
        failed = [i for i, r in zip(indexes, results, strict=True) if isinstance(r, BaseException)]
        if failed:
            first = next(r for r in results if isinstance(r, BaseException))
            if isinstance(first, asyncio.CancelledError):
                raise first
            raise PublishError(failed, f"{type(first).__name__}: {first}"[:300])

    async def _publish_one(self, channel: aiormq.abc.AbstractChannel, body: bytes) -> None:
        result = await channel.basic_publish(
            body,
            exchange=self._exchange_name,
            routing_key=self._routing_key,
            properties=spec.Basic.Properties(delivery_mode=2, content_encoding="utf-8"),
            mandatory=True,  # unroutable -> Basic.Return -> an error, never a silent drop
        )
        # A confirm channel answers Basic.Ack; a nack raises, anything else is a failure.
        if not isinstance(result, spec.Basic.Ack):
            raise RuntimeError(f"broker answered {type(result).__name__}")
