"""The max-TLP / max-PAP gate: may this observable be sent to LastInfoSec? It fails closed.

Every marking the entity carries (:func:`lis_async.enrichment.markings.collect`) is resolved to its
definition: a standard TLP or PAP id (case-insensitive) is what it is; any other id is what the
platform says (``markingDefinition(id)``, docs/protocol.md §8.6, kept in this worker's cache). What
the job itself says about a marking (GraphQL ``objectMarking`` nodes, a playbook bundle's
``marking-definition`` objects: anyone who can write a playbook step or to the listen queue writes
those) can only make the verdict stricter: it is judged beside the platform's definition, never
instead of it, and the platform is asked unless the job's word alone already refuses. Then:

* a TLP above ``max_tlp``, or a PAP above ``max_pap`` when a PAP gate is set, refuses;
* a TLP or PAP marking whose level is not a known one (a custom ``TLP:ORANGE``) refuses;
* a marking nobody can resolve, or an entry that is not even an id, refuses: it may be a TLP;
* anything else (statements, other definition types) is not the gate's business.

With ``max_tlp = TLP:RED`` and no PAP gate nothing can refuse, and nothing is resolved.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any, Final

from lis_async.enrichment.job import Job, Observable, PlaybookJob
from lis_async.enrichment.markings import (
    PAP_ORDER,
    STANDARD_MARKINGS,
    TLP_ORDER,
    MarkingDef,
    bundle_definitions,
    classify,
    definition_from_node,
)

__all__ = ["MarkingGate", "ReadMarking"]

#: Reads one marking definition from the platform: its GraphQL node, or None if unknown.
ReadMarking = Callable[[str], Awaitable[Mapping[str, Any] | None]]

_NOT_SENT: Final = "not sent to LastInfoSec"
CACHE_TTL_S: Final = 600.0
CACHE_ENTRIES: Final = 1024


@dataclass(frozen=True, slots=True)
class _Levels:
    """The most restrictive TLP and PAP found, and what could not be judged."""

    tlp: int = -1
    pap: int = -1
    unknown_tlp: str | None = None  # a TLP-type marking of an unknown level (its name)
    unknown_pap: str | None = None
    unresolved: str | None = None  # the first marking id no source could resolve


class MarkingCache:
    """Marking definitions read from the platform: bounded, with an expiry (an administrator may
    edit a marking). Only definitions are kept; an unknown id is asked again next time."""

    __slots__ = ("_data", "_size", "_time", "_ttl")

    def __init__(
        self,
        ttl_s: float = CACHE_TTL_S,
        size: int = CACHE_ENTRIES,
        time_fn: Callable[[], float] = time.monotonic,
    ) -> None:
        self._data: OrderedDict[str, tuple[float, MarkingDef]] = OrderedDict()
        self._ttl, self._size, self._time = ttl_s, size, time_fn

    def get(self, key: str) -> MarkingDef | None:
        entry = self._data.get(key)
        if entry is None:
            return None
        if entry[0] <= self._time():
            del self._data[key]
            return None
        return entry[1]

    def put(self, key: str, value: MarkingDef) -> None:
        self._data[key] = (self._time() + self._ttl, value)
        self._data.move_to_end(key)
        while len(self._data) > self._size:
            self._data.popitem(last=False)

    def __len__(self) -> int:
        return len(self._data)


class MarkingGate:
    """Decides, per observable, whether it may leave for LastInfoSec (module docstring)."""

    def __init__(
        self, max_tlp: str, max_pap: str | None = None, cache: MarkingCache | None = None
    ) -> None:
        self.max_tlp, self.max_pap = max_tlp, max_pap
        self._max_tlp = TLP_ORDER.index(max_tlp)
        self._max_pap = PAP_ORDER.index(max_pap) if max_pap is not None else None
        self._cache = cache if cache is not None else MarkingCache()

    @property
    def open(self) -> bool:
        """Nothing can be refused: every TLP allowed and no PAP gate below PAP:RED."""
        top_tlp = self._max_tlp == len(TLP_ORDER) - 1
        return top_tlp and self._max_pap in (None, len(PAP_ORDER) - 1)

    async def refusal(self, job: Job, obs: Observable, read: ReadMarking) -> str | None:
        """None when ``obs`` may be sent; else why not (the job's work message)."""
        if self.open:
            return None
        if obs.unreadable_markings:
            return (
                f"{obs.unreadable_markings} marking entry(ies) of the entity cannot be read: "
                f"{self._above()}, not sent to LastInfoSec"
            )
        known = dict(obs.marking_defs)
        if isinstance(job, PlaybookJob):
            objects = job.playbook.bundle.get("objects")
            known = bundle_definitions(objects if isinstance(objects, list) else ()) | known
        levels = _Levels()
        for ref in obs.marking_refs:
            key = ref.lower()
            standard = STANDARD_MARKINGS.get(key)
            if standard is not None:
                levels = _merge(levels, ref, standard)
                continue
            claimed = known.get(key)  # the job's word: it may only add restrictions
            if claimed is not None:
                levels = _merge(levels, ref, claimed)
                if self._verdict(_merge(_Levels(), ref, claimed)) is not None:
                    continue  # refused on the job's word alone: the platform cannot lift it
            levels = _merge(levels, ref, await self._resolve(key, read))
        return self._verdict(levels)

    async def _resolve(self, key: str, read: ReadMarking) -> MarkingDef | None:
        """The platform's definition of a custom marking (cached), or None if it has none."""
        found = self._cache.get(key)
        if found is not None:
            return found
        node = await read(key)
        definition = definition_from_node(node) if node is not None else None
        if definition is not None:
            self._cache.put(key, definition)
        return definition

    def _above(self) -> str:
        if self._max_tlp < len(TLP_ORDER) - 1 or self.max_pap is None:
            return f"treated as above the max TLP {self.max_tlp}"
        return f"treated as above the max PAP {self.max_pap}"

    def _verdict(self, levels: _Levels) -> str | None:
        tlp_gate = self._max_tlp < len(TLP_ORDER) - 1
        if levels.unresolved is not None:
            return (
                f"marking {levels.unresolved} cannot be resolved (it may be a TLP or a PAP): "
                f"{self._above()}, not sent to LastInfoSec"
            )
        if levels.unknown_tlp is not None and tlp_gate:
            return (
                f"{levels.unknown_tlp} is not a known TLP level: treated as above the max TLP "
                f"{self.max_tlp}, not sent to LastInfoSec"
            )
        if levels.tlp > self._max_tlp:
            return f"{TLP_ORDER[levels.tlp]} is above the max TLP {self.max_tlp}: {_NOT_SENT}"
        if self._max_pap is None:
            return None
        if levels.unknown_pap is not None:
            return (
                f"{levels.unknown_pap} is not a known PAP level: treated as above the max PAP "
                f"{self.max_pap}, not sent to LastInfoSec"
            )
        if levels.pap > self._max_pap:
            return f"{PAP_ORDER[levels.pap]} is above the max PAP {self.max_pap}: {_NOT_SENT}"
        return None


def _merge(levels: _Levels, ref: str, definition: MarkingDef | None) -> _Levels:
    if definition is None:
        return levels if levels.unresolved else replace(levels, unresolved=ref)
    kind, rank = classify(definition)
    name = definition.definition
    if kind == "TLP":
        if rank is None:
            return levels if levels.unknown_tlp else replace(levels, unknown_tlp=name)
        return replace(levels, tlp=max(levels.tlp, rank))
    if kind == "PAP":
        if rank is None:
            return levels if levels.unknown_pap else replace(levels, unknown_pap=name)
        return replace(levels, pap=max(levels.pap, rank))
    return levels
