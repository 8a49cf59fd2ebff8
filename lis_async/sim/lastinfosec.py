"""A simulated LastInfoSec API (``aiohttp.web``) for the demo, end-to-end tests and benchmarks.

It serves the three enrichment endpoints the connector uses (``/v2/stix21/search_hash/{hash}``,
``/v2/stix21/search_host/{host}`` and ``POST /v2/stix21/search/``) with deterministic STIX 2.1
answers, and lets tests inject latency, errors, hangs, rate limiting (429 + ``Retry-After``),
the "invalid key but HTTP 200" answer and arbitrary raw bodies.  Every knob lives on
:class:`LisSimConfig` (``sim.config``), can be changed at run time, and is also settable by
``POST /_sim/config``.  :class:`LisSimStats` (``sim.stats``, ``GET /_sim/stats``) counts what was
received; ``POST /_sim/reset`` clears it.

Answers are built by hand as plain dicts (no ``stix2`` objects), serialised once with ``orjson``
and cached, so that the simulator costs little CPU under benchmark load.

Run manually with ``python -m lis_async.sim.lastinfosec --port 8089 --latency 0.15``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import hashlib
import json
import random
import re
import signal
import sys
import time
import uuid
from collections import OrderedDict, deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Literal
from urllib.parse import urlsplit

import orjson
from aiohttp import web

__all__ = [
    "LastInfoSecSim",
    "LisSimConfig",
    "LisSimStats",
    "RecordedRequest",
    "main",
    "redact_api_key",
]

Kind = Literal["hash", "host", "value"]

# --------------------------------------------------------------------------------------------
# Constant parts of every answer (the same ids as in tests/fixtures/lastinfosec).
# --------------------------------------------------------------------------------------------

TIMESTAMP = "2026-10-14T08:12:03.000Z"
VALID_FROM = "2026-10-14T08:12:03Z"
IDENTITY_ID = "identity--191b26a0-a0fb-5de1-97f2-10f2b575298f"
TLP_AMBER_ID = "marking-definition--f88d31f6-486f-44da-b317-01333bde0b82"
MALWARE_ID = "malware--d5e0e0fa-b5d1-550f-a619-a3d8016cc902"
INTRUSION_SET_ID = "intrusion-set--9c3310bc-f832-599d-adf4-8dfda3b9df68"
ATTACK_PATTERN_ID = "attack-pattern--0fb5ea38-a2f1-5b60-aeaf-6d1df64633d8"
REL_IS_USES_MALWARE_ID = "relationship--3b15fd41-d84a-5c32-8ab4-bb7645fd3851"
REL_MALWARE_USES_AP_ID = "relationship--e683ce91-e3f0-5b16-8769-b7e2382fe884"

#: Namespace of the simulator's own uuid5 ids (SDOs, relationships, bundles).
SIM_NAMESPACE = uuid.UUID("6b3f8a52-5c1e-4f0e-9d59-2f4c1a7e0b11")
#: STIX 2.1 namespace for deterministic SCO ids (section 2.9 of the specification).
SCO_NAMESPACE = uuid.UUID("00abedb4-aa42-466c-9c01-fed23315a9b7")

MIN_BUNDLE_SIZE = 5  # identity, marking, observable, indicator, report
BASE_BUNDLE_SIZE = 12  # the documented shape without filler objects

_MARKING_REFS = [TLP_AMBER_ID]

_IDENTITY: dict[str, Any] = {
    "type": "identity",
    "spec_version": "2.1",
    "id": IDENTITY_ID,
    "created": TIMESTAMP,
    "modified": TIMESTAMP,
    "name": "LastInfoSec",
    "description": "LastInfoSec Threat Feed (Gatewatcher)",
    "identity_class": "organization",
}
_TLP_AMBER: dict[str, Any] = {
    "type": "marking-definition",
    "spec_version": "2.1",
    "id": TLP_AMBER_ID,
    "created": "2017-01-20T00:00:00.000Z",
    "definition_type": "tlp",
    "name": "TLP:AMBER",
    "definition": {"tlp": "amber"},
}
_SDO_COMMON: dict[str, Any] = {
    "spec_version": "2.1",
    "created_by_ref": IDENTITY_ID,
    "created": TIMESTAMP,
    "modified": TIMESTAMP,
}
_MALWARE: dict[str, Any] = {
    "type": "malware",
    **_SDO_COMMON,
    "id": MALWARE_ID,
    "name": "Emotet",
    "malware_types": ["trojan"],
    "is_family": True,
    "object_marking_refs": _MARKING_REFS,
}
_INTRUSION_SET: dict[str, Any] = {
    "type": "intrusion-set",
    **_SDO_COMMON,
    "id": INTRUSION_SET_ID,
    "name": "TA542",
    "aliases": ["Mummy Spider"],
    "object_marking_refs": _MARKING_REFS,
}
_ATTACK_PATTERN: dict[str, Any] = {
    "type": "attack-pattern",
    **_SDO_COMMON,
    "id": ATTACK_PATTERN_ID,
    "name": "Spearphishing Attachment",
    "external_references": [{"source_name": "mitre-attack", "external_id": "T1566.001"}],
    "object_marking_refs": _MARKING_REFS,
}

ERROR_401 = b'{"detail":{"details":[{"error":"Invalid api key"}]}}'
ERROR_422 = b'{"detail":{"details":[{"error":"No result found for this value"}]}}'
ERROR_500 = b'{"detail":{"details":[{"error":"Internal server error"}]}}'
ERROR_429 = b'{"detail":{"details":[{"error":"Too many requests"}]}}'
ERROR_404 = b'{"detail":"Not Found"}'
INVALID_KEY_200 = b'{"message":"Your api key is not valid or has expired"}'
EMPTY_MESSAGE_200 = b'{"message":[]}'
ERROR_BAD_BODY = (
    b'{"detail":[{"loc":["body","value"],"msg":"field required","type":"value_error.missing"}]}'
)

_JSON = "application/json"

_HASH_KEYS = {32: "MD5", 40: "SHA-1", 64: "SHA-256", 128: "SHA-512"}
_HEX_RE = re.compile(r"[0-9a-fA-F]+")
_API_KEY_RE = re.compile(r"(?i)((?:^|[?&;])api(?:_|%5f)key=)[^&;#]*")


def redact_api_key(path_qs: str) -> str:
    """Replace the value of every ``api_key`` query parameter by ``***``."""
    return _API_KEY_RE.sub(r"\1***", path_qs)


# --------------------------------------------------------------------------------------------
# Configuration and statistics
# --------------------------------------------------------------------------------------------


@dataclass
class LisSimConfig:
    """Behaviour knobs; mutable at run time (``sim.config.x = ...`` or ``POST /_sim/config``)."""

    api_key: str = "test-lis-key"
    #: Share of values (by a deterministic hash of the value) that are "known" (200).
    known_share: float = 0.8
    #: Values always known / always unknown (422), whatever ``known_share`` says.
    known_values: set[str] = field(default_factory=set)
    unknown_values: set[str] = field(default_factory=set)
    #: Values answered ``{"message": []}`` (200, nothing to import).
    empty_values: set[str] = field(default_factory=set)
    #: Objects in the (first) bundle of a known value; at least 5.
    bundle_size: int = 12
    #: Bundles in a found answer; the 2nd and next are small (12-object) related bundles.
    bundles_per_answer: int = 1
    latency_s: float = 0.0
    #: Extra uniform delay in ``[0, jitter_s]``.
    jitter_s: float = 0.0
    #: Share of requests answered 500.
    error_rate: float = 0.0
    #: Share of requests that sleep ``hang_s`` before answering (the client should time out).
    timeout_rate: float = 0.0
    hang_s: float = 60.0
    #: Fixed one-second window limit; past it, 429.  ``None``: no limit.
    rate_limit_per_s: float | None = None
    #: ``Retry-After`` header value sent with 429; ``None``: no header.
    retry_after_s: float | None = 1
    #: Answer 429 to every request while true.
    force_429: bool = False
    #: Answer 429 to the next N requests (decremented).
    force_429_count: int = 0
    #: Answer HTTP 200 ``{"message": "Your api key is not valid or has expired"}``.
    invalid_key_answer: bool = False
    #: ``(status, raw body, content-type)`` served to every API request (no key check).
    body_override: tuple[int, bytes, str] | None = None
    #: Seed of the random generator used for jitter / error_rate / timeout_rate.
    seed: int | None = None
    #: Maximum number of cached answers (LRU).
    cache_size: int = 10_000
    #: How long ``close()`` waits for in-flight requests before cancelling them.
    shutdown_timeout_s: float = 0.5

    def update(self, values: Mapping[str, Any]) -> None:
        """Set knobs from a JSON-like mapping (lists become sets, ``body_override`` a tuple).

        Raises ``ValueError`` on an unknown knob or a value of the wrong type.
        """
        names = {f.name for f in dataclasses.fields(self)}
        unknown = set(values) - names
        if unknown:
            raise ValueError(f"unknown knob(s): {', '.join(sorted(unknown))}")
        converted: dict[str, Any] = {}
        for name, raw in values.items():
            converted[name] = _coerce_knob(name, raw)
        for name, value in converted.items():
            setattr(self, name, value)

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable view of the knobs, with the api key redacted."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, set):
                value = sorted(value)
            elif f.name == "body_override" and value is not None:
                status, body, ctype = value
                value = [status, f"<{len(body)} bytes>", ctype]
            out[f.name] = value
        out["api_key"] = "***"
        return out


def _number(name: str, raw: Any) -> float:
    if isinstance(raw, bool) or not isinstance(raw, int | float):
        raise ValueError(f"{name} must be a number")
    return float(raw)


def _optional_number(name: str, raw: Any) -> float | None:
    return None if raw is None else _number(name, raw)


def _integer(name: str, raw: Any) -> int:
    if isinstance(raw, bool) or not isinstance(raw, int):
        raise ValueError(f"{name} must be an integer")
    return raw


def _optional_integer(name: str, raw: Any) -> int | None:
    if raw is not None and (isinstance(raw, bool) or not isinstance(raw, int)):
        raise ValueError(f"{name} must be an integer or null")
    return raw


def _boolean(name: str, raw: Any) -> bool:
    if not isinstance(raw, bool):
        raise ValueError(f"{name} must be a boolean")
    return raw


def _string(name: str, raw: Any) -> str:
    if not isinstance(raw, str):
        raise ValueError(f"{name} must be a string")
    return raw


def _string_set(name: str, raw: Any) -> set[str]:
    if not isinstance(raw, list | tuple | set | frozenset) or not all(
        isinstance(v, str) for v in raw
    ):
        raise ValueError(f"{name} must be a list of strings")
    return set(raw)


def _body_override(name: str, raw: Any) -> tuple[int, bytes, str] | None:
    if raw is None:
        return None
    if (
        isinstance(raw, list | tuple)
        and len(raw) == 3
        and isinstance(raw[0], int)
        and isinstance(raw[1], str | bytes)
        and isinstance(raw[2], str)
    ):
        body = raw[1].encode() if isinstance(raw[1], str) else raw[1]
        return (raw[0], body, raw[2])
    raise ValueError(f"{name} must be [status, body, content_type] or null")


#: One checker-converter per :class:`LisSimConfig` field, for the values given to
#: :meth:`LisSimConfig.update` (``POST /_sim/config``); each raises ``ValueError`` naming the knob.
_KNOB_COERCERS: dict[str, Callable[[str, Any], Any]] = {
    "api_key": _string,
    "known_share": _number,
    "known_values": _string_set,
    "unknown_values": _string_set,
    "empty_values": _string_set,
    "bundle_size": _integer,
    "bundles_per_answer": _integer,
    "latency_s": _number,
    "jitter_s": _number,
    "error_rate": _number,
    "timeout_rate": _number,
    "hang_s": _number,
    "rate_limit_per_s": _optional_number,
    "retry_after_s": _optional_number,
    "force_429": _boolean,
    "force_429_count": _integer,
    "invalid_key_answer": _boolean,
    "body_override": _body_override,
    "seed": _optional_integer,
    "cache_size": _integer,
    "shutdown_timeout_s": _number,
}


def _coerce_knob(name: str, raw: Any) -> Any:
    coerce = _KNOB_COERCERS.get(name)
    if coerce is None:
        raise ValueError(f"unknown knob: {name}")  # pragma: no cover
    return coerce(name, raw)


@dataclass(slots=True)
class RecordedRequest:
    """One API request as received (``path`` is the raw request target, key redacted)."""

    method: str
    path: str
    endpoint: str
    value: str | None
    time: float
    status: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "path": self.path,
            "endpoint": self.endpoint,
            "value": self.value,
            "time": self.time,
            "status": self.status,
        }


class LisSimStats:
    """What the simulator received (API requests only, not ``/_sim/*``)."""

    MAX_RECORDED = 10_000

    def __init__(self) -> None:
        self.concurrent = 0
        self.reset()

    def reset(self) -> None:
        self.total = 0
        self.by_status: dict[int, int] = {}
        self.by_endpoint: dict[str, int] = {}
        #: Requests that arrived in each one-second window (``int(epoch second)`` → count).
        self.per_window: dict[int, int] = {}
        #: Same, for the requests that were not answered 429.
        self.per_window_accepted: dict[int, int] = {}
        self.max_concurrent = self.concurrent
        self.requests: deque[RecordedRequest] = deque(maxlen=self.MAX_RECORDED)

    @property
    def paths(self) -> list[str]:
        """Raw request targets (path + query) as received, ``api_key=***``."""
        return [r.path for r in self.requests]

    @property
    def values(self) -> list[str | None]:
        """Decoded looked-up values, in arrival order."""
        return [r.value for r in self.requests]

    def max_per_window(self, accepted_only: bool = False) -> int:
        """Most requests seen in one one-second window (optionally not counting 429s)."""
        counts = self.per_window_accepted if accepted_only else self.per_window
        return max(counts.values(), default=0)

    def _begin(self, record: RecordedRequest) -> None:
        self.total += 1
        self.by_endpoint[record.endpoint] = self.by_endpoint.get(record.endpoint, 0) + 1
        window = int(record.time)
        self.per_window[window] = self.per_window.get(window, 0) + 1
        self.concurrent += 1
        if self.concurrent > self.max_concurrent:
            self.max_concurrent = self.concurrent
        self.requests.append(record)

    def _end(self, record: RecordedRequest, status: int | None) -> None:
        self.concurrent -= 1
        if status is None:
            return
        record.status = status
        self.by_status[status] = self.by_status.get(status, 0) + 1
        if status != 429:
            window = int(record.time)
            self.per_window_accepted[window] = self.per_window_accepted.get(window, 0) + 1

    def to_dict(self) -> dict[str, Any]:
        return {
            "total": self.total,
            "by_status": {str(k): v for k, v in sorted(self.by_status.items())},
            "by_endpoint": dict(self.by_endpoint),
            "concurrent": self.concurrent,
            "max_concurrent": self.max_concurrent,
            "per_window": {str(k): v for k, v in sorted(self.per_window.items())},
            "per_window_accepted": {str(k): v for k, v in sorted(self.per_window_accepted.items())},
            "max_per_window": self.max_per_window(),
            "requests": [r.to_dict() for r in self.requests],
        }


# --------------------------------------------------------------------------------------------
# Answer construction
# --------------------------------------------------------------------------------------------


def _sim_id(stix_type: str, *parts: str) -> str:
    return f"{stix_type}--{uuid.uuid5(SIM_NAMESPACE, '|'.join((stix_type, *parts)))}"


def _sco_id(stix_type: str, contributing: dict[str, Any]) -> str:
    """Deterministic STIX 2.1 SCO id (JSON canonicalisation of the contributing properties)."""
    data = json.dumps(contributing, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return f"{stix_type}--{uuid.uuid5(SCO_NAMESPACE, data)}"


def _pattern_literal(value: str) -> str:
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def value_fraction(value: str) -> float:
    """Deterministic number in ``[0, 1)`` derived from ``value`` (sha256)."""
    digest = hashlib.sha256(value.encode("utf-8", "surrogatepass")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def _observable(kind: Kind, value: str) -> tuple[dict[str, Any], str]:
    """The observable for a looked-up value and the indicator pattern that matches it."""
    obs: dict[str, Any]
    if kind == "value" and "://" in value:
        obs = {
            "type": "url",
            "spec_version": "2.1",
            "id": _sco_id("url", {"value": value}),
            "value": value,
        }
        return obs, f"[url:value = {_pattern_literal(value)}]"
    hash_key = _HASH_KEYS.get(len(value)) if _HEX_RE.fullmatch(value) else None
    if kind == "hash" or (kind == "value" and hash_key is not None):
        if hash_key is None:  # not a hash the API knows: describe the file by its name
            obs = {
                "type": "file",
                "spec_version": "2.1",
                "id": _sco_id("file", {"name": value}),
                "name": value,
            }
            return obs, f"[file:name = {_pattern_literal(value)}]"
        hashes = {hash_key: value}
        obs = {
            "type": "file",
            "spec_version": "2.1",
            "id": _sco_id("file", {"hashes": hashes}),
            "hashes": hashes,
        }
        return obs, f"[file:hashes.'{hash_key}' = {_pattern_literal(value)}]"
    obs = {
        "type": "domain-name",
        "spec_version": "2.1",
        "id": _sco_id("domain-name", {"value": value}),
        "value": value,
    }
    return obs, f"[domain-name:value = {_pattern_literal(value)}]"


def _host_of(obs: dict[str, Any], value: str) -> str:
    """A host name related to the observable (used for filler and related objects)."""
    if obs["type"] == "domain-name":
        return value
    if obs["type"] == "url":
        with contextlib.suppress(ValueError):
            host = urlsplit(value).hostname
            if host:
                return host
    digest = hashlib.sha256(value.encode("utf-8", "surrogatepass")).hexdigest()
    return f"dl-{digest[:10]}.example.net"


#: The scores LastInfoSec gives its indicators, by risk level (low, medium, high).
RISK_SCORES = (50, 75, 90)


def risk_score(name: str) -> int:
    """The indicator's ``x_opencti_score``: one of :data:`RISK_SCORES`, fixed per value."""
    digest = hashlib.sha256(name.encode("utf-8", "surrogatepass")).digest()
    return RISK_SCORES[digest[0] % len(RISK_SCORES)]


def _indicator(ind_id: str, name: str, pattern: str, full: bool) -> dict[str, Any]:
    ind: dict[str, Any] = {
        "type": "indicator",
        **_SDO_COMMON,
        "id": ind_id,
        "name": name,
        "indicator_types": ["malicious-activity"],
        "pattern": pattern,
        "pattern_type": "stix",
        "pattern_version": "2.1",
        "valid_from": VALID_FROM,
        "x_opencti_score": risk_score(name),
    }
    if full:
        ind["labels"] = ["malicious"]
        ind["confidence"] = 80
    ind["object_marking_refs"] = _MARKING_REFS
    return ind


def _relationship(rel_id: str, rel_type: str, source: str, target: str) -> dict[str, Any]:
    return {
        "type": "relationship",
        **_SDO_COMMON,
        "id": rel_id,
        "relationship_type": rel_type,
        "source_ref": source,
        "target_ref": target,
        "object_marking_refs": _MARKING_REFS,
    }


def _optional_parts(ind_id: str, obs_id: str) -> tuple[tuple[int, dict[str, Any]], ...]:
    """The optional objects of the documented shape, in bundle order, each with its rank.

    A bundle of ``size`` < 12 objects keeps the parts of rank < ``size - 5`` (the higher ranks
    are dropped first).
    """
    return (
        (1, _MALWARE),
        (3, _INTRUSION_SET),
        (5, _ATTACK_PATTERN),
        (
            0,
            _relationship(
                _sim_id("relationship", "based-on", ind_id, obs_id), "based-on", ind_id, obs_id
            ),
        ),
        (
            2,
            _relationship(
                _sim_id("relationship", "indicates", ind_id, MALWARE_ID),
                "indicates",
                ind_id,
                MALWARE_ID,
            ),
        ),
        (4, _relationship(REL_IS_USES_MALWARE_ID, "uses", INTRUSION_SET_ID, MALWARE_ID)),
        (6, _relationship(REL_MALWARE_USES_AP_ID, "uses", MALWARE_ID, ATTACK_PATTERN_ID)),
    )


def _filler_triplet(host: str, i: int) -> list[dict[str, Any]]:
    """The ``i``-th filler: a domain name on ``host``, its indicator and their relationship."""
    filler_value = f"c2-{i}.{host}"
    dom_id = _sco_id("domain-name", {"value": filler_value})
    f_ind_id = _sim_id("indicator", dom_id)
    return [
        {"type": "domain-name", "spec_version": "2.1", "id": dom_id, "value": filler_value},
        _indicator(
            f_ind_id,
            filler_value,
            f"[domain-name:value = {_pattern_literal(filler_value)}]",
            False,
        ),
        _relationship(
            _sim_id("relationship", "based-on", f_ind_id, dom_id), "based-on", f_ind_id, dom_id
        ),
    ]


def _filler(host: str, count: int) -> list[dict[str, Any]]:
    """``count`` filler objects: whole triplets, the last one cut short if need be."""
    objects: list[dict[str, Any]] = []
    i = 0
    while len(objects) < count:
        objects.extend(_filler_triplet(host, i))
        i += 1
    return objects[:count]


def _report(obs_id: str, value: str, size: int, object_refs: list[str]) -> dict[str, Any]:
    return {
        "type": "report",
        **_SDO_COMMON,
        "id": _sim_id("report", obs_id, str(size)),
        "name": f"LastInfoSec IOC {value}",
        "description": "Compromise evidence enriched by LastInfoSec",
        "report_types": ["threat-report"],
        "published": VALID_FROM,
        "object_refs": object_refs,
        "object_marking_refs": _MARKING_REFS,
    }


def build_bundle(kind: Kind, value: str, size: int) -> dict[str, Any]:
    """One deterministic STIX 2.1 bundle of ``size`` objects (at least 5) about ``value``."""
    size = max(size, MIN_BUNDLE_SIZE)
    obs, pattern = _observable(kind, value)
    obs_id: str = obs["id"]
    ind_id = _sim_id("indicator", obs_id)
    objects: list[dict[str, Any]] = [
        _IDENTITY,
        _TLP_AMBER,
        obs,
        _indicator(ind_id, value, pattern, True),
    ]
    # Optional parts of the documented shape, the highest ranks dropped first when size < 12.
    n_opt = min(size - MIN_BUNDLE_SIZE, BASE_BUNDLE_SIZE - MIN_BUNDLE_SIZE)
    objects.extend(obj for rank, obj in _optional_parts(ind_id, obs_id) if rank < n_opt)
    # Filler up to size - 1 objects, the last one being the report.
    objects.extend(_filler(_host_of(obs, value), size - 1 - len(objects)))
    # As in the fixtures: the report refers to every object but the identity and the marking.
    report = _report(obs_id, value, size, [o["id"] for o in objects[2:]])
    objects.append(report)
    return {"type": "bundle", "id": _sim_id("bundle", obs_id, str(size)), "objects": objects}


def _related_bundle(kind: Kind, value: str, index: int) -> dict[str, Any]:
    """The ``index``-th (>= 1) extra bundle: a small bundle about a URL on the same host."""
    obs, _ = _observable(kind, value)
    host = _host_of(obs, value)
    page = "gate.php" if index == 1 else f"gate{index}.php"
    return build_bundle("value", f"http://{host}/{page}", BASE_BUNDLE_SIZE)


def build_bundles(
    kind: Kind, value: str, bundle_size: int, bundles_per_answer: int
) -> list[dict[str, Any]]:
    bundles = [build_bundle(kind, value, bundle_size)]
    bundles.extend(_related_bundle(kind, value, i) for i in range(1, bundles_per_answer))
    return bundles


# --------------------------------------------------------------------------------------------
# The simulator
# --------------------------------------------------------------------------------------------


class LastInfoSecSim:
    """The simulated API. ``async with LastInfoSecSim() as sim: url = sim.base_url``."""

    def __init__(self, config: LisSimConfig | None = None) -> None:
        self.config: LisSimConfig = config if config is not None else LisSimConfig()
        self.stats: LisSimStats = LisSimStats()
        self.base_url: str | None = None
        self.port: int | None = None
        self._runner: web.AppRunner | None = None
        # (kind, value, bundle_size, bundles_per_answer) -> (bare list bytes, envelope bytes)
        self._cache: OrderedDict[tuple[str, str, int, int], tuple[bytes, bytes]] = OrderedDict()
        self._rng = random.Random(self.config.seed)
        self._rng_seed = self.config.seed
        self._window = -1
        self._window_count = 0

    # ---- answers --------------------------------------------------------------------------

    def is_known(self, value: str) -> bool:
        cfg = self.config
        if value in cfg.unknown_values:
            return False
        if value in cfg.known_values:
            return True
        return value_fraction(value) < cfg.known_share

    def _bodies(self, kind: Kind, value: str) -> tuple[bytes, bytes]:
        cfg = self.config
        key = (kind, value, max(cfg.bundle_size, MIN_BUNDLE_SIZE), max(cfg.bundles_per_answer, 1))
        cached = self._cache.get(key)
        if cached is not None:
            self._cache.move_to_end(key)
            return cached
        bare = orjson.dumps(build_bundles(kind, value, key[2], key[3]))
        bodies = (bare, b'{"message":' + bare + b"}")
        self._cache[key] = bodies
        while len(self._cache) > max(cfg.cache_size, 1):
            self._cache.popitem(last=False)
        return bodies

    def answer_for(self, kind: Kind, value: str, headers: bool = True) -> bytes | None:
        """The 200 body for ``value`` (``None``: unknown, 422); deterministic and cached.

        ``headers=False`` gives the bare-list shape.  Values in ``empty_values`` give
        ``{"message": []}`` (``[]`` bare).
        """
        if not self.is_known(value):
            return None
        if value in self.config.empty_values:
            return EMPTY_MESSAGE_200 if headers else b"[]"
        bare, envelope = self._bodies(kind, value)
        return envelope if headers else bare

    def clear_cache(self) -> None:
        self._cache.clear()

    # ---- HTTP -----------------------------------------------------------------------------

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/v2/stix21/search_hash/{hash}", self._search_hash)
        app.router.add_get("/v2/stix21/search_host/{host}", self._search_host)
        app.router.add_post("/v2/stix21/search/", self._search)
        app.router.add_post("/v2/stix21/search", self._search)
        app.router.add_get("/_sim/stats", self._sim_stats)
        app.router.add_post("/_sim/reset", self._sim_reset)
        app.router.add_get("/_sim/config", self._sim_get_config)
        app.router.add_post("/_sim/config", self._sim_set_config)
        app.router.add_route("*", "/{tail:.*}", self._not_found)
        return app

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        """Listen on ``host:port`` (0: any free port); return the base URL (``.../v2``)."""
        if self._runner is not None:
            raise RuntimeError("simulator already started")
        runner = web.AppRunner(
            self.app(),
            shutdown_timeout=self.config.shutdown_timeout_s,
            handler_cancellation=True,
            access_log=None,
        )
        await runner.setup()
        try:
            site = web.TCPSite(runner, host, port)
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        self.port = int(runner.addresses[0][1])
        shown = f"[{host}]" if ":" in host else host
        self.base_url = f"http://{shown}:{self.port}/v2"
        return self.base_url

    async def close(self) -> None:
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()

    async def __aenter__(self) -> LastInfoSecSim:
        if self._runner is None:
            await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    # ---- handlers -------------------------------------------------------------------------

    async def _search_hash(self, request: web.Request) -> web.StreamResponse:
        return await self._api(request, "search_hash", "hash", request.match_info["hash"])

    async def _search_host(self, request: web.Request) -> web.StreamResponse:
        return await self._api(request, "search_host", "host", request.match_info["host"])

    async def _search(self, request: web.Request) -> web.StreamResponse:
        value: str | None = None
        with contextlib.suppress(ValueError, UnicodeDecodeError):
            body = orjson.loads(await request.read())
            if isinstance(body, dict) and isinstance(body.get("value"), str):
                value = body["value"]
        return await self._api(request, "search", "value", value)

    async def _not_found(self, request: web.Request) -> web.StreamResponse:
        return await self._api(request, "other", None, None)

    def _random(self) -> float:
        if self.config.seed != self._rng_seed:
            self._rng_seed = self.config.seed
            self._rng.seed(self._rng_seed)
        return self._rng.random()

    def _rate_limited(self, now: float) -> bool:
        cfg = self.config
        if cfg.force_429:
            return True
        if cfg.force_429_count > 0:
            cfg.force_429_count -= 1
            return True
        if cfg.rate_limit_per_s is None:
            return False
        window = int(now)
        if window != self._window:
            self._window = window
            self._window_count = 0
        self._window_count += 1
        return self._window_count > cfg.rate_limit_per_s

    def _decide(
        self, request: web.Request, kind: Kind | None, value: str | None, now: float
    ) -> web.Response:
        cfg = self.config
        if cfg.body_override is not None:
            status, raw, ctype = cfg.body_override
            return web.Response(status=status, body=raw, headers={"Content-Type": ctype})
        if kind is None:
            return _json_response(404, ERROR_404)
        if request.query.get("api_key") != cfg.api_key:
            return _json_response(401, ERROR_401)
        if self._rate_limited(now):
            headers = {}
            if cfg.retry_after_s is not None:
                ra = float(cfg.retry_after_s)
                headers["Retry-After"] = str(int(ra)) if ra.is_integer() else repr(ra)
            return _json_response(429, ERROR_429, headers)
        if cfg.error_rate > 0 and self._random() < cfg.error_rate:
            return _json_response(500, ERROR_500)
        if cfg.invalid_key_answer:
            return _json_response(200, INVALID_KEY_200)
        if value is None:
            return _json_response(422, ERROR_BAD_BODY)
        headers_param = request.query.get("headers", "true").strip().lower()
        body = self.answer_for(kind, value, headers=headers_param not in ("false", "0", "no"))
        if body is None:
            return _json_response(422, ERROR_422)
        return _json_response(200, body)

    async def _api(
        self, request: web.Request, endpoint: str, kind: Kind | None, value: str | None
    ) -> web.StreamResponse:
        now = time.time()
        record = RecordedRequest(
            method=request.method,
            path=redact_api_key(request.raw_path),
            endpoint=endpoint,
            value=value,
            time=now,
        )
        stats = self.stats
        stats._begin(record)
        status: int | None = None
        try:
            cfg = self.config
            response = self._decide(request, kind, value, now)
            delay = cfg.latency_s
            if cfg.jitter_s > 0:
                delay += self._random() * cfg.jitter_s
            if cfg.timeout_rate > 0 and self._random() < cfg.timeout_rate:
                delay += cfg.hang_s
            if delay > 0:
                await asyncio.sleep(delay)
            status = response.status
            return response
        finally:
            stats._end(record, status)

    async def _sim_stats(self, request: web.Request) -> web.StreamResponse:
        return _json_response(200, orjson.dumps(self.stats.to_dict()))

    async def _sim_reset(self, request: web.Request) -> web.StreamResponse:
        self.stats.reset()
        return _json_response(200, b'{"reset":true}')

    async def _sim_get_config(self, request: web.Request) -> web.StreamResponse:
        return _json_response(200, orjson.dumps(self.config.to_dict()))

    async def _sim_set_config(self, request: web.Request) -> web.StreamResponse:
        try:
            values = orjson.loads(await request.read())
            if not isinstance(values, dict):
                raise ValueError("a JSON object is expected")
            self.config.update(values)
        except ValueError as exc:  # orjson.JSONDecodeError is a ValueError
            return _json_response(400, orjson.dumps({"error": str(exc)}))
        return _json_response(200, orjson.dumps(self.config.to_dict()))


def _json_response(
    status: int, body: bytes, headers: Mapping[str, str] | None = None
) -> web.Response:
    return web.Response(status=status, body=body, content_type=_JSON, headers=headers)


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------


def _optional_float(text: str) -> float | None:
    return None if text.strip().lower() in ("none", "null", "") else float(text)


def _parser() -> argparse.ArgumentParser:
    d = LisSimConfig()
    p = argparse.ArgumentParser(
        prog="python -m lis_async.sim.lastinfosec",
        description="Simulated LastInfoSec API (STIX 2.1 enrichment endpoints).",
    )
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8089)
    p.add_argument("--api-key", default=d.api_key)
    p.add_argument("--known-share", type=float, default=d.known_share)
    p.add_argument("--bundle-size", type=int, default=d.bundle_size)
    p.add_argument("--bundles-per-answer", type=int, default=d.bundles_per_answer)
    p.add_argument("--latency", type=float, default=d.latency_s, help="seconds")
    p.add_argument("--jitter", type=float, default=d.jitter_s, help="seconds")
    p.add_argument("--error-rate", type=float, default=d.error_rate)
    p.add_argument("--timeout-rate", type=float, default=d.timeout_rate)
    p.add_argument("--hang", type=float, default=d.hang_s, help="seconds (timeout_rate)")
    p.add_argument(
        "--rate-limit",
        type=_optional_float,
        default=d.rate_limit_per_s,
        help="requests per second, or 'none'",
    )
    p.add_argument(
        "--retry-after",
        type=_optional_float,
        default=d.retry_after_s,
        help="seconds, or 'none' for no Retry-After header",
    )
    p.add_argument("--invalid-key-answer", action="store_true")
    p.add_argument("--seed", type=int, default=None)
    return p


async def _serve(config: LisSimConfig, host: str, port: int) -> None:
    sim = LastInfoSecSim(config)
    url = await sim.start(host, port)
    print(
        f"LastInfoSec simulator listening on {url} (stats: {url.removesuffix('/v2')}/_sim/stats)",
        flush=True,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await sim.close()


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    config = LisSimConfig(
        api_key=args.api_key,
        known_share=args.known_share,
        bundle_size=args.bundle_size,
        bundles_per_answer=args.bundles_per_answer,
        latency_s=args.latency,
        jitter_s=args.jitter,
        error_rate=args.error_rate,
        timeout_rate=args.timeout_rate,
        hang_s=args.hang,
        rate_limit_per_s=args.rate_limit,
        retry_after_s=args.retry_after,
        invalid_key_answer=args.invalid_key_answer,
        seed=args.seed,
    )
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_serve(config, args.host, args.port))
    return 0


if __name__ == "__main__":
    sys.exit(main())
