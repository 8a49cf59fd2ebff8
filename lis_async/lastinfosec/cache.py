"""The in-process cache of LastInfoSec answers: bounded in entries and in bytes, with separate
found / not-found TTLs."""

from __future__ import annotations

import zlib
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import orjson

from lis_async.enrichment.ports import LookupResult

CacheKey = tuple[str, str]  # (endpoint, value sent)


@dataclass(frozen=True, slots=True)
class CachedAnswer:
    """A cached answer: the bundles as zlib-compressed compact JSON. Parsed dicts take many
    times the memory, and every hit needs its own copy anyway (callers may mutate what they
    get); compressing and inflating an answer costs little next to a request."""

    found: bool
    bundles_z: bytes
    query: str
    endpoint: str

    @classmethod
    def of(cls, result: LookupResult) -> CachedAnswer:
        packed = zlib.compress(orjson.dumps(result.bundles), 1)
        return cls(result.found, packed, result.query, result.endpoint)

    def result(self) -> LookupResult:
        bundles = tuple(orjson.loads(zlib.decompress(self.bundles_z)))
        return LookupResult(self.found, bundles, self.query, self.endpoint, True)

    @property
    def nbytes(self) -> int:
        """What the entry costs, roughly: its compressed bundles, its strings and the objects
        around them (about 300 bytes)."""
        return len(self.bundles_z) + len(self.query) + len(self.endpoint) + _ENTRY_OVERHEAD


_ENTRY_OVERHEAD = 300


class SharedCache(Protocol):
    """A second-level cache shared by every replica, with cross-replica coalescing
    (:class:`lis_async.cluster.cache.SharedAnswerCache`). Every method is best effort: a failure
    reads as a miss, and a write that fails is lost."""

    async def fetch(self, key: CacheKey) -> tuple[CachedAnswer, float] | None:
        """The answer and the seconds it has left (from the shared cache, or from the replica
        that was fetching it), or None: the caller asks LastInfoSec, then calls ``put`` or
        ``release``."""
        ...

    async def put(self, key: CacheKey, answer: CachedAnswer, ttl_s: float) -> None: ...

    async def release(self, key: CacheKey) -> None: ...


class AnswerCache:
    """An LRU bounded by entries (``size``) and by bytes (``max_bytes``, :attr:`CachedAnswer.
    nbytes` summed; None: no byte bound) with a per-entry expiry.

    Hand-written because found and not-found answers need different lifetimes, and
    ``cachetools.TTLCache`` has a single TTL for all its entries. Expired entries are dropped
    when met (and pushed out by the LRU bounds otherwise). An answer larger than ``max_bytes``
    on its own is not kept.
    """

    __slots__ = ("_bytes", "_data", "_max_bytes", "_size", "_time")

    def __init__(
        self, size: int, time_fn: Callable[[], float], max_bytes: int | None = None
    ) -> None:
        self._data: OrderedDict[CacheKey, tuple[float, CachedAnswer]] = OrderedDict()
        self._size = size
        self._max_bytes = max_bytes
        self._bytes = 0
        self._time = time_fn

    @property
    def nbytes(self) -> int:
        """The bytes the entries account for now."""
        return self._bytes

    def get(self, key: CacheKey) -> CachedAnswer | None:
        entry = self._data.get(key)
        if entry is None:
            return None
        if entry[0] <= self._time():
            self._drop(key)
            return None
        self._data.move_to_end(key)
        return entry[1]

    def put(self, key: CacheKey, value: CachedAnswer, ttl_s: float) -> None:
        data = self._data
        self._drop(key)
        if self._max_bytes is not None and value.nbytes > self._max_bytes:
            return
        data[key] = (self._time() + ttl_s, value)
        self._bytes += value.nbytes
        while len(data) > self._size or (
            self._max_bytes is not None and self._bytes > self._max_bytes
        ):
            _, (_, old) = data.popitem(last=False)
            self._bytes -= old.nbytes

    def _drop(self, key: CacheKey) -> None:
        entry = self._data.pop(key, None)
        if entry is not None:
            self._bytes -= entry[1].nbytes

    def __len__(self) -> int:
        return len(self._data)
