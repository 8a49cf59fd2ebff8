"""Works (jobs) of the simulated platform: lifecycle, expectation accounting, history.

The platform creates a work before it publishes a job; the connector moves it to *received*,
adds expectations (one per bundle it pushes), the worker reports each imported item, and the
connector marks it *processed*. The accounting is the platform's (docs/protocol.md §6.2):
``addExpectations(n)`` adds n to the expected count, each ``reportExpectation`` adds one to the
processed count, and the work is *complete* as soon as processed >= expected, checked on every
report and on ``toProcessed``. So a work whose expectations are all reported completes without
``toProcessed``, and one that never got an expectation completes on ``toProcessed`` (or on its
first report). A multi-part work (``workAdd(isMultiPartWork: true)``) completes on a report only
after ``toProcessed``. A complete work stays complete. A killed (deleted) work answers
``WORK_NOT_ALIVE`` to every later call, and ``work(id)`` answers ``null`` for it as for an
unknown id.

``work(id)`` answers the platform's ``Work`` type (a superset of pycti's ``get_work``
selection). While a work runs, the platform keeps its counters in a cache where a counter nobody
wrote yet reads ``null``: ``tracking.import_expected_number`` before the first
``addExpectations``, ``tracking.import_processed_number`` before the first report. A complete
work answers numbers.

Every change of status, expected or processed count is appended to ``Work.history``;
:func:`early_completions` finds the works that were complete while they expected fewer objects
than were finally imported for them (they read complete before their objects were imported).
:class:`WorkTracker` implements the in-process API (used by the worker emulation and tests) and
the ``workEdit`` / ``workAdd`` / ``isWorkAlive`` / ``work`` GraphQL operations on top of it.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from lis_async.sim.opencti.changes import ChangeNotifier
from lis_async.sim.opencti.config import PlatformSimConfig, Work, WorkState
from lis_async.sim.opencti.errors import WorkNotAlive
from lis_async.sim.opencti.formats import iso
from lis_async.sim.opencti.graphql import Handler, RequestContext

__all__ = ["EarlyCompletion", "WorkTracker", "early_completions", "work_node"]

#: the platform keeps at most this many errors per work
MAX_WORK_ERRORS = 100
#: ``Work.user.name`` in ``work(id)`` answers (the double has no users)
SIM_USER_NAME = "Sim connector user"
#: history entries an :class:`EarlyCompletion` prints before eliding the middle
_TRAIL_HEAD, _TRAIL_TAIL = 8, 3


def _iso_or_none(ts: float | None) -> str | None:
    return None if ts is None else iso(ts)


def _tracking(w: Work) -> dict[str, Any]:
    """``Work.tracking``: the cache's counters while running (null until written), else numbers."""
    running = w.status != "complete"
    return {
        "import_expected_number": None if running and not w.expectation_calls else w.expected,
        "import_processed_number": None if running and not w.processed else w.processed,
        "import_last_processed": _iso_or_none(w.last_report_time),
    }


def work_node(w: Work, user_id: str | None = None) -> dict[str, Any]:
    """The platform's ``Work`` node for ``w`` (``connector`` is not answered)."""
    user = {"id": user_id, "name": SIM_USER_NAME, "entity_type": "User"} if user_id else None
    return {
        "id": w.id,
        "name": w.name,
        "user": user,
        "timestamp": iso(w.created_time),
        "status": w.status,
        "event_source_id": w.connector_id,
        "received_time": _iso_or_none(w.received_time),
        "processed_time": _iso_or_none(w.processed_time),
        "completed_time": _iso_or_none(w.completed_time),
        "completed_number": w.processed if w.complete else 0,
        "draft_context": w.draft_context,
        "tracking": _tracking(w),
        "messages": [
            {"timestamp": iso(t), "message": m, "sequence": None, "source": None}
            for t, m in zip(w.message_times, w.messages, strict=False)
        ],
        "errors": [
            {
                "timestamp": _iso_or_none(e.get("timestamp")),
                "message": e.get("message"),
                "sequence": None,
                "source": e.get("source"),
            }
            for e in w.errors
        ],
    }


# ------------------------------------------------------------------------ early completions


@dataclass(frozen=True, slots=True)
class EarlyCompletion:
    """A work that was complete while it expected fewer objects than were finally imported."""

    work_id: str
    #: the first such state: complete with ``state.expected`` < ``imported``
    state: WorkState
    #: objects finally imported for the work
    imported: int
    #: the work's whole history, oldest first
    history: tuple[WorkState, ...]

    @property
    def created_time(self) -> float:
        return self.history[0].time if self.history else self.state.time

    def trail(self) -> str:
        """The history as ``status processed/expected @+seconds``, long middles elided."""
        t0 = self.created_time
        items = [
            f"{s.status} {s.processed}/{s.expected} @+{s.time - t0:.3f}s" for s in self.history
        ]
        if len(items) > _TRAIL_HEAD + _TRAIL_TAIL + 1:
            hidden = len(items) - _TRAIL_HEAD - _TRAIL_TAIL
            items = [*items[:_TRAIL_HEAD], f"... {hidden} more ...", *items[-_TRAIL_TAIL:]]
        return " -> ".join(items)

    def __str__(self) -> str:
        s = self.state
        return (
            f"{self.work_id}: complete {s.time - self.created_time:.3f} s after creation with "
            f"{s.expected} expected and {s.processed} processed, but {self.imported} object(s) "
            f"imported in the end; history (status processed/expected): {self.trail()}"
        )


