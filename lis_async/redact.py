"""Masking secrets in any text that may be logged, raised or sent to the platform.

One helper for every secret (LastInfoSec API key, OpenCTI token, RabbitMQ and proxy passwords):

* ``api_key=<value>`` query parameters (raw and percent-encoded ``api_key%3D``) are masked
  whatever their value;
* the userinfo of a URL (``scheme://user:pass@host``) is masked;
* each secret given is masked where it stands as a whole token, raw or percent-encoded: not
  inside a longer word. A one-letter key ``k`` is masked in ``api_key=k`` or ``Bearer k`` but
  leaves ``not known`` alone, which a plain ``str.replace`` would turn into ``not ***nown``.

A token boundary is any character that cannot be part of a key or token: everything except
letters, digits and ``-._~`` (the characters RFC 3986 leaves unreserved, which is what API keys,
UUID tokens and JWTs are made of).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from functools import lru_cache
from typing import Final
from urllib.parse import quote

MASK: Final = "***"

_API_KEY_RE: Final = re.compile(r"(?i)(api_key(?:=|%3D))[^&\s#\"'<>;,)]*")
_USERINFO_RE: Final = re.compile(r"(?i)(\b[a-z][a-z0-9+.\-]*://)[^/\s@]+@")
_TOKEN_CHARS: Final = r"A-Za-z0-9\-._~"


@lru_cache(maxsize=64)
def _secret_re(secret: str) -> re.Pattern[str]:
    forms = {secret, quote(secret, safe="")}
    alternatives = "|".join(re.escape(f) for f in sorted(forms, key=len, reverse=True))
    return re.compile(rf"(?<![{_TOKEN_CHARS}])(?:{alternatives})(?![{_TOKEN_CHARS}])")


def redact(text: str, secrets: Iterable[str] = ()) -> str:
    """``text`` with every ``api_key=`` value, URL userinfo and whole-token secret masked."""
    for secret in secrets:
        if secret:
            text = _secret_re(secret).sub(MASK, text)
    text = _API_KEY_RE.sub(rf"\1{MASK}", text)
    if "@" in text:
        text = _USERINFO_RE.sub(rf"\1{MASK}@", text)
    return text


def mask_url(url: str) -> str:
    """A URL with its userinfo masked (proxy and base URLs may carry credentials)."""
    if "@" not in url:
        return url
    return _USERINFO_RE.sub(rf"\1{MASK}@", url)
