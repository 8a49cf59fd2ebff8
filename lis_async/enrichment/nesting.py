"""How deeply untrusted JSON may nest (job bodies, LastInfoSec answers).

orjson parses up to 1024 levels but serialises only 255, and Python's own recursion (``json``,
``copy.deepcopy``, pycti's splitter) stops near 1000: a document nested between those bounds
parses, then breaks the first serialiser it meets. Real OpenCTI entities and bundles, and real
LastInfoSec answers, nest about ten levels; anything past :data:`MAX_DEPTH` is refused where it
comes in, so that every later step can serialise what it holds.
"""

from __future__ import annotations

from typing import Any, Final

__all__ = ["MAX_DEPTH", "too_deep"]

MAX_DEPTH: Final = 64


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
