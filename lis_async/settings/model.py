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
    PrivateAttr,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic.fields import FieldInfo

from lis_async.enrichment.job import SUPPORTED_TYPES, normalise_tlp
from lis_async.enrichment.markings import normalise_pap
from lis_async.errors import SettingsError
from lis_async.redact import mask_url, url_secrets
from lis_async.settings import removed, unsupported
from lis_async.settings.tls import AmqpTls, is_pem, mq_context

__all__ = ["Settings", "SettingsError", "load_settings"]

DEFAULT_CONFIG_PATHS: Final = (
    Path("config.yml"),
    Path("/opt/opencti-connector-lastinfosec-enrichment/config.yml"),
)


#: Where a setting comes from, marked on every field (``json_schema_extra["origin"]``) and shown in
#: docs/configuration.md: the upstream connector's own settings, the ones pycti's connector helper
#: reads (same name, same meaning), and lis-async's own.
Origin = Literal["upstream", "pycti", "lis-async"]
ORIGINS: Final[tuple[Origin, ...]] = ("upstream", "pycti", "lis-async")


def _setting(
    origin: Origin,
    default: Any,
    description: str,
    *,
    group: str | None = None,
    legacy_env: tuple[str, ...] = (),
    legacy_yaml: tuple[str, ...] = (),
    secret_file: bool = False,
    **kwargs: Any,
) -> Any:
    """A settings field: pydantic's ``Field`` plus what the loader and the generated reference
    (:mod:`lis_async.settings.reference`) read: ``origin``, the operator's ``group`` (default:
    the section's), the upstream names still read (``legacy_env``, ``legacy_yaml`` as
    ``section.key``) and whether a ``NAME_FILE`` variable may hold the value (``secret_file``)."""
    extra: dict[str, Any] = {"origin": origin}
    if group:
        extra["group"] = group
    if legacy_env:
        extra["legacy_env"] = list(legacy_env)
    if legacy_yaml:
        extra["legacy_yaml"] = list(legacy_yaml)
    if secret_file:
        extra["secret_file"] = True
    return Field(default, description=description, json_schema_extra=extra, **kwargs)


def _upstream(default: Any, description: str, **kwargs: Any) -> Any:
    """A setting of the upstream LastInfoSec connector (same name, same meaning)."""
    return _setting("upstream", default, description, **kwargs)


def _pycti(default: Any, description: str, **kwargs: Any) -> Any:
    """A setting pycti's connector helper reads, honoured with pycti's name and meaning."""
    return _setting("pycti", default, description, **kwargs)


