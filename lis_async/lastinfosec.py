"""The LastInfoSec (Gatewatcher) client: endpoints, answers, errors, retries, rate limit, cache.

One :class:`LastInfoSecClient` per process owns one ``aiohttp.ClientSession``. A lookup goes
through, in this order: TTL cache -> coalescing of identical in-flight lookups -> the client-wide
429 pause -> the sliding-window rate limiter -> the concurrency semaphore -> HTTP (with bounded
retries and exponential backoff with full jitter).

The API key travels in the query string (``api_key=...``), so every URL is a secret. Nothing this
module logs, raises or returns carries it: texts go through :func:`redact`, and exceptions are
raised outside ``except`` blocks (or ``from None``) so no aiohttp exception with the full URL is
chained to them.
"""

from __future__ import annotations

import asyncio
import email.utils
import functools
import logging
import random
import re
import time
import zlib
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Final, Literal
from urllib.parse import quote, unquote, urlsplit

import aiohttp
import orjson
from yarl import URL

from lis_async.job import Observable

__all__ = [
    "LastInfoSecClient",
    "LisBadAnswer",
    "LisClientOptions",
    "LisError",
    "LisFatalError",
    "LisRetriesExhausted",
    "LisStats",
    "LookupResult",
    "NothingToLookUp",
    "redact",
]

logger: Final = logging.getLogger("lis_async.lastinfosec")
_DEBUG: Final = logging.DEBUG

Endpoint = Literal["search_hash", "search_host", "search"]
EndpointStyle = Literal["search_hash_host", "search"]

_HASH_PREFERENCE: Final = ("SHA-256", "SHA-1", "MD5")
_HOST_TYPES: Final = frozenset({"Domain-Name", "Hostname"})
_POST_HEADERS: Final = {"Content-Type": "application/json"}
_DETAIL_BYTES: Final = 4096  # how much of an error body is read for its message
_DETAIL_CHARS: Final = 300

# `api_key=<value>` in a URL / text (also the percent-encoded `api_key%3D` form), and the
# userinfo of a URL (a proxy URL may carry credentials).
_API_KEY_RE: Final = re.compile(r"(?i)(api_key(?:=|%3D))[^&\s#\"'<>;,)]*")
_USERINFO_RE: Final = re.compile(r"(?i)(\b[a-z][a-z0-9+.\-]*://)[^/\s@]+@")


def redact(text: str, secrets: Iterable[str] = ()) -> str:
    """Mask every ``api_key=...`` query value, URL userinfo, and each secret given (raw and
    percent-encoded) in ``text``."""
    for secret in secrets:
        if secret:
            text = text.replace(secret, "***")
            enc = quote(secret, safe="")
            if enc != secret:
                text = text.replace(enc, "***")
    text = _API_KEY_RE.sub(r"\1***", text)
    if "@" in text:
        text = _USERINFO_RE.sub(r"\1***@", text)
    return text


