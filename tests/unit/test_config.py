from __future__ import annotations

import logging
from pathlib import Path

import pytest

from lis_async.app import _warn_unused_settings
from lis_async.settings.model import SettingsError, all_env_names, load_settings
from lis_async.settings.removed import REMOVED, Removed

UUID = "0b3c1f2e-6d7a-4b8c-9d0e-1f2a3b4c5d6e"
BASE_ENV = {
    "OPENCTI_URL": "http://opencti:8080/",
    "OPENCTI_TOKEN": "octi-token-secret",
    "CONNECTOR_ID": UUID,
    "CONFIG_LIS_APIKEY_CTI": "lis-key-secret",
}


def errors_for(env: dict[str, str], tmp_path: Path | None = None) -> list[str]:
    with pytest.raises(SettingsError) as info:
        load_settings(env=env)
    return info.value.problems


def test_seed_environment_variables_work_unchanged() -> None:
    s = load_settings(
        env=BASE_ENV
        | {
            "CONNECTOR_NAME": "LastInfoSec",
            "CONNECTOR_SCOPE": "StixFile,Domain-Name,Hostname,Url",
            "CONNECTOR_AUTO": "true",
            "CONNECTOR_CONFIDENCE_LEVEL": "80",
            "CONNECTOR_LOG_LEVEL": "warn",
            "PROXY_HTTP": "http://proxy:3128",
            "PROXY_HTTPS": "http://user:pw@proxy:3128",
        }
    )
    assert s.opencti.url == "http://opencti:8080"
    assert s.opencti.token.get_secret_value() == "octi-token-secret"
    assert s.connector.id == UUID
    assert s.connector.scope == ("StixFile", "Domain-Name", "Hostname", "Url")
    assert s.connector.auto is True
    assert s.connector.confidence_level == 80
    assert s.connector.log_level == "warning"
    assert s.lastinfosec.api_key_cti.get_secret_value() == "lis-key-secret"
    assert s.opencti.proxy_http == "http://proxy:3128"
    assert s.lastinfosec.max_tlp == "TLP:AMBER"  # safe default


def test_yaml_keys_and_env_precedence(tmp_path: Path) -> None:
    cfg = tmp_path / "config.yml"
    cfg.write_text(
        f"""
opencti:
  url: 'http://from-yaml:8080'
  token: 'yaml-token'
connector:
  id: '{UUID}'
  scope: 'domain-name,url'
  confidence_level: 30
  log_level: 'debug'
lastinfosec:
  api_key_cti: 'yaml-key'
  rate_per_s: 3
  proxy_https: 'http://legacy-proxy:1'
"""
    )
    s = load_settings(
        cfg, env={"OPENCTI_URL": "http://from-env:8080", "CONNECTOR_JOBS_IN_FLIGHT": "7"}
    )
    assert s.opencti.url == "http://from-env:8080"  # environment wins
    assert s.opencti.token.get_secret_value() == "yaml-token"
    assert s.connector.scope == ("Domain-Name", "Url")  # case-insensitive, canonical names
    assert s.connector.confidence_level == 30
    assert s.connector.jobs_in_flight == 7
    assert s.lastinfosec.rate_per_s == 3
    assert s.opencti.proxy_https == "http://legacy-proxy:1"
    # Conventional env name beats the legacy alias.
    s2 = load_settings(
        cfg, env={"CONFIG_LIS_APIKEY_CTI": "legacy", "LASTINFOSEC_API_KEY_CTI": "conventional"}
    )
    assert s2.lastinfosec.api_key_cti.get_secret_value() == "conventional"


def test_default_config_path_is_current_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "config.yml").write_text(
        f"opencti: {{url: 'http://x', token: 't'}}\nconnector: {{id: '{UUID}'}}\n"
        "lastinfosec: {api_key_cti: 'k'}\n"
    )
    monkeypatch.chdir(tmp_path)
    assert load_settings(env={}).opencti.url == "http://x"


