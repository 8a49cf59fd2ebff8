"""The metric names a PromQL expression selects, from its syntax tree (promql-parser, the
Prometheus grammar), not from a text search: functions, label matchers, ``by``/``without``
clauses, durations, strings and offsets never look like metric names here. Grafana's variables
are given values first (the parser knows PromQL only)."""

from __future__ import annotations

import re
from typing import Any

import promql_parser

#: Grafana's interval variables, and a dashboard variable inside a label matcher's string.
_GRAFANA_DURATIONS = re.compile(r"\$(?:__rate_interval|__interval|__range)\b|\$\{__\w+\}")
_GRAFANA_VARIABLE = re.compile(r"\$\{?\w+\}?")
_CHILDREN = ("lhs", "rhs", "expr", "param", "vector_selector")


def grafana_to_promql(expr: str) -> str:
    """A Grafana target's expression with its variables replaced by plain values."""
    expr = _GRAFANA_DURATIONS.sub("5m", expr)
    return _GRAFANA_VARIABLE.sub(".*", expr)


def _walk(node: Any, names: set[str]) -> None:
    kind = type(node).__name__
    if kind == "VectorSelector":
        if node.name:
            names.add(node.name)
        for matcher in getattr(node.matchers, "matchers", None) or []:
            if matcher.name == "__name__":
                names.add(matcher.value)
        return
    for attr in _CHILDREN:
        child = getattr(node, attr, None)
        if child is not None and not isinstance(child, str | int | float):
            _walk(child, names)
    for arg in getattr(node, "args", None) or []:
        _walk(arg, names)


def metric_names(expr: str) -> set[str]:
    """Every metric name ``expr`` selects (a Grafana expression: its variables are replaced)."""
    names: set[str] = set()
    _walk(promql_parser.parse(grafana_to_promql(expr)), names)
    return names
