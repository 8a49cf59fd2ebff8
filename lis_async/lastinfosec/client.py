"""The LastInfoSec HTTP client: one pooled session, the lookup order, retries, redaction.

A lookup goes through, in this order: the in-process answer cache -> coalescing of identical
in-flight lookups -> (cluster mode) the shared cache and cross-replica coalescing -> the
client-wide 429 pause -> the daily budget (when set; every attempt spends one request) -> the
rate limiter (local, or the cluster's) -> the concurrency semaphore
-> HTTP (with bounded retries and back-off, :class:`lis_async.retry.Backoff`).

The API key travels in the query string (``api_key=...``), so every URL is a secret. Nothing this
module logs, raises or returns carries it: texts go through :func:`lis_async.redact.redact`, and
aiohttp's exceptions are mapped here, once, into :mod:`lis_async.errors` without chaining (they
carry the full URL).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final
from urllib.parse import quote

import aiohttp
import orjson
from yarl import URL

from lis_async.enrichment.job import Observable
from lis_async.enrichment.ports import LookupResult
from lis_async.errors import (
    LisBadAnswer,
    LisBudgetSpent,
    LisError,
    LisFatalError,
    LisRetriesExhausted,
    NothingToLookUp,
)
from lis_async.lastinfosec.budget import DailyBudget
from lis_async.lastinfosec.cache import AnswerCache, CachedAnswer, CacheKey, SharedCache
from lis_async.lastinfosec.limiter import PacedLimiter, RateLimiter
from lis_async.lastinfosec.outage import PROBE_INTERVAL_S, OutageGate
from lis_async.lastinfosec.wire import (
    ENDPOINTS,
    error_detail,
    parse_answer,
    path_segment,
    query_for,
    redirect_target,
    retry_after_s,
)
from lis_async.redact import mask_url, redact
from lis_async.retry import Backoff
from lis_async.settings.model import LastInfoSecSettings

logger: Final = logging.getLogger("lis_async.lastinfosec")
_DEBUG: Final = logging.DEBUG
_POST_HEADERS: Final = {"Content-Type": "application/json"}
_DETAIL_BYTES: Final = 4096  # how much of an error body is read for its message


@dataclass(slots=True)
class LisStats:
    """Counters for metrics. ``latency_observer`` (seconds per answered HTTP attempt) is a hook
    metrics can attach to."""

    requests: int = 0  # HTTP attempts sent
    responses_by_status: dict[int, int] = field(default_factory=dict)
    retries: int = 0
    throttled: int = 0  # 429 answers
    timeouts: int = 0
    connection_errors: int = 0  # connection and payload errors
    cache_hits: int = 0  # in-process cache
    cache_misses: int = 0
    shared_cache_hits: int = 0  # cluster mode: answered from Redis (waits for a replica included)
    coalesced: int = 0  # lookups that joined an identical in-flight lookup
    bad_answers: int = 0
    in_flight: int = 0  # HTTP requests open now (gauge)
    latency_observer: Callable[[float], None] | None = field(default=None, repr=False)


class _Transient(Exception):
    """One attempt failed in a way a retry may fix (5xx, 429, timeout, connection). Internal:
    it never leaves the client (exhausted retries become :class:`LisRetriesExhausted`)."""

    def __init__(
        self,
        cause: str,
        status: int | None = None,
        retry_after_s: float | None = None,
        throttled: bool = False,
    ) -> None:
        super().__init__(cause)
        self.cause = cause
        self.status = status
        self.retry_after_s = retry_after_s
        self.throttled = throttled


@dataclass(frozen=True, slots=True)
class _Response:
    """What one HTTP exchange brought back (the body only when it is worth reading)."""

    status: int
    data: bytes = b""
    retry_after: str | None = None
    too_big: bool = False
    location: str | None = None  # a redirect's target


@dataclass(frozen=True, slots=True)
class _Request:
    """One lookup's HTTP request, built once and carried through its attempts."""

    endpoint: str
    value: str  # the value looked up
    url: URL = field(repr=False)  # carries the API key
    body: bytes | None  # the JSON body of a POST (``search``); None for a GET
    seg: str  # the URL's path after the endpoint, for the debug log
    started: float  # time.monotonic()
    deadline: float  # retries stop here (``retry_budget_s``)

    @property
    def key(self) -> CacheKey:
        return (self.endpoint, self.value)