def test_missing_config_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match="file not found"):
        load_settings(tmp_path / "nope.yml", env=BASE_ENV)


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"OPENCTI_TOKEN": "ChangeMe"}, "OPENCTI_TOKEN (opencti.token): must be set"),
        ({"OPENCTI_TOKEN": ""}, "OPENCTI_TOKEN (opencti.token): is required"),
        ({"CONNECTOR_ID": "not-a-uuid"}, "CONNECTOR_ID (connector.id): must be a UUID"),
        (
            {"CONNECTOR_SCOPE": "StixFile,IPv4-Addr"},
            "CONNECTOR_SCOPE (connector.scope): unknown scope 'IPv4-Addr'",
        ),
        ({"LASTINFOSEC_RATE_PER_S": "-5"}, "LASTINFOSEC_RATE_PER_S (lastinfosec.rate_per_s)"),
        (
            {"LASTINFOSEC_MAX_TLP": "TLP:PURPLE"},
            "LASTINFOSEC_MAX_TLP (lastinfosec.max_tlp): unknown TLP",
        ),
        (
            {"CONNECTOR_CONFIDENCE_LEVEL": "101"},
            "CONNECTOR_CONFIDENCE_LEVEL (connector.confidence_level)",
        ),
        ({"CONNECTOR_LOG_LEVEL": "chatty"}, "CONNECTOR_LOG_LEVEL (connector.log_level)"),
        ({"CONFIG_LIS_APIKEY_CTI": ""}, "CONFIG_LIS_APIKEY_CTI (lastinfosec.api_key_cti)"),
        ({"OPENCTI_URL": "ftp://x"}, "OPENCTI_URL (opencti.url): must be an http"),
        (
            {"CONNECTOR_ENRICHMENT_RESOLUTION": "full"},
            "CONNECTOR_ENRICHMENT_RESOLUTION (connector.enrichment_resolution): Input should be",
        ),
        (
            {"CONNECTOR_JOBS_IN_FLIGHT": "zero"},
            "CONNECTOR_JOBS_IN_FLIGHT (connector.jobs_in_flight)",
        ),
    ],
)
def test_each_bad_value_gives_one_error_naming_the_variable(
    env: dict[str, str], expected: str
) -> None:
    problems = errors_for(BASE_ENV | env)
    assert len(problems) == 1, problems
    assert expected in problems[0]


def test_several_problems_are_all_reported() -> None:
    problems = errors_for({"CONNECTOR_ID": "x"})
    text = "\n".join(problems)
    for name in ("OPENCTI_URL", "OPENCTI_TOKEN", "CONNECTOR_ID", "CONFIG_LIS_APIKEY_CTI"):
        assert name in text


def test_secrets_never_in_repr_summary_or_errors() -> None:
    s = load_settings(
        env=BASE_ENV | {"MQ_PASS": "mq-secret", "PROXY_HTTPS": "http://u:proxy-pw@p:1"}
    )
    text = repr(s) + str(s) + str(s.summary())
    for secret in ("octi-token-secret", "lis-key-secret", "mq-secret", "proxy-pw"):
        assert secret not in text
    assert s.summary()["mq.pass"] == "***"
    # A secret that fails validation is not echoed back either.
    problems = errors_for(
        BASE_ENV | {"CONNECTOR_ID": "bad", "LASTINFOSEC_RATE_PER_S": "lis-key-secret"}
    )
    assert "lis-key-secret" not in "\n".join(problems)


def test_mq_overrides() -> None:
    s = load_settings(env=BASE_ENV | {"MQ_HOST": "rabbit", "MQ_PORT": "5671", "MQ_USE_SSL": "true"})
    assert (s.mq.host, s.mq.port, s.mq.use_ssl) == ("rabbit", 5671, True)


def test_env_names_follow_the_convention() -> None:
    names = all_env_names()
    for name in (
        "LASTINFOSEC_RATE_PER_S",
        "CONNECTOR_JOBS_IN_FLIGHT",
        "LASTINFOSEC_MAX_TLP",
        "OPENCTI_THREADS",
        "LASTINFOSEC_CACHE_TTL_S",
        "CONNECTOR_METRICS_PORT",
        "MQ_PASS",
    ):
        assert name in names


def test_tls_verification_is_on_by_default_and_off_only_explicitly() -> None:
    s = load_settings(env=BASE_ENV)
    assert s.opencti.ssl_verify is True and s.lastinfosec.ssl_verify is True
    s = load_settings(env=BASE_ENV | {"OPENCTI_SSL_VERIFY": "false"})
    assert s.opencti.ssl_verify is False and s.lastinfosec.ssl_verify is True


