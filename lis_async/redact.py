"""Masking secrets in any text that may be logged, raised or sent to the platform, and escaping
what must not reach a log line raw (:func:`escape_controls`).

One helper for every secret (LastInfoSec API key, OpenCTI token, RabbitMQ, Redis and proxy
passwords, the cluster cache key):

* ``api_key=<value>`` query parameters (raw and percent-encoded ``api_key%3D``) are masked
  whatever their value, and so is the value of any password-like query parameter
  (``password``, ``pass``, ``pwd``, ``secret``, ``token``, ``key``, ``auth``...: redis-py reads
  ``?password=``);
* the userinfo of a URL (``scheme://user:pass@host``) is masked up to the LAST ``@`` (a raw
  ``@`` inside a password must not leak the password's tail);
* each secret given, and each secret registered with :func:`register_secrets` (the settings'
  secrets, those found in URLs included, registered at start-up), is masked where it stands as
  a whole token, raw or percent-encoded: not inside a longer word. A one-letter key ``k`` is
  masked in ``api_key=k`` or ``Bearer k`` but leaves ``not known`` alone, which a plain
  ``str.replace`` would turn into ``not ***nown``.

A token boundary is any character that cannot be part of a key or token: everything except
letters, digits and ``-._~`` (the characters RFC 3986 leaves unreserved, which is what API keys,
UUID tokens and JWTs are made of).

:class:`SecretFilter` applies the same masking to every log record (the CLI installs it).
"""

from __future__ import annotations

import logging
import re
import traceback
import unicodedata
from collections.abc import Iterable
from functools import lru_cache
from typing import Final
from urllib.parse import quote, unquote, urlsplit

MASK: Final = "***"

_API_KEY_RE: Final = re.compile(r"(?i)(api_key(?:=|%3D))[^&\s#\"'<>;,)]*")
#: Words that make a query parameter's value a secret (``redis_password``, ``x-api-key``...).
_SECRET_WORDS: Final = r"(?:password|passwd|pass|pwd|secret|token|key|auth|credential)"
_SECRET_PARAM_RE: Final = re.compile(
    rf"(?i)([?&;][\w.\-~%]*{_SECRET_WORDS}[\w.\-~%]*(?:=|%3D))[^&\s#\"'<>;,)]*"
)
_SECRET_KEY_RE: Final = re.compile(rf"(?i){_SECRET_WORDS}")
# Greedy up to the last "@" before the authority ends (a "/" or a blank): a raw "@" in a
# password is then masked with the rest of the userinfo.
_USERINFO_RE: Final = re.compile(r"(?i)(\b[a-z][a-z0-9+.\-]*://)[^/\s]*@")
_TOKEN_CHARS: Final = r"A-Za-z0-9\-._~"

_registered: set[str] = set()


@lru_cache(maxsize=64)
def _secret_re(secret: str) -> re.Pattern[str]:
    forms = {secret, quote(secret, safe="")}
    alternatives = "|".join(re.escape(f) for f in sorted(forms, key=len, reverse=True))
    return re.compile(rf"(?<![{_TOKEN_CHARS}])(?:{alternatives})(?![{_TOKEN_CHARS}])")


def register_secrets(secrets: Iterable[str]) -> None:
    """Mask these values in every later :func:`redact` and every log record that goes through
    :class:`SecretFilter` (the process's secrets, from the settings)."""
    _registered.update(s for s in secrets if s)


def redact(text: str, secrets: Iterable[str] = ()) -> str:
    """``text`` with every ``api_key=`` and password-like parameter value, URL userinfo and
    whole-token secret (given or registered) masked."""
    for secret in (*secrets, *_registered):
        if secret:
            text = _secret_re(secret).sub(MASK, text)
    text = _API_KEY_RE.sub(rf"\1{MASK}", text)
    text = _SECRET_PARAM_RE.sub(rf"\1{MASK}", text)
    if "@" in text:
        text = _USERINFO_RE.sub(rf"\1{MASK}@", text)
    return text


def mask_url(url: str) -> str:
    """A URL with its userinfo (everything up to its last ``@``) and the values of its
    password-like query parameters masked (proxy, OpenCTI and Redis URLs may carry credentials).
    An ``@`` elsewhere (a path, a query) masks a little more than needed, never less."""
    # The query first: a raw "@" in a query value must not pass for the end of a userinfo.
    scheme, sep, rest = _SECRET_PARAM_RE.sub(rf"\1{MASK}", url).partition("://")
    if sep and "@" in rest:
        rest = f"{MASK}@{rest.rpartition('@')[2]}"
    return scheme + sep + rest