# --------------------------------------------------------------------------------------------
# Options, results, stats, errors
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class LisClientOptions:
    """Client settings. ``api_key`` and ``proxy`` (may hold credentials) never show in repr."""

    api_key: str = field(default="", repr=False)
    base_url: str = "https://api.client.lastinfosec.com/v2"
    # "search_hash_host": GET /stix21/search_hash/{h} and /stix21/search_host/{host};
    # "search": POST /stix21/search/ with {"value": ...}
    endpoint_style: EndpointStyle = "search_hash_host"
    timeout_s: float = 30.0
    retries: int = 5  # retries after the first attempt
    backoff_base_s: float = 0.5
    backoff_max_s: float = 30.0
    concurrency: int = 16  # HTTP requests open at once
    rate_per_s: float = 10.0  # token bucket shared by every request; <= 0 disables
    rate_burst: int | None = None  # bucket size; None = one second's worth (at least 1)
    cache_ttl_s: float = 3600.0  # found answers; 0 disables
    negative_cache_ttl_s: float = 300.0  # not-found answers; 0 disables
    cache_size: int = 10_000  # entries; 0 disables the cache
    proxy: str | None = field(default=None, repr=False)
    trust_env: bool = True  # honour HTTP(S)_PROXY / NO_PROXY
    ssl_verify: bool = True
    max_answer_bytes: int = 32 * 1024 * 1024
    user_agent: str = "lis-async"
    # clock of the cache expiry (injectable for tests)
    time_fn: Callable[[], float] = field(default=time.monotonic, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.endpoint_style not in ("search_hash_host", "search"):
            raise ValueError(
                f"endpoint_style must be 'search_hash_host' or 'search', "
                f"got {self.endpoint_style!r}"
            )
        url = URL(self.base_url)
        if url.scheme not in ("http", "https") or not url.host:
            raise ValueError(
                f"base_url must be an absolute http(s) URL, got {redact(self.base_url)!r}"
            )
        if self.timeout_s <= 0:
            raise ValueError("timeout_s must be > 0")
        if self.retries < 0:
            raise ValueError("retries must be >= 0")
        if self.backoff_base_s < 0 or self.backoff_max_s < 0:
            raise ValueError("backoff_base_s and backoff_max_s must be >= 0")
        if self.concurrency < 1:
            raise ValueError("concurrency must be >= 1")
        if self.rate_burst is not None and self.rate_burst < 1:
            raise ValueError("rate_burst must be >= 1")
        if self.cache_size < 0 or self.cache_ttl_s < 0 or self.negative_cache_ttl_s < 0:
            raise ValueError("cache_size, cache_ttl_s and negative_cache_ttl_s must be >= 0")
        if self.max_answer_bytes < 1:
            raise ValueError("max_answer_bytes must be >= 1")


@dataclass(frozen=True, slots=True)
class LookupResult:
    found: bool
    bundles: tuple[dict[str, Any], ...]  # every STIX bundle of the answer
    query: str  # the value actually sent (hash, host or full value)
    endpoint: str  # "search_hash" | "search_host" | "search"
    cached: bool = False


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
    cache_hits: int = 0
    cache_misses: int = 0
    coalesced: int = 0  # lookups that joined an identical in-flight lookup
    bad_answers: int = 0
    in_flight: int = 0  # HTTP requests open now (gauge)
    latency_observer: Callable[[float], None] | None = field(default=None, repr=False)


class LisError(Exception):
    """A LastInfoSec lookup failure. The message is always redacted."""

    retriable: bool = False

    def __init__(
        self, message: str, *, retriable: bool | None = None, status: int | None = None
    ) -> None:
        super().__init__(message)
        if retriable is not None:
            self.retriable = retriable
        self.status = status


class LisFatalError(LisError):
    """The API key is invalid or expired (200 with a text, 401, 403): stop the worker."""

    retriable = False


class LisRetriesExhausted(LisError):
    """429 / 5xx / timeouts / connection errors beyond the retry budget; the job may be retried
    later."""

    retriable = True

    def __init__(self, message: str, *, attempts: int, status: int | None = None) -> None:
        super().__init__(message, status=status)
        self.attempts = attempts


class LisBadAnswer(LisError):
    """Non-JSON, truncated, oversized or wrongly shaped answer."""

    retriable = False


class NothingToLookUp(LisError):
    """The observable gives nothing to send (no usable hash, no host, unsupported type)."""

    retriable = False


# --------------------------------------------------------------------------------------------
# Cache
# --------------------------------------------------------------------------------------------

_CacheKey = tuple[str, str]


@dataclass(frozen=True, slots=True)
class _Cached:
    """A cached answer: the bundles as zlib-compressed compact JSON. Parsed dicts take about
    ten times the memory (a 10 000-entry cache of 12-object answers: ~130 MB as dicts, about
    15 MB compressed: a 5.5 KB answer packs into 1.2 KB), and every hit needs its own copy
    anyway (callers may mutate what they get). Compressing and inflating a 12-object answer
    costs tens of microseconds."""

    found: bool
    bundles_z: bytes
    query: str
    endpoint: str

    @classmethod
    def of(cls, result: LookupResult) -> _Cached:
        packed = zlib.compress(orjson.dumps(result.bundles), 1)
        return cls(result.found, packed, result.query, result.endpoint)

    def result(self) -> LookupResult:
        bundles = tuple(orjson.loads(zlib.decompress(self.bundles_z)))
        return LookupResult(self.found, bundles, self.query, self.endpoint, True)


class SlidingWindowLimiter:
    """At most ``capacity`` acquisitions in any ``window_s`` seconds, first come first served.

    Written here rather than taken from aiolimiter: its leaky bucket starts full and refills
    during any lull, so it lets up to twice the rate through within one second, while users set
    ``rate_per_s`` to stay under a provider's per-second quota. Keeping the times of the last
    ``capacity`` acquisitions gives the exact guarantee and still sustains the full rate.
    """

    __slots__ = ("_capacity", "_lock", "_times", "_window")

    def __init__(self, capacity: int, window_s: float) -> None:
        self._capacity = capacity
        self._window = window_s
        self._times: deque[float] = deque()
        self._lock = asyncio.Lock()  # FIFO: waiters are served in arrival order

    async def acquire(self) -> None:
        async with self._lock:
            loop = asyncio.get_running_loop()
            times = self._times
            while True:
                now = loop.time()
                while times and times[0] <= now - self._window:
                    times.popleft()
                if len(times) < self._capacity:
                    times.append(now)
                    return
                await asyncio.sleep(times[0] + self._window - now)


class _TtlLru:
    """An LRU bounded by size with a per-entry expiry.

    Hand-written because found and not-found answers need different lifetimes, and
    ``cachetools.TTLCache`` has a single TTL for all its entries. Expired entries are dropped
    when met (and pushed out by the LRU bound otherwise).
    """

    __slots__ = ("_data", "_size", "_time")

    def __init__(self, size: int, time_fn: Callable[[], float]) -> None:
        self._data: OrderedDict[_CacheKey, tuple[float, _Cached]] = OrderedDict()
        self._size = size
        self._time = time_fn

    def get(self, key: _CacheKey) -> _Cached | None:
        entry = self._data.get(key)
        if entry is None:
            return None
        if entry[0] <= self._time():
            del self._data[key]
            return None
        self._data.move_to_end(key)
        return entry[1]

    def put(self, key: _CacheKey, value: _Cached, ttl_s: float) -> None:
        data = self._data
        data[key] = (self._time() + ttl_s, value)
        data.move_to_end(key)
        while len(data) > self._size:
            data.popitem(last=False)

    def clear(self) -> None:
        self._data.clear()

    def __len__(self) -> int:
        return len(self._data)


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


def _path_segment(value: str) -> str:
    """Percent-encode ``value`` as ONE path segment: ``/ ? # %`` and controls are encoded, and
    the dot segments ``.`` / ``..`` (which ``quote`` leaves alone) are encoded too."""
    seg = quote(value, safe="")
    if seg == "." or seg == "..":
        seg = seg.replace(".", "%2E")
    return seg


def _url_host(value: str) -> str | None:
    """The IDNA-encoded, lower-case host of a URL value (no port, no userinfo), or None."""
    text = value.strip()
    if "://" not in text and not text.startswith("//"):
        text = "http://" + text
    try:
        host = urlsplit(text).hostname
    except ValueError:
        return None
    if not host:
        return None
    if "%" in host:
        host = unquote(host)
    host = host.rstrip(".")
    if not host:
        return None
    try:
        # yarl applies IDNA (UTS #46, IDNA 2003 fallback) and rejects invalid host characters.
        encoded = URL.build(scheme="http", host=host).raw_host
    except (ValueError, UnicodeError):
        return None
    return encoded or None


def _retry_after_s(header: str | None) -> float | None:
    """``Retry-After`` as seconds (delta-seconds or HTTP date), or None when absent/unreadable."""
    if not header:
        return None
    header = header.strip()
    try:
        return max(0.0, float(header))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(header)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - datetime.now(UTC)).total_seconds())