def _own(default: Any, description: str, **kwargs: Any) -> Any:
    """A setting of lis-async's own."""
    return _setting("lis-async", default, description, **kwargs)


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
    """The OpenCTI platform: where it is, how to reach it, how to log."""

    # URLs may carry credentials: kept out of repr, masked in the summary.
    url: str = _pycti(
        ..., "OpenCTI's URL (http:// or https://)", repr=False, examples=["http://localhost:8080"]
    )
    token: SecretStr = _pycti(
        ...,
        "the connector's OpenCTI API token (never logged)",
        secret_file=True,
        examples=["ChangeMe"],
    )
    ssl_verify: Bool = _pycti(True, "verify OpenCTI's TLS certificate")
    json_logging: Bool = _pycti(True, "log lines as JSON, in pycti 7's format (false: plain lines)")
    proxy_http: OptStr = _upstream(
        None,
        "proxy for LastInfoSec requests (HTTP(S)_PROXY and NO_PROXY are honoured too)",
        repr=False,
        legacy_env=("PROXY_HTTP",),
        legacy_yaml=("lastinfosec.proxy_http",),
    )
    proxy_https: OptStr = _upstream(
        None,
        "proxy for LastInfoSec requests, preferred over proxy_http when both are set",
        repr=False,
        legacy_env=("PROXY_HTTPS",),
        legacy_yaml=("lastinfosec.proxy_https",),
    )
    threads: int = _own(8, "threads for pycti's (synchronous) GraphQL calls", ge=1, le=256)
    timeout_s: float = _own(60.0, "timeout of one OpenCTI request, seconds", gt=0)
    custom_headers: SecretStr | None = _pycti(
        None,
        "extra headers on every request to OpenCTI (GraphQL and work reports), "
        "'Name1:value1;Name2:value2' (never logged)",
    )

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
    """The connector as OpenCTI registers it, and how the worker takes and holds jobs."""

    id: str = _pycti(..., "a UUID, unique per connector (uuidgen)", examples=["ChangeMe"])
    name: str = _pycti("LastInfoSec Enrichment", "name shown in OpenCTI (2 characters or more)")
    type: Literal["INTERNAL_ENRICHMENT"] = _pycti("INTERNAL_ENRICHMENT", "the only accepted value")
    scope: tuple[str, ...] = _pycti(
        tuple(SUPPORTED_TYPES), "observable types to enrich, comma-separated: any of these four"
    )
    auto: Bool = _pycti(False, "enrich observables on creation")
    auto_update: Bool = _pycti(False, "enrich observables on update")
    confidence_level: int = _upstream(
        50,
        "confidence of the relationships created, 0 (unknown) to 100 (pycti 6 reads and ignores "
        "it)",
        ge=0,
        le=100,
    )
    log_level: Literal["debug", "info", "warning", "error"] = _pycti(
        "info", "debug, info, warn/warning or error (pycti's default: error)"
    )
    jobs_in_flight: int = _own(
        64, "jobs taken from the queue and not yet acknowledged", ge=1, le=10_000, group="limits"
    )
    shutdown_timeout_s: float = _own(
        30.0, "how long jobs in flight may finish after SIGTERM, seconds", ge=0
    )
    expose_metrics: Bool = _pycti(False, "serve Prometheus /metrics on metrics_port")
    metrics_port: int = _pycti(9095, "port of /metrics", ge=0, le=65535)
    health_port: int = _own(9096, "port of /healthz and /readyz (0 disables them)", ge=0, le=65535)
    # 0.0.0.0 is what works in a container.
    health_host: str = _own(
        "0.0.0.0", "address of /healthz, /readyz and /metrics (127.0.0.1: local only)"
    )
    heartbeat_interval_s: float = _own(
        40.0,
        "seconds between pingConnector heartbeats (OpenCTI: alive = pinged < 5 min ago) and "
        "queue_threshold checks",
        ge=1,
        le=240,
    )
    platform_retry_max_s: float = _own(
        60.0, "longest back-off between retries of a platform report, seconds", gt=0
    )
    # Backpressure: about a dozen messages per job.
    push_high_watermark: int = _own(
        50_000,
        "no new jobs while the push queue holds more messages (0: off)",
        ge=0,
        group="limits",
    )
    push_low_watermark: int = _own(
        25_000,
        "... until it is back below this many (below push_high_watermark)",
        ge=0,
        group="limits",
    )
    # Priority lanes (docs/architecture.md, Priority lanes): jobs are moved from the listen queue
    # into one connector-owned priority queue.
    priority_lanes: Bool = _own(
        True,
        "manual and playbook jobs overtake the auto-enrichment backlog, through the "
        "connector's priority queue lis-async.lanes.<connector id> (false: FIFO)",
    )
    # The lookahead is also bounded by the rate to fit in half of it (lis_async/app.py).
    consumer_timeout_s: float = _own(
        1800.0,
        "RabbitMQ's consumer_timeout, seconds: jobs held longer than 80 % of it are requeued, "
        "and the jobs taken at once fit in half of it at the rate (0: off)",
        ge=0,
    )
    # docs/protocol.md §3.5.
    enrichment_resolution: Literal["none", "stix_bundle", "deferred"] = _pycti(
        "none",
        "registered with OpenCTI: what jobs carry, none (the entity), stix_bundle (plus its "
        "bundle) or deferred (nothing: the connector reads it)",
    )
    # Intake held at or above (lis_async/intake/threshold.py).
    queue_threshold: float = _pycti(
        500.0,
        "no new jobs while OpenCTI reports the connector's queue at or above this many MB "
        "(10^6 bytes), checked every heartbeat while the push queue holds messages "
        "(docs/protocol.md §2.3)",
        gt=0,
        group="limits",
    )
    # prometheus_client's name prefixes.
    metrics_namespace: OptStr = _pycti(
        None, "prefix of every /metrics name (namespace_subsystem_name)"
    )
    metrics_subsystem: OptStr = _pycti(None, "second prefix of every /metrics name")

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
    """The LastInfoSec API: the key, the endpoint, retries, the rate, the gates and the cache."""

    api_key_cti: SecretStr = _upstream(
        ...,
        "LastInfoSec API key (never logged)",
        legacy_env=("CONFIG_LIS_APIKEY_CTI",),
        secret_file=True,
        examples=["ChangeMe"],
    )
    # Before base_url: its validator reads it. The key travels in the query string, so plain
    # http is refused unless asked for (the simulators on loopback).
    allow_http: Bool = _own(False, "accept an http:// base_url (the key travels in the URL)")
    base_url: str = _own(
        "https://api.client.lastinfosec.com/v2", "LastInfoSec API base URL", repr=False
    )
    endpoint_style: Literal["search_hash_host", "search"] = _own(
        "search_hash_host",
        "search_hash_host (GET search_hash/search_host) or search (POST /stix21/search/)",
    )
    timeout_s: float = _own(30.0, "timeout of one LastInfoSec request, seconds", gt=0)
    # Unacknowledged meanwhile; below RabbitMQ's default 30-minute consumer_timeout, which a job
    # must never reach.
    retry_budget_s: float = _own(
        600.0,
        "how long a job waits out 429/5xx/timeouts/connection errors before it ends in error, "
        "seconds",
        ge=0,
        le=1500,
    )
    backoff_base_s: float = _own(0.5, "first retry back-off, doubled each attempt, seconds", gt=0)
    backoff_max_s: float = _own(
        30.0, "longest retry back-off (and Retry-After honoured), seconds", gt=0
    )
    concurrency: int = _own(16, "LastInfoSec requests open at once", ge=1, le=1024, group="limits")
    rate_per_s: float = _own(
        10.0,
        "LastInfoSec requests per second (per replica; the cluster's with redis.url)",
        gt=0,
        group="limits",
    )
    rate_burst: int | None = _own(
        None,
        "burst allowance, requests granted at once before pacing resumes; default 1 (evenly paced)",
        ge=1,
        group="limits",
    )
    daily_budget: int | None = _own(
        None,
        "LastInfoSec requests per UTC day, retries included, across replicas and restarts; "
        "unset: no daily budget",
        ge=1,
        group="limits",
    )
    daily_budget_urgent_share: float = _own(
        0.1,
        "share of daily_budget only manual and playbook jobs may use (0..1)",
        ge=0,
        le=1,
        group="limits",
    )
    daily_budget_file: OptStr = _own(
        None,
        "where a worker without redis.url keeps the day's count across restarts; default: "
        "$XDG_STATE_HOME/lis-async/daily-budget-<connector.id>.json "
        "(XDG_STATE_HOME: ~/.local/state)",
        group="limits",
    )
    max_tlp: str = _own(
        "TLP:AMBER",
        "observables marked above this TLP (or with a marking that cannot be resolved) are "
        "never sent",
    )
    max_pap: OptStr = _own(
        None,
        "PAP:CLEAR..PAP:RED: observables marked above it are never sent; none: no PAP gate",
    )
    cache_ttl_s: float = _own(3600.0, "cache of answers, seconds (0 disables)", ge=0)
    cache_negative_ttl_s: float = _own(300.0, 'cache of "not found" answers, seconds', ge=0)
    cache_size: int = _own(10_000, "cache entries", ge=0)
    cache_max_bytes: int = _own(
        64 * 1024 * 1024, "cache size in bytes of compressed answers (0 disables)", ge=0
    )
    ssl_verify: Bool = _own(True, "verify LastInfoSec's TLS certificate")
    max_answer_bytes: int = _own(
        4 * 1024 * 1024, "largest accepted answer body, bytes", ge=1024, group="limits"
    )
    max_answer_objects: int = _own(
        5000, "most STIX objects accepted in one answer; more fails the job", ge=1, group="limits"
    )

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

    host: OptStr = _pycti(None, "broker host")
    port: int | None = _pycti(None, "broker port", ge=1, le=65535)
    vhost: OptStr = _pycti(None, "virtual host")
    use_ssl: Bool | None = _pycti(None, "true/false: AMQPS")
    user: OptStr = _pycti(None, "user name")
    # ``pass`` is a keyword: the YAML key and env name stay mq.pass / MQ_PASS.
    password: SecretStr | None = _pycti(None, "password (never logged)", alias="pass")
    # pycti's AMQPS client settings (lis_async.settings.tls): paths or PEM texts.
    use_ssl_ca: OptStr = _pycti(
        None, "CA to trust besides the system's: a file path or the PEM text"
    )
    use_ssl_cert: OptStr = _pycti(None, "client certificate: a file path or the PEM text")
    use_ssl_key: SecretStr | None = _pycti(
        None, "its private key: a file path or the PEM text (never logged)"
    )
    use_ssl_passphrase: SecretStr | None = _pycti(None, "the key's passphrase (never logged)")
    use_ssl_reject_unauthorized: Bool = _pycti(
        True,
        "check the broker's certificate and host name (pycti checks only when it is true)",
    )

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


