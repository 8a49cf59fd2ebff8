"""The interfaces between the pipeline and the adapters, in one place.

The pipeline (:mod:`lis_async.enrichment.pipeline`) depends only on these Protocols, the data
types below and
:mod:`lis_async.errors`; the adapters (:mod:`lis_async.lastinfosec`,
:mod:`lis_async.platform.client`,
:mod:`lis_async.broker.publisher`) implement them, and :mod:`lis_async.app` wires one to the other.
Unit tests give the pipeline in-memory fakes of the same shape.

Each port documents the errors it may raise; anything else escaping a port is a bug, which
``Pipeline.run`` contains: the work ends in error with a generic message and the traceback goes to
the log, a playbook step is still answered (docs/architecture.md).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from lis_async.enrichment.delivery import Delivery
from lis_async.enrichment.job import Observable, PlaybookContext

__all__ = [
    "Delivery",
    "Lookup",
    "LookupResult",
    "PlatformHealthPort",
    "PlatformPort",
    "PublisherPort",
]


@dataclass(frozen=True, slots=True)
class LookupResult:
    """One LastInfoSec answer."""

    found: bool
    bundles: tuple[dict[str, Any], ...]  # every STIX bundle of the answer
    query: str  # the value actually sent (hash, host or full value)
    endpoint: str  # "search_hash" | "search_host" | "search"
    cached: bool = False


class Lookup(Protocol):
    """LastInfoSec, as the pipeline sees it.

    Raises :class:`~lis_async.errors.NothingToLookUp` (nothing to send: the job is skipped),
    :class:`~lis_async.errors.LisFatalError` (the key is refused: the worker stops) and other
    :class:`~lis_async.errors.LisError` (the work ends in error).
    """

    async def lookup(self, obs: Observable, *, urgent: bool = False) -> LookupResult:
        """``urgent``: served before the other lookups waiting for the rate limit."""
        ...


class PlatformPort(Protocol):
    """OpenCTI's GraphQL API, as the pipeline sees it (docs/protocol.md §4.3, §7 and §8).

    Every call raises :class:`~lis_async.errors.PlatformError` when it did not go through:
    ``WorkNotAlive`` (the work is gone: drop the job), ``PlatformAuthError`` (the token is
    refused: stop) or a retriable ``PlatformError``. ``draft_id`` is sent as that request's
    ``opencti-draft-id`` header.
    """

    async def work_received(self, work_id: str, draft_id: str | None) -> None: ...
    async def add_expectations(self, work_id: str, n: int, draft_id: str | None) -> None: ...
    async def work_processed(
        self, work_id: str, message: str, in_error: bool, draft_id: str | None
    ) -> None: ...
    async def work_expectations(self, work_id: str, draft_id: str | None) -> int:
        """The expectations the work recorded so far (0 when none)."""
        ...

    async def ping_work(self, work_id: str, draft_id: str | None) -> None: ...
    async def playbook_step(
        self, ctx: PlaybookContext, execution_start: str, bundle_json: str
    ) -> None: ...
    async def read_observable(
        self, entity_id: str, draft_id: str | None
    ) -> Mapping[str, Any] | None:
        """The platform's GraphQL ``stixCyberObservable`` record, or None when it cannot be
        read. Turning it into STIX is
        :func:`lis_async.enrichment.bundle.observable_from_platform`'s job."""
        ...

    async def read_marking(self, marking_id: str) -> Mapping[str, Any] | None:
        """The platform's ``markingDefinition`` node (``standard_id``, ``definition_type``,
        ``definition``, ``x_opencti_order``), or None when the platform does not know it (or
        hides it from the connector). Markings are global: no draft header."""
        ...


class PlatformHealthPort(Protocol):
    """The shared view of "the platform is down" (:mod:`lis_async.platform.health`)."""

    async def wait_up(self) -> None:
        """Return when the platform is (believed) up."""
        ...

    def unavailable(self, what: str, exc: BaseException) -> None:
        """A call found the platform unavailable."""
        ...


class PublisherPort(Protocol):
    """The connector's push queue.

    ``publish`` returns once every message of the delivery is confirmed by the broker, retrying
    what was not confirmed with back-off for as long as it takes (a job is never acknowledged
    before its messages are safely queued); it only ends early by cancellation.
    """

    async def publish(self, delivery: Delivery) -> None: ...