# ----------------------------------------------------------------------------- empty values
# One rule for the environment and config.yml: an empty value means "not set".


def _yaml(tmp_path: Path, text: str) -> Path:
    cfg = tmp_path / "config.yml"
    cfg.write_text(text, encoding="utf-8")
    return cfg


@pytest.mark.parametrize("empty", ["", "   "])
def test_an_empty_variable_does_not_hide_the_yaml_value(tmp_path: Path, empty: str) -> None:
    """Compose files keep `PROXY_HTTP=` lines: the proxy of the mounted config.yml applies."""
    cfg = _yaml(
        tmp_path,
        "opencti: {proxy_https: 'http://yaml-proxy:3128'}\n"
        "lastinfosec: {proxy_http: 'http://legacy-yaml-proxy:3128'}\n"
        "connector: {jobs_in_flight: 5}\n",
    )
    env = BASE_ENV | {"PROXY_HTTP": empty, "PROXY_HTTPS": empty, "CONNECTOR_JOBS_IN_FLIGHT": empty}
    s = load_settings(cfg, env=env)
    assert s.opencti.proxy_https == "http://yaml-proxy:3128"
    assert s.opencti.proxy_http == "http://legacy-yaml-proxy:3128"
    assert s.lastinfosec_proxy == "http://yaml-proxy:3128"
    assert s.connector.jobs_in_flight == 5


@pytest.mark.parametrize("source", ["env", "yaml-null", "yaml-empty-string"])
def test_empty_values_mean_the_default(tmp_path: Path, source: str) -> None:
    keys = {
        "connector": ("jobs_in_flight", "auto", "scope", "log_level"),
        "opencti": ("ssl_verify", "threads", "proxy_http"),
        "lastinfosec": ("rate_per_s", "ssl_verify", "max_tlp"),
        "mq": ("port", "use_ssl", "pass"),
    }
    env = dict(BASE_ENV)
    cfg = None
    if source == "env":
        env |= {f"{sec}_{key}".upper(): "" for sec, names in keys.items() for key in names}
    else:
        value = "" if source == "yaml-null" else "''"
        text = "".join(
            f"{sec}:\n" + "".join(f"  {key}: {value}\n" for key in names)
            for sec, names in keys.items()
        )
        cfg = _yaml(tmp_path, text)
    s = load_settings(cfg, env=env)
    assert s.connector.jobs_in_flight == 64 and s.connector.auto is False
    assert s.connector.scope == ("StixFile", "Domain-Name", "Hostname", "Url")
    assert s.connector.log_level == "info"
    assert s.opencti.ssl_verify is True  # an empty boolean no longer turns TLS checks off
    assert s.opencti.threads == 8 and s.opencti.proxy_http is None
    assert s.lastinfosec.rate_per_s == 10 and s.lastinfosec.ssl_verify is True
    assert s.lastinfosec.max_tlp == "TLP:AMBER"
    assert (s.mq.port, s.mq.use_ssl, s.mq.password) == (None, None, None)


@pytest.mark.parametrize("source", ["env", "yaml-null", "yaml-empty-string"])
def test_an_empty_required_secret_is_required(tmp_path: Path, source: str) -> None:
    env = {"OPENCTI_URL": "http://opencti:8080", "CONNECTOR_ID": UUID}
    cfg = None
    if source == "env":
        env |= {"OPENCTI_TOKEN": "", "CONFIG_LIS_APIKEY_CTI": "", "LASTINFOSEC_API_KEY_CTI": ""}
    else:
        value = "" if source == "yaml-null" else "''"
        cfg = _yaml(tmp_path, f"opencti:\n  token: {value}\nlastinfosec:\n  api_key_cti: {value}\n")
    with pytest.raises(SettingsError) as info:
        load_settings(cfg, env=env)
    assert info.value.problems == [
        "OPENCTI_TOKEN (opencti.token): is required",
        "LASTINFOSEC_API_KEY_CTI / CONFIG_LIS_APIKEY_CTI (lastinfosec.api_key_cti): is required",
    ]


