"""GraphQL document handling of the simulated platform, without a GraphQL library.

* :func:`classify_query`: the canonical operation (pycti's operation name) of a document,
  found from its root field (and the ``workEdit`` sub-field) with precompiled regexes.
* :func:`selected_fields`: the output fields a document selects (a small lexer: strings,
  comments and arguments skipped; aliases, fragment spreads, type conditions and directives
  told apart), used to answer ``jwks`` only when asked and to emulate an older schema.
* :func:`missing_field_errors`: graphql-js's ``Cannot query field`` errors for the fields
  ``PlatformSimConfig.missing_fields`` says the schema lacks.
* :class:`RequestContext` and :data:`Handler`: what an operation handler receives.

Results are cached per query text: clients send a handful of distinct documents.
"""

from __future__ import annotations

import bisect
import functools
import re
from collections.abc import Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, NamedTuple

__all__ = [
    "WORK_MUTATIONS",
    "Handler",
    "RequestContext",
    "SelectedField",
    "classify_query",
    "missing_field_errors",
    "selected_fields",
]

_OP_RE = re.compile(r"^\s*(?:(query|mutation|subscription)\b\s*([_A-Za-z]\w*)?)?")
_ROOT_RE = re.compile(r"\{\s*(?:[_A-Za-z]\w*\s*:\s*)?([_A-Za-z]\w*)")
_WORK_SUB_RE = re.compile(r"workEdit\s*(?:\([^)]*\))?\s*\{\s*(?:[_A-Za-z]\w*\s*:\s*)?(\w+)")

_ROOT_CANONICAL: dict[str, str] = {
    "about": "healthCheck",
    "registerConnector": "RegisterConnector",
    "pingConnector": "PingConnector",
    "deleteConnector": "ConnectorDeletionMutation",
    "connector": "GetConnector",
    "connectorsForWorker": "GetConnectors",
    "stixCyberObservable": "StixCyberObservable",
    "stixCoreObject": "StixCoreObject",
    "stixNestedRefRelationships": "StixNestedRefRelationships",
    "markingDefinition": "MarkingDefinition",
    "playbookStepExecution": "PlaybookStepExecution",
    "workAdd": "workAdd",
    "isWorkAlive": "isWorkAlive",
    "work": "WorkQuery",
    "stixBundlePush": "StixBundlePush",
}
_WORK_CANONICAL: dict[str, str] = {
    "toReceived": "workToReceived",
    "addExpectations": "addExpectations",
    "reportExpectation": "reportExpectation",
    "toProcessed": "workToProcessed",
    "ping": "pingWork",
    "addDraftContext": "addDraftContext",
}
#: canonical names of the ``workEdit`` mutations (the default scope of injected errors)
WORK_MUTATIONS = frozenset(_WORK_CANONICAL.values())


@functools.lru_cache(maxsize=4096)
def classify_query(query: str) -> tuple[str, str | None, str]:
    """Return (canonical operation, operation name in the document, root field)."""
    m = _OP_RE.match(query)
    op_name = m.group(2) if m else None
    root_m = _ROOT_RE.search(query)
    root = root_m.group(1) if root_m else ""
    if root == "workEdit":
        sub = _WORK_SUB_RE.search(query)
        canonical = _WORK_CANONICAL.get(sub.group(1), "workEdit") if sub else "workEdit"
    else:
        canonical = _ROOT_CANONICAL.get(root, root or (op_name or "unknown"))
    return canonical, op_name, root


# ------------------------------------------------------------------------ selected fields

# block strings, strings and comments first so that nothing inside them is a token
_TOKEN_RE = re.compile(
    r'"""(?:\\"""|[^"]|"(?!""))*"""'
    r'|"(?:\\.|[^"\\\n])*"'
    r"|#[^\n]*"
    r"|\.\.\."
    r"|[_A-Za-z][_0-9A-Za-z]*"
    r"|[^\s,]"
)
_NAME_RE = re.compile(r"[_A-Za-z][_0-9A-Za-z]*")