def _error_detail(data: bytes) -> str:
    """A short text out of an error body (``{"detail": {"details": [{"error": ...}]}}`` or any)."""
    if not data:
        return "no detail"
    text: str | None = None
    try:
        doc = orjson.loads(data)
    except orjson.JSONDecodeError:
        doc = None
    if isinstance(doc, dict):
        detail = doc.get("detail", doc.get("message"))
        if isinstance(detail, dict):
            items = detail.get("details")
            if isinstance(items, list):
                errs = [
                    str(i.get("error")) for i in items if isinstance(i, dict) and i.get("error")
                ]
                if errs:
                    text = "; ".join(errs)
        elif isinstance(detail, str):
            text = detail
    if text is None:
        text = data.decode("utf-8", "replace")
    text = " ".join(text.split())
    return text[:_DETAIL_CHARS] if text else "no detail"


# Outcomes of one HTTP attempt (internal).
@dataclass(slots=True)
class _Transient:
    cause: str
    status: int | None = None
    retry_after_s: float | None = None
    throttled: bool = False


# --------------------------------------------------------------------------------------------
# Client
# --------------------------------------------------------------------------------------------


class LastInfoSecClient:
    """Asyncio LastInfoSec client; see the module docstring for the order of a lookup."""

    def __init__(self, options: LisClientOptions) -> None:
        self._opts = options
        self.stats = LisStats()
        self._secrets: tuple[str, ...] = (options.api_key,) if options.api_key else ()
        base = options.base_url.rstrip("/")
        self._prefix: dict[str, str] = {
            "search_hash": base + "/stix21/search_hash/",
            "search_host": base + "/stix21/search_host/",
            "search": base + "/stix21/search/",
        }
        self._qs = "?api_key=" + quote(options.api_key, safe="") + "&platform=opencti"
        self._qs_redacted = "?api_key=***&platform=opencti"
        self._session: aiohttp.ClientSession | None = None
        self._proxy: str | None = options.proxy
        self._proxy_auth: aiohttp.BasicAuth | None = None
        self._sem = asyncio.Semaphore(options.concurrency)
        self._limiter: SlidingWindowLimiter | None = None
        if options.rate_per_s > 0:
            # ``burst`` requests per ``burst / rate`` seconds: by default one second's worth.
            burst = options.rate_burst or max(1, round(options.rate_per_s))
            self._limiter = SlidingWindowLimiter(burst, burst / options.rate_per_s)
        cache_on = options.cache_size > 0 and (
            options.cache_ttl_s > 0 or options.negative_cache_ttl_s > 0
        )
        self._cache = _TtlLru(options.cache_size, options.time_fn) if cache_on else None
        self._inflight: dict[_CacheKey, asyncio.Task[LookupResult]] = {}
        self._resume_at = 0.0  # loop time before which no request may start (429 pause)
        self._throttle_level = 0  # 429 pauses in a row without Retry-After; 0 after an answer

    def __repr__(self) -> str:
        return f"LastInfoSecClient({self._opts!r})"

    @property
    def options(self) -> LisClientOptions:
        return self._opts

    def redact(self, text: str) -> str:
        """:func:`redact` with this client's API key."""
        return redact(text, self._secrets)

    # ---- lifecycle ---------------------------------------------------------------------

    async def start(self) -> None:
        """Create the one ``ClientSession``. Idempotent."""
        if self._session is not None and not self._session.closed:
            return
        opts = self._opts
        # The environment's proxy (HTTP(S)_PROXY / NO_PROXY) is resolved once, here: with
        # trust_env, aiohttp would scan os.environ on every request (a measurable share of the
        # worker's CPU). The proxy's credentials stay in its URL, as aiohttp accepts them.
        self._proxy = opts.proxy
        if self._proxy is None and opts.trust_env:
            try:
                env_proxy, self._proxy_auth = aiohttp.helpers.get_env_proxy_for_url(
                    URL(opts.base_url)
                )
                self._proxy = str(env_proxy)
            except LookupError:
                pass
        connector = aiohttp.TCPConnector(limit=opts.concurrency, ssl=opts.ssl_verify)
        self._session = aiohttp.ClientSession(
            connector=connector,
            timeout=aiohttp.ClientTimeout(total=opts.timeout_s),
            json_serialize=lambda obj: orjson.dumps(obj).decode(),
            trust_env=False,
            headers={"User-Agent": opts.user_agent, "Accept": "application/json"},
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

    def cache_clear(self) -> None:
        if self._cache is not None:
            self._cache.clear()

    # ---- query -------------------------------------------------------------------------

    def query_for(self, obs: Observable) -> tuple[str, str]:
        """``(endpoint, value)`` to send for ``obs``, or :class:`NothingToLookUp`."""
        etype = obs.entity_type
        post = self._opts.endpoint_style == "search"
        if etype == "StixFile":
            hashes = obs.hashes
            for algo in _HASH_PREFERENCE:
                digest = hashes.get(algo)
                if digest:
                    return ("search" if post else "search_hash", digest)
            raise NothingToLookUp(
                "file has no MD5, SHA-1 or SHA-256 hash to look up"
                + (" (SHA-512 is not supported by LastInfoSec)" if "SHA-512" in hashes else "")
            )
        value = (obs.value or "").strip()
        if etype in _HOST_TYPES:
            if not value:
                raise NothingToLookUp(f"{etype} has no value to look up")
            return ("search" if post else "search_host", value)
        if etype == "Url":
            if not value:
                raise NothingToLookUp("Url has no value to look up")
            if post:
                return ("search", value)
            host = _url_host(value)
            if host is None:
                raise NothingToLookUp("Url has no host to look up")
            return ("search_host", host)
        raise NothingToLookUp(f"entity type {etype!r} is not supported by LastInfoSec")

    # ---- lookup ------------------------------------------------------------------------

    async def lookup(self, obs: Observable) -> LookupResult:
        """Look ``obs`` up. Raises :class:`LisError` subclasses (never an aiohttp error)."""
        endpoint, value = self.query_for(obs)
        return await self.lookup_value(endpoint, value)

    async def lookup_value(self, endpoint: str, value: str) -> LookupResult:
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

    def _task_done(self, key: _CacheKey, task: asyncio.Task[LookupResult]) -> None:
        if self._inflight.get(key) is task:
            del self._inflight[key]
        if not task.cancelled():
            task.exception()  # mark retrieved: every waiter may have been cancelled

    async def _fetch(self, endpoint: str, value: str, key: _CacheKey) -> LookupResult:
        result = await self._request(endpoint, value)
        cache = self._cache
        if cache is not None:
            ttl = self._opts.cache_ttl_s if result.found else self._opts.negative_cache_ttl_s
            if ttl > 0:
                cache.put(key, _Cached.of(result), ttl)
        return result

    # ---- HTTP --------------------------------------------------------------------------

    async def _wait_pause(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            delay = self._resume_at - loop.time()
            if delay <= 0:
                return
            await asyncio.sleep(delay)

    def _pause_client(self, delay_s: float) -> None:
        resume = asyncio.get_running_loop().time() + delay_s
        if resume > self._resume_at:
            self._resume_at = resume

    def _throttle_pause_s(self) -> float:
        """The client-wide pause after a 429 without ``Retry-After``. It grows with the pauses
        the whole client went through (one step per pause, not per 429 of the same round), not
        with one request's attempts: fresh requests would keep it near zero and the client would
        go on hammering a throttled API. Half of it is fixed, so jitter cannot collapse it."""
        if asyncio.get_running_loop().time() >= self._resume_at:  # first 429 since the last pause
            self._throttle_level += 1
        opts = self._opts
        ceiling = min(opts.backoff_max_s, opts.backoff_base_s * (2.0 ** (self._throttle_level - 1)))
        return ceiling / 2 + random.uniform(0.0, ceiling / 2)

    def _backoff_s(self, attempt: int) -> float:
        """Exponential backoff with full jitter for retry number ``attempt`` (1-based)."""
        opts = self._opts
        ceiling = min(opts.backoff_max_s, opts.backoff_base_s * (2.0 ** (attempt - 1)))
        return random.uniform(0.0, ceiling)

    async def _request(self, endpoint: str, value: str) -> LookupResult:
        opts = self._opts
        seg = "" if endpoint == "search" else _path_segment(value)
        url_text = self._prefix[endpoint] + seg + self._qs
        url = URL(url_text, encoded=True)
        if endpoint == "search":
            method, body = "POST", orjson.dumps({"value": value})
        else:
            method, body = "GET", None
        attempts_allowed = opts.retries + 1
        attempt = 0
        while True:
            attempt += 1
            await self._wait_pause()
            if self._limiter is not None:
                await self._limiter.acquire()
            async with self._sem:
                if self._resume_at > asyncio.get_running_loop().time():
                    await self._wait_pause()  # a 429 arrived while this one was queued
                outcome = await self._attempt(method, url, body, endpoint, value, seg)
            if isinstance(outcome, tuple):
                return self._parse_answer(outcome[1], endpoint, value)
            if isinstance(outcome, LookupResult):
                return outcome
            if isinstance(outcome, LisError):
                raise outcome
            # transient
            if attempt >= attempts_allowed:
                raise LisRetriesExhausted(
                    f"LastInfoSec {endpoint} lookup failed after {attempt} attempt"
                    f"{'s' if attempt > 1 else ''}; last cause: {outcome.cause}",
                    attempts=attempt,
                    status=outcome.status,
                )
            self.stats.retries += 1
            if outcome.retry_after_s is not None:
                delay = min(outcome.retry_after_s, opts.backoff_max_s)
            elif outcome.throttled:
                delay = self._throttle_pause_s()
            else:
                delay = self._backoff_s(attempt)
            logger.warning(
                "LastInfoSec %s attempt %d/%d failed (%s); retrying in %.2f s%s",
                endpoint,
                attempt,
                attempts_allowed,
                outcome.cause,
                delay,
                " (whole client paused)" if outcome.throttled else "",
            )
            if outcome.throttled:
                self._pause_client(delay)  # every request waits, not only this one
            elif delay > 0:
                await asyncio.sleep(delay)

    async def _attempt(
        self, method: str, url: URL, body: bytes | None, endpoint: str, value: str, seg: str
    ) -> tuple[int, bytes] | LookupResult | LisError | _Transient:
        """One HTTP exchange. Returns ``(200, body)``, a not-found result, a final error, or a
        transient failure. Never raises aiohttp errors (and never chains them)."""
        session = self._session
        if session is None:
            return LisError("LastInfoSec client is closed", retriable=True)
        stats = self.stats
        debug = logger.isEnabledFor(_DEBUG)
        if debug:
            logger.debug(
                "LastInfoSec request %s %s",
                method,
                self._prefix[endpoint] + seg + self._qs_redacted,
            )
        stats.requests += 1
        stats.in_flight += 1
        t0 = time.perf_counter()
        status = 0
        data = b""
        retry_after: str | None = None
        too_big = False
        cause: str
        kind: Literal["ok", "timeout", "conn", "other"] = "ok"
        try:
            async with session.request(
                method,
                url,
                data=body,
                headers=_POST_HEADERS if body is not None else None,
                proxy=self._proxy,
                proxy_auth=self._proxy_auth,
            ) as resp:
                status = resp.status
                if status == 200:
                    read = await self._read_capped(resp)
                    if read is None:
                        too_big = True
                    else:
                        data = read
                elif status == 429:
                    retry_after = resp.headers.get("Retry-After")
                elif status not in (404, 422) and status < 500:
                    data = await resp.content.read(_DETAIL_BYTES)
        except TimeoutError:
            kind, cause = "timeout", f"timeout after {self._opts.timeout_s:g} s"
        except (aiohttp.ClientSSLError, aiohttp.ServerFingerprintMismatch) as exc:
            kind, cause = "other", self.redact(f"TLS error: {type(exc).__name__}: {exc}")
        except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError) as exc:
            kind, cause = "conn", self.redact(f"{type(exc).__name__}: {exc}")
        except aiohttp.ClientError as exc:
            kind, cause = "other", self.redact(f"{type(exc).__name__}: {exc}")
        finally:
            stats.in_flight -= 1
        elapsed = time.perf_counter() - t0

        if kind != "ok":
            if kind == "timeout":
                stats.timeouts += 1
            elif kind == "conn":
                stats.connection_errors += 1
            if debug:
                logger.debug(
                    "LastInfoSec %s failed after %.1f ms: %s", endpoint, elapsed * 1000, cause
                )
            if kind == "other":
                return LisError(f"LastInfoSec {endpoint} request failed: {cause}")
            return _Transient(cause)

        by_status = stats.responses_by_status
        by_status[status] = by_status.get(status, 0) + 1
        if status != 429:
            self._throttle_level = 0
        observer = stats.latency_observer
        if observer is not None:
            observer(elapsed)
        if debug:
            logger.debug(
                "LastInfoSec answer %d, %d bytes, %.1f ms", status, len(data), elapsed * 1000
            )

        if status == 200:
            if too_big:
                stats.bad_answers += 1
                return LisBadAnswer(
                    f"LastInfoSec {endpoint} answer is larger than "
                    f"{self._opts.max_answer_bytes} bytes",
                    status=200,
                )
            return (200, data)
        if status in (404, 422):
            return LookupResult(False, (), value, endpoint)
        if status == 429:
            stats.throttled += 1
            return _Transient("HTTP 429 (rate limited)", 429, _retry_after_s(retry_after), True)
        if status >= 500:
            return _Transient(f"HTTP {status}", status)
        detail = self.redact(_error_detail(data))
        if status in (401, 403):
            return LisFatalError(
                f"LastInfoSec rejected the API key (HTTP {status}): {detail}", status=status
            )
        return LisError(f"LastInfoSec {endpoint} answered HTTP {status}: {detail}", status=status)

    async def _read_capped(self, resp: aiohttp.ClientResponse) -> bytes | None:
        """The body, or None when it is over ``max_answer_bytes`` (never buffers more than
        ``max_answer_bytes + 1`` bytes of it)."""
        cap = self._opts.max_answer_bytes
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

    def _parse_answer(self, data: bytes, endpoint: str, value: str) -> LookupResult:
        doc: Any = None
        bad_json = False
        try:
            doc = orjson.loads(data)
        except orjson.JSONDecodeError:
            bad_json = True
        if bad_json:  # raised outside the except block: nothing chained
            self.stats.bad_answers += 1
            raise LisBadAnswer(
                f"LastInfoSec {endpoint} answer is not valid JSON ({len(data)} bytes)", status=200
            )
        items: Any
        if isinstance(doc, list):
            items = doc
        elif isinstance(doc, dict):
            if "message" in doc:
                items = doc["message"]
                if isinstance(items, str):
                    text = self.redact(" ".join(items.split()))[:_DETAIL_CHARS]
                    if "key" in text.lower():
                        raise LisFatalError(f"LastInfoSec rejected the API key: {text}", status=200)
                    self.stats.bad_answers += 1
                    raise LisBadAnswer(
                        f"LastInfoSec {endpoint} answered a text instead of bundles: {text}",
                        status=200,
                    )
            elif doc.get("type") == "bundle":
                items = [doc]
            else:
                items = None
        else:
            items = None
        if not isinstance(items, list):
            self.stats.bad_answers += 1
            raise LisBadAnswer(
                f"LastInfoSec {endpoint} answer has an unexpected shape "
                f"({type(doc).__name__}, not a list of bundles)",
                status=200,
            )
        if not items:
            return LookupResult(False, (), value, endpoint)
        bundles = tuple(
            b for b in items if isinstance(b, dict) and isinstance(b.get("objects"), list)
        )
        if not bundles:
            self.stats.bad_answers += 1
            raise LisBadAnswer(
                f"LastInfoSec {endpoint} answer holds {len(items)} item(s) but no STIX bundle",
                status=200,
            )
        return LookupResult(True, bundles, value, endpoint)