def early_completions(
    works: Mapping[str, Work],
    work_ids: Iterable[str] | None = None,
    imported: Mapping[str, int] | None = None,
) -> list[EarlyCompletion]:
    """The works ever seen complete while their expected count was below their final imports.

    ``work_ids`` defaults to every work (an unknown id raises ``KeyError``). ``imported`` gives
    the number of objects finally imported per work; a work it does not list counts its final
    processed count, i.e. every report the worker made for it (re-imports of a re-published
    object included). One entry per such work, for its first such state, in ``work_ids`` order.
    """
    counts = imported or {}
    out: list[EarlyCompletion] = []
    for wid in works if work_ids is None else work_ids:
        w = works[wid]
        final = counts.get(wid, w.processed)
        first = next((s for s in w.history if s.status == "complete" and s.expected < final), None)
        if first is not None:
            out.append(EarlyCompletion(wid, first, final, tuple(w.history)))
    return out


# ------------------------------------------------------------------------ tracker


class WorkTracker:
    """All works by id, and the operations that move them along."""

    def __init__(self, changes: ChangeNotifier, config: PlatformSimConfig | None = None) -> None:
        self.works: dict[str, Work] = {}
        self._changes = changes
        self._config = config
        self._last_work_ms = 0

    # ---------------------------------------------------------------- in-process API

    def create(self, connector_id: str, name: str = "Enrichment", multipart: bool = False) -> str:
        """Create a work like the platform before publishing a job; return its id."""
        now = time.time()
        ms = int(now * 1000)
        if ms <= self._last_work_ms:  # keep ids unique and in the platform's exact format
            ms = self._last_work_ms + 1
        self._last_work_ms = ms
        # the id carries the work's timestamp, as on the platform
        work_id = f"work_{connector_id}_{iso(ms / 1000)}"
        w = Work(
            id=work_id,
            connector_id=connector_id,
            name=name,
            created_time=ms / 1000,
            multipart=multipart,
        )
        w.record_state(now)
        self.works[work_id] = w
        self._changes.notify()
        return work_id

    def alive(self, work_id: str) -> Work:
        """The work, or WorkNotAlive when it is unknown or killed."""
        w = self.works.get(work_id)
        if w is None or w.killed:
            raise WorkNotAlive(work_id)
        return w

    @staticmethod
    def _complete(w: Work, now: float) -> None:
        if w.status != "complete":
            w.status = "complete"
            w.completed_time = now

    @staticmethod
    def _add_message(w: Work, now: float, message: str) -> None:
        w.messages.append(message)
        w.message_times.append(now)

    def _changed(self, w: Work, now: float) -> None:
        w.record_state(now)
        self._changes.notify()

    def add_expectations(self, work_id: str, n: int) -> None:
        w = self.alive(work_id)
        now = time.time()
        w.expected += int(n)
        w.expectation_calls += 1
        w.updated_time = now
        self._changed(w, now)

    def report_expectation(self, work_id: str, error: dict[str, Any] | None = None) -> None:
        """One imported item (what the worker reports); raises WorkNotAlive."""
        w = self.alive(work_id)
        now = time.time()
        w.processed += 1
        w.updated_time = now
        w.last_report_time = now
        if error and len(w.errors) < MAX_WORK_ERRORS:
            w.errors.append(
                {
                    "timestamp": now,
                    "message": error.get("error", error.get("message")),
                    "source": error.get("source"),
                }
            )
        # docs/protocol.md §6.2: complete as soon as processed >= expected (a multi-part work
        # only once toProcessed came)
        if w.processed >= w.expected and (not w.multipart or w.processed_time is not None):
            self._complete(w, now)
        self._changed(w, now)

    def to_received(self, work_id: str, message: str | None = None) -> None:
        w = self.alive(work_id)
        now = time.time()
        w.received_time = now
        w.updated_time = now
        w.status = "progress" if w.status != "complete" else w.status
        if message:
            self._add_message(w, now, message)
        self._changed(w, now)

    def to_processed(
        self, work_id: str, message: str | None = None, in_error: bool = False
    ) -> None:
        w = self.alive(work_id)
        now = time.time()
        w.processed_time = now
        w.updated_time = now
        if in_error:
            w.in_error = True
            if len(w.errors) < MAX_WORK_ERRORS:
                w.errors.append({"timestamp": now, "message": message, "source": None})
        elif message:
            self._add_message(w, now, message)
        # docs/protocol.md §6.2: toProcessed completes the work if processed >= expected already
        if w.processed >= w.expected:
            self._complete(w, now)
        self._changed(w, now)

    def kill(self, work_id: str) -> None:
        """Delete the work on the platform side: later work calls get WORK_NOT_ALIVE."""
        w = self.works.get(work_id)
        if w is not None:  # an unknown work is already "not alive"
            w.killed = True
            self._changes.notify()

    def by_status(self) -> dict[str, int]:
        out: dict[str, int] = {"wait": 0, "progress": 0, "complete": 0}
        killed = 0
        for w in self.works.values():
            if w.killed:
                killed += 1
            else:
                out[w.status] = out.get(w.status, 0) + 1
        if killed:
            out["killed"] = killed
        return out

    async def wait(
        self,
        work_ids: Iterable[str] | None,
        timeout: float,  # noqa: ASYNC109 - public API takes a plain timeout
    ) -> bool:
        """True once all given works (None: all non-killed works) are complete.

        Returns False at ``timeout``, or early when one of the given works was killed.
        """
        ids = list(work_ids) if work_ids is not None else None

        def done() -> bool:
            if ids is None:
                return all(w.status == "complete" for w in self.works.values() if not w.killed)
            for wid in ids:
                w = self.works.get(wid)
                if w is None or w.status != "complete":
                    return False
            return True

        def hopeless() -> bool:
            return ids is not None and any(
                (w := self.works.get(wid)) is not None and w.killed and w.status != "complete"
                for wid in ids
            )

        ok = await self._changes.wait_until(lambda: done() or hopeless(), timeout)
        return ok and done()

    def early_completions(
        self, work_ids: Iterable[str] | None = None, imported: Mapping[str, int] | None = None
    ) -> list[EarlyCompletion]:
        """:func:`early_completions` over this tracker's works."""
        return early_completions(self.works, work_ids, imported)

    # ---------------------------------------------------------------- GraphQL operations

    def handlers(self) -> dict[str, Handler]:
        return {
            "workToReceived": self._op_to_received,
            "addExpectations": self._op_add_expectations,
            "reportExpectation": self._op_report_expectation,
            "workToProcessed": self._op_to_processed,
            "pingWork": self._op_ping_work,
            "addDraftContext": self._op_add_draft_context,
            "workAdd": self._op_work_add,
            "isWorkAlive": self._op_is_work_alive,
            "WorkQuery": self._op_work,
        }

    @staticmethod
    def _work_id(v: dict[str, Any]) -> str:
        return str(v.get("id") or "")

    async def _op_to_received(self, ctx: RequestContext, v: dict[str, Any]) -> Any:
        wid = self._work_id(v)
        self.to_received(wid, v.get("message"))
        return {"workEdit": {"toReceived": wid}}

    async def _op_add_expectations(self, ctx: RequestContext, v: dict[str, Any]) -> Any:
        wid = self._work_id(v)
        self.add_expectations(wid, int(v.get("expectations") or 0))
        return {"workEdit": {"addExpectations": wid}}

    async def _op_report_expectation(self, ctx: RequestContext, v: dict[str, Any]) -> Any:
        wid = self._work_id(v)
        err = v.get("error")
        self.report_expectation(wid, err if isinstance(err, dict) else None)
        return {"workEdit": {"reportExpectation": wid}}

    async def _op_to_processed(self, ctx: RequestContext, v: dict[str, Any]) -> Any:
        wid = self._work_id(v)
        self.to_processed(wid, v.get("message"), bool(v.get("inError") or False))
        return {"workEdit": {"toProcessed": wid}}

    async def _op_ping_work(self, ctx: RequestContext, v: dict[str, Any]) -> Any:
        wid = self._work_id(v)
        w = self.alive(wid)
        w.pings += 1
        w.updated_time = time.time()
        return {"workEdit": {"ping": wid}}

    async def _op_add_draft_context(self, ctx: RequestContext, v: dict[str, Any]) -> Any:
        wid = self._work_id(v)
        w = self.alive(wid)
        w.draft_context = v.get("draftContext")
        return {"workEdit": {"addDraftContext": wid}}

    async def _op_work_add(self, ctx: RequestContext, v: dict[str, Any]) -> Any:
        wid = self.create(
            str(v.get("connectorId") or ""),
            v.get("friendlyName") or "Work",
            multipart=bool(v.get("isMultiPartWork") or False),
        )
        return {"workAdd": {"id": wid}}

    async def _op_is_work_alive(self, ctx: RequestContext, v: dict[str, Any]) -> Any:
        w = self.works.get(self._work_id(v))
        return {"isWorkAlive": w is not None and not w.killed}

    async def _op_work(self, ctx: RequestContext, v: dict[str, Any]) -> Any:
        """``work(id)``: the work's node; ``null`` (not an error) when unknown or killed."""
        w = self.works.get(self._work_id(v))
        if w is None or w.killed:
            return {"work": None}
        user_id = self._config.connector_user_id if self._config is not None else None
        return {"work": work_node(w, user_id)}
