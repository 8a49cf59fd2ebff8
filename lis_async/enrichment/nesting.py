"""How deeply untrusted JSON may nest (job bodies, LastInfoSec answers), how many values it may
hold, and copying it.

orjson parses up to 1024 levels but serialises only 255, and Python's own recursion (``json``,
``copy.deepcopy``, pycti's splitter) stops near 1000: a document nested between those bounds
parses, then breaks the first serialiser it meets. Real OpenCTI entities and bundles, and real
LastInfoSec answers, nest about ten levels; anything past :data:`MAX_DEPTH` is refused where it
comes in, so that every later step can serialise what it holds.

Size in bytes does not bound the work either: 14 MiB of empty lists is 5 million values, 4 s for
orjson to build and 7 s for :func:`too_deep` to walk. :func:`too_many_values` counts them, before
anything is parsed, from the bytes that open a value (:data:`MAX_VALUES`).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any, Final

import orjson

__all__ = ["MAX_DEPTH", "MAX_VALUES", "json_copy", "too_deep", "too_many_values"]

MAX_DEPTH: Final = 64
#: Typical STIX runs about 32 bytes per value, so this meets the 16 MiB job body limit; real jobs
#: hold hundreds of values (a playbook bundle of 2,000 objects about 60,000). Parsing this many
#: of the cheapest values (empty lists) takes ~0.5 s, off the event loop.
MAX_VALUES: Final = 500_000


def too_deep(value: Any, limit: int = MAX_DEPTH) -> bool:
    """Whether parsed JSON ``value`` nests lists (tuples) and objects more than ``limit`` levels.
    Iterative: a deep document cannot exhaust the interpreter's stack here."""
    if not isinstance(value, dict | list | tuple):
        return False
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > limit:
            return True
        children = node.values() if isinstance(node, dict) else node
        for child in children:
            if isinstance(child, dict | list | tuple):
                stack.append((child, depth + 1))
    return False


def too_many_values(data: bytes, limit: int = MAX_VALUES) -> bool:
    """Whether the JSON ``data`` may hold more than ``limit`` values, counted before parsing as
    the ``[``, ``{`` and ``,`` bytes: every array and object opens with one, and every member
    but the first follows one. Never short, generous at worst: a member that is an array or an
    object counts twice, and bytes inside strings count too (which is how JSON carried in a
    string, a job's ``stix_entity``, is counted with the rest)."""
    return data.count(b"[") + data.count(b"{") + data.count(b",") > limit


def json_copy(value: Any) -> Any:
    """A deep copy of JSON data, as plain dicts and lists. An orjson round trip costs much less
    than ``copy.deepcopy``; what orjson cannot write (Mapping proxies, integers past 64 bits) is
    copied the slow way."""
    try:
        return orjson.loads(orjson.dumps(value))
    except (TypeError, ValueError):
        return _plain(value)


def _plain(value: Any) -> Any:
    """Deep copy turning every Mapping into a dict and every tuple into a list."""
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if value is None or isinstance(value, str | int | float):
        return value
    return copy.deepcopy(value)
