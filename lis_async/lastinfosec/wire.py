"""What goes on the wire to and from LastInfoSec: the query for an observable, URL pieces, and
the reading of answers. Pure functions, no I/O (docs/lastinfosec.md describes the API)."""

from __future__ import annotations

import email.utils
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, Final, Literal
from urllib.parse import quote, unquote, urlsplit

import orjson
from yarl import URL

from lis_async.enrichment.job import BY_ENTITY_TYPE, Observable
from lis_async.enrichment.nesting import MAX_DEPTH, too_deep
from lis_async.enrichment.ports import LookupResult
from lis_async.errors import LisBadAnswer, LisFatalError, NothingToLookUp

Endpoint = Literal["search_hash", "search_host", "search"]
EndpointStyle = Literal["search_hash_host", "search"]
ENDPOINTS: Final[tuple[Endpoint, ...]] = ("search_hash", "search_host", "search")

HASH_PREFERENCE: Final = ("SHA-256", "SHA-1", "MD5")
DETAIL_CHARS: Final = 300


def query_for(obs: Observable, style: EndpointStyle) -> tuple[Endpoint, str]:
    """``(endpoint, value)`` to send for ``obs``, or :class:`NothingToLookUp`."""
    etype = obs.entity_type
    kind = BY_ENTITY_TYPE[etype].lookup if etype in BY_ENTITY_TYPE else None
    post = style == "search"
    if kind == "hash":
        for algo in HASH_PREFERENCE:
            digest = obs.hashes.get(algo)
            if digest:
                return ("search" if post else "search_hash", digest)
        raise NothingToLookUp(
            "file has no MD5, SHA-1 or SHA-256 hash to look up"
            + (" (SHA-512 is not supported by LastInfoSec)" if "SHA-512" in obs.hashes else "")
        )
    value = (obs.value or "").strip()
    if kind is not None and not value:
        raise NothingToLookUp(f"{etype} has no value to look up")
    if kind == "host" or (kind == "url" and post):
        return ("search" if post else "search_host", value)
    if kind == "url":
        host = url_host(value)
        if host is None:
            raise NothingToLookUp("Url has no host to look up")
        return ("search_host", host)
    raise NothingToLookUp(f"entity type {etype!r} is not supported by LastInfoSec")


def path_segment(value: str) -> str:
    """Percent-encode ``value`` as ONE path segment: ``/ ? # %`` and controls are encoded, and
    the dot segments ``.`` / ``..`` (which ``quote`` leaves alone) are encoded too."""
    seg = quote(value, safe="")
    if seg == "." or seg == "..":
        seg = seg.replace(".", "%2E")
    return seg


def url_host(value: str) -> str | None:
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


def retry_after_s(header: str | None) -> float | None:
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


def redirect_target(location: str | None, redact: Callable[[str], str]) -> str:
    """`` to https://host`` for a redirect's ``Location`` (scheme and host only: its path and
    query may echo the key), or ``""``."""
    if not location:
        return ""
    try:
        parts = urlsplit(location.strip())
    except ValueError:
        return ""
    if not parts.scheme or not parts.hostname:
        return " within the same host"
    return redact(f" to {parts.scheme}://{parts.hostname}")[:DETAIL_CHARS]


def error_detail(data: bytes) -> str:
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
    return text[:DETAIL_CHARS] if text else "no detail"


def parse_answer(
    data: bytes,
    endpoint: str,
    value: str,
    redact: Callable[[str], str],
    max_objects: int | None = None,
) -> LookupResult:
    """A 200 answer: a list of bundles, ``{"message": [bundles]}``, one bundle, or ``{"message":
    "text"}`` (an invalid key says so in a 200). Raises :class:`LisBadAnswer` or
    :class:`LisFatalError`, also for an answer of more than ``max_objects`` objects in all, or
    nested deeper than :data:`lis_async.enrichment.nesting.MAX_DEPTH` levels (before anything is
    built from
    it: such an answer must not become thousands of push messages, nor break a serialiser)."""
    doc: Any = None
    bad_json = False
    try:
        doc = orjson.loads(data)
    except orjson.JSONDecodeError:
        bad_json = True
    if bad_json:  # raised outside the except block: nothing chained
        raise LisBadAnswer(
            f"LastInfoSec {endpoint} answer is not valid JSON ({len(data)} bytes)", status=200
        )
    items = _answer_items(doc, endpoint, redact)
    if not items:
        return LookupResult(False, (), value, endpoint)
    bundles = tuple(b for b in items if isinstance(b, dict) and isinstance(b.get("objects"), list))
    if not bundles:
        raise LisBadAnswer(
            f"LastInfoSec {endpoint} answer holds {len(items)} item(s) but no STIX bundle",
            status=200,
        )
    count = sum(len(b["objects"]) for b in bundles)
    if max_objects is not None and count > max_objects:
        raise LisBadAnswer(
            f"LastInfoSec {endpoint} answer holds {count} objects, more than "
            f"LASTINFOSEC_MAX_ANSWER_OBJECTS ({max_objects}): nothing imported",
            status=200,
        )
    if too_deep(bundles, MAX_DEPTH):
        raise LisBadAnswer(
            f"LastInfoSec {endpoint} answer nests deeper than {MAX_DEPTH} levels: nothing imported",
            status=200,
        )
    return LookupResult(True, bundles, value, endpoint)


def _answer_items(doc: Any, endpoint: str, redact: Callable[[str], str]) -> list[Any]:
    items: Any = None
    if isinstance(doc, list):
        items = doc
    elif isinstance(doc, dict):
        if "message" in doc:
            items = doc["message"]
            if isinstance(items, str):
                text = redact(" ".join(items.split()))[:DETAIL_CHARS]
                if "key" in text.lower():
                    raise LisFatalError(f"LastInfoSec rejected the API key: {text}", status=200)
                raise LisBadAnswer(
                    f"LastInfoSec {endpoint} answered a text instead of bundles: {text}",
                    status=200,
                )
        elif doc.get("type") == "bundle":
            items = [doc]
    if not isinstance(items, list):
        raise LisBadAnswer(
            f"LastInfoSec {endpoint} answer has an unexpected shape "
            f"({type(doc).__name__}, not a list of bundles)",
            status=200,
        )
    return items
