"""Priority lanes: manual and playbook jobs overtake the auto-enrichment backlog.

The platform's listen queue is first in, first out, and the connector cannot change it
(docs/protocol.md §1.3). So the :class:`Mover` takes every job from the listen queue and
republishes it, unchanged, into one connector-owned classic priority queue, the lane
(:func:`lane_name`), at priority :data:`URGENT` for a manual or playbook job and
:data:`NORMAL` otherwise; the worker (:class:`lis_async.broker.consumer.Consumer`) consumes the
lane,
where RabbitMQ delivers the highest priority first, however deep the backlog.

At least once: the listen delivery is acked only after the broker confirmed the lane publish
(persistent, ``mandatory``: a lane that has gone returns it instead of dropping it). A crash in
between leaves a copy in each queue: duplicates are bounded by :data:`MOVE_PREFETCH`, and the
copy redelivered from the listen queue carries :data:`REDELIVERED_HEADER` so that the pipeline
treats it as the redelivery it is (it adds only the expectations its work lacks).

Whose queue is it? The lane's name can be declared by anyone with configure rights on the vhost,
with dead-lettering, a TTL, a length limit or another type. :func:`check_lane` reads the
arguments of whatever holds the name (a refused declare names one that differs: it is matched and
the declare tried again), and :func:`declare_lane` raises :class:`ForeignLane` unless the queue is
ours: our arguments, another expiry allowed (an older replica's). The worker then consumes the
listen queue directly and checks again every :data:`LANE_RECHECK_S`
(docs/security.md, "A lane of our own").

Design and trade-offs: docs/architecture.md, "Priority lanes".
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import re
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, Final, Protocol

import aio_pika
import aiormq.abc
import aiormq.exceptions
import orjson
from aio_pika.abc import (
    AbstractChannel,
    AbstractIncomingMessage,
    AbstractQueue,
    AbstractRobustChannel,
    AbstractRobustConnection,
)
from pamqp import commands as spec

from lis_async.broker.batches import BatchPublisher
from lis_async.broker.connection import (
    AmqpParams,
    connect,
    queue_depth,
    reason,
    settle,
    throwaway_channel,
)
from lis_async.enrichment.job import HEAD_BYTES, MAX_BODY_BYTES, read_internal

log: Final = logging.getLogger("lis_async.lanes")

NORMAL: Final = 0  # auto enrichment
URGENT: Final = 1  # a manual job (an analyst is waiting) or a playbook step
#: Set on a lane message whose listen delivery was a redelivery (the lane's own flag is not).
REDELIVERED_HEADER: Final = "x-lis-redelivered"
#: The lane deletes itself after this long without a consumer (RabbitMQ's x-expires); the jobs
#: it still holds go with it, so it is long: a week covers any planned stop (it was the setting
#: CONNECTOR_LANES_EXPIRE_S, see lis_async/settings/removed.py).
EXPIRE_S: Final = 604_800.0
#: Listen deliveries being moved at once (their publishes are pipelined, their acks grouped):
#: enough to keep the mover busy, few enough that a burst of them delays the event loop far
#: less than a request interval at the rates LastInfoSec sells (BENCHMARKS.md, "Figures quoted
#: from the code"). It also bounds the duplicates a crash can leave.
MOVE_PREFETCH: Final = 128
#: How often the mover looks for its listen queue again after the broker cancelled its consumer.
RECONSUME_S: Final = 5.0
#: A lane publish not confirmed within this long (a broker alarm blocks publishers) gives its
#: listen delivery back to the queue rather than hold it toward the consumer timeout. One
#: watch enforces it for every move (:meth:`Mover._expire`): a timer per publish is a
#: measurable share of the mover's CPU.
PUBLISH_TIMEOUT_S: Final = 60.0


def lane_name(connector_id: str) -> str:
    """The lane of a connector. The platform's queues are ``listen_<id>`` and ``push_<id>``
    (docs/protocol.md §1.3): a name with a dot and this prefix cannot be one of them."""
    return f"lis-async.lanes.{connector_id}"


#: While the lane's name is held by a foreign queue, it is checked again this often (and when
#: the mover meets one); the listen queue is consumed directly meanwhile.
LANE_RECHECK_S: Final = 60.0
#: The longest one check of the lane's name may take before the watch gives up on it.
CHECK_TIMEOUT_S: Final = 10.0
#: A refused declare names one argument that differs; this many probes name them all.
_MAX_PROBES: Final = 12
_INEQUIVALENT: Final = re.compile(
    r"inequivalent arg '(?P<key>[^']*)' for queue .*: received .* but current is "
    r"(?:(?P<none>none)|'(?P<same>[^']*)'|the value '(?P<value>[^']*)' of type '(?P<type>\w+)')"
)
_STRING_TYPES: Final = frozenset({"longstr", "shortstr", "binary"})
_ABSENT: Final = object()


class ForeignLane(Exception):
    """The lane's name is held by a queue that is not a lane (see :func:`check_lane`)."""

    def __init__(self, name: str, differences: tuple[str, ...]) -> None:
        super().__init__(f"the queue {name} is not a lane: {', '.join(differences)}")
        self.name = name
        self.differences = differences