def test_an_empty_legacy_variable_does_not_hide_the_yaml_secret(tmp_path: Path) -> None:
    cfg = _yaml(tmp_path, "lastinfosec: {api_key_cti: 'yaml-key'}\n")
    env = BASE_ENV | {"CONFIG_LIS_APIKEY_CTI": "", "LASTINFOSEC_API_KEY_CTI": ""}
    assert load_settings(cfg, env=env).lastinfosec.api_key_cti.get_secret_value() == "yaml-key"


# ---------------------------------------------------------------------------------------------
# issue #15: gates, caps, exposure, secrets from files


def test_new_defaults() -> None:
    s = load_settings(env=BASE_ENV)
    assert s.lastinfosec.max_pap is None  # no PAP gate unless asked
    assert s.lastinfosec.max_answer_bytes == 4 * 1024 * 1024
    assert s.lastinfosec.max_answer_objects == 5000
    assert s.lastinfosec.cache_max_bytes == 64 * 1024 * 1024
    assert s.lastinfosec.allow_http is False
    assert s.connector.health_host == "0.0.0.0"


@pytest.mark.parametrize(
    ("value", "expected"),
    [("pap:amber", "PAP:AMBER"), ("PAP:WHITE", "PAP:CLEAR"), ("red", "PAP:RED")],
)
def test_max_pap(value: str, expected: str) -> None:
    assert (
        load_settings(env=BASE_ENV | {"LASTINFOSEC_MAX_PAP": value}).lastinfosec.max_pap == expected
    )


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        (
            {"LASTINFOSEC_MAX_PAP": "PAP:PURPLE"},
            "LASTINFOSEC_MAX_PAP (lastinfosec.max_pap): unknown PAP",
        ),
        (
            {"LASTINFOSEC_BASE_URL": "http://lis.internal/v2"},
            "LASTINFOSEC_BASE_URL (lastinfosec.base_url): is plain http: the API key would travel "
            "unencrypted (set LASTINFOSEC_ALLOW_HTTP=true to allow it)",
        ),
        (
            {"LASTINFOSEC_MAX_ANSWER_OBJECTS": "0"},
            "LASTINFOSEC_MAX_ANSWER_OBJECTS (lastinfosec.max_answer_objects)",
        ),
        ({"CONNECTOR_HEALTH_HOST": "0.0.0.0/0"}, "CONNECTOR_HEALTH_HOST (connector.health_host)"),
    ],
)
def test_new_settings_name_the_variable(env: dict[str, str], expected: str) -> None:
    problems = errors_for(BASE_ENV | env)
    assert len(problems) == 1 and expected in problems[0], problems


def test_plain_http_lastinfosec_only_when_allowed() -> None:
    env = BASE_ENV | {
        "LASTINFOSEC_BASE_URL": "http://127.0.0.1:8089/v2",
        "LASTINFOSEC_ALLOW_HTTP": "true",
    }
    assert load_settings(env=env).lastinfosec.base_url == "http://127.0.0.1:8089/v2"
    # OpenCTI itself often is plain http inside a deployment: no such rule there.
    assert load_settings(env=BASE_ENV).opencti.url == "http://opencti:8080"


def test_health_host() -> None:
    assert (
        load_settings(env=BASE_ENV | {"CONNECTOR_HEALTH_HOST": " 127.0.0.1 "}).connector.health_host
        == "127.0.0.1"
    )


def test_credentials_in_urls_are_masked_in_the_summary() -> None:
    s = load_settings(
        env=BASE_ENV
        | {
            "OPENCTI_URL": "https://octi-user:octi-pass@opencti.example",
            "LASTINFOSEC_BASE_URL": "https://lis-user:lis-pass@lis.example/v2",
        }
    )
    summary = s.summary()
    assert summary["opencti.url"] == "https://***@opencti.example"
    assert summary["lastinfosec.base_url"] == "https://***@lis.example/v2"
    text = str(summary) + repr(s) + str(s)
    for secret in ("octi-pass", "lis-pass", "octi-user", "lis-user"):
        assert secret not in text, secret


