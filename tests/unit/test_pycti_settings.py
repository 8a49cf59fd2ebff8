"""pycti's helper settings: each one is honoured with pycti's meaning or refused with its name.

Refused settings (lis_async/settings/unsupported.py) are tried one by one from both sources; honoured ones
are checked for pycti's format and defaults here, and for their effect in
tests/integration/test_platform.py (custom headers, queue threshold, enrichment resolution),
tests/integration/test_amqp_tls.py (MQ_USE_SSL_*) and tests/e2e/test_operations.py (metrics
prefix, the queue-threshold warning).
"""

from __future__ import annotations

import datetime
from pathlib import Path

import pytest

from lis_async.ops.metrics import Metrics, metric_name
from lis_async.settings.model import (
    SettingsError,
    all_env_names,
    load_settings,
    parse_custom_headers,
)
from lis_async.settings.unsupported import UNSUPPORTED, Unsupported

UUID = "0b3c1f2e-6d7a-4b8c-9d0e-1f2a3b4c5d6e"
BASE_ENV = {
    "OPENCTI_URL": "http://opencti:8080",
    "OPENCTI_TOKEN": "octi-token-secret",
    "CONNECTOR_ID": UUID,
    "CONFIG_LIS_APIKEY_CTI": "lis-key-secret",
}


def problems(env: dict[str, str], cfg: Path | None = None) -> list[str]:
    with pytest.raises(SettingsError) as info:
        load_settings(cfg, env=BASE_ENV | env)
    return info.value.problems


def refused_value(entry: Unsupported) -> str:
    """A value lis-async does not do: the other boolean, or anything else."""
    if entry.boolean:
        return "false" if entry.accepted == ("true",) else "true"
    return "refused-value-s3cr3t"


# ----------------------------------------------------------------------------- refused
@pytest.mark.parametrize("entry", UNSUPPORTED, ids=lambda e: e.env[0])
@pytest.mark.parametrize("source", ["env", "yaml"])
def test_each_refused_setting_stops_the_start_naming_it(
    entry: Unsupported, source: str, tmp_path: Path
) -> None:
    value = refused_value(entry)
    cfg = None
    env: dict[str, str] = {}
    if source == "env":
        env = {entry.env[0]: value}
    else:
        section, key = entry.yaml
        cfg = tmp_path / "config.yml"
        cfg.write_text(f"{section}:\n  {key}: '{value}'\n", encoding="utf-8")
    (line,) = problems(env, cfg)
    assert line.startswith(f"{entry.env[0]} ")
    assert f"({entry.yaml[0]}.{entry.yaml[1]})" in line
    assert entry.reason in line
    assert "s3cr3t" not in line  # a value is never repeated: some are credentials


@pytest.mark.parametrize("entry", [e for e in UNSUPPORTED if e.accepted], ids=lambda e: e.env[0])
def test_refused_settings_accept_what_lis_async_does(entry: Unsupported) -> None:
    """``CONNECTOR_LISTEN_PROTOCOL=AMQP`` and the like start (in any case, any boolean form)."""
    for value in entry.accepted:
        for form in (value, value.upper(), f" {value.lower()} "):
            load_settings(env=BASE_ENV | {entry.env[0]: form})
    if entry.boolean:
        yes_no = "yes" if entry.accepted == ("true",) else "no"
        load_settings(env=BASE_ENV | {entry.env[0]: yes_no})


def test_the_deprecated_queue_protocol_name_is_read_too() -> None:
    (line,) = problems({"QUEUE_PROTOCOL": "api"})
    assert line.startswith("CONNECTOR_QUEUE_PROTOCOL / QUEUE_PROTOCOL (connector.queue_protocol)")
    load_settings(env=BASE_ENV | {"QUEUE_PROTOCOL": "amqp"})


def test_refusals_and_bad_values_are_reported_together() -> None:
    lines = problems({"CONNECTOR_LISTEN_PROTOCOL": "API", "CONNECTOR_JOBS_IN_FLIGHT": "0"})
    assert [line.split(" ")[0] for line in lines] == [
        "CONNECTOR_LISTEN_PROTOCOL",
        "CONNECTOR_JOBS_IN_FLIGHT",
    ]


