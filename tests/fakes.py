"""The one set of in-memory fakes for the pipeline's ports (lis_async.enrichment.ports), used by
every test that runs a :class:`~lis_async.enrichment.pipeline.Pipeline` without the network.

Test files import from here or from tests/helpers (never from another test file).
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import date
from typing import Any, Final

import orjson

from lis_async.enrichment.delivery import Delivery
from lis_async.enrichment.job import Observable
from lis_async.enrichment.pipeline import Pipeline, Policy
from lis_async.enrichment.ports import LookupResult
from lis_async.errors import PlatformError
from lis_async.lastinfosec.cache import CachedAnswer
from lis_async.lastinfosec.wire import parse_answer, query_for
from lis_async.retry import Backoff

#: Every type the connector enriches.
SCOPE = frozenset({"StixFile", "Domain-Name", "Hostname", "Url"})


class FakeLookup:
    """LastInfoSec: answers ``bundles`` (found when there are any), or raises ``error``.
    Records the observables looked up (``seen``) and whether each lookup was urgent."""

    def __init__(
        self, bundles: Sequence[dict[str, Any]] = (), error: Exception | None = None
    ) -> None:
        self.bundles = tuple(bundles)
        self.error = error
        self.seen: list[Observable] = []
        self.urgent: list[bool] = []

    async def lookup(self, obs: Observable, *, urgent: bool = False) -> LookupResult:
        self.seen.append(obs)
        self.urgent.append(urgent)
        if self.error:
            raise self.error
        return LookupResult(
            found=bool(self.bundles),
            bundles=self.bundles,
            query=obs.display,
            endpoint="search_host",
        )


class ParsingLookup(FakeLookup):
    """LastInfoSec answering ``raw`` (the HTTP body), through the real client's query building
    and answer parsing (lastinfosec.wire, with an objects cap) and its answer cache entry
    (CachedAnswer: where a deep answer used to raise TypeError), without HTTP; or raising
    ``error``. Nothing is recorded when there is nothing to look up."""

    def __init__(
        self, raw: bytes | None = None, error: Exception | None = None, max_objects: int = 50
    ) -> None:
        super().__init__(error=error)
        self.raw = raw
        self.max_objects = max_objects

    async def lookup(self, obs: Observable, *, urgent: bool = False) -> LookupResult:
        endpoint, value = query_for(obs, "search_hash_host")
        self.seen.append(obs)
        self.urgent.append(urgent)
        if self.error is not None:
            raise self.error
        assert self.raw is not None
        result = parse_answer(self.raw, endpoint, value, lambda text: text, self.max_objects)
        return CachedAnswer.of(result).result()


class FakePlatform:
    """OpenCTI's GraphQL API as the pipeline sees it. ``calls`` records every call that went
    through, as a tuple starting with its name (``names()``: the names alone).

    Failures: every call first fails ``flaky`` times with a retriable PlatformError (an outage);
    then ``fail[name]`` lists exceptions the next calls of that name raise, in order. A draft id
    that cannot be an HTTP header raises ValueError, as aiohttp does."""

    def __init__(
        self,
        *,
        entity: Any = None,
        markings: dict[str, Any] | None = None,
        recorded: int = 0,
        flaky: int = 0,
    ) -> None:
        self.calls: list[tuple[Any, ...]] = []
        self.fail: dict[str, list[Exception]] = {}
        self.entity = entity  # the GraphQL stixCyberObservable record read_observable returns
        self.markings: dict[str, Any] = dict(markings or {})  # read_marking, by lower-case id
        self.recorded = recorded  # expectations the work already has (work_expectations)
        self.flaky = flaky
        self._failed: dict[str, int] = {}

    def _call(self, name: str, draft_id: str | None = None) -> None:
        if draft_id is not None and not draft_id.isprintable():
            raise ValueError("Newline or carriage return detected in headers")
        if self._failed.get(name, 0) < self.flaky:
            self._failed[name] = self._failed.get(name, 0) + 1
            raise PlatformError("OpenCTI answered HTTP 503: outage")
        errors = self.fail.get(name)
        if errors:
            raise errors.pop(0)

    def names(self) -> list[str]:
        return [c[0] for c in self.calls]

    async def work_received(self, work_id: str, draft_id: str | None) -> None:
        self._call("received", draft_id)
        self.calls.append(("received", work_id, draft_id))

    async def add_expectations(self, work_id: str, n: int, draft_id: str | None) -> None:
        self._call("expectations", draft_id)
        self.calls.append(("expectations", work_id, n))

    async def work_processed(
        self, work_id: str, message: str, in_error: bool, draft_id: str | None
    ) -> None:
        assert isinstance(message, str) and message
        self._call("processed", draft_id)
        self.calls.append(("processed", work_id, message, in_error))

    async def work_expectations(self, work_id: str, draft_id: str | None) -> int:
        self._call("tracking", draft_id)
        self.calls.append(("tracking", work_id))
        return self.recorded

    async def ping_work(self, work_id: str, draft_id: str | None) -> None:
        self.calls.append(("ping", work_id))

    async def playbook_step(self, ctx: Any, execution_start: str, bundle_json: str) -> None:
        bundle = orjson.loads(bundle_json)
        assert isinstance(bundle.get("objects"), list)
        self._call("playbook")
        self.calls.append(("playbook", ctx.step_id, bundle))

    async def read_observable(self, entity_id: str, draft_id: str | None) -> Any:
        self._call("read", draft_id)
        self.calls.append(("read", entity_id))
        return self.entity

    async def read_marking(self, marking_id: str) -> Any:
        self._call("marking")
        self.calls.append(("marking", marking_id))
        return self.markings.get(marking_id.lower())


class FakePublisher:
    """The push queue: every body published, and how many deliveries brought them."""

    def __init__(self) -> None:
        self.published: list[bytes] = []
        self.deliveries = 0

    async def publish(self, delivery: Delivery) -> None:
        self.deliveries += 1
        self.published.extend(delivery.bodies)


def make_pipeline(
    lookup: FakeLookup,
    platform: FakePlatform | None = None,
    *,
    max_tlp: str = "TLP:AMBER",
    max_pap: str | None = None,
    connector_user_id: str | None = "connector-user",
    backoff: Backoff | None = None,
) -> tuple[Pipeline, FakePlatform, FakePublisher]:
    """A pipeline on these fakes (every observable type in scope, confidence 70, back-offs of
    milliseconds), with its platform and publisher."""
    platform = platform or FakePlatform()
    publisher = FakePublisher()
    pipeline = Pipeline(
        lookup=lookup,
        platform=platform,
        publisher=publisher,
        policy=Policy(
            scope=SCOPE,
            max_tlp=max_tlp,
            confidence=70,
            connector_user_id=connector_user_id,
            max_pap=max_pap,
        ),
        backoff=backoff or Backoff(base_s=0.001, max_s=0.01),
    )
    return pipeline, platform, publisher


# -- the daily budget -------------------------------------------------------------------------

#: The work message of an auto job past the daily budget (what an analyst reads).
SPENT: Final = "LastInfoSec daily budget spent; re-enrich after 00:00 UTC"


class Today:
    """The UTC day, moved by the test (the budget's day function)."""

    def __init__(self) -> None:
        self.day = date(2026, 12, 7)

    def __call__(self) -> date:
        return self.day
