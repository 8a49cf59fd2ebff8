"""Cluster mode's secrets (issue #20, finding 2): REDIS_CACHE_KEY is required with REDIS_URL,
both may come from files, and no form of Redis, proxy or OpenCTI URL shows its password."""

from __future__ import annotations

import io
import logging
from pathlib import Path
from urllib.parse import quote

import pytest

from lis_async.redact import SecretFilter, mask_url, redact, register_secrets, url_secrets
from lis_async.settings.model import SettingsError, load_settings
from tests.helpers import OFFLINE_ENV

KEY = "k" * 16 + "-cache-key"

# (URL, its secrets): every form redis-py, aiohttp or pycti accept a password in.
URL_FORMS = [
    ("redis://127.0.0.1:6379/7?password=s3cretPW", ["s3cretPW"]),
    ("redis://127.0.0.1:6379/7?password=s3c@retPW", ["s3c@retPW"]),
    ("redis://u:pa@w0rd@127.0.0.1:6379/7?password=s3c@retPW", ["pa@w0rd", "s3c@retPW"]),
    ("redis://127.0.0.1:6379/7?db=1&Password=s3cretPW&x=1", ["s3cretPW"]),
    ("redis://:p@ss@host:6379/0", ["p@ss"]),
    ("redis://user:p@ss@w0rd@host/0", ["p@ss@w0rd"]),
    ("redis://user:pa%40ss@host/0", ["pa%40ss", "pa@ss"]),
    ("rediss://default:s3cret@host:6380/3?ssl_cert_reqs=none", ["s3cret"]),
    ("redis://s3cretonly@host:6379", ["s3cretonly"]),
    ("unix://:s3cret@/run/redis.sock?db=2", ["s3cret"]),
    ("unix:///run/redis.sock?db=2&password=s3cret", ["s3cret"]),
    ("http://proxy-user:pr0xy@pw@proxy:3128", ["pr0xy@pw"]),
    ("https://u:pw@opencti.example:8080/graphql?token=t0ken&x=1", ["pw", "t0ken"]),
    ("http://proxy:3128/?api_key=k3y&secret=s3c&pwd=p4&auth=a5", ["k3y", "s3c", "p4", "a5"]),
]


@pytest.mark.parametrize(("url", "secrets"), URL_FORMS)
def test_no_url_form_shows_its_password(url: str, secrets: list[str]) -> None:
    masked, in_text = mask_url(url), redact(f"connecting to {url} failed")
    assert set(secrets) <= set(url_secrets(url))
    for secret in secrets:
        # Nor any tail of it after an "@" (redis://:p@ss@host was shown as redis://***@ss@host).
        for part in {secret, *secret.split("@")[1:], quote(secret, safe="")}:
            assert part not in masked, (url, masked)
            assert part not in in_text, (url, in_text)
    assert "***" in masked


def test_masking_keeps_what_is_not_secret() -> None:
    assert mask_url("redis://user:pw@redis.example:6380/3") == "redis://***@redis.example:6380/3"
    assert mask_url("redis://redis.example:6379/3?db=3") == "redis://redis.example:6379/3?db=3"
    assert mask_url("redis://h/0?password=x&db=2") == "redis://h/0?password=***&db=2"
    assert url_secrets("redis://h:6379/0") == []


def settings_env(**env: str) -> dict[str, str]:
    return OFFLINE_ENV | env


def test_cluster_mode_requires_a_cache_key() -> None:
    with pytest.raises(SettingsError) as info:
        load_settings(env=settings_env(REDIS_URL="redis://127.0.0.1:6379/0"))
    assert "REDIS_CACHE_KEY (redis.cache_key) is required with REDIS_URL" in str(info.value)
    with pytest.raises(SettingsError) as info:
        load_settings(env=settings_env(REDIS_URL="redis://h/0", REDIS_CACHE_KEY="short-key"))
    assert "REDIS_CACHE_KEY (redis.cache_key): must be at least 16 characters" in str(info.value)
    assert "short-key" not in str(info.value)
    # Without Redis no key is needed.
    assert load_settings(env=settings_env()).redis.cache_key is None


def test_the_url_and_the_cache_key_may_come_from_files(tmp_path: Path) -> None:
    url_file, key_file = tmp_path / "url", tmp_path / "key"
    url_file.write_text("redis://:pw-from-file@127.0.0.1:6379/3\n")
    key_file.write_text(KEY + "\n")
    s = load_settings(
        env=settings_env(REDIS_URL_FILE=str(url_file), REDIS_CACHE_KEY_FILE=str(key_file))
    )
    assert s.redis.url == "redis://:pw-from-file@127.0.0.1:6379/3"
    assert s.redis.cache_key is not None and s.redis.cache_key.get_secret_value() == KEY
    shown = f"{s!r} {s.summary()}"
    assert "pw-from-file" not in shown and KEY not in shown
    assert s.summary()["redis.url"] == "redis://***@127.0.0.1:6379/3"
    assert {"pw-from-file", KEY} <= set(s.secrets())


def test_every_url_secret_of_the_settings_is_registered_for_the_logs(
    caplog: pytest.LogCaptureFixture,
) -> None:
    s = load_settings(
        env=settings_env(
            OPENCTI_URL="http://octi:0cti-Pw@opencti:8080",
            PROXY_HTTPS="http://proxy:pr0xy-Pw@proxy:3128",
            REDIS_URL="redis://127.0.0.1:6379/0?password=r3dis-Pw",
            REDIS_CACHE_KEY=KEY,
        )
    )
    secrets = set(s.secrets())
    assert {"0cti-Pw", "pr0xy-Pw", "r3dis-Pw", KEY, "octi-token-secret"} <= secrets
    register_secrets(["r3dis-Pw-registered"])
    # A line that quotes the bare password (an exception text without the URL) is masked too.
    record = logging.LogRecord(
        "x", logging.ERROR, __file__, 1, "AUTH failed: %s", ("r3dis-Pw-registered",), None
    )
    assert SecretFilter().filter(record)
    assert record.getMessage() == "AUTH failed: ***"


@pytest.mark.parametrize("json_lines", [False, True])
def test_tracebacks_are_masked_in_both_log_formats(json_lines: bool) -> None:
    from lis_async.ops.logs import EscapeControls, PyctiJsonFormatter

    register_secrets(url_secrets("redis://:tr4ceback@Pw@127.0.0.1:6379/0"))
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.addFilter(SecretFilter())
    handler.addFilter(EscapeControls())  # as setup_logging adds it: it rebuilds the traceback
    handler.setFormatter(PyctiJsonFormatter() if json_lines else logging.Formatter())
    logger = logging.getLogger("lis_async.test_secret_filter")
    logger.addHandler(handler)
    try:
        try:
            raise ConnectionError("AUTH tr4ceback@Pw refused by redis://:tr4ceback@Pw@h:6379")
        except ConnectionError:
            logger.error("Redis %s failed", "redis://:tr4ceback@Pw@h:6379", exc_info=True)
    finally:
        logger.removeHandler(handler)
    text = stream.getvalue()
    assert "ConnectionError" in text and "***" in text
    assert "tr4ceback" not in text and "@Pw" not in text, text