def test_an_empty_refused_setting_is_not_set() -> None:
    load_settings(env=BASE_ENV | {"CONNECTOR_LISTEN_PROTOCOL": "", "S3_ENDPOINT": " "})


def test_refused_names_are_known_names() -> None:
    names = set(all_env_names())
    for entry in UNSUPPORTED:
        assert set(entry.env) <= names


# ----------------------------------------------------------------------------- OPENCTI_CUSTOM_HEADERS
def test_custom_headers_in_pyctis_format() -> None:
    assert parse_custom_headers(" X-Tenant: blue ;Authorization-Proxy:a:b;; ") == {
        "X-Tenant": "blue",
        "Authorization-Proxy": "a:b",
    }
    s = load_settings(env=BASE_ENV | {"OPENCTI_CUSTOM_HEADERS": "X-Proxy-Key:hdr-s3cr3t"})
    assert s.opencti.custom_headers is not None
    assert "hdr-s3cr3t" not in repr(s) + str(s.summary())


@pytest.mark.parametrize("value", ["no-colon-s3cr3t", "X-A:1;bad name:s3cr3t", ":s3cr3t"])
def test_malformed_custom_headers_are_refused_without_their_value(value: str) -> None:
    (line,) = problems({"OPENCTI_CUSTOM_HEADERS": value})
    assert line.startswith("OPENCTI_CUSTOM_HEADERS (opencti.custom_headers): pair ")
    assert "s3cr3t" not in line


# ----------------------------------------------------------------------------- CONNECTOR_QUEUE_THRESHOLD
def test_queue_threshold_has_pyctis_default_and_knows_when_it_was_set() -> None:
    s = load_settings(env=BASE_ENV)
    assert s.connector.queue_threshold == 500
    assert "queue_threshold" not in s.connector.model_fields_set
    s = load_settings(env=BASE_ENV | {"CONNECTOR_QUEUE_THRESHOLD": "250.5"})
    assert s.connector.queue_threshold == 250.5
    assert "queue_threshold" in s.connector.model_fields_set
    for bad in ("0", "-1", "lots"):
        (line,) = problems({"CONNECTOR_QUEUE_THRESHOLD": bad})
        assert line.startswith("CONNECTOR_QUEUE_THRESHOLD (connector.queue_threshold)")


# ----------------------------------------------------------------------------- metrics prefix
def test_metric_names_are_prefixed_as_prometheus_client_does() -> None:
    from prometheus_client import CollectorRegistry, Counter

    registry = CollectorRegistry()
    Counter("x", "x", namespace="opencti", subsystem="lis", registry=registry)
    assert [m.name for m in registry.collect()] == [metric_name("x", "opencti", "lis")]
    assert metric_name("x", "", "lis") == "lis_x" and metric_name("x") == "x"
    text = Metrics("opencti", "lis").render().decode()
    assert "opencti_lis_lis_jobs_total" in text and "\nlis_jobs" not in text


def test_metrics_prefixes_are_validated() -> None:
    s = load_settings(
        env=BASE_ENV
        | {"CONNECTOR_METRICS_NAMESPACE": "opencti", "CONNECTOR_METRICS_SUBSYSTEM": "a:b"}
    )
    assert (s.connector.metrics_namespace, s.connector.metrics_subsystem) == ("opencti", "a:b")
    (line,) = problems({"CONNECTOR_METRICS_NAMESPACE": "not-a-name"})
    assert line.startswith("CONNECTOR_METRICS_NAMESPACE (connector.metrics_namespace)")