@dataclass(frozen=True, slots=True)
class LaneCheck:
    """What holds the lane's name. ``foreign``: how it differs from a lane, one entry per
    argument (empty: it is a lane, or there was none and it now is). ``arguments``: what to
    declare it with (ours, with the expiry an older replica gave it)."""

    arguments: dict[str, Any] = field(default_factory=dict)
    foreign: tuple[str, ...] = ()


def _current(match: re.Match[str], sent: Any) -> Any:
    """The existing queue's value of the argument a refusal names (``_ABSENT``: it has none)."""
    if match["none"]:
        return _ABSENT
    if match["same"] is not None:  # the broker's short form: the same type as was sent
        text, kind = match["same"], ("longstr" if isinstance(sent, str) else "long")
        if isinstance(sent, bool):
            kind = "bool"
    else:
        text, kind = match["value"], match["type"]
    if kind in _STRING_TYPES:
        return text
    if kind == "bool":
        return text == "true"
    try:
        return float(text) if kind in ("float", "double") else int(text)
    except ValueError:
        return text


async def check_lane(conn: AbstractRobustConnection, name: str, expire_s: float) -> LaneCheck:
    """Declare the lane with our arguments on throw-away channels (a refused declare closes its
    channel). Each refusal names one argument and the existing queue's value of it, which the
    next declare takes, until one matches: an ``x-expires`` of its own (an older replica's
    ``CONNECTOR_LANES_EXPIRE_S``) is still a lane; any other difference, or a difference in
    ``durable`` or ``exclusive``, makes the queue foreign. No queue: it is declared, ours.

    A probe with another queue's arguments must not create one: should the name be freed
    between two probes (an operator deleting the foreign queue), that probe would leave a queue
    of mixed arguments holding the name for good, and the lane refused forever. So each such
    probe first checks, passively, that the queue is still there, and the check starts over
    with ours if not. (The two run back to back on one channel; a delete between them is not
    ruled out, only made unlikely.)"""
    ours = lane_arguments(expire_s)
    probe = dict(ours)
    found: list[str] = []
    for _ in range(_MAX_PROBES):
        try:
            async with throwaway_channel(conn) as channel:
                if probe != ours:
                    await channel.declare_queue(name, passive=True)
                await channel.declare_queue(name, durable=True, arguments=probe)
        except aiormq.exceptions.ChannelNotFoundEntity:  # gone since the last probe
            probe, found = dict(ours), []
        except aio_pika.exceptions.ChannelPreconditionFailed as exc:
            match = _INEQUIVALENT.search(str(exc))
            if match is None or not match["key"].startswith("x-"):  # durable, unreadable...
                detail = reason(exc) if match is None else f"{match['key']} differs"
                return LaneCheck(probe, (*found, detail))
            key = match["key"]
            current = _current(match, probe.get(key))
            found.append(f"{key} missing" if current is _ABSENT else f"{key}={current!r}")
            if current is _ABSENT:
                probe.pop(key, None)
            else:
                probe[key] = current
        except aiormq.exceptions.ChannelLockedResource:
            return LaneCheck(probe, (*found, "exclusive to another connection"))
        else:
            others = {k: v for k, v in probe.items() if k != "x-expires"}
            lane = isinstance(probe.get("x-expires"), int) and others == {
                k: v for k, v in ours.items() if k != "x-expires"
            }
            return LaneCheck(probe, () if lane else tuple(found))
    return LaneCheck(probe, (*found, "more arguments"))


