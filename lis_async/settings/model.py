"""Settings: ``config.yml`` + environment variables (environment wins), validated and immutable.

One visible convention: the YAML key ``section.key`` is the environment variable ``SECTION_KEY``
(``lastinfosec.rate_per_s`` <-> ``LASTINFOSEC_RATE_PER_S``). The upstream connector's names keep
working unchanged: they are listed in :data:`LEGACY_ENV` / :data:`LEGACY_YAML`.

Validation is pydantic's (typed, frozen models); errors are rewritten into one line per bad value
that names the environment variable and the YAML key, never the value of a secret.
"""

from __future__ import annotations

import os
import re
import ssl
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Final, Literal

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from lis_async.enrichment.job import SUPPORTED_TYPES, normalise_tlp
from lis_async.enrichment.markings import normalise_pap
from lis_async.errors import SettingsError
from lis_async.redact import mask_url
from lis_async.settings import unsupported
from lis_async.settings.tls import AmqpTls, is_pem, mq_context

__all__ = ["Settings", "SettingsError", "load_settings"]

DEFAULT_CONFIG_PATHS: Final = (
    Path("config.yml"),
    Path("/opt/opencti-connector-lastinfosec-enrichment/config.yml"),
)

# Upstream environment variable -> (section, key). Checked after the conventional name.
LEGACY_ENV: Final[Mapping[str, tuple[str, str]]] = {
    "CONFIG_LIS_APIKEY_CTI": ("lastinfosec", "api_key_cti"),
    "PROXY_HTTP": ("opencti", "proxy_http"),
    "PROXY_HTTPS": ("opencti", "proxy_https"),
}
# Upstream YAML key -> our (section, key).
LEGACY_YAML: Final[Mapping[tuple[str, str], tuple[str, str]]] = {
    ("lastinfosec", "proxy_http"): ("opencti", "proxy_http"),
    ("lastinfosec", "proxy_https"): ("opencti", "proxy_https"),
}


def _to_bool(v: Any) -> Any:
    if isinstance(v, str):
        low = v.strip().lower()
        if low in ("true", "1", "yes", "on"):
            return True
        if low in ("false", "0", "no", "off", ""):
            return False
    return v


def _blank_to_none(v: Any) -> Any:
    if isinstance(v, str) and not v.strip():
        return None
    return v


def is_set(value: Any) -> bool:
    """The one rule for both sources: an empty value (``KEY=`` in the environment, ``key:`` or
    ``key: ''`` in YAML, or only spaces) means "not set", and the next source or the default
    applies."""
    return value is not None and not (isinstance(value, str) and not value.strip())


Bool = Annotated[bool, BeforeValidator(_to_bool)]
OptStr = Annotated[str | None, BeforeValidator(_blank_to_none)]
_METRIC_NAME_RE: Final = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
_HEADER_NAME_RE: Final = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")  # an HTTP token


def parse_custom_headers(text: str) -> dict[str, str]:
    """pycti's ``OPENCTI_CUSTOM_HEADERS``: ``Name1:value1;Name2:value2``, names and values
    stripped, empty pairs skipped. pycti logs and skips a malformed pair; here it is an error
    (the message never repeats the text, which may hold a credential)."""
    headers: dict[str, str] = {}
    for number, pair in enumerate(text.strip().split(";"), start=1):
        if not pair.strip():
            continue
        name, colon, value = pair.partition(":")
        if not colon or not _HEADER_NAME_RE.fullmatch(name.strip()):
            raise ValueError(
                f"pair {number} is not Name:value (format: 'Name1:value1;Name2:value2')"
            )
        headers[name.strip()] = value.strip()
    return headers


class _Section(BaseModel):
    model_config = ConfigDict(frozen=True, extra="ignore")


