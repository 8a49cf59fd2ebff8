"""One job, from received to processed. Knows no transport: it talks to the ports.

A work job: toReceived is started, the job is *prepared* (observable, policy: scope and max
TLP/PAP gate, lookup, bundle) meanwhile, toReceived is awaited, the bundle is *delivered*
(expectations, push messages), toProcessed. A playbook step: the same preparation, then one
playbookStepExecution with the bundle (the incoming one when nothing was added).

:meth:`Pipeline.run` returns a :class:`Result` for every job the consumer may ack. It raises only
:class:`~lis_async.errors.FatalError` (the worker must stop: the job goes back to the queue) and
cancellation. Platform reports and publishes that fail are retried with back-off for as long as
it takes: a job is never acknowledged before its work is processed (docs/architecture.md).

Anything else going wrong inside a job (a bug, an input nobody foresaw) is contained: the work
ends in error with :data:`INTERNAL_ERROR`, the detail goes to the log, and a playbook step is
always answered, so that no work stays "in progress" and no playbook waits for ever.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, Final, Generic, TypeVar

import orjson

from lis_async.enrichment import bundle as stix
from lis_async.enrichment.delivery import Delivery
from lis_async.enrichment.delivery import prepare as push_messages
from lis_async.enrichment.gate import MarkingGate
from lis_async.enrichment.job import (
    Job,
    Observable,
    PlaybookContext,
    PlaybookJob,
    WorkJob,
    parse_job,
    parse_observable,
)
from lis_async.enrichment.ports import (
    Lookup,
    LookupResult,
    PlatformHealthPort,
    PlatformPort,
    PublisherPort,
)
from lis_async.errors import (
    FatalError,
    JobError,
    LisBudgetSpent,
    LisError,
    LisFatalError,
    NothingToLookUp,
    PlatformAuthError,
    PlatformError,
    PlatformUnavailable,
    WorkNotAlive,
)
from lis_async.redact import escape_controls, shown
from lis_async.retry import Backoff

log = logging.getLogger("lis_async.pipeline")
T = TypeVar("T")

# pycti pings a work every 5 minutes while its job runs (docs/protocol.md §4.3): the platform
# only bumps the work's updated_at, which keeps long jobs from looking stuck.
WORK_PING_INTERVAL_S: Final = 300.0
#: Bodies up to this size (a job is usually a few kilobytes) are parsed on the event loop;
#: larger ones in a thread, so that one job cannot stall the others.
PARSE_INLINE_BYTES: Final = 64 * 1024
#: The work message of a job that failed for a reason the connector did not foresee.
INTERNAL_ERROR: Final = "internal error, see the connector log"
# What can end a job early and must not be contained: the worker stops, or the work is gone.
_NOT_CONTAINED: Final = (FatalError, WorkNotAlive)


def _execution_start() -> str:
    """A playbook step's start, in pycti's format (docs/protocol.md §7)."""
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S+00:00")


def _dumps(bundle: Mapping[str, Any]) -> str:
    return orjson.dumps(bundle).decode()


def _label(job: Job) -> str:
    """How the log names a job: its work id, or "playbook"."""
    return job.work_id if isinstance(job, WorkJob) else "playbook"


def _passthrough_json(job: PlaybookJob) -> str:
    """The playbook bundle as received (organisations propagated), as JSON; an empty bundle
    with the same id if even that cannot be written (parsing bounds the nesting, so it can)."""
    try:
        return _dumps(stix.playbook_passthrough(job))
    except Exception:
        log.exception("cannot write the playbook bundle back: answering an empty bundle")
        bundle_id = job.playbook.bundle.get("id")
        return _dumps({"type": "bundle", "id": str(bundle_id), "objects": []})


async def _settle(received: asyncio.Future[None]) -> None:
    """Cancel ``received`` if it still runs, else mark its outcome retrieved (a contained
    failure may have ended the job before it was awaited)."""
    if not received.done():
        received.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await received
    elif not received.cancelled():
        received.exception()


class Outcome(StrEnum):
    ENRICHED = "enriched"
    NOT_FOUND = "not_found"
    SKIPPED = "skipped"
    FAILED = "failed"
    DROPPED = "dropped"  # the platform deleted the work: nothing to report to
    INVALID = "invalid"  # the body could not be parsed into a job (Pipeline.handle)


@dataclass(frozen=True, slots=True)
class Result:
    outcome: Outcome
    message: str
    objects: int = 0
    bundles: int = 0


@dataclass(frozen=True, slots=True)
class Policy:
    scope: frozenset[str]
    max_tlp: str
    confidence: int
    connector_user_id: str | None = None
    max_pap: str | None = None  # None: no PAP gate


@dataclass(slots=True)
class _Run:
    """A work job's progress, so a retried step never repeats a step that already went
    through."""

    job: WorkJob
    redelivered: bool
    started: float = field(default_factory=time.monotonic)
    expectations_added: bool = False


@dataclass(frozen=True, slots=True)
class _Prepared(Generic[T]):
    """A prepared job: its bundle, and what goes out of it (``out``: a work's push messages,
    a playbook step's bundle as JSON)."""

    found: LookupResult
    built: stix.Built
    out: T


class Pipeline:
    """Runs one job at a time per call, any number concurrently; all per-job state lives in the
    job's :class:`_Run`, never on the pipeline.

    ``handle`` takes a listen-queue body; ``run`` a parsed job. Reports to the platform go
    through :meth:`_retry` (until they go through); the bundle goes to the publisher, which
    retries what the broker did not confirm. ``in_flight`` (work id -> start time, draft id)
    feeds the long-job work ping (:meth:`ping_long_works`).
    """

    def __init__(
        self,
        *,
        lookup: Lookup,
        platform: PlatformPort,
        publisher: PublisherPort,
        policy: Policy,
        backoff: Backoff | None = None,
        health: PlatformHealthPort | None = None,
    ) -> None:
        self._lookup = lookup
        self._health = health
        self._platform = platform
        self._publisher = publisher
        self._policy = policy
        self._backoff = backoff or Backoff()
        self._gate = MarkingGate(policy.max_tlp, policy.max_pap)
        # work id -> (start time, draft id) of jobs in flight, for the 5-minute work ping.
        self.in_flight: dict[str, tuple[float, str | None]] = {}

    async def handle(self, body: bytes, redelivered: bool = False) -> Result:
        """A listen-queue body, end to end, with its one log line."""
        started = time.monotonic()
        try:
            # A large body is parsed off the event loop (its values are bounded: see
            # lis_async.enrichment.nesting); the usual few kilobytes stay on it.
            if len(body) > PARSE_INLINE_BYTES:
                job = await asyncio.to_thread(parse_job, body)
            else:
                job = parse_job(body)
        except JobError as exc:
            result = await self._reject(exc)
            log.warning(
                "job work=%s outcome=%s elapsed_ms=%d: %s",
                exc.work_id,
                result.outcome,
                (time.monotonic() - started) * 1000,
                escape_controls(str(exc)),
            )
            return result
        result = await self.run(job, redelivered)
        if log.isEnabledFor(logging.INFO):
            log.info(
                "job work=%s entity=%s outcome=%s elapsed_ms=%d: %s",
                _label(job),
                shown(str(job.entity_type)),
                result.outcome,
                (time.monotonic() - started) * 1000,
                escape_controls(result.message),
            )
        return result

    async def _reject(self, exc: JobError) -> Result:
        """An unreadable body is acked at once; its work (if its id could be read) ends in error,
        its playbook step (if its ids could be read) gets the bundle back as received. A few
        attempts only: the body must never hold a slot for long."""
        result = Result(Outcome.INVALID, f"Invalid enrichment job: {exc}"[:1000])
        if isinstance(exc.playbook, PlaybookContext):
            ctx = exc.playbook
            start = _execution_start()
            await self._few_attempts(
                "playbookStepExecution",
                lambda: self._platform.playbook_step(ctx, start, _dumps(dict(ctx.bundle))),
            )
        elif exc.work_id is not None:
            work_id = exc.work_id
            await self._few_attempts(
                "toProcessed",
                lambda: self._platform.work_processed(work_id, result.message, True, None),
            )
        return result

    async def _few_attempts(self, what: str, call: Callable[[], Awaitable[None]]) -> None:
        for attempt in range(3):
            try:
                await call()
                return
            except WorkNotAlive:
                return
            except PlatformError as perr:
                log.warning("%s for an invalid job failed (%s)", what, perr)
                await asyncio.sleep(self._backoff.delay(attempt + 1))
            except Exception:
                log.exception("%s for an invalid job failed", what)
                return

    async def run(self, job: Job, redelivered: bool = False) -> Result:
        if isinstance(job, PlaybookJob):
            return await self._run_playbook(job)
        run = _Run(job, redelivered)
        self.in_flight[job.work_id] = (run.started, job.draft_id)
        try:
            return await self._run_work(run)
        except WorkNotAlive:
            log.warning("work %s is no longer alive on the platform: job dropped", job.work_id)
            return Result(Outcome.DROPPED, "work no longer alive")
        finally:
            self.in_flight.pop(job.work_id, None)

    async def _contained(self, job: Job, step: Awaitable[T]) -> T | Result:
        """``step``'s value, or the failed Result of an exception nobody foresaw (logged with
        its traceback). FatalError, WorkNotAlive and cancellation go through."""
        try:
            return await step
        except _NOT_CONTAINED:
            raise
        except Exception:
            log.exception(
                "internal error in job work=%s entity=%s",
                _label(job),
                escape_controls(job.entity_id),
            )
            return Result(Outcome.FAILED, INTERNAL_ERROR)

    # -- jobs with a work --------------------------------------------------------------------
    async def _run_work(self, run: _Run) -> Result:
        job = run.job
        # toReceived goes out while the job is prepared (one platform round trip less on every
        # job's latency); it only has to land before the next report, which awaits it.
        received = asyncio.ensure_future(
            self._retry(
                "toReceived", lambda: self._platform.work_received(job.work_id, job.draft_id)
            )
        )
        try:
            result = await self._contained(job, self._enrich(run, received))
        finally:
            await _settle(received)
        in_error = result.outcome is Outcome.FAILED
        await self._contained(
            job,
            self._retry(
                "toProcessed",
                lambda: self._platform.work_processed(
                    job.work_id, result.message, in_error, job.draft_id
                ),
            ),
        )
        return result

    async def _enrich(self, run: _Run, received: asyncio.Future[None]) -> Result:
        """Prepare, await toReceived (the platform hears "received" before any expectation),
        deliver."""
        job = run.job
        prepared = await self._prepare(
            job,
            lambda bundle: push_messages(
                bundle,
                applicant_id=job.applicant_id or self._policy.connector_user_id,
                draft_id=job.draft_id,
                work_id=job.work_id,
            ),
        )
        if not isinstance(prepared, Result) and log.isEnabledFor(logging.DEBUG):
            log.debug(
                "work %s: %d object(s) from %d LastInfoSec bundle(s), %d push message(s), "
                "%d dropped by the splitter",
                job.work_id,
                len(prepared.built.bundle["objects"]),
                len(prepared.found.bundles),
                len(prepared.out.bodies),
                prepared.out.incompatible,
            )
        await received
        if isinstance(prepared, Result):
            return prepared
        delivery = prepared.out
        await self._deliver(run, delivery)
        return Result(
            Outcome.ENRICHED,
            f"Sent {delivery.objects} object(s) in {len(delivery.bodies)} bundle(s)"
            + prepared.built.left_out(),
            objects=delivery.objects,
            bundles=len(delivery.bodies),
        )

    async def _deliver(self, run: _Run, delivery: Delivery) -> None:
        job = run.job
        work_id, draft_id = job.work_id, job.draft_id
        if not run.expectations_added:
            n = len(delivery.bodies)
            if run.redelivered:
                # The first attempt may have recorded its expectations before it was lost:
                # adding them again would leave the work waiting for ever, not adding them
                # would let it read "complete" before the objects are imported. Ask the work.
                recorded = await self._retry(
                    "read work tracking",
                    lambda: self._platform.work_expectations(work_id, draft_id),
                )
                n = max(0, n - recorded)
            if n:
                await self._retry(
                    "addExpectations",
                    lambda: self._platform.add_expectations(work_id, n, draft_id),
                )
            run.expectations_added = True
        await self._publisher.publish(delivery)

    # -- playbook jobs -----------------------------------------------------------------------
    async def _run_playbook(self, job: PlaybookJob) -> Result:
        """One playbookStepExecution, whatever happens: the platform waits for it."""
        execution_start = _execution_start()
        answer = await self._contained(job, self._playbook_answer(job))
        if isinstance(answer, Result):  # contained: the bundle goes back as received
            result, bundle_json = answer, _passthrough_json(job)
        else:
            result, bundle_json = answer
        await self._contained(
            job,
            self._retry(
                "playbookStepExecution",
                lambda: self._platform.playbook_step(job.playbook, execution_start, bundle_json),
            ),
        )
        return result

    async def _playbook_answer(self, job: PlaybookJob) -> tuple[Result, str]:
        """Playbooks always get the whole bundle back, even when nothing was added."""
        prepared = await self._prepare(job, _dumps)
        if isinstance(prepared, Result):
            return prepared, _passthrough_json(job)
        n = len(prepared.built.bundle.get("objects", []))
        return Result(
            Outcome.ENRICHED, f"Returned {n} object(s) to the playbook" + prepared.built.left_out()
        ), prepared.out  # objects/bundles stay 0: nothing is published for a playbook

    # -- preparation, for both kinds -------------------------------------------------------
    async def _prepare(self, job: Job, out: Callable[[dict[str, Any]], T]) -> _Prepared[T] | Result:
        """Observable, policy, lookup, bundle (and ``out`` of it): all a job needs before
        anything goes out. A Result when the job ends here (skipped, not found, failed)."""
        obs = await self._observable(job)
        if isinstance(obs, Result):
            return obs
        if job.observable is None:  # read from the platform: the job now carries it
            job = replace(job, observable=obs)
        skip = await self._policy_check(job, obs)
        if skip is not None:
            return skip
        found = await self._look_up(obs, job.urgent)
        if isinstance(found, Result):
            return found
        try:
            built = stix.build(job, found.bundles, confidence=self._policy.confidence)
            return _Prepared(found, built, out(built.bundle))
        except Exception as exc:  # a LastInfoSec answer we cannot turn into STIX
            text = escape_controls(str(exc))
            log.warning("cannot build a bundle for %s: %s", shown(obs.display), text)
            return Result(
                Outcome.FAILED, f"Cannot build a STIX bundle from the answer: {text}"[:500]
            )

    async def _observable(self, job: Job) -> Observable | Result:
        if job.observable is not None:
            return job.observable
        # Deferred resolution: the platform sent no stix_entity; read it (docs/protocol.md §3.5).
        record = await self._retry(
            "read entity", lambda: self._platform.read_observable(job.entity_id, job.draft_id)
        )
        if record is None:
            return Result(
                Outcome.FAILED,
                "Unable to read/access the entity, please check the connector permissions",
            )
        try:
            entity = stix.observable_from_platform(record, job.entity_id)
            return parse_observable(entity, job.entity_type, job.work_id)
        except JobError as exc:
            return Result(Outcome.FAILED, f"Unreadable entity: {exc}")

    async def _policy_check(self, job: Job, obs: Observable) -> Result | None:
        """Scope, then the max-TLP / max-PAP gate (lis_async.enrichment.gate): before any call
        out."""
        if obs.entity_type not in self._policy.scope:
            return Result(
                Outcome.SKIPPED,
                f"{shown(obs.entity_type)} is not in this connector's scope, skipped",
            )
        refusal = await self._gate.refusal(job, obs, self._read_marking)
        if refusal is not None:
            return Result(Outcome.SKIPPED, refusal)
        return None

    async def _read_marking(self, marking_id: str) -> Mapping[str, Any] | None:
        return await self._retry(
            "read marking definition", lambda: self._platform.read_marking(marking_id)
        )

    async def _look_up(self, obs: Observable, urgent: bool) -> LookupResult | Result:
        try:
            found = await self._lookup.lookup(obs, urgent=urgent)
        except NothingToLookUp as exc:
            return Result(Outcome.SKIPPED, str(exc))
        except LisFatalError as exc:
            raise FatalError(str(exc)) from None
        except LisBudgetSpent as exc:  # nothing sent: completed at once, not in error
            return Result(Outcome.SKIPPED, str(exc))
        except LisError as exc:  # retries exhausted, bad answer: the work ends in error
            return Result(Outcome.FAILED, f"LastInfoSec lookup failed: {exc}")
        if not found.found:
            return Result(Outcome.NOT_FOUND, f"{shown(found.query)} not found in LastInfoSec")
        return found

    # -- shared ------------------------------------------------------------------------------
    async def _retry(self, what: str, call: Callable[[], Awaitable[T]]) -> T:
        """Retry a platform call until it goes through. WorkNotAlive is final; so is an auth
        failure (a configuration error: the worker stops and the job returns to the queue).
        An unavailable platform is waited for on the health gate (one probe for the whole
        worker); an error the platform answered is retried with back-off."""
        attempt = 0
        health = self._health
        while True:
            if health is not None:
                await health.wait_up()
            try:
                return await call()
            except WorkNotAlive:
                raise
            except PlatformAuthError as exc:
                raise FatalError(f"OpenCTI refused the connector's token: {exc}") from None
            except PlatformUnavailable as exc:
                if health is None:
                    await self._back_off(what, exc, attempt := attempt + 1)
                else:  # the whole worker waits for the platform, on one probe
                    health.unavailable(what, exc)
            except PlatformError as exc:  # it answered with an error: retry this call alone
                attempt += 1
                await self._back_off(what, exc, attempt)

    async def _back_off(self, what: str, exc: PlatformError, attempt: int) -> None:
        delay = self._backoff.delay(attempt)
        log.warning("%s failed (%s); retry %d in %.1fs", what, exc, attempt, delay)
        await asyncio.sleep(delay)

    async def ping_long_works(
        self, every_s: float = 60.0, older_than_s: float = WORK_PING_INTERVAL_S
    ) -> None:
        """One loop for every job: ping works whose job has run longer than 5 minutes."""
        last: dict[str, float] = {}
        while True:
            await asyncio.sleep(every_s)
            now = time.monotonic()
            for work_id, (started, draft_id) in list(self.in_flight.items()):
                if (
                    now - started >= older_than_s
                    and now - last.get(work_id, started) >= older_than_s
                ):
                    try:
                        await self._platform.ping_work(work_id, draft_id)
                        last[work_id] = now
                    except PlatformError as exc:
                        log.info("ping of work %s failed: %s", work_id, exc)
            for work_id in list(last):
                if work_id not in self.in_flight:
                    del last[work_id]