def lane_arguments(expire_s: float) -> dict[str, Any]:
    """The lane's arguments. Every replica declares the lane with the same ones (a different
    set is refused by the broker: see :func:`declare_lane`). A classic queue, named
    explicitly: a vhost whose default queue type is quorum would otherwise ignore the
    priorities."""
    return {
        "x-queue-type": "classic",
        "x-max-priority": URGENT,
        "x-expires": int(expire_s * 1000),
    }


def priority(body: bytes) -> int:
    """:data:`URGENT` for a manual job or a playbook step, else :data:`NORMAL`. A usual body (up
    to :data:`~lis_async.enrichment.job.HEAD_BYTES`) is parsed whole; of a larger one only
    ``internal`` is read, from its head where the platform writes it
    (:func:`~lis_async.enrichment.job.read_internal`), and a body over the job size limit is not
    read at all. A body that cannot be read is moved as it is, at the normal priority: the
    pipeline acks it and marks its work in error."""
    if len(body) > MAX_BODY_BYTES:
        return NORMAL
    if len(body) > HEAD_BYTES:
        internal = read_internal(body)
    else:
        try:
            doc = orjson.loads(body)
        except orjson.JSONDecodeError:
            return NORMAL
        internal = doc.get("internal") if isinstance(doc, dict) else None
    if not isinstance(internal, dict):
        return NORMAL
    if internal.get("mode") == "manual" or internal.get("playbook") is not None:
        return URGENT
    return NORMAL


def redelivered(message: AbstractIncomingMessage) -> bool:
    """A lane (or listen) message is a redelivery if the broker says so, or if the listen
    delivery it was moved from was one."""
    return bool(message.redelivered) or bool(
        message.headers and message.headers.get(REDELIVERED_HEADER)
    )


async def declare_lane(
    conn: AbstractRobustConnection, channel: AbstractChannel, name: str, expire_s: float
) -> AbstractQueue:
    """Declare the lane on ``channel`` (idempotent), after :func:`check_lane`. Raises
    :class:`ForeignLane` when the name is held by a queue that is not a lane. A lane with
    an older replica's expiry is used as it is, with a warning."""
    check = await check_lane(conn, name, expire_s)
    if check.foreign:
        raise ForeignLane(name, check.foreign)
    if check.arguments != lane_arguments(expire_s):
        log.warning(
            "the lane %s expires after %s ms, as an older replica declared it "
            "(CONNECTOR_LANES_EXPIRE_S); using it as it is",
            name,
            check.arguments.get("x-expires"),
        )
    return await channel.declare_queue(name, durable=True, arguments=check.arguments)