#: The shortest REDIS_CACHE_KEY accepted (a guessable key would let anyone who can write to
#: Redis forge cached answers).
MIN_CACHE_KEY_CHARS: Final = 16


class RedisSettings(_Section):
    """Cluster mode: replicas on one connector id share the LastInfoSec quota and the answer
    cache through Redis (docs/architecture.md, "Cluster mode"). Unset ``url``: every replica
    keeps its own limiter and cache, as without Redis."""

    # May hold a password: kept out of repr, masked in the summary and in every message.
    url: OptStr = _own(
        None,
        "redis://[user:password@]host:port/db, rediss:// for TLS, unix:///path?db=N; unset: "
        "no cluster mode",
        repr=False,
        secret_file=True,
    )
    # Two connectors never share a quota by accident.
    key_prefix: OptStr = _own(None, "prefix of every Redis key; default: lis-async:<connector.id>")
    timeout_s: float = _own(
        0.25, "per Redis command, seconds; a slow Redis costs at most this", gt=0, le=30
    )
    # Never more than the cluster rate.
    fallback_rate_share: float | None = _own(
        None,
        "share of rate_per_s one replica may use while Redis is down; default: 1 / the "
        "replicas seen",
        gt=0,
        le=1,
    )
    cache_key: SecretStr | None = _own(
        None,
        "the secret (16 characters or more, the same on every replica) that authenticates the "
        "answers cached in Redis (HMAC-SHA256); required with url; never logged "
        "(docs/security.md#cluster-mode-and-redis)",
        repr=False,
        secret_file=True,
    )

    @field_validator("url")
    @classmethod
    def _url(cls, v: str | None) -> str | None:
        if v is None:
            return None
        v = v.strip()
        if not v.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("must be a redis://, rediss:// or unix:// URL")
        return v

    @field_validator("cache_key")
    @classmethod
    def _cache_key(cls, v: SecretStr | None) -> SecretStr | None:
        if v is not None and len(v.get_secret_value().strip()) < MIN_CACHE_KEY_CHARS:
            raise ValueError(f"must be at least {MIN_CACHE_KEY_CHARS} characters")
        return v

    @model_validator(mode="after")
    def _cache_key_with_url(self) -> RedisSettings:
        if self.url is not None and self.cache_key is None:
            raise ValueError(
                "REDIS_CACHE_KEY (redis.cache_key) is required with REDIS_URL: the replicas "
                "authenticate the answers they share in Redis with it (set the same random "
                "value, e.g. `openssl rand -hex 32`, on every replica)"
            )
        return self