class OpenCTISettings(_Section):
    url: str = Field(repr=False)  # may carry credentials: masked in the summary
    token: SecretStr
    ssl_verify: Bool = True
    json_logging: Bool = False
    # Proxy URLs may carry credentials: kept out of repr, masked in the summary.
    proxy_http: OptStr = Field(None, repr=False)
    proxy_https: OptStr = Field(None, repr=False)
    threads: int = Field(8, ge=1, le=256, description="threads for pycti calls")
    timeout_s: float = Field(60.0, gt=0)
    # pycti's OPENCTI_CUSTOM_HEADERS, "Name1:value1;Name2:value2", on every GraphQL request.
    custom_headers: SecretStr | None = None

    @field_validator("custom_headers")
    @classmethod
    def _custom_headers(cls, v: SecretStr | None) -> SecretStr | None:
        if v is not None:
            parse_custom_headers(v.get_secret_value())
        return v

    @field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:
        v = v.strip().rstrip("/")
        if not v.startswith(("http://", "https://")):
            raise ValueError("must be an http:// or https:// URL")
        return v

    @field_validator("token")
    @classmethod
    def _token(cls, v: SecretStr) -> SecretStr:
        if not v.get_secret_value().strip() or v.get_secret_value() == "ChangeMe":
            raise ValueError("must be set to an OpenCTI API token")
        return v


class ConnectorSettings(_Section):
    id: str
    name: str = "LastInfoSec Enrichment"
    type: Literal["INTERNAL_ENRICHMENT"] = "INTERNAL_ENRICHMENT"
    scope: tuple[str, ...] = tuple(SUPPORTED_TYPES)
    auto: Bool = False
    auto_update: Bool = False
    confidence_level: int = Field(50, ge=0, le=100)
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    jobs_in_flight: int = Field(64, ge=1, le=10_000)
    shutdown_timeout_s: float = Field(30.0, ge=0)
    expose_metrics: Bool = False
    metrics_port: int = Field(9095, ge=0, le=65535)
    health_port: int = Field(9096, ge=0, le=65535, description="0 disables /healthz")
    # Address of the /healthz, /readyz and /metrics servers; 0.0.0.0 is what works in a container.
    health_host: str = "0.0.0.0"
    heartbeat_interval_s: float = Field(40.0, ge=1, le=240)
    platform_retry_max_s: float = Field(60.0, gt=0)
    # Backpressure: no new jobs while the push queue holds more than push_high_watermark
    # messages, again below push_low_watermark (0 disables). About a dozen messages per job.
    push_high_watermark: int = Field(50_000, ge=0)
    push_low_watermark: int = Field(25_000, ge=0)
    # Priority lanes (docs/architecture.md, Priority lanes): jobs are moved from the listen queue
    # into one connector-owned priority queue, and manual and playbook jobs are taken first.
    # false: the listen queue is consumed directly, first in first out.
    priority_lanes: Bool = True
    # The lane deletes itself after this long without a consumer (RabbitMQ's x-expires); the
    # jobs it still holds go with it, so it is long: a week.
    lanes_expire_s: float = Field(604_800.0, ge=60, le=2_592_000)
    # RabbitMQ's consumer_timeout (30 min by default): no delivery is held unacked longer than
    # 80 % of it (older jobs are requeued) and the lookahead is bounded by the rate to fit in
    # half of it. 0 turns both off.
    consumer_timeout_s: float = Field(1800.0, ge=0)
    # While OpenCTI is unavailable: seconds between the probes of the health gate (jobs wait,
    # intake is paused; every waiting job goes on within about this long of its return).
    platform_probe_s: float = Field(1.0, gt=0, le=60)
    # pycti's CONNECTOR_ENRICHMENT_RESOLUTION: what jobs carry (docs/protocol.md §3.5).
    enrichment_resolution: Literal["none", "stix_bundle", "deferred"] = "none"
    # pycti's CONNECTOR_QUEUE_THRESHOLD, megabytes (10^6 bytes) of the connector's queue as
    # OpenCTI reports it: intake held at or above (lis_async/intake/threshold.py).
    queue_threshold: float = Field(500.0, gt=0)
    # pycti's CONNECTOR_METRICS_NAMESPACE / _SUBSYSTEM: prometheus_client's name prefixes.
    metrics_namespace: OptStr = None
    metrics_subsystem: OptStr = None

    @field_validator("metrics_namespace", "metrics_subsystem")
    @classmethod
    def _metric_prefix(cls, v: str | None) -> str | None:
        if v is not None and not _METRIC_NAME_RE.fullmatch(v.strip()):
            raise ValueError("must be a Prometheus name: letters, digits, '_' and ':'")
        return v.strip() if v is not None else None

    @model_validator(mode="after")
    def _watermarks(self) -> ConnectorSettings:
        if self.push_high_watermark and self.push_low_watermark >= self.push_high_watermark:
            raise ValueError(
                "CONNECTOR_PUSH_LOW_WATERMARK (connector.push_low_watermark) must be below "
                "CONNECTOR_PUSH_HIGH_WATERMARK (connector.push_high_watermark)"
            )
        return self

    @field_validator("id")
    @classmethod
    def _id(cls, v: str) -> str:
        try:
            return str(uuid.UUID(v.strip()))
        except ValueError:
            raise ValueError("must be a UUID (e.g. generated with uuidgen)") from None

    @field_validator("health_host")
    @classmethod
    def _host(cls, v: str) -> str:
        v = v.strip()
        if not v or any(c.isspace() or c in "/@?#" for c in v):
            raise ValueError("must be an IP address or a host name (e.g. 127.0.0.1)")
        return v

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if len(v.strip()) < 2:
            raise ValueError("must be at least 2 characters")
        return v.strip()

    @field_validator("scope", mode="before")
    @classmethod
    def _scope(cls, v: Any) -> tuple[str, ...]:
        items = v.split(",") if isinstance(v, str) else list(v)
        known = {t.lower(): t for t in SUPPORTED_TYPES}
        out: list[str] = []
        for item in items:
            name = str(item).strip()
            if not name:
                continue
            canon = known.get(name.lower())
            if canon is None:
                raise ValueError(
                    f"unknown scope {name!r} (supported: {', '.join(SUPPORTED_TYPES)})"
                )
            if canon not in out:
                out.append(canon)
        if not out:
            raise ValueError("must name at least one of " + ", ".join(SUPPORTED_TYPES))
        return tuple(out)

    @field_validator("enrichment_resolution", mode="before")
    @classmethod
    def _resolution(cls, v: Any) -> Any:
        return v.strip().lower() if isinstance(v, str) else v

    @field_validator("log_level", mode="before")
    @classmethod
    def _level(cls, v: Any) -> Any:
        if isinstance(v, str):
            low = v.strip().lower()
            return "warning" if low == "warn" else low
        return v