def test_secrets_from_files(tmp_path: Path) -> None:
    token, key = tmp_path / "token", tmp_path / "key"
    token.write_text("token-from-file\n")
    key.write_text("key-from-file\r\n")
    env = {k: v for k, v in BASE_ENV.items() if k not in ("OPENCTI_TOKEN", "CONFIG_LIS_APIKEY_CTI")}
    s = load_settings(
        env=env | {"OPENCTI_TOKEN_FILE": str(token), "LASTINFOSEC_API_KEY_CTI_FILE": str(key)}
    )
    assert s.opencti.token.get_secret_value() == "token-from-file"
    assert s.lastinfosec.api_key_cti.get_secret_value() == "key-from-file"
    # the upstream name has its _FILE form too; only one trailing newline goes
    key.write_text("key\n\n")
    s = load_settings(
        env=env | {"OPENCTI_TOKEN_FILE": str(token), "CONFIG_LIS_APIKEY_CTI_FILE": str(key)}
    )
    assert s.lastinfosec.api_key_cti.get_secret_value() == "key\n"
    assert "token-from-file" not in str(s.summary()) + repr(s)


def test_unreadable_secret_file_names_the_variable_never_the_content(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    problems = errors_for(BASE_ENV | {"OPENCTI_TOKEN_FILE": str(missing)})
    assert problems == ["OPENCTI_TOKEN and OPENCTI_TOKEN_FILE are both set: set only one of them"]
    env = BASE_ENV | {"OPENCTI_TOKEN": ""}  # empty: not set
    problems = errors_for(env | {"OPENCTI_TOKEN_FILE": str(missing)})
    assert problems == [f"OPENCTI_TOKEN_FILE: cannot read {str(missing)!r} (FileNotFoundError)"]
    binary = tmp_path / "binary"
    binary.write_bytes(b"\xff\xfe-secret-bytes")
    problems = errors_for(env | {"OPENCTI_TOKEN_FILE": str(binary)})
    assert problems == [f"OPENCTI_TOKEN_FILE: cannot read {str(binary)!r} (UnicodeDecodeError)"]
    assert "secret-bytes" not in "".join(problems)
    empty = tmp_path / "empty"
    empty.write_text("\n")
    assert (
        "OPENCTI_TOKEN (opencti.token): is required"
        in errors_for(env | {"OPENCTI_TOKEN_FILE": str(empty)})[0]
    )


def test_file_variants_are_known_names() -> None:
    names = all_env_names()
    for name in (
        "OPENCTI_TOKEN_FILE",
        "LASTINFOSEC_API_KEY_CTI_FILE",
        "CONFIG_LIS_APIKEY_CTI_FILE",
    ):
        assert name in names


# ----------------------------------------------------------------------------- removed settings
@pytest.mark.parametrize("entry", REMOVED, ids=lambda e: e.env)
@pytest.mark.parametrize("source", ["env", "yaml"])
def test_a_removed_setting_is_ignored_with_a_warning_naming_it(
    entry: Removed, source: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """People copy env files and config.yml: a setting lis-async no longer reads never stops the
    start, whatever its value, and one WARNING names it (never its value)."""
    cfg = tmp_path / "config.yml"
    cfg.write_text("", encoding="utf-8")
    env = dict(BASE_ENV)
    if source == "env":
        env[entry.env] = "not-a-number-s3cr3t"
    else:
        cfg.write_text(f"{entry.section}:\n  {entry.key}: 'x-s3cr3t'\n", encoding="utf-8")
    s = load_settings(cfg, env=env)
    (line,) = s.ignored
    assert line.startswith(f"{entry.env} ({entry.section}.{entry.key}) is no longer a setting")
    assert "s3cr3t" not in line
    assert f"{entry.section}.{entry.key}" not in s.summary()
    caplog.set_level(logging.WARNING, "lis_async")
    _warn_unused_settings(s)
    assert [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING] == [line]


def test_an_empty_removed_setting_is_not_set() -> None:
    env = BASE_ENV | {entry.env: " " for entry in REMOVED}
    assert load_settings(env=env).ignored == ()
    assert load_settings(env=BASE_ENV).ignored == ()


def test_removed_settings_are_not_settings() -> None:
    names = set(all_env_names())
    assert not {entry.env for entry in REMOVED} & names