class _Throttle:
    """The client-wide pause after a 429: every request waits it out, not only the one that was
    throttled. Without ``Retry-After``, its length grows with the pauses the whole client went
    through (one step per pause, not per 429 of the same round), not with one request's
    attempts: fresh requests would keep it near zero and the client would go on hammering a
    throttled API. Any other answer starts it from the bottom again."""

    def __init__(self, backoff: Backoff) -> None:
        self._backoff = backoff
        self._resume_at = 0.0  # loop time before which no request may start
        self._level = 0  # pauses in a row without Retry-After; 0 after another answer

    async def wait(self) -> None:
        """Return once no pause is on."""
        loop = asyncio.get_running_loop()
        while True:
            delay = self._resume_at - loop.time()
            if delay <= 0:
                return
            await asyncio.sleep(delay)

    def next_pause_s(self) -> float:
        """The pause after a 429 without ``Retry-After``."""
        if asyncio.get_running_loop().time() >= self._resume_at:  # first 429 since the last pause
            self._level += 1
        return self._backoff.delay(self._level)

    def pause(self, delay_s: float) -> None:
        resume = asyncio.get_running_loop().time() + delay_s
        if resume > self._resume_at:
            self._resume_at = resume

    def reset(self) -> None:
        """An answer other than 429: the next pause starts from the bottom."""
        self._level = 0