class LastInfoSecSettings(_Section):
    api_key_cti: SecretStr
    # Before base_url: its validator reads it. The key travels in the query string, so plain
    # http is refused unless asked for (the simulators on loopback).
    allow_http: Bool = False
    base_url: str = Field("https://api.client.lastinfosec.com/v2", repr=False)  # like url
    endpoint_style: Literal["search_hash_host", "search"] = "search_hash_host"
    timeout_s: float = Field(30.0, gt=0)
    # Superseded by retry_budget_s (transient failures are retried by time, not by count):
    # still read, so existing deployments start, and a start-up warning says it is unused.
    retries: int = Field(5, ge=0, le=100)
    # How long one job waits out transient LastInfoSec failures (5xx, 429, timeouts, connection
    # errors), unacknowledged, before its work ends in error. Below RabbitMQ's default 30-minute
    # consumer_timeout, which a job must never reach.
    retry_budget_s: float = Field(600.0, ge=0, le=1500)
    outage_probe_s: float = Field(1.0, gt=0, le=60, description="while LastInfoSec is down")
    backoff_base_s: float = Field(0.5, gt=0)
    backoff_max_s: float = Field(30.0, gt=0)
    concurrency: int = Field(16, ge=1, le=1024)
    rate_per_s: float = Field(10.0, gt=0)
    rate_burst: int | None = Field(None, ge=1)
    max_tlp: str = "TLP:AMBER"
    max_pap: OptStr = None  # None: no PAP gate
    cache_ttl_s: float = Field(3600.0, ge=0)
    cache_negative_ttl_s: float = Field(300.0, ge=0)
    cache_size: int = Field(10_000, ge=0)
    cache_max_bytes: int = Field(64 * 1024 * 1024, ge=0)
    ssl_verify: Bool = True
    max_answer_bytes: int = Field(4 * 1024 * 1024, ge=1024)
    max_answer_objects: int = Field(5000, ge=1)

    @field_validator("api_key_cti")
    @classmethod
    def _key(cls, v: SecretStr) -> SecretStr:
        if not v.get_secret_value().strip() or v.get_secret_value() == "ChangeMe":
            raise ValueError("must be set to a LastInfoSec API key")
        return v

    @field_validator("base_url")
    @classmethod
    def _base(cls, v: str, info: ValidationInfo) -> str:
        v = v.strip().rstrip("/")
        if not v.startswith(("http://", "https://")):
            raise ValueError("must be an http:// or https:// URL")
        if v.startswith("http://") and not info.data.get("allow_http"):
            raise ValueError(
                "is plain http: the API key would travel unencrypted (set "
                "LASTINFOSEC_ALLOW_HTTP=true to allow it)"
            )
        return v

    @field_validator("max_tlp")
    @classmethod
    def _tlp(cls, v: str) -> str:
        return normalise_tlp(v)

    @field_validator("max_pap")
    @classmethod
    def _pap(cls, v: str | None) -> str | None:
        return None if v is None else normalise_pap(v)