class _Acks:
    """The listen deliveries of one mover channel, acked many at a time.

    A delivery is *taken* when it arrives and *moved* once the broker confirmed its copy in the
    lane. An AMQP ack with ``multiple`` settles every unsettled delivery up to its tag, so it
    may only name a tag below every delivery still being moved: :meth:`flush` (once per loop
    turn) acks up to the highest moved tag under the lowest taken one. A delivery whose move
    failed is nacked on its own at once (settled, so the next multiple ack passes over it).
    Delivery tags count per channel: a channel reopened after a reconnection gets a new
    ``_Acks`` (the old one's deliveries went back to the queue with the old channel)."""

    __slots__ = ("_scheduled", "channel", "moved", "publisher", "taken")

    def __init__(self, channel: aiormq.Channel, lane: str) -> None:
        self.channel = channel
        self.publisher = BatchPublisher(channel, lane)  # the copies, on the same channel
        self.taken: set[int] = set()
        self.moved: list[int] = []
        self._scheduled = False

    def done(self, tag: int) -> None:
        """The delivery ``tag`` is in the lane: ack it with the next flush."""
        self.taken.discard(tag)
        self.moved.append(tag)
        if not self._scheduled:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self.flush)

    def flush(self) -> None:
        self._scheduled = False
        low = min(self.taken, default=None)
        ready = self.moved if low is None else [t for t in self.moved if t < low]
        if not ready:
            return
        top = max(ready)
        self.moved = [t for t in self.moved if t > top]
        _spawn(settle(self.channel.basic_ack(top, multiple=True, wait=False)))

    async def nack(self, tag: int) -> None:
        """The delivery ``tag`` could not be moved: back into the listen queue, alone."""
        self.taken.discard(tag)
        await settle(self.channel.basic_nack(tag, requeue=True, wait=False))


_BACKGROUND: Final[set[asyncio.Future[Any]]] = set()


def _keep(future: asyncio.Future[Any]) -> None:
    """Keep ``future`` (a task) until it ends: the loop holds tasks weakly."""
    _BACKGROUND.add(future)
    future.add_done_callback(_BACKGROUND.discard)


def _spawn(coro: Coroutine[Any, Any, None]) -> None:
    """Run ``coro`` as a task of its own, kept until it ends."""
    _keep(asyncio.ensure_future(coro))