def url_secrets(url: str | None) -> list[str]:
    """The secrets a URL holds, raw and percent-decoded, for :func:`register_secrets`: its
    password (the userinfo up to its last ``@``; all of it when there is no ``:``, as in
    ``redis://password@host``) and the values of its password-like query parameters."""
    if not url:
        return []
    found: list[str] = []
    _, sep, rest = _SECRET_PARAM_RE.sub(rf"\1{MASK}", url).partition("://")
    if sep and "@" in rest:
        # The authority ends at the first "/", "?" or "#" after an "@"; a password holding
        # one of them raw has its userinfo end at the last "@" of the URL.
        end = min((i for i in map(rest.find, "/?#") if i >= 0), default=len(rest))
        head = rest[:end] if "@" in rest[:end] else rest
        user, colon, password = head.rpartition("@")[0].partition(":")
        found.append(password if colon else user)
    try:
        query = urlsplit(url).query
    except ValueError:
        query = url.partition("?")[2]
    for pair in re.split(r"[&;]", query):
        name, eq, value = pair.partition("=")
        if eq and _SECRET_KEY_RE.search(unquote(name)):
            found.append(value)
    found += [unquote(f) for f in found]
    return sorted({f for f in found if f})


class SecretFilter(logging.Filter):
    """Masks what :func:`redact` masks, registered secrets included, in every record's message
    and traceback. Installed on the log handler by the CLI: a URL or an exception text that a
    module forgot to redact still never shows a password."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a malformed record: let logging report it as it always does
            return True
        masked = redact(message)
        if masked != message:
            record.msg, record.args = masked, None
        if record.exc_info and record.exc_text is None:
            text = "".join(traceback.format_exception(*record.exc_info)).rstrip("\n")
            record.exc_text = redact(text)
        return True


# Escaping: a short function over unicodedata rather than a dependency (the logging libraries
# escape for JSON, not bidirectional controls nor terminal escapes). docs/telemetry.md, "Logs".
_ESCAPED_CATEGORIES: Final = frozenset({"Cc", "Cf", "Cs", "Zl", "Zp"})


def _escape_char(c: str) -> str:
    code = ord(c)
    if code < 0x100:
        return {"\n": "\\n", "\r": "\\r", "\t": "\\t"}.get(c) or f"\\x{code:02x}"
    return f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


def escape_controls(text: str, keep: str = "") -> str:
    """``text`` with every control, format (bidirectional overrides such as U+202E, zero-width
    characters), surrogate and line/paragraph separator character written as a Python escape
    (``\\x1b``, ``\\r``, ``\\u202e``), except those in ``keep``: a value from outside can then
    neither forge a log line nor drive a terminal nor reorder what a reader sees."""
    if text.isprintable():  # the fast path: nothing to escape (tabs and newlines are not)
        return text
    return "".join(
        _escape_char(c) if c not in keep and unicodedata.category(c) in _ESCAPED_CATEGORIES else c
        for c in text
    )


# ----------------------------------------------------------------------------------------------
# Untrusted values (an observable's value, a hash) in work messages and log lines

#: The most characters of a value a work message or log line shows.
SHOWN_CHARS: Final = 200
_AUTHORITY_START: Final = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*://|//")


def _userinfo_span(url: str) -> tuple[int, int] | None:
    """Where the userinfo of ``url`` stands, ``@`` included: ``(start, end)``, or None. A value
    without ``scheme://`` is read as an authority first (``alice:pw@host/x``), as
    ``urllib.parse`` reads it once ``http://`` is prepended. Linear time, whatever the value."""
    m = _AUTHORITY_START.match(url)
    start = m.end() if m else 0
    end = len(url)
    for sep in "/?#":
        found = url.find(sep, start, end)
        if found != -1:
            end = found
    at = url.rfind("@", start, end)
    return (start, at + 1) if at != -1 else None


def strip_userinfo(url: str) -> str:
    """``url`` without its userinfo: ``https://alice:pw@host/x`` -> ``https://host/x``."""
    span = _userinfo_span(url)
    return url if span is None else url[: span[0]] + url[span[1] :]


def shown(value: str, limit: int = SHOWN_CHARS) -> str:
    """An untrusted value as a work message or a log line may show it: a URL's userinfo masked
    (``https://***@host``), control characters escaped (no forged log lines, no terminal
    escapes), at most ``limit`` characters, with the full length said when cut."""
    span = _userinfo_span(value)
    if span is not None:
        value = value[: span[0]] + MASK + "@" + value[span[1] :]
    text = value if len(value) <= limit else value[:limit]
    text = escape_controls(text)[:limit]
    return text if len(value) <= limit else f"{text}... ({len(value)} characters)"