class MqSettings(_Section):
    """pycti's ``MQ_*`` overrides of the RabbitMQ block the platform returns at registration."""

    host: OptStr = None
    port: int | None = Field(None, ge=1, le=65535)
    vhost: OptStr = None
    use_ssl: Bool | None = None
    user: OptStr = None
    # ``pass`` is a keyword: the YAML key and env name stay mq.pass / MQ_PASS.
    password: SecretStr | None = Field(None, alias="pass")
    # pycti's AMQPS client settings (lis_async.settings.tls): paths or PEM texts.
    use_ssl_ca: OptStr = None
    use_ssl_cert: OptStr = None
    use_ssl_key: SecretStr | None = None
    use_ssl_passphrase: SecretStr | None = None
    use_ssl_reject_unauthorized: Bool = True

    model_config = ConfigDict(frozen=True, extra="ignore", populate_by_name=True)

    @field_validator("use_ssl_ca", "use_ssl_cert")
    @classmethod
    def _pem_or_file(cls, v: str | None) -> str | None:
        if v is not None and not is_pem(v) and not Path(v).is_file():
            raise ValueError(f"file not found: {v} (a path, or the PEM text itself)")
        return v

    @field_validator("use_ssl_key")
    @classmethod
    def _key_pem_or_file(cls, v: SecretStr | None) -> SecretStr | None:
        if v is not None:
            text = v.get_secret_value()
            if not is_pem(text) and not Path(text).is_file():
                raise ValueError("file not found (a path, or the PEM text itself)")
        return v

    @property
    def tls(self) -> AmqpTls:
        return AmqpTls(
            verify=self.use_ssl_reject_unauthorized,
            ca=self.use_ssl_ca,
            cert=self.use_ssl_cert,
            key=self.use_ssl_key.get_secret_value() if self.use_ssl_key else None,
            passphrase=(
                self.use_ssl_passphrase.get_secret_value() if self.use_ssl_passphrase else None
            ),
        )

    @model_validator(mode="after")
    def _loads(self) -> MqSettings:
        """The CA, certificate and key load (a wrong passphrase or a key that does not match
        the certificate stops the start, not the first connection)."""
        if self.use_ssl_cert is None and (self.use_ssl_key or self.use_ssl_passphrase):
            raise ValueError(
                "MQ_USE_SSL_KEY / MQ_USE_SSL_PASSPHRASE (mq.use_ssl_key / mq.use_ssl_passphrase):"
                " need MQ_USE_SSL_CERT (mq.use_ssl_cert), the client certificate"
            )
        if self.use_ssl_ca is None and self.use_ssl_cert is None:
            return self
        try:
            mq_context(self.tls)
        except (OSError, ssl.SSLError) as exc:
            detail = (exc.reason if isinstance(exc, ssl.SSLError) else exc.strerror) or "error"
            raise ValueError(
                "MQ_USE_SSL_CA / MQ_USE_SSL_CERT / MQ_USE_SSL_KEY (mq.use_ssl_*): cannot load the "
                f"TLS material ({detail}): not PEM, a wrong MQ_USE_SSL_PASSPHRASE, or a key that "
                "does not match the certificate"
            ) from None
        return self


