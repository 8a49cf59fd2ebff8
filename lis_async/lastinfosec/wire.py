"""What goes on the wire to and from LastInfoSec: the query for an observable, URL pieces, and
the reading of answers. Pure functions, no I/O (docs/lastinfosec.md describes the API).

Nothing is sent that is not the value it claims to be: a hash is hex of its algorithm's length, a
host name a valid one, and a URL goes without its userinfo
(docs/security.md, "Values checked before they are sent")."""

from __future__ import annotations

import email.utils
import ipaddress
import re
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
from lis_async.redact import shown, strip_userinfo

Endpoint = Literal["search_hash", "search_host", "search"]
EndpointStyle = Literal["search_hash_host", "search"]
ENDPOINTS: Final[tuple[Endpoint, ...]] = ("search_hash", "search_host", "search")

HASH_PREFERENCE: Final = ("SHA-256", "SHA-1", "MD5")
#: Hex digits of each hash algorithm (SHA-512 is checked too, though never sent).
HASH_HEX_DIGITS: Final = {"MD5": 32, "SHA-1": 40, "SHA-256": 64, "SHA-512": 128}
_HEX: Final = re.compile(r"[0-9a-f]+")  # hashes are lower-cased when the job is read
#: A host name's limits (RFC 1035, on its IDNA form): 253 characters, labels of 1 to 63
#: letters, digits, hyphens or underscores (which DNS carries and malicious names use).
MAX_HOST_CHARS: Final = 253
_LABEL: Final = re.compile(r"[a-z0-9_-]{1,63}")
DETAIL_CHARS: Final = 300


def valid_hash(algo: str, digest: str) -> bool:
    """``digest`` is hex of ``algo``'s length."""
    return len(digest) == HASH_HEX_DIGITS.get(algo) and _HEX.fullmatch(digest) is not None


def host_problem(host: str) -> str | None:
    """Why ``host`` is not a host name LastInfoSec can be asked about, or None: an IP address,
    or a name whose IDNA form (``bücher.de`` -> ``xn--bcher-kva.de``, which is what the limits
    apply to) is at most 253 characters of valid labels; a final dot is allowed."""
    name = host.rstrip(".")
    if not name:
        return "is empty"
    if len(name) > 4 * MAX_HOST_CHARS:  # no IDNA work on a huge value
        return f"is {len(host)} characters long (a host name has at most {MAX_HOST_CHARS})"
    try:
        ipaddress.ip_address(name)
        return None
    except ValueError:
        pass
    try:
        # yarl applies IDNA (UTS #46, IDNA 2003 fallback) and rejects invalid host characters.
        encoded = URL.build(scheme="http", host=name).raw_host or ""
    except (ValueError, UnicodeError):
        return "is not a valid host name"
    if len(encoded) > MAX_HOST_CHARS:
        return f"is {len(encoded)} characters long (a host name has at most {MAX_HOST_CHARS})"
    if not all(_LABEL.fullmatch(label) for label in encoded.split(".")):
        return "is not a valid host name (labels of 1 to 63 letters, digits, - or _)"
    return None


def _hash_query(obs: Observable, post: bool) -> tuple[Endpoint, str]:
    invalid: list[str] = []
    for algo in HASH_PREFERENCE:
        digest = obs.hashes.get(algo)
        if not digest:
            continue
        if valid_hash(algo, digest):
            return ("search" if post else "search_hash", digest)
        invalid.append(f"{algo} {shown(digest)} is not {HASH_HEX_DIGITS[algo]} hex digits")
    if invalid:
        raise NothingToLookUp("file has no valid hash to look up: " + "; ".join(invalid))
    raise NothingToLookUp(
        "file has no MD5, SHA-1 or SHA-256 hash to look up"
        + (" (SHA-512 is not supported by LastInfoSec)" if "SHA-512" in obs.hashes else "")
    )


def query_for(obs: Observable, style: EndpointStyle) -> tuple[Endpoint, str]:
    """``(endpoint, value)`` to send for ``obs``, or :class:`NothingToLookUp` (nothing valid to
    send: the job completes with that message and nothing goes out)."""
    etype = obs.entity_type
    kind = BY_ENTITY_TYPE[etype].lookup if etype in BY_ENTITY_TYPE else None
    post = style == "search"
    if kind == "hash":
        return _hash_query(obs, post)
    value = (obs.value or "").strip()
    if kind is not None and not value:
        raise NothingToLookUp(f"{etype} has no value to look up")
    if kind == "host":
        problem = host_problem(value)
        if problem is not None:
            raise NothingToLookUp(f"{etype} value {shown(value)} {problem}: not looked up")
        return ("search" if post else "search_host", value)
    if kind == "url":
        host = url_host(value)
        problem = "has no host" if host is None else host_problem(host)
        if host is None or problem is not None:
            raise NothingToLookUp(f"Url {shown(value)} {problem}: not looked up")
        # The userinfo (``alice:S3cret@``) is a credential, not part of what is looked up.
        return ("search", strip_userinfo(value)) if post else ("search_host", host)
    raise NothingToLookUp(f"entity type '{shown(etype)}' is not supported by LastInfoSec")


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