# ----------------------------------------------------------------------------- MQ_USE_SSL_*
def _pki(tmp: Path, passphrase: bytes | None = None) -> dict[str, Path]:
    """A CA and a client certificate it signed, as PEM files."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.UTC)

    def cert(
        subject: str, key: ec.EllipticCurvePrivateKey, issuer: x509.Name, sign: object
    ) -> x509.Certificate:
        return (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
            .issuer_name(issuer)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=1))
            .not_valid_after(now + datetime.timedelta(hours=1))
            .add_extension(x509.BasicConstraints(ca=subject == "ca", path_length=None), True)
            .sign(sign, hashes.SHA256())  # type: ignore[arg-type]
        )

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "ca")])
    ca = cert("ca", ca_key, ca_name, ca_key)
    client_key = ec.generate_private_key(ec.SECP256R1())
    client = cert("client", client_key, ca_name, ca_key)
    encryption = (
        serialization.BestAvailableEncryption(passphrase)
        if passphrase
        else serialization.NoEncryption()
    )
    out = {"ca": tmp / "ca.pem", "cert": tmp / "client.pem", "key": tmp / "client.key"}
    out["ca"].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    out["cert"].write_bytes(client.public_bytes(serialization.Encoding.PEM))
    out["key"].write_bytes(
        client_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption
        )
    )
    return out


def test_mq_tls_material_as_paths_or_pem_texts(tmp_path: Path) -> None:
    pki = _pki(tmp_path, b"pass-s3cr3t")
    for form in ("path", "pem"):

        def value(name: str, form: str = form) -> str:
            return str(pki[name]) if form == "path" else pki[name].read_text()

        s = load_settings(
            env=BASE_ENV
            | {
                "MQ_USE_SSL_CA": value("ca"),
                "MQ_USE_SSL_CERT": value("cert"),
                "MQ_USE_SSL_KEY": value("key"),
                "MQ_USE_SSL_PASSPHRASE": "pass-s3cr3t",
            }
        )
        tls = s.mq.tls
        assert tls.verify is True and tls.passphrase == "pass-s3cr3t"
        text = repr(s) + str(s.summary()) + repr(tls)
        assert "pass-s3cr3t" not in text and "PRIVATE KEY" not in text
    assert s.summary()["mq.use_ssl_ca"] == "(PEM text)"
    assert s.summary()["mq.use_ssl_key"] == "***"


def test_mq_reject_unauthorized_false_turns_the_checks_off() -> None:
    import ssl

    from lis_async.settings.tls import mq_context

    s = load_settings(env=BASE_ENV | {"MQ_USE_SSL_REJECT_UNAUTHORIZED": "false"})
    context = mq_context(s.mq.tls)
    assert context.verify_mode == ssl.CERT_NONE and not context.check_hostname
    context = mq_context(load_settings(env=BASE_ENV).mq.tls)
    assert context.verify_mode == ssl.CERT_REQUIRED and context.check_hostname


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"MQ_USE_SSL_CA": "/nonexistent/ca.pem"}, "MQ_USE_SSL_CA (mq.use_ssl_ca): file not found"),
        (
            {"MQ_USE_SSL_KEY": "/nonexistent/k.pem"},
            "MQ_USE_SSL_KEY (mq.use_ssl_key): file not found",
        ),
        ({"MQ_USE_SSL_PASSPHRASE": "x"}, "need MQ_USE_SSL_CERT"),
        ({"MQ_USE_SSL_PASSPHRASE": "wrong-s3cr3t"}, "cannot load the TLS material"),
        ({"MQ_USE_SSL_CA": "-----BEGIN CERTIFICATE-----\nnot base64\n"}, "cannot load"),
    ],
)
def test_bad_mq_tls_material_is_one_clear_line(
    tmp_path: Path, env: dict[str, str], expected: str
) -> None:
    pki = _pki(tmp_path, b"right")
    if env.get("MQ_USE_SSL_PASSPHRASE") == "wrong-s3cr3t":
        env = env | {"MQ_USE_SSL_CERT": str(pki["cert"]), "MQ_USE_SSL_KEY": str(pki["key"])}
    (line,) = problems(env)
    assert expected in line
    assert "s3cr3t" not in line


def test_lis_async_run_exits_2_with_one_line_per_refused_setting() -> None:
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENCTI_", "CONNECTOR_"))}
    env |= BASE_ENV | {"CONNECTOR_LISTEN_PROTOCOL": "API", "CONNECTOR_SEND_TO_DIRECTORY": "true"}
    res = subprocess.run(
        [sys.executable, "-m", "lis_async.cli", "run"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert lines[0] == "lis-async: invalid settings:"
    assert [line.split()[0] for line in lines[1:]] == [
        "CONNECTOR_LISTEN_PROTOCOL",
        "CONNECTOR_SEND_TO_DIRECTORY",
    ]