class Settings(_Section):
    opencti: OpenCTISettings
    connector: ConnectorSettings
    lastinfosec: LastInfoSecSettings
    mq: MqSettings = MqSettings()
    redis: RedisSettings = RedisSettings()
    # Removed settings that were set (lis_async.settings.removed): one warning line each.
    _ignored: tuple[str, ...] = PrivateAttr(default=())

    @property
    def ignored(self) -> tuple[str, ...]:
        """One line per removed setting found set: ignored, logged as a WARNING at start."""
        return self._ignored

    @property
    def redis_key_prefix(self) -> str:
        """The prefix of every Redis key: ``REDIS_KEY_PREFIX``, else one per connector id."""
        return self.redis.key_prefix or f"lis-async:{self.connector.id}"

    @property
    def lastinfosec_proxy(self) -> str | None:
        """The proxy for LastInfoSec requests: upstream reads ``PROXY_HTTPS``, then
        ``PROXY_HTTP``, for its (https) API calls."""
        return self.opencti.proxy_https or self.opencti.proxy_http

    def secrets(self) -> list[str]:
        """Every secret value of these settings, those found in URLs included, for
        :func:`lis_async.redact.register_secrets`."""
        found = [
            self.opencti.token.get_secret_value(),
            self.lastinfosec.api_key_cti.get_secret_value(),
        ]
        for secret in (self.mq.password, self.mq.use_ssl_passphrase, self.redis.cache_key):
            if secret is not None:
                found.append(secret.get_secret_value())
        if self.opencti.custom_headers is not None:
            headers = parse_custom_headers(self.opencti.custom_headers.get_secret_value())
            found += headers.values()
        for url in (
            self.opencti.url,
            self.opencti.proxy_http,
            self.opencti.proxy_https,
            self.lastinfosec.base_url,
            self.redis.url,
        ):
            found += url_secrets(url)
        return [f for f in found if f]

    def summary(self) -> dict[str, Any]:
        """Effective settings for the start-up log line; secrets masked."""
        out: dict[str, Any] = {}
        for section in SECTIONS:
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
SECTIONS: Final[Mapping[str, type[_Section]]] = {
    "opencti": OpenCTISettings,
    "connector": ConnectorSettings,
    "lastinfosec": LastInfoSecSettings,
    "mq": MqSettings,
    "redis": RedisSettings,
}