class Mover:
    """Moves every job from the listen queue into the lane (see the module docstring).

    The hot path works on the AMQP channel beneath aio-pika's robust channel (aiormq's): a
    delivery arrives as aiormq's message, its copy goes out with the loop turn's others
    (:class:`~lis_async.broker.batches.BatchPublisher`; the confirm is awaited by the
    delivery's own task, so moves are pipelined) and the listen deliveries are acked many at a
    time (:class:`_Acks`). aio-pika's message objects, built
    and checked per message on both sides, cost more than the move itself (BENCHMARKS.md,
    "The mover (issue #21)"; docs/lanes.md, "Trade-offs"). aio-pika still owns the
    channel: it reopens it after a reconnection, and the mover then consumes again on the new
    one (:meth:`_reopened`)."""

    def __init__(
        self,
        listen: str,
        lane: str,
        expire_s: float,
        *,
        on_moved: Callable[[int], None] = lambda _priority: None,
        on_foreign: Callable[[], None] = lambda: None,
        publish_timeout_s: float = PUBLISH_TIMEOUT_S,
    ) -> None:
        self._listen = listen
        self._lane = lane
        self._expire_s = expire_s
        self._on_moved = on_moved
        self._on_foreign = on_foreign  # the lane's name is held by a foreign queue now
        self._publish_timeout = publish_timeout_s
        self._conn: AbstractRobustConnection | None = None
        self._channel: AbstractRobustChannel | None = None
        self._acks: _Acks | None = None
        self._tag: str | None = None
        self._stopped = False
        #: The moves under way, oldest first, and when each started (see _expire).
        self._moves: dict[asyncio.Task[Any], float] = {}
        self._expired: set[asyncio.Task[Any]] = set()
        self._watch: asyncio.Task[None] | None = None
        self._resume: asyncio.Task[None] | None = None  # see _cancelled
        self._idle = asyncio.Event()
        self._idle.set()
        self.moved = 0  # jobs moved (confirmed in the lane) by this mover
        self.moved_bytes = 0  # ... and the size of their bodies

    @property
    def mean_body_bytes(self) -> float | None:
        """The mean body size of the jobs this mover moved (None before the first)."""
        return self.moved_bytes / self.moved if self.moved else None

    async def start(self, conn: AbstractRobustConnection) -> None:
        """Declare the lane and start moving, on a channel of its own on ``conn``. Raises
        :class:`ForeignLane` (and moves nothing) when the lane's name holds a foreign queue."""
        channel = await conn.channel(publisher_confirms=True, on_return_raises=True)
        assert isinstance(channel, aio_pika.RobustChannel)  # a robust connection's channel
        self._conn, self._channel = conn, channel
        await channel.set_qos(prefetch_count=MOVE_PREFETCH)
        try:
            await declare_lane(conn, channel, self._lane, self._expire_s)
            # Passive: the platform owns the listen queue (see lis_async.broker.consumer).
            await channel.declare_queue(self._listen, passive=True)
            await self._consume()
        except BaseException:
            await channel.close()
            raise
        channel.reopen_callbacks.add(self._reopened)
        self._watch = asyncio.create_task(self._expire(), name="lis-async lane mover watch")

    async def _consume(self) -> None:
        channel = self._channel
        if channel is None or self._stopped:
            return
        raw = await channel.get_underlay_channel()
        assert isinstance(raw, aiormq.Channel)  # see lis_async.broker.batches
        self._acks = _Acks(raw, self._lane)
        raw.on_consumer_cancel_callbacks.add(self._cancelled)
        ok = await raw.basic_consume(self._listen, self._move, no_ack=False)
        self._tag = ok.consumer_tag

    def _cancelled(self, frame: spec.Basic.Cancel) -> None:
        """The broker cancelled the mover's consumer (the listen queue was deleted): consume
        again once the queue is back (aio-pika does this for its own consumers)."""
        if frame.consumer_tag != self._tag or self._stopped:
            return
        self._tag = None
        log.warning(
            "the broker cancelled the lane mover's consumer of %s (was the queue deleted?): "
            "trying again every %g s",
            self._listen,
            RECONSUME_S,
        )
        self._resume = asyncio.create_task(self._consume_again(), name="lis-async mover resume")

    async def _consume_again(self) -> None:
        while not self._stopped and self._tag is None:
            await asyncio.sleep(RECONSUME_S)
            # A consume on a missing queue would close the channel: look first, elsewhere.
            if self._conn is None or await queue_depth(self._conn, self._listen) is None:
                continue
            try:
                await self._consume()
            except Exception as exc:
                log.warning("the lane mover could not consume again: %s", reason(exc))
        if self._tag is not None:
            log.warning("the lane mover consumes %s again", self._listen)

    async def _reopened(self, _channel: object) -> None:
        """aio-pika reopened the channel (a reconnection): consume again on the new one."""
        self._tag = None
        try:
            await self._consume()
        except Exception as exc:  # the next reopen tries again
            log.warning("the lane mover could not consume again: %s", reason(exc))

    async def _move(self, message: aiormq.abc.DeliveredMessage) -> None:
        # aiormq runs each delivery's callback as a task of its own: moves overlap, and
        # their confirms are awaited together.
        delivery = message.delivery
        assert isinstance(delivery, spec.Basic.Deliver)
        tag, acks = delivery.delivery_tag, self._acks
        if tag is None or acks is None or acks.channel is not message.channel:
            return  # a delivery of a closed channel: the broker requeued it
        acks.taken.add(tag)
        task = asyncio.current_task()
        assert task is not None
        self._moves[task] = time.monotonic()
        self._idle.clear()
        try:
            await self._move_one(message, tag, acks, bool(delivery.redelivered))
        except asyncio.CancelledError:
            if task not in self._expired:
                raise
            self._expired.discard(task)
            log.warning(
                "moving a job into the lane was not confirmed within %g s; it is requeued",
                self._publish_timeout,
            )
            await acks.nack(tag)
        finally:
            del self._moves[task]
            self._expired.discard(task)  # cancelled by the watch as it ended
            if not self._moves:
                self._idle.set()

    async def _expire(self) -> None:
        """Forever: cancel the moves whose publish waited :data:`PUBLISH_TIMEOUT_S` (their
        deliveries go back to the listen queue)."""
        while True:
            await asyncio.sleep(self._publish_timeout / 10)
            limit = time.monotonic() - self._publish_timeout
            for task, started in list(self._moves.items()):
                if started > limit:
                    break  # oldest first: the rest are younger
                self._expired.add(task)
                task.cancel()

    async def _move_one(
        self, message: aiormq.abc.DeliveredMessage, tag: int, acks: _Acks, again: bool
    ) -> None:
        body = message.body
        if self._stopped:  # stopping: the delivery goes back to the listen queue
            await acks.nack(tag)
            return
        level = priority(body)
        properties = spec.Basic.Properties(
            delivery_mode=2,  # persistent
            priority=level,
            headers={REDELIVERED_HEADER: True} if again else None,
        )
        try:
            await acks.publisher.publish(body, properties)
        except Exception as exc:  # not confirmed: the job stays in the listen queue
            log.warning("moving a job into the lane failed (%s); it is requeued", reason(exc))
            await acks.nack(tag)
            if isinstance(exc, aiormq.exceptions.PublishError):  # the lane is gone
                await self._redeclare()
            return
        acks.done(tag)
        self.moved += 1
        self.moved_bytes += len(body)
        self._on_moved(level)

    async def _redeclare(self) -> None:
        conn, channel = self._conn, self._channel
        if conn is not None and channel is not None:
            try:
                await declare_lane(conn, channel, self._lane, self._expire_s)
            except ForeignLane:
                # Not one more job into it: stop moving (the deliveries stay in the listen
                # queue) and let the worker fall back to the listen queue.
                await self._cancel()
                self._on_foreign()
            except Exception as exc:
                log.warning("declaring the lane %s again failed: %s", self._lane, reason(exc))

    async def _cancel(self) -> None:
        """No more listen deliveries (a move that starts after this requeues its delivery)."""
        self._stopped = True
        acks, tag, self._tag = self._acks, self._tag, None
        if acks is not None and tag is not None:
            try:
                await acks.channel.basic_cancel(tag)
            except Exception as exc:
                log.info("cancelling the mover failed: %s", reason(exc))

    async def stop(self, timeout_s: float = 10.0) -> None:
        """Stop taking listen deliveries and let the moves under way finish (their deliveries
        are requeued by the broker if they do not), then close the mover's channel (which
        settles what was moved: the broker requeues any delivery left unacked)."""
        await self._cancel()
        try:
            await asyncio.wait_for(self._idle.wait(), timeout_s)
        except TimeoutError:
            pass
        for task in (self._watch, self._resume):
            if task is not None:
                task.cancel()
        self._watch = self._resume = None
        if self._acks is not None:
            self._acks.flush()
            await asyncio.sleep(0)  # let the last ack go out before the channel closes
        channel, self._channel = self._channel, None
        if channel is not None:
            try:
                await channel.close()
            except Exception as exc:
                log.info("closing the mover's channel failed: %s", reason(exc))


