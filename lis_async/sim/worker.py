"""Emulation of OpenCTI's worker on a connector's push queue (docs/protocol.md §5.3, §10.2).

Consumes ``push_<id>`` by name (never declares it), decodes every message the way
``opencti-worker/src/push_handler.py`` does and, instead of importing, reports expectations to the
:class:`PlatformSim` the way pycti's ``import_bundle`` would:

* JSON body, ``content`` required, base64 -> UTF-8 -> JSON bundle with non-empty ``objects``;
  anything else is nacked without requeue and recorded as a rejection (nothing is reported, so the
  work never completes, as on the real platform);
* one object or ``no_split`` -> one ``report_expectation`` per object (an error dict when
  ``stix2.parse`` fails, or for elements pycti's splitter declares incompatible);
* several objects without ``no_split`` -> split with pycti's ``OpenCTIStix2Splitter``,
  ``add_expectations(N)``, re-publish N one-object messages (same envelope, new ``content``) to the
  same push exchange and routing key, ack the original;
* messages of dead works (``WorkNotAlive``) are acked and dropped.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Final, Protocol

import aio_pika
import aiormq
import stix2
from aio_pika.abc import (
    AbstractChannel,
    AbstractExchange,
    AbstractIncomingMessage,
    AbstractQueue,
    AbstractRobustConnection,
)
from pycti import OpenCTIStix2Splitter

from lis_async.sim.opencti import WorkNotAlive

log = logging.getLogger(__name__)

SOURCE_MAX_CHARS: Final = 50_000
BODY_EXCERPT_BYTES: Final = 2_000


class WorkerPlatform(Protocol):
    """The part of :class:`lis_async.sim.opencti.PlatformSim` the worker emulation uses."""

    def registration(self, connector_id: str) -> dict[str, Any]: ...

    def report_expectation(self, work_id: str, error: dict[str, Any] | None = None) -> None: ...

    def add_expectations(self, work_id: str, n: int) -> None: ...


@dataclass
class PushRecord:
    """One consumed push message."""

    envelope: dict[str, Any]
    keys: tuple[str, ...]
    properties: dict[str, Any]
    bundle: dict[str, Any] | None
    work_id: str | None
    applicant_id: str | None
    draft_id: str | None
    outcome: str  # "imported" | "split" | "dropped" (dead work)
    redelivered: bool = False
    errors: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class Rejection:
    """A push message the worker nacked without requeue."""

    reason: str
    body: bytes  # first BODY_EXCERPT_BYTES bytes
    work_id: str | None
    properties: dict[str, Any]


@dataclass
class WorkerCounters:
    received: int = 0
    acked: int = 0
    rejected: int = 0
    imported_messages: int = 0
    split_messages: int = 0
    republished: int = 0
    dropped_dead: int = 0
    objects: int = 0
    reported_ok: int = 0
    reported_error: int = 0
    dead_reports: int = 0
    bytes_received: int = 0


class _Reject(Exception):
    def __init__(self, reason: str, work_id: str | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.work_id = work_id


class _WorkerMessage(aio_pika.Message):
    """Exactly the properties the worker (and pycti) publish: delivery_mode 2 + utf-8 encoding."""

    @property
    def properties(self) -> aiormq.spec.Basic.Properties:
        return aiormq.spec.Basic.Properties(delivery_mode=2, content_encoding="utf-8")


def _properties(message: AbstractIncomingMessage) -> dict[str, Any]:
    return {
        "delivery_mode": int(message.delivery_mode),
        "content_encoding": message.content_encoding,
        "content_type": message.content_type,
        "headers": dict(message.headers) if message.headers else {},
        "priority": message.priority,
        "expiration": message.expiration,
        "message_id": message.message_id,
    }


class WorkerEmulation:
    """Consumes one connector's push queue like OpenCTI's worker and reports to the platform."""

    def __init__(
        self,
        platform: WorkerPlatform,
        connector_id: str,
        amqp_url: str = "amqp://guest:guest@127.0.0.1:5672/",
        *,
        prefetch_count: int = 64,
        validate: bool = True,
        max_records: int | None = None,
        drain_timeout_s: float = 5.0,
    ) -> None:
        self.platform = platform
        self.connector_id = connector_id
        self.amqp_url = amqp_url
        self.prefetch_count = prefetch_count
        self.validate = validate
        self.max_records = max_records
        self.drain_timeout_s = drain_timeout_s
        self.messages: list[PushRecord] = []
        self.rejections: list[Rejection] = []
        self.objects_by_work: dict[str, list[dict[str, Any]]] = {}
        self.counters = WorkerCounters()
        self.push_queue: str | None = None
        self._recorded_objects = 0
        self._connection: AbstractRobustConnection | None = None
        self._consume_channel: AbstractChannel | None = None
        self._publish_exchange: AbstractExchange | None = None
        self._push_routing: str | None = None
        self._queue: AbstractQueue | None = None
        self._consumer_tag: str | None = None
        self._inflight = 0
        self._activity = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._changed = asyncio.Condition()

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        """Start consuming; the connector must already be registered (the queue must exist)."""
        if self._connection is not None:
            return
        reg = self.platform.registration(self.connector_id)
        self.push_queue = str(reg["push"])
        self._push_routing = str(reg["push_routing"])
        connection = await aio_pika.connect_robust(self.amqp_url)
        try:
            publish_channel = await connection.channel(publisher_confirms=True)
            self._publish_exchange = await publish_channel.get_exchange(
                str(reg["push_exchange"]), ensure=False
            )
            channel = await connection.channel()
            await channel.set_qos(prefetch_count=self.prefetch_count)
            self._queue = await channel.get_queue(self.push_queue, ensure=False)
            self._consumer_tag = await self._queue.consume(self._on_message)
        except BaseException:
            await connection.close()
            raise
        self._connection = connection
        self._consume_channel = channel

    async def close(self) -> None:
        connection, self._connection = self._connection, None
        if connection is None:
            return
        queue, tag = self._queue, self._consumer_tag
        self._queue = self._consumer_tag = None
        try:
            if queue is not None and tag is not None:
                await queue.cancel(tag)
            if self._inflight:
                try:
                    await asyncio.wait_for(self._idle.wait(), self.drain_timeout_s)
                except TimeoutError:
                    log.warning("worker emulation: %d messages still in flight", self._inflight)
        finally:
            self._publish_exchange = None
            self._consume_channel = None
            await connection.close()

    async def __aenter__(self) -> WorkerEmulation:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    # ------------------------------------------------------------------ waiting
    @property
    def inflight(self) -> int:
        return self._inflight

    async def wait_idle(self, timeout: float = 10.0, quiet_s: float = 0.2) -> bool:  # noqa: ASYNC109
        """True once nothing is in flight and nothing arrived for ``quiet_s``; False on timeout."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            remaining = deadline - loop.time()
            if remaining <= 0:
                return False
            try:
                await asyncio.wait_for(self._idle.wait(), remaining)
            except TimeoutError:
                return False
            marker = self._activity
            await asyncio.sleep(max(0.0, min(quiet_s, deadline - loop.time())))
            if self._idle.is_set() and self._activity == marker:
                return True

    async def wait_for(
        self,
        predicate: Callable[[WorkerEmulation], bool],
        timeout: float = 10.0,  # noqa: ASYNC109
    ) -> bool:
        """Wait until ``predicate(self)`` holds (checked after every message); False on timeout."""
        async with self._changed:
            try:
                await asyncio.wait_for(self._changed.wait_for(lambda: predicate(self)), timeout)
            except TimeoutError:
                return False
        return True

    def reset(self) -> None:
        """Forget records and counters (not the consumer)."""
        self.messages.clear()
        self.rejections.clear()
        self.objects_by_work.clear()
        self.counters = WorkerCounters()
        self._recorded_objects = 0

    # ------------------------------------------------------------------ handling
    def _can_record(self) -> bool:
        return self.max_records is None or len(self.messages) < self.max_records

    async def _on_message(self, message: AbstractIncomingMessage) -> None:
        self._inflight += 1
        self._activity += 1
        self._idle.clear()
        self.counters.received += 1
        self.counters.bytes_received += len(message.body)
        try:
            try:
                await self._handle(message)
            except _Reject as rej:
                self._reject(message, rej.reason, rej.work_id)
                await message.nack(requeue=False)
            except Exception as exc:  # the worker nacks (no requeue) on any unhandled error
                log.exception("worker emulation: unexpected error")
                self._reject(message, f"unhandled: {exc!r}", None)
                await message.nack(requeue=False)
            else:
                self.counters.acked += 1
                await message.ack()
        finally:
            self._inflight -= 1
            self._activity += 1
            if self._inflight == 0:
                self._idle.set()
            async with self._changed:
                self._changed.notify_all()

    def _reject(self, message: AbstractIncomingMessage, reason: str, work_id: str | None) -> None:
        self.counters.rejected += 1
        if self.max_records is None or len(self.rejections) < self.max_records:
            self.rejections.append(
                Rejection(
                    reason, bytes(message.body[:BODY_EXCERPT_BYTES]), work_id, _properties(message)
                )
            )

    async def _handle(self, message: AbstractIncomingMessage) -> None:
        try:
            data = json.loads(message.body)
        except (ValueError, UnicodeDecodeError) as exc:
            raise _Reject(f"body is not JSON: {exc}") from exc
        if not isinstance(data, dict):
            raise _Reject(f"body is not a JSON object: {type(data).__name__}")
        raw_work_id = data.get("work_id")
        work_id = raw_work_id if isinstance(raw_work_id, str) else None
        if "content" not in data:
            raise _Reject("missing content", work_id)
        try:
            raw = base64.b64decode(data["content"]).decode("utf-8")
            bundle = json.loads(raw)
        except (TypeError, ValueError, binascii.Error, UnicodeDecodeError) as exc:
            raise _Reject(f"content is not base64 JSON: {exc!r}", work_id) from exc
        if not isinstance(bundle, dict):
            raise _Reject("content is not a JSON object", work_id)
        event_type = data.get("type", "bundle")
        if event_type != "bundle":
            raise _Reject(f"unsupported event type {event_type!r}", work_id)
        objects = bundle.get("objects")
        if not isinstance(objects, list) or len(objects) == 0:
            raise _Reject("JSON data type is not a STIX2 bundle", work_id)

        record = PushRecord(
            envelope=data,
            keys=tuple(data),
            properties=_properties(message),
            bundle=bundle,
            work_id=work_id,
            applicant_id=data.get("applicant_id"),
            draft_id=data.get("draft_id"),
            outcome="imported",
            redelivered=bool(message.redelivered),
        )
        if self._can_record():
            self.messages.append(record)

        if len(objects) == 1 or data.get("no_split", False):
            self._import(record, raw, objects)
        else:
            await self._split(record, data, raw)

    def _import(self, record: PushRecord, raw: str, objects: list[Any]) -> None:
        """What pycti's ``import_bundle`` reports: one expectation per item (+ incompatibles)."""
        self.counters.imported_messages += 1
        items: list[Any] = objects
        reports: list[dict[str, Any] | None] = []
        if self.validate:
            splitter = OpenCTIStix2Splitter()
            _, incompatible, bundles = splitter.split_bundle_with_expectations(
                json.loads(raw), False, None
            )
            for element in incompatible:
                reports.append(
                    {
                        "error": "Incompatible element in bundle",
                        "source": f"Element {element.get('id')} is incompatible and couldn't be "
                        "processed",
                    }
                )
            items = [obj for b in bundles for obj in b["objects"]]
        for obj in items:
            reports.append(self._check(obj) if self.validate else None)
            self._record_object(record.work_id, obj)
        self.counters.objects += len(items)
        for error in reports:
            if error is not None:
                record.errors.append(error)
            if record.work_id is None:
                continue
            try:
                self.platform.report_expectation(record.work_id, error)
            except WorkNotAlive:
                # pycti skips WORK_NOT_ALIVE silently; the message is acked and dropped
                self.counters.dead_reports += 1
                if record.outcome != "dropped":
                    record.outcome = "dropped"
                    self.counters.dropped_dead += 1
                break
            if error is None:
                self.counters.reported_ok += 1
            else:
                self.counters.reported_error += 1

    @staticmethod
    def _check(obj: Any) -> dict[str, Any] | None:
        try:
            stix2.parse(obj, allow_custom=True)
        except Exception as exc:
            return {
                "error": f"{type(exc).__name__}: {exc}",
                "source": json.dumps(obj)[:SOURCE_MAX_CHARS],
            }
        return None

    def _record_object(self, work_id: str | None, obj: Any) -> None:
        if self.max_records is not None and self._recorded_objects >= self.max_records:
            return
        self._recorded_objects += 1
        self.objects_by_work.setdefault(work_id or "", []).append(obj)

    async def _split(self, record: PushRecord, data: dict[str, Any], raw: str) -> None:
        content = json.loads(raw)
        splitter = OpenCTIStix2Splitter()
        expectations, _, bundles = splitter.split_bundle_with_expectations(
            content, False, content.get("x_opencti_event_version")
        )
        if record.work_id is not None:
            try:
                self.platform.add_expectations(record.work_id, expectations)
            except WorkNotAlive:
                record.outcome = "dropped"
                self.counters.dropped_dead += 1
                return
        record.outcome = "split"
        self.counters.split_messages += 1
        exchange = self._publish_exchange
        if exchange is None or self._push_routing is None:
            raise RuntimeError("worker emulation is not started")
        for split in bundles:
            out = dict(data)
            out["content"] = base64.b64encode(json.dumps(split).encode("utf-8")).decode("utf-8")
            await exchange.publish(
                _WorkerMessage(json.dumps(out).encode("utf-8")),
                self._push_routing,
                mandatory=False,
            )
            self.counters.republished += 1