def _keys(section: str) -> list[str]:
    model = SECTIONS[section]
    return [f.alias or name for name, f in model.model_fields.items()]


def field_extra(field: FieldInfo) -> dict[str, Any]:
    """What :func:`_setting` marked on a field (origin, group, legacy names, secret file)."""
    extra = field.json_schema_extra
    return dict(extra) if isinstance(extra, dict) else {}


def settings_fields() -> list[tuple[str, str, FieldInfo]]:
    """(section, key, field) of every setting, in declaration order."""
    return [
        (section, f.alias or name, f)
        for section, model in SECTIONS.items()
        for name, f in model.model_fields.items()
    ]


def _dotted(name: str) -> tuple[str, str]:
    section, _, key = name.partition(".")
    return section, key


# Upstream environment variable -> (section, key). Checked after the conventional name.
LEGACY_ENV: Final[Mapping[str, tuple[str, str]]] = {
    legacy: (section, key)
    for section, key, f in settings_fields()
    for legacy in field_extra(f).get("legacy_env", ())
}
# Upstream YAML key -> our (section, key).
LEGACY_YAML: Final[Mapping[tuple[str, str], tuple[str, str]]] = {
    _dotted(legacy): (section, key)
    for section, key, f in settings_fields()
    for legacy in field_extra(f).get("legacy_yaml", ())
}


def env_name(section: str, key: str) -> str:
    return f"{section}_{key}".upper()


def all_env_names() -> list[str]:
    """Every variable the loader reads, refused pycti settings included."""
    names = [env_name(s, k) for s in SECTIONS for k in _keys(s)]
    return (
        names + list(LEGACY_ENV) + unsupported.env_names() + [f"{n}_FILE" for n in secret_names()]
    )


# Secrets that may also be given as a file (Docker and Kubernetes secrets): NAME_FILE holds its
# path, the file its value (one trailing newline stripped).
SECRET_FILE_SETTINGS: Final = tuple(
    (section, key) for section, key, f in settings_fields() if field_extra(f).get("secret_file")
)


def secret_names() -> list[str]:
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
    for name in secret_names():
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
    raw: dict[str, dict[str, Any]] = {s: {} for s in SECTIONS}
    for section in SECTIONS:
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
    for section in SECTIONS:
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
    settings._ignored = tuple(removed.ignored(sources.yaml_data, sources.env, is_set))
    return settings