class RedisSettings(_Section):
    """Cluster mode: replicas on one connector id share the LastInfoSec quota and the answer
    cache through Redis (docs/architecture.md, "Cluster mode"). Unset ``url``: every replica
    keeps its own limiter and cache, as without Redis."""

    # redis://[user:password@]host:port/db, rediss:// for TLS, unix:///path?db=N. May hold a
    # password: kept out of repr, masked in the summary and in every message.
    url: OptStr = Field(None, repr=False)
    # Keys are "<prefix>:..."; by default derived from the connector id, so two connectors never
    # share a quota by accident.
    key_prefix: OptStr = None
    timeout_s: float = Field(0.25, gt=0, le=30, description="per Redis command")
    connect_timeout_s: float = Field(1.0, gt=0, le=60)
    # Share of LASTINFOSEC_RATE_PER_S one replica may use while Redis is unreachable; unset =
    # 1 / the number of replicas seen while Redis was up (never more than the cluster rate).
    fallback_rate_share: float | None = Field(None, gt=0, le=1)
    # Cross-replica coalescing: the replica looking a value up holds a lease this long; the
    # others wait for its answer at most coalesce_wait_s, then ask LastInfoSec themselves.
    # Both longer than a lookup may queue under a backlog (jobs in flight / rate: 64 jobs at
    # 10/s wait up to 6.4 s for the rate limit), or the waiting replica gives up and asks too.
    lease_s: float = Field(30.0, gt=0, le=600)
    coalesce_wait_s: float = Field(30.0, ge=0, le=600)
    probe_interval_s: float = Field(2.0, gt=0, le=60, description="while Redis is down")

    @field_validator("url")
    @classmethod
    def _url(cls, v: str | None) -> str | None:
        if v is None:
            return None
        v = v.strip()
        if not v.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("must be a redis://, rediss:// or unix:// URL")
        return v


class Settings(_Section):
    opencti: OpenCTISettings
    connector: ConnectorSettings
    lastinfosec: LastInfoSecSettings
    mq: MqSettings = MqSettings()
    redis: RedisSettings = RedisSettings()

    @property
    def redis_key_prefix(self) -> str:
        """The prefix of every Redis key: ``REDIS_KEY_PREFIX``, else one per connector id."""
        return self.redis.key_prefix or f"lis-async:{self.connector.id}"

    @property
    def lastinfosec_proxy(self) -> str | None:
        """The proxy for LastInfoSec requests: upstream reads ``PROXY_HTTPS``, then
        ``PROXY_HTTP``, for its (https) API calls."""
        return self.opencti.proxy_https or self.opencti.proxy_http

    def summary(self) -> dict[str, Any]:
        """Effective settings for the start-up log line; secrets masked."""
        out: dict[str, Any] = {}
        for section in _SECTIONS:
            model: BaseModel = getattr(self, section)
            for key, val in model.model_dump(by_alias=True).items():
                if isinstance(val, SecretStr):
                    val = "***" if val.get_secret_value() else ""
                elif isinstance(val, str) and is_pem(val):
                    val = "(PEM text)"
                elif key in ("proxy_http", "proxy_https", "url", "base_url") and val:
                    val = mask_url(str(val))
                out[f"{section}.{key}"] = val
        return out


# Every (section, key) the loader reads. The env name is always SECTION_KEY.
_SECTIONS: Final[Mapping[str, type[_Section]]] = {
    "opencti": OpenCTISettings,
    "connector": ConnectorSettings,
    "lastinfosec": LastInfoSecSettings,
    "mq": MqSettings,
    "redis": RedisSettings,
}


def _keys(section: str) -> list[str]:
    model = _SECTIONS[section]
    return [f.alias or name for name, f in model.model_fields.items()]


def env_name(section: str, key: str) -> str:
    return f"{section}_{key}".upper()


def all_env_names() -> list[str]:
    """Every variable the loader reads, refused pycti settings included."""
    names = [env_name(s, k) for s in _SECTIONS for k in _keys(s)]
    return (
        names + list(LEGACY_ENV) + unsupported.env_names() + [f"{n}_FILE" for n in _secret_names()]
    )


# Secrets that may also be given as a file (Docker and Kubernetes secrets): NAME_FILE holds its
# path, the file its value (one trailing newline stripped).
SECRET_FILE_SETTINGS: Final = (("opencti", "token"), ("lastinfosec", "api_key_cti"))


def _secret_names() -> list[str]:
    names = [env_name(s, k) for s, k in SECRET_FILE_SETTINGS]
    return names + [e for e, target in LEGACY_ENV.items() if target in SECRET_FILE_SETTINGS]