class LastInfoSecClient:
    """Asyncio LastInfoSec client (implements :class:`~lis_async.enrichment.ports.Lookup`); see
    the module docstring for the order of a lookup. Built from the validated settings; ``start`` and
    ``close`` are idempotent, and it is an async context manager."""

    def __init__(
        self,
        settings: LastInfoSecSettings,
        *,
        proxy: str | None = None,
        trust_env: bool = True,
        user_agent: str = "lis-async",
        clock: Callable[[], float] = time.monotonic,
        limiter: RateLimiter | None = None,
        shared_cache: SharedCache | None = None,
        outage_probe_s: float = PROBE_INTERVAL_S,
        budget: DailyBudget | None = None,
    ) -> None:
        """``proxy``: explicit proxy URL (``PROXY_HTTP(S)``); with ``trust_env``, else the
        environment's ``HTTP(S)_PROXY`` / ``NO_PROXY``. ``clock``: the cache's expiry clock.
        ``limiter`` / ``shared_cache``: cluster mode's (default: a local paced limiter, no
        shared cache). ``outage_probe_s``: seconds between probes while LastInfoSec is down
        (tests make it short). ``budget``: the daily budget (None: none), local or the
        cluster's."""
        self._settings = s = settings
        self.stats = LisStats()
        key = s.api_key_cti.get_secret_value()
        self._secrets: tuple[str, ...] = (key,)
        base = s.base_url.rstrip("/")
        self._prefix: dict[str, str] = {e: f"{base}/stix21/{e}/" for e in ENDPOINTS}
        self._qs = "?api_key=" + quote(key, safe="") + "&platform=opencti"
        self._qs_redacted = "?api_key=***&platform=opencti"
        self._backoff = Backoff(s.backoff_base_s, s.backoff_max_s)
        # The 429 pause keeps half its length whatever the jitter: it must not collapse.
        self._throttle = _Throttle(Backoff(s.backoff_base_s, s.backoff_max_s, floor=0.5))
        self._explicit_proxy = proxy
        self._trust_env = trust_env
        self._user_agent = user_agent
        self._session: aiohttp.ClientSession | None = None
        self._proxy: str | None = proxy
        self._proxy_auth: aiohttp.BasicAuth | None = None
        self._sem = asyncio.Semaphore(s.concurrency)
        self._limiter: RateLimiter = limiter or PacedLimiter(s.rate_per_s, s.rate_burst or 1)
        self._shared = shared_cache
        self.budget = budget
        self._outage = OutageGate(outage_probe_s)
        cache_on = s.cache_size > 0 and (s.cache_ttl_s > 0 or s.cache_negative_ttl_s > 0)
        cache_on = cache_on and s.cache_max_bytes > 0
        self._cache = AnswerCache(s.cache_size, clock, s.cache_max_bytes) if cache_on else None
        self._inflight: dict[CacheKey, asyncio.Task[LookupResult]] = {}
        self._urgent: set[CacheKey] = set()  # in-flight lookups an urgent job waits on

    def __repr__(self) -> str:
        return f"LastInfoSecClient({self._settings!r})"

    @property
    def outage_down(self) -> bool:
        """True while LastInfoSec is in an outage (lookups wait on the outage gate)."""
        return self._outage.down

    @property
    def proxy(self) -> str | None:
        """The proxy requests go through (resolved at ``start``); may hold credentials."""
        return self._proxy

    def redact(self, text: str) -> str:
        """:func:`lis_async.redact.redact` with this client's API key."""
        return redact(text, self._secrets)

    # ---- lifecycle ---------------------------------------------------------------------

    async def start(self) -> None:
        """Create the one ``ClientSession``. Idempotent."""
        if self._session is not None and not self._session.closed:
            return
        s = self._settings
        # The environment's proxy (HTTP(S)_PROXY / NO_PROXY) is resolved once, here: with
        # trust_env, aiohttp would scan os.environ on every request (a measurable share of the
        # worker's CPU). The proxy's credentials stay in its URL, as aiohttp accepts them.
        self._proxy = self._explicit_proxy
        if self._proxy is None and self._trust_env:
            try:
                env_proxy, self._proxy_auth = aiohttp.helpers.get_env_proxy_for_url(URL(s.base_url))
                self._proxy = str(env_proxy)
            except LookupError:
                pass
        connector = aiohttp.TCPConnector(limit=s.concurrency, ssl=s.ssl_verify)
        self._session = aiohttp.ClientSession(
            connector=connector,
            timeout=aiohttp.ClientTimeout(total=s.timeout_s),
            json_serialize=lambda obj: orjson.dumps(obj).decode(),
            trust_env=False,
            headers={"User-Agent": self._user_agent, "Accept": "application/json"},
        )

    async def close(self) -> None:
        """Cancel in-flight lookups and close the session. Idempotent."""
        tasks = list(self._inflight.values())
        self._inflight.clear()
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        session, self._session = self._session, None
        if session is not None and not session.closed:
            await session.close()

    async def __aenter__(self) -> LastInfoSecClient:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    # ---- lookup ------------------------------------------------------------------------

    def query_for(self, obs: Observable) -> tuple[str, str]:
        """``(endpoint, value)`` to send for ``obs``, or :class:`NothingToLookUp`."""
        return query_for(obs, self._settings.endpoint_style)

    async def lookup(self, obs: Observable, *, urgent: bool = False) -> LookupResult:
        """Look ``obs`` up. Raises :class:`LisError` subclasses (never an aiohttp error).
        ``urgent``: its request goes before the others waiting for the rate limit."""
        endpoint, value = self.query_for(obs)
        return await self.lookup_value(endpoint, value, urgent=urgent)

    async def lookup_value(
        self, endpoint: str, value: str, *, urgent: bool = False
    ) -> LookupResult:
        """Look a prepared ``(endpoint, value)`` (see :meth:`query_for`) up."""
        key = (endpoint, value)
        cache = self._cache
        if cache is not None:
            hit = cache.get(key)
            if hit is not None:
                self.stats.cache_hits += 1
                return hit.result()
            self.stats.cache_misses += 1
        task = self._inflight.get(key)
        if task is None:
            if endpoint not in self._prefix:
                raise NothingToLookUp(f"unknown endpoint {endpoint!r}")
            if self._session is None:
                await self.start()
            task = asyncio.get_running_loop().create_task(self._fetch(endpoint, value, key))
            self._inflight[key] = task
            task.add_done_callback(functools.partial(self._task_done, key))
        else:
            self.stats.coalesced += 1
        if urgent:  # read when the request asks the rate limiter (a waiter joining counts too)
            self._urgent.add(key)
        try:
            # shield: one waiter being cancelled must not cancel the lookup the others share
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if task.cancelled() and (current is None or not current.cancelling()):
                # the shared lookup was cancelled (client closing), not this waiter
                raise LisError(
                    "LastInfoSec client was closed during the lookup", retriable=True
                ) from None
            raise

    def _task_done(self, key: CacheKey, task: asyncio.Task[LookupResult]) -> None:
        if self._inflight.get(key) is task:
            del self._inflight[key]
            self._urgent.discard(key)
        if not task.cancelled():
            task.exception()  # mark retrieved: every waiter may have been cancelled

    async def _fetch(self, endpoint: str, value: str, key: CacheKey) -> LookupResult:
        shared = self._shared
        if shared is not None:
            hit = await shared.fetch(key)
            if hit is not None:
                shared_answer, ttl_s = hit
                self.stats.shared_cache_hits += 1
                if self._cache is not None and ttl_s > 0:
                    self._cache.put(key, shared_answer, ttl_s)
                return shared_answer.result()
        try:
            result = await self._request(self._new_request(endpoint, value))
        except BaseException:
            if shared is not None:  # waiting replicas stop waiting (shielded: may be cancelled)
                await asyncio.shield(shared.release(key))
            raise
        s = self._settings
        ttl = s.cache_ttl_s if result.found else s.cache_negative_ttl_s
        answer: CachedAnswer | None = None
        if ttl > 0 and (self._cache is not None or shared is not None):
            try:
                answer = CachedAnswer.of(result)
            except (TypeError, ValueError) as exc:  # not serialisable: used, not kept
                logger.warning("LastInfoSec answer not cached: %s", type(exc).__name__)
        if answer is not None:
            if self._cache is not None:
                self._cache.put(key, answer, ttl)
            if shared is not None:
                await shared.put(key, answer, ttl)
        elif shared is not None:
            await shared.release(key)
        return result

    # ---- one request, top to bottom ----------------------------------------------------

    def _new_request(self, endpoint: str, value: str) -> _Request:
        seg = "" if endpoint == "search" else path_segment(value)
        started = time.monotonic()
        return _Request(
            endpoint=endpoint,
            value=value,
            url=URL(self._prefix[endpoint] + seg + self._qs, encoded=True),
            body=orjson.dumps({"value": value}) if endpoint == "search" else None,
            seg=seg,
            started=started,
            deadline=started + self._settings.retry_budget_s,
        )

    async def _request(self, req: _Request) -> LookupResult:
        """The lookup's HTTP exchanges: transient failures (5xx, 429, timeouts, connection
        errors) are retried for up to ``retry_budget_s``, waiting an outage out with the whole
        client (:class:`~lis_async.lastinfosec.outage.OutageGate`); then the job gives up."""
        gate = self._outage
        attempt = 0
        while True:
            attempt += 1
            probe = await self._admit(req, attempt)
            try:
                result = await self._attempt(req)
            except _Transient as failure:
                if failure.throttled:  # a 429 is an answer: LastInfoSec is up, only busy
                    await gate.answered(probe)
                else:
                    await gate.failed(failure.cause, probe)
                if time.monotonic() >= req.deadline:
                    raise self._exhausted(req, attempt, failure) from None
                await self._before_retry(req, failure, attempt)
                continue
            except LisBudgetSpent:  # nothing was sent
                if probe:
                    await gate.release()
                raise
            except LisError:
                await gate.answered(probe)  # an answer, even a bad one: LastInfoSec is up
                raise
            except BaseException:
                if probe:
                    await gate.release()
                raise
            await gate.answered(probe)
            return result

    async def _admit(self, req: _Request, attempt: int) -> bool:
        """The outage gate, within this lookup's budget: True when this attempt is the probe."""
        gate = self._outage
        if not gate.down:
            return False
        try:
            async with asyncio.timeout(max(0.0, req.deadline - time.monotonic())):
                return await gate.admit()
        except TimeoutError:
            raise self._exhausted(req, attempt - 1, None) from None

    def _exhausted(
        self, req: _Request, attempts: int, failure: _Transient | None
    ) -> LisRetriesExhausted:
        gate = self._outage
        cause = failure.cause if failure is not None else gate.cause or "LastInfoSec down"
        outage = f"; LastInfoSec down for {gate.down_for_s():.0f} s" if gate.down else ""
        return LisRetriesExhausted(
            f"LastInfoSec {req.endpoint} lookup gave up after "
            f"{time.monotonic() - req.started:.0f} s (budget "
            f"{self._settings.retry_budget_s:g} s, "
            f"{attempts} attempt{'s' if attempts != 1 else ''}{outage}); last cause: {cause}",
            attempts=attempts,
            status=failure.status if failure is not None else None,
        )

    async def _before_retry(self, req: _Request, failure: _Transient, attempt: int) -> None:
        self.stats.retries += 1
        if self._outage.down and not failure.throttled:
            return  # the outage gate spaces the probes; it logged the outage once
        if failure.retry_after_s is not None:
            delay = min(failure.retry_after_s, self._settings.backoff_max_s)
        elif failure.throttled:
            delay = self._throttle.next_pause_s()
        else:
            delay = self._backoff.delay(attempt)
        logger.warning(
            "LastInfoSec %s attempt %d failed (%s); retrying in %.2f s%s",
            req.endpoint,
            attempt,
            failure.cause,
            delay,
            " (whole client paused)" if failure.throttled else "",
        )
        if failure.throttled:
            self._throttle.pause(delay)  # every request waits, not only this one
            await self._limiter.pause(delay)  # cluster mode: every replica too
        elif delay > 0:
            await asyncio.sleep(delay)

    async def _attempt(self, req: _Request) -> LookupResult:
        """One attempt: the 429 pause, the daily budget, the rate limiter, a connection slot,
        then one HTTP exchange turned into a result. Raises :class:`_Transient` (a retry may
        help) or a final :class:`LisError`."""
        throttle = self._throttle
        await throttle.wait()
        urgent = req.key in self._urgent
        if self.budget is not None:
            await self.budget.spend(urgent)  # LastInfoSec counts every arrival, retries too
        await self._limiter.acquire(urgent=urgent)
        async with self._sem:
            await throttle.wait()  # a 429 may have arrived while this one was queued
            if logger.isEnabledFor(_DEBUG):
                logger.debug(
                    "LastInfoSec request %s %s",
                    "GET" if req.body is None else "POST",
                    mask_url(self._prefix[req.endpoint]) + req.seg + self._qs_redacted,
                )
            t0 = time.perf_counter()
            response = await self._exchange(req)
            self._count_answer(response, time.perf_counter() - t0)
            return self._interpret(response, req)

    async def _exchange(self, req: _Request) -> _Response:
        """The HTTP request, aiohttp's errors mapped (never chained: they carry the URL)."""
        session = self._session
        if session is None:
            raise LisError("LastInfoSec client is closed", retriable=True)
        stats = self.stats
        stats.requests += 1
        stats.in_flight += 1
        t0 = time.perf_counter()
        failure: _Transient | LisError
        try:
            return await self._send(session, req)
        except TimeoutError:
            stats.timeouts += 1
            failure = _Transient(f"timeout after {self._settings.timeout_s:g} s")
        except (aiohttp.ClientSSLError, aiohttp.ServerFingerprintMismatch) as exc:
            cause = self.redact(f"TLS error: {type(exc).__name__}: {exc}")
            failure = LisError(f"LastInfoSec {req.endpoint} request failed: {cause}")
        except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError) as exc:
            stats.connection_errors += 1
            failure = _Transient(self.redact(f"{type(exc).__name__}: {exc}"))
        except aiohttp.ClientError as exc:
            cause = self.redact(f"{type(exc).__name__}: {exc}")
            failure = LisError(f"LastInfoSec {req.endpoint} request failed: {cause}")
        finally:
            stats.in_flight -= 1
        if logger.isEnabledFor(_DEBUG):
            logger.debug(
                "LastInfoSec %s failed after %.1f ms: %s",
                req.endpoint,
                (time.perf_counter() - t0) * 1000,
                failure,
            )
        raise failure  # outside the except blocks: the aiohttp exception is not chained

    async def _send(self, session: aiohttp.ClientSession, req: _Request) -> _Response:
        async with session.request(
            "GET" if req.body is None else "POST",
            req.url,
            data=req.body,
            headers=_POST_HEADERS if req.body is not None else None,
            proxy=self._proxy,
            proxy_auth=self._proxy_auth,
            # A redirect would carry the API key (it is in the query string) to wherever the
            # Location points: it is an error, never followed.
            allow_redirects=False,
        ) as resp:
            status = resp.status
            if status == 200:
                data = await self._read_capped(resp)
                if data is None:
                    return _Response(200, too_big=True)
                return _Response(200, data)
            if status == 429:
                return _Response(429, retry_after=resp.headers.get("Retry-After"))
            if 300 <= status < 400:
                return _Response(status, location=resp.headers.get("Location"))
            if status not in (404, 422) and status < 500:
                return _Response(status, await resp.content.read(_DETAIL_BYTES))
            return _Response(status)

    def _count_answer(self, response: _Response, elapsed: float) -> None:
        """Metrics of an answered attempt: its status, its latency."""
        by_status = self.stats.responses_by_status
        by_status[response.status] = by_status.get(response.status, 0) + 1
        observer = self.stats.latency_observer
        if observer is not None:
            observer(elapsed)
        if logger.isEnabledFor(_DEBUG):
            logger.debug(
                "LastInfoSec answer %d, %d bytes, %.1f ms",
                response.status,
                len(response.data),
                elapsed * 1000,
            )

    def _interpret(self, response: _Response, req: _Request) -> LookupResult:
        endpoint, status = req.endpoint, response.status
        if status == 429:
            self.stats.throttled += 1
            wait = retry_after_s(response.retry_after)
            raise _Transient("HTTP 429 (rate limited)", 429, wait, throttled=True)
        self._throttle.reset()  # any other answer ends a run of 429 pauses
        if status == 200:
            try:
                if response.too_big:
                    raise LisBadAnswer(
                        f"LastInfoSec {endpoint} answer is larger than "
                        f"{self._settings.max_answer_bytes} bytes",
                        status=200,
                    )
                return parse_answer(
                    response.data,
                    endpoint,
                    req.value,
                    self.redact,
                    self._settings.max_answer_objects,
                )
            except LisBadAnswer:
                self.stats.bad_answers += 1
                raise
        if status in (404, 422):
            return LookupResult(False, (), req.value, endpoint)
        if status >= 500:
            raise _Transient(f"HTTP {status}", status)
        if 300 <= status < 400:
            raise LisError(
                f"LastInfoSec {endpoint} answered HTTP {status}, a redirect"
                f"{redirect_target(response.location, self.redact)}: not followed (it would "
                "carry the API key); check LASTINFOSEC_BASE_URL",
                status=status,
            )
        detail = self.redact(error_detail(response.data))
        if status in (401, 403):
            raise LisFatalError(
                f"LastInfoSec rejected the API key (HTTP {status}): {detail}", status=status
            )
        raise LisError(f"LastInfoSec {endpoint} answered HTTP {status}: {detail}", status=status)

    async def _read_capped(self, resp: aiohttp.ClientResponse) -> bytes | None:
        """The body, or None when it is over ``max_answer_bytes`` (never buffers more than
        ``max_answer_bytes + 1`` bytes of it)."""
        cap = self._settings.max_answer_bytes
        length = resp.content_length
        if length is not None:
            if length > cap:
                return None
            if not resp.headers.get("Content-Encoding"):
                return await resp.content.read()  # bounded by Content-Length
        content = resp.content
        chunks: list[bytes] = []
        total = 0
        while True:
            chunk = await content.read(cap + 1 - total)
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
            if total > cap:
                return None
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)