class SelectedField(NamedTuple):
    """An output field of a document and where it is (1-based, as graphql-js reports)."""

    name: str
    line: int
    column: int


def _tokens(query: str) -> Iterator[tuple[str, int]]:
    """Significant tokens outside arguments (strings, comments and ``(...)`` dropped)."""
    depth = 0
    for m in _TOKEN_RE.finditer(query):
        tok = m.group()
        if tok[0] in '"#':
            continue
        if tok == "(":
            depth += 1
        elif tok == ")":
            depth -= 1
        elif depth == 0:
            yield tok, m.start()


def _is_field(tokens: list[tuple[str, int]], i: int) -> bool:
    """Whether the name at ``tokens[i]`` (inside a selection set) is a field name."""
    prev = tokens[i - 1][0] if i > 0 else ""
    following = tokens[i + 1][0] if i + 1 < len(tokens) else ""
    if prev in ("...", "@") or following == ":":  # spread / directive / alias
        return False
    # the type of an inline fragment: "... on Type"
    return not (prev == "on" and i > 1 and tokens[i - 2][0] == "...")


@functools.lru_cache(maxsize=1024)
def selected_fields(query: str) -> tuple[SelectedField, ...]:
    """The output fields the document selects, in document order."""
    tokens = list(_tokens(query))
    line_starts = [0] + [m.end() for m in re.finditer("\n", query)]
    fields: list[SelectedField] = []
    depth = 0
    for i, (tok, pos) in enumerate(tokens):
        if tok == "{":
            depth += 1
        elif tok == "}":
            depth -= 1
        elif depth > 0 and _NAME_RE.fullmatch(tok) and _is_field(tokens, i):
            line = bisect.bisect_right(line_starts, pos)
            fields.append(SelectedField(tok, line, pos - line_starts[line - 1] + 1))
    return tuple(fields)


@functools.lru_cache(maxsize=1024)
def selected_field_names(query: str) -> frozenset[str]:
    """The names of :func:`selected_fields`, for membership tests."""
    return frozenset(f.name for f in selected_fields(query))


@functools.lru_cache(maxsize=64)
def _missing_by_field(coordinates: frozenset[str]) -> dict[str, str]:
    """``{"jwks": "Connector"}`` from ``{"Connector.jwks"}`` (first type in sorted order)."""
    out: dict[str, str] = {}
    for coordinate in sorted(coordinates):
        type_name, dot, field_name = coordinate.partition(".")
        if not dot or not type_name or not field_name:
            raise ValueError(f"missing_fields entry {coordinate!r} does not read 'Type.field'")
        out.setdefault(field_name, type_name)
    return out


def missing_field_errors(query: str, coordinates: Iterable[str]) -> list[dict[str, Any]]:
    """graphql-js ``FieldsOnCorrectTypeRule`` errors for the selected fields the schema lacks."""
    missing = _missing_by_field(frozenset(coordinates))
    return [
        {
            "message": f'Cannot query field "{f.name}" on type "{missing[f.name]}".',
            "locations": [{"line": f.line, "column": f.column}],
            "extensions": {"code": "GRAPHQL_VALIDATION_FAILED"},
        }
        for f in selected_fields(query)
        if f.name in missing
    ]


# ------------------------------------------------------------------------ handlers


@dataclass(slots=True)
class RequestContext:
    """What an operation handler knows of the request besides its variables."""

    #: root field of the document (``stixCoreObject`` and ``stixCyberObservable`` share a handler)
    root: str
    query: str
    draft_id: str | None
    applicant_id: str | None
    work_id_header: str | None

    def selects(self, field_name: str) -> bool:
        """Whether the document selects an output field of that name (at any depth)."""
        return field_name in selected_field_names(self.query)


#: an operation handler: (context, variables) -> the ``data`` of the answer
Handler = Callable[[RequestContext, dict[str, Any]], Awaitable[Any]]
