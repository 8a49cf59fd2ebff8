"""Every error the worker's parts raise, in one hierarchy.

Each adapter maps its library's exceptions (aiohttp, aiormq, requests, pydantic) into these once,
at its boundary, and never chains the original: a library exception may carry a URL with the
LastInfoSec key or a broker password. The pipeline handles only these classes. Every message is
already redacted when it is built (:mod:`lis_async.redact`).

::

    LisAsyncError
    ├── SettingsError            bad settings: exit 2 at start
    ├── JobError                 a listen-queue body that cannot become a job (never retried)
    ├── LisError                 a LastInfoSec lookup failed
    │   ├── LisFatalError        the API key is refused: the worker stops
    │   ├── LisRetriesExhausted  429/5xx/timeouts beyond the retry budget
    │   ├── LisBadAnswer         not JSON, too large, wrongly shaped
    │   ├── LisBudgetSpent       the daily budget has no request left for this job
    │   └── NothingToLookUp      the observable gives nothing to send
    ├── PlatformError            a GraphQL call to OpenCTI failed
    │   ├── PlatformUnavailable  no answer, or not a GraphQL one (HTTP 5xx...): it is down
    │   ├── WorkNotAlive         the platform deleted the work
    │   └── PlatformAuthError    the token is refused: the worker stops
    ├── PublishError             push messages not confirmed by the broker
    └── FatalError               the worker cannot go on: stop taking jobs, requeue the job

``retriable`` says whether the same operation may succeed later.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = [
    "FatalError",
    "JobError",
    "LisAsyncError",
    "LisBadAnswer",
    "LisBudgetSpent",
    "LisError",
    "LisFatalError",
    "LisRetriesExhausted",
    "NothingToLookUp",
    "PlatformAuthError",
    "PlatformError",
    "PlatformUnavailable",
    "PublishError",
    "SettingsError",
    "WorkNotAlive",
]


class LisAsyncError(Exception):
    """Base class of every error this package raises on purpose."""

    retriable: bool = False


class SettingsError(LisAsyncError, ValueError):
    """Invalid settings: one line per problem, naming the variable; never a secret's value."""

    def __init__(self, problems: Sequence[str]) -> None:
        self.problems = list(problems)
        super().__init__("invalid settings:\n  " + "\n  ".join(self.problems))


class JobError(LisAsyncError, ValueError):
    """A listen-queue body that cannot be turned into a job. Never retried; ``work_id`` is set
    when it could be read, so the work can be ended in error. ``playbook`` holds the
    :class:`lis_async.enrichment.job.PlaybookContext` of a playbook step whose ids could be read
    (the step
    must still be answered, or the playbook waits for ever); it is set by the parser."""

    def __init__(self, message: str, work_id: str | None = None) -> None:
        super().__init__(message)
        self.work_id = work_id
        self.playbook: object | None = None


class LisError(LisAsyncError):
    """A LastInfoSec lookup failure. The message is always redacted."""

    def __init__(
        self, message: str, *, retriable: bool | None = None, status: int | None = None
    ) -> None:
        super().__init__(message)
        if retriable is not None:
            self.retriable = retriable
        self.status = status


class LisFatalError(LisError):
    """The API key is invalid or expired (200 with a text, 401, 403): stop the worker."""


class LisRetriesExhausted(LisError):
    """429 / 5xx / timeouts / connection errors beyond the retry budget."""

    retriable = True

    def __init__(self, message: str, *, attempts: int, status: int | None = None) -> None:
        super().__init__(message, status=status)
        self.attempts = attempts


class LisBadAnswer(LisError):
    """Non-JSON, truncated, oversized or wrongly shaped answer."""


class LisBudgetSpent(LisError):
    """The day's LastInfoSec budget (``LASTINFOSEC_DAILY_BUDGET``) has no request left for this
    job (or, in cluster mode, none is held and Redis cannot be reached): nothing was sent. Not
    an error of the job: the pipeline completes it at once with the message
    (docs/lastinfosec.md, Daily budget)."""

    def __init__(
        self, message: str = "LastInfoSec daily budget spent; re-enrich after 00:00 UTC"
    ) -> None:
        super().__init__(message, retriable=False)


class NothingToLookUp(LisError):
    """The observable gives nothing to send (no usable hash, no host, unsupported type)."""


class PlatformError(LisAsyncError):
    """A failed GraphQL call to OpenCTI; ``code`` is the platform's error name when it sent one."""

    def __init__(self, message: str, *, code: str | None = None, retriable: bool = True) -> None:
        super().__init__(message)
        self.code = code
        self.retriable = retriable


class PlatformUnavailable(PlatformError):
    """OpenCTI did not answer the call (unreachable, timeout, HTTP 5xx or another non-GraphQL
    answer): the platform, not this call, is the problem. The pipeline waits for it on the
    platform health gate instead of retrying on its own."""


class WorkNotAlive(PlatformError):
    """The platform deleted the work: nothing more can be reported for this job."""

    def __init__(self, message: str = "WORK_NOT_ALIVE") -> None:
        super().__init__(message, code="WORK_NOT_ALIVE", retriable=False)


class PlatformAuthError(PlatformError):
    """The token is refused or lacks a capability: a configuration error."""

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message, code=code, retriable=False)


class PublishError(LisAsyncError):
    """Some push messages were not confirmed by the broker; ``unconfirmed`` holds them (the
    publisher retries just those)."""

    retriable = True

    def __init__(self, unconfirmed: Sequence[bytes], cause: str) -> None:
        super().__init__(f"{len(unconfirmed)} push message(s) not confirmed: {cause}")
        self.unconfirmed = tuple(unconfirmed)


class FatalError(LisAsyncError):
    """The worker cannot go on (LastInfoSec key invalid, OpenCTI token refused): it stops taking
    jobs and the job in hand returns to the queue."""
