"""pycti's helper settings that lis-async does not implement: refused at start, never ignored.

The upstream connector runs on pycti's ``OpenCTIConnectorHelper``, so every variable it reads is
part of what an operator may already have set. The ones lis-async honours are settings of
:mod:`lis_async.settings.model`; the ones below are accepted only with the value that says what
lis-async does anyway (``CONNECTOR_LISTEN_PROTOCOL=AMQP``) and otherwise stop the start with one
line naming the variable and saying why (exit code 2). docs/configuration.md lists both kinds.

Values are compared the way pycti reads them: environment first, then ``config.yml``; an empty
value is "not set" (config's one rule); booleans in any of pycti's spellings.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final

__all__ = ["UNSUPPORTED", "Unsupported", "env_names", "problems"]

_TRUE: Final = frozenset({"true", "yes", "on", "1"})
_FALSE: Final = frozenset({"false", "no", "off", "0"})


@dataclass(frozen=True, slots=True)
class Unsupported:
    """One pycti setting lis-async does not implement."""

    env: tuple[str, ...]  # pycti's variable first, then its deprecated aliases
    yaml: tuple[str, str]
    #: values equal to what lis-async does (compared case-insensitively); empty: any value set
    #: is refused
    accepted: tuple[str, ...]
    reason: str
    boolean: bool = False

    def normalise(self, value: Any) -> str:
        text = str(value).strip().lower()
        if isinstance(value, bool):
            text = "true" if value else "false"
        if self.boolean:
            text = "true" if text in _TRUE else "false" if text in _FALSE else text
        return text

    def problem(self, where: str) -> str:
        if self.accepted:
            return f"{where}: only {' or '.join(self.accepted)} is supported: {self.reason}"
        return f"{where}: not supported, leave it unset: {self.reason}"


_API = "used only by pycti's API listen protocol (CONNECTOR_LISTEN_PROTOCOL=API), not implemented"
_DIRECTORY = (
    "writing bundles to a directory instead of (or besides) the push queue is not implemented"
)
_S3 = "storing bundles in S3 (pycti 7) is not implemented: bundles go to the push queue"
_STREAM = "a stream-connector setting: an enrichment connector never reads a live stream"
_SCHEDULE = "an import-connector scheduling setting: an enrichment connector runs until stopped"


def _c(key: str, accepted: tuple[str, ...], reason: str, boolean: bool = False) -> Unsupported:
    return Unsupported((f"CONNECTOR_{key.upper()}",), ("connector", key), accepted, reason, boolean)


UNSUPPORTED: Final[tuple[Unsupported, ...]] = (
    _c(
        "listen_protocol",
        ("AMQP",),
        "lis-async takes jobs from its RabbitMQ listen queue; pycti's API protocol (the "
        "platform POSTs jobs to an HTTP callback server) is not implemented",
    ),
    _c("listen_protocol_api_port", ("7070",), _API),
    _c("listen_protocol_api_path", ("/api/callback",), _API),
    _c("listen_protocol_api_ssl", ("false",), _API, boolean=True),
    _c("listen_protocol_api_uri", ("http://127.0.0.1:7070", "https://127.0.0.1:7070"), _API),
    Unsupported(
        ("LISTEN_PROTOCOL_API_SSL_KEY",), ("connector", "listen_protocol_api_ssl_key"), (), _API
    ),
    Unsupported(
        ("LISTEN_PROTOCOL_API_SSL_CERT",), ("connector", "listen_protocol_api_ssl_cert"), (), _API
    ),
    Unsupported(
        ("LISTEN_PROTOCOL_API_SSL_PASSPHRASE",),
        ("connector", "listen_protocol_api_ssl_passphrase"),
        (),
        _API,
    ),
    Unsupported(
        ("CONNECTOR_QUEUE_PROTOCOL", "QUEUE_PROTOCOL"),
        ("connector", "queue_protocol"),
        ("amqp",),
        "lis-async publishes bundles to the push queue over AMQP with publisher confirms; "
        "pycti's api protocol (the stixBundlePush mutation) is not implemented",
    ),
    _c(
        "send_to_queue",
        ("true",),
        "lis-async always publishes its bundles to the push queue: without it an enrichment "
        "imports nothing",
        boolean=True,
    ),
    _c("send_to_directory", ("false",), _DIRECTORY, boolean=True),
    _c("send_to_directory_path", (), _DIRECTORY),
    _c("send_to_directory_retention", ("7",), _DIRECTORY),
    _c("send_to_s3", ("false",), _S3, boolean=True),
    _c("send_to_s3_bucket", (), _S3),
    _c("send_to_s3_folder", ("connectors",), _S3),
    _c("send_to_s3_retention", ("7",), _S3),
    *(
        Unsupported((f"S3_{key.upper()}",), ("s3", key), (), _S3)
        for key in ("endpoint", "port", "access_key", "secret_key", "use_ssl", "bucket_region")
    ),
    _c(
        "validate_before_import",
        ("false",),
        "sending bundles to a draft for validation instead of importing them is not "
        "implemented: lis-async imports directly",
        boolean=True,
    ),
    _c(
        "auto_create_service_account",
        ("false",),
        "creating a service account and its token at start (pycti 7) is not implemented: give "
        "the connector a token in OPENCTI_TOKEN",
        boolean=True,
    ),
    _c(
        "auto_create_service_account_confidence_level",
        ("50",),
        "used only with CONNECTOR_AUTO_CREATE_SERVICE_ACCOUNT, not implemented",
    ),
    _c(
        "only_contextual",
        ("false",),
        "a file-import connector setting: lis-async registers only_contextual=false",
        boolean=True,
    ),
    _c("xtm_one_intent", (), "not sent at registration (a field of recent platforms only)"),
    _c("run_and_terminate", ("false",), _SCHEDULE, boolean=True),
    _c("duration_period", (), _SCHEDULE),
    _c("live_stream_id", (), _STREAM),
    _c("live_stream_listen_delete", ("true",), _STREAM, boolean=True),
    _c("live_stream_no_dependencies", ("true",), _STREAM, boolean=True),
    _c("live_stream_with_inferences", ("false",), _STREAM, boolean=True),
    _c("live_stream_recover_iso_date", (), _STREAM),
    _c("live_stream_start_timestamp", (), _STREAM),
)


def env_names() -> list[str]:
    return [name for entry in UNSUPPORTED for name in entry.env]


def _value(
    entry: Unsupported,
    yaml_data: Mapping[str, Any],
    env: Mapping[str, str],
    is_set: Callable[[Any], bool],
) -> tuple[str, Any] | None:
    """(where it was found, value), environment first, as pycti reads it."""
    for name in entry.env:
        if is_set(env.get(name)):
            return name, env[name]
    section, key = entry.yaml
    block = yaml_data.get(section)
    if isinstance(block, Mapping) and is_set(block.get(key)):
        return f"{section}.{key}", block[key]
    return None


def problems(
    yaml_data: Mapping[str, Any], env: Mapping[str, str], is_set: Callable[[Any], bool]
) -> list[str]:
    """One line per refused setting; a value is never repeated (some are credentials)."""
    out: list[str] = []
    for entry in UNSUPPORTED:
        found = _value(entry, yaml_data, env, is_set)
        accepted = {a.lower() for a in entry.accepted}
        if found is not None and entry.normalise(found[1]) not in accepted:
            section, key = entry.yaml
            out.append(entry.problem(f"{' / '.join(entry.env)} ({section}.{key})"))
    return out