def _read_secret(name: str, path: str, problems: list[str]) -> str | None:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:  # the message names the path, never the content
        problems.append(f"{name}_FILE: cannot read {path!r} ({type(exc).__name__})")
        return None
    if text.endswith("\r\n"):
        return text[:-2]
    return text[:-1] if text.endswith("\n") else text


def _secret_files(env: Mapping[str, str]) -> dict[str, str]:
    """``NAME`` -> the content of the file ``NAME_FILE`` points at, for the secrets that may
    come from a file; a SettingsError naming the variable when a file cannot be read or when both
    forms are set."""
    out: dict[str, str] = {}
    problems: list[str] = []
    for name in _secret_names():
        path = env.get(f"{name}_FILE")
        if path is None:
            continue
        if env.get(name, "").strip():  # an empty value means "not set"
            problems.append(f"{name} and {name}_FILE are both set: set only one of them")
            continue
        value = _read_secret(name, path, problems)
        if value is not None:
            out[name] = value
    if problems:
        raise SettingsError(problems)
    return out


def _where(section: str, key: str) -> str:
    legacy = [e for e, target in LEGACY_ENV.items() if target == (section, key)]
    names = " / ".join([env_name(section, key), *legacy])
    return f"{names} ({section}.{key})"


@dataclass(frozen=True)
class _Sources:
    yaml_data: Mapping[str, Any]
    env: Mapping[str, str]


def find_config_file(path: str | os.PathLike[str] | None) -> Path | None:
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise SettingsError([f"--config: file not found: {p}"])
        return p
    return next((p for p in DEFAULT_CONFIG_PATHS if p.is_file()), None)


def _read_yaml(path: Path | None) -> Mapping[str, Any]:
    if path is None:
        return {}
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise SettingsError([f"{path}: cannot read YAML ({type(exc).__name__})"]) from None
    if data is None:
        return {}
    if not isinstance(data, Mapping):
        raise SettingsError([f"{path}: the top level must be a mapping of sections"])
    return data


def _merge(src: _Sources) -> dict[str, dict[str, Any]]:
    raw: dict[str, dict[str, Any]] = {s: {} for s in _SECTIONS}
    for section in _SECTIONS:
        block = src.yaml_data.get(section)
        if isinstance(block, Mapping):
            for key, val in block.items():
                if is_set(val):
                    raw[section][str(key)] = val
    for (lsec, lkey), (sec, key) in LEGACY_YAML.items():
        block = src.yaml_data.get(lsec)
        if isinstance(block, Mapping) and is_set(block.get(lkey)):
            raw[sec].setdefault(key, block[lkey])
    # Environment wins; the conventional name wins over a legacy alias. Empty = not set.
    for legacy, (sec, key) in LEGACY_ENV.items():
        if is_set(src.env.get(legacy)):
            raw[sec][key] = src.env[legacy]
    for section in _SECTIONS:
        for key in _keys(section):
            name = env_name(section, key)
            if is_set(src.env.get(name)):
                raw[section][key] = src.env[name]
    return raw


def _problem(err: Mapping[str, Any]) -> str:
    loc = [str(p) for p in err.get("loc", ())]
    section = loc[0] if loc else "?"
    msg = str(err.get("msg", "invalid value"))
    if err.get("type") == "missing":
        msg = "is required"
    msg = msg.removeprefix("Value error, ")
    if len(loc) < 2:  # a check across a section's keys: its message names them
        return msg
    return f"{_where(section, loc[1])}: {msg}"


def load_settings(
    config_path: str | os.PathLike[str] | None = None,
    env: Mapping[str, str] | None = None,
) -> Settings:
    """Read config.yml (``--config``, ./config.yml, the upstream path) and the environment."""
    path = find_config_file(config_path)
    environ = os.environ if env is None else env
    environ = {**environ, **_secret_files(environ)}
    sources = _Sources(_read_yaml(path), environ)
    # pycti settings lis-async does not implement, set to another value than what it does.
    refused = unsupported.problems(sources.yaml_data, sources.env, is_set)
    try:
        settings = Settings.model_validate(_merge(sources))
    except ValidationError as exc:
        # include_input=False: pydantic must not echo a secret's value back.
        problems = [_problem(e) for e in exc.errors(include_url=False, include_input=False)]
        raise SettingsError(refused + problems) from None
    if refused:
        raise SettingsError(refused)
    return settings
