"""Works (jobs) of the simulated platform: lifecycle, expectation accounting, history.

The platform creates a work before it publishes a job; the connector moves it to *received*,
adds expectations (one per bundle it pushes), the worker reports each imported item, and the
connector marks it *processed*. The work is *complete* once processed and every expectation
is reported, in whichever order the two happen. A killed (deleted) work answers
``WORK_NOT_ALIVE`` to every later call. :class:`WorkTracker` implements the in-process API
(used by the worker emulation and tests) and the ``workEdit`` / ``workAdd`` /
``isWorkAlive`` GraphQL operations on top of it.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

from lis_async.sim.opencti.changes import ChangeNotifier
from lis_async.sim.opencti.config import Work
from lis_async.sim.opencti.errors import WorkNotAlive
from lis_async.sim.opencti.formats import iso
from lis_async.sim.opencti.graphql import Handler, RequestContext

__all__ = ["WorkTracker"]

#: the platform keeps at most this many errors per work
MAX_WORK_ERRORS = 100


class WorkTracker:
    """All works by id, and the operations that move them along."""

    def __init__(self, changes: ChangeNotifier) -> None:
        self.works: dict[str, Work] = {}
        self._changes = changes
        self._last_work_ms = 0

    # ---------------------------------------------------------------- in-process API

    def create(self, connector_id: str, name: str = "Enrichment") -> str:
        """Create a work like the platform before publishing a job; return its id."""
        ms = int(time.time() * 1000)
        if ms <= self._last_work_ms:  # keep ids unique and in the platform's exact format
            ms = self._last_work_ms + 1
        self._last_work_ms = ms
        work_id = f"work_{connector_id}_{iso(ms / 1000)}"
        self.works[work_id] = Work(id=work_id, connector_id=connector_id, name=name)
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

    def add_expectations(self, work_id: str, n: int) -> None:
        w = self.alive(work_id)
        w.expected += int(n)
        w.updated_time = time.time()
        self._changes.notify()

    def report_expectation(self, work_id: str, error: dict[str, Any] | None = None) -> None:
        """One imported item (what the worker reports); raises WorkNotAlive."""
        w = self.alive(work_id)
        now = time.time()
        w.processed += 1
        w.updated_time = now
        if error and len(w.errors) < MAX_WORK_ERRORS:
            w.errors.append(
                {
                    "timestamp": now,
                    "message": error.get("error", error.get("message")),
                    "source": error.get("source"),
                }
            )
        if w.processed >= w.expected:
            self._complete(w, now)
        self._changes.notify()

    def to_received(self, work_id: str, message: str | None = None) -> None:
        w = self.alive(work_id)
        now = time.time()
        w.received_time = now
        w.updated_time = now
        w.status = "progress" if w.status != "complete" else w.status
        if message:
            w.messages.append(message)
        self._changes.notify()

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
            w.messages.append(message)
        if w.processed >= w.expected:
            self._complete(w, now)
        self._changes.notify()

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
        wid = self.create(str(v.get("connectorId") or ""), v.get("friendlyName") or "Work")
        return {"workAdd": {"id": wid}}

    async def _op_is_work_alive(self, ctx: RequestContext, v: dict[str, Any]) -> Any:
        w = self.works.get(self._work_id(v))
        return {"isWorkAlive": w is not None and not w.killed}