class _Consumer(Protocol):
    """What :class:`Lanes` needs of :class:`lis_async.broker.consumer.Consumer`."""

    accepting: bool

    @property
    def connection(self) -> AbstractRobustConnection | None: ...

    @property
    def connected(self) -> bool: ...

    async def switch(
        self,
        queue_name: str,
        declare: Callable[[AbstractRobustConnection, AbstractChannel], Awaitable[AbstractQueue]]
        | None,
    ) -> None: ...


class Lanes:
    """A worker's priority lanes: its :class:`Mover`, and the guard against a foreign queue
    under the lane's name. While one holds it, nothing is moved into it and the consumer takes
    the listen queue directly, first in first out; :meth:`watch` checks again every
    :data:`LANE_RECHECK_S` (and at once when the mover met one) and switches the consumer back
    once an operator deleted it (or over, when one appears)."""

    def __init__(
        self, listen: str, connector_id: str, on_moved: Callable[[int], None], params: AmqpParams
    ) -> None:
        self.name = lane_name(connector_id)
        self.mover: Mover | None = None
        #: How the queue holding the lane's name differs from a lane (empty: it is ours).
        self.foreign: tuple[str, ...] = ()
        self._listen = listen
        self._on_moved = on_moved
        self._params = params
        self._recheck = asyncio.Event()
        self.declare = functools.partial(declare_lane, name=self.name, expire_s=EXPIRE_S)

    @property
    def queue(self) -> str:
        """The queue the consumer takes: the lane, or the listen queue while it is refused."""
        return self._listen if self.foreign else self.name

    async def check(self) -> None:
        """Before the consumer starts: whose queue the lane's name holds (a connection of its
        own, closed after)."""
        conn = await connect(self._params, "lis-async lane check")
        try:
            self._checked(await check_lane(conn, self.name, EXPIRE_S))
        finally:
            await conn.close()

    def _checked(self, check: LaneCheck) -> None:
        if check.foreign and check.foreign != self.foreign:
            log.error(
                "the queue %s exists with arguments other than the priority lane's (%s): "
                "nothing is moved into it; the listen queue %s is consumed directly, first in "
                "first out, until an operator deletes that queue (checked every %g s)",
                self.name,
                ", ".join(check.foreign),
                self._listen,
                LANE_RECHECK_S,
            )
        elif not check.foreign and self.foreign:
            log.warning(
                "the foreign queue %s is gone: priority lanes resume (declared and fed from %s)",
                self.name,
                self._listen,
            )
        self.foreign = check.foreign

    async def start(self, consumer: _Consumer) -> None:
        """Start moving, unless the lane is refused (the consumer then takes the listen queue)."""
        if self.foreign:
            return
        conn = consumer.connection
        if conn is None:
            raise RuntimeError("the consumer is not connected")
        mover = Mover(
            self._listen, self.name, EXPIRE_S, on_moved=self._on_moved, on_foreign=self._recheck.set
        )
        await mover.start(conn)
        self.mover = mover

    async def watch(self, consumer: _Consumer) -> None:
        """Forever: check the lane's name every :data:`LANE_RECHECK_S` (at once when the mover
        asks) and switch the consumer between the lane and the listen queue accordingly."""
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._recheck.wait(), LANE_RECHECK_S)
            self._recheck.clear()
            conn = consumer.connection
            if conn is None or not consumer.connected or not consumer.accepting:
                log.debug("the priority lane is not checked: the consumer is not connected")
                continue
            try:
                await self._recheck_once(consumer, conn)
            except Exception as exc:
                log.warning("checking the priority lane %s failed: %s", self.name, reason(exc))

    async def _recheck_once(self, consumer: _Consumer, conn: AbstractRobustConnection) -> None:
        # Bounded: a channel open or a declare that hangs (a broker busy or reconnecting) must
        # not stall the watch; the next round asks again. Waited for, not timed out from
        # inside: a cancellation that a library's cleanup swallows would leave the watch stuck
        # (seen twice in full suite runs: no recheck for 30 s after the foreign queue went).
        # A check that does not end is cancelled and left to end on its own.
        check = asyncio.ensure_future(check_lane(conn, self.name, EXPIRE_S))
        done, _ = await asyncio.wait({check}, timeout=CHECK_TIMEOUT_S)
        if not done:
            check.cancel()
            _keep(check)
            raise TimeoutError(f"no answer within {CHECK_TIMEOUT_S:g} s")
        self._checked(check.result())
        if self.foreign and self.mover is not None:
            mover, self.mover = self.mover, None
            await mover.stop()
            await consumer.switch(self._listen, None)
        elif not self.foreign and self.mover is None:
            await consumer.switch(self.name, self.declare)
            await self.start(consumer)

    async def stop(self, timeout_s: float) -> None:
        """Stop the mover (see :meth:`Mover.stop`)."""
        if self.mover is not None:
            await self.mover.stop(timeout_s)
