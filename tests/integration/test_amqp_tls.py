"""AMQPS with pycti's MQ_USE_SSL_* settings against a real RabbitMQ with a TLS listener.

The machine's broker is never reconfigured: the module starts a private second RabbitMQ node
(its own node name, data directory, configuration and ports, loopback only) whose only listener
is AMQPS and which requires a client certificate (``fail_if_no_peer_cert``). The CA, the
broker's certificate and the client's are made here; the node is stopped at the end.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import ssl
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import aio_pika
import pytest
from aiormq.exceptions import AMQPConnectionError

from lis_async.broker.connection import AmqpParams, connect
from lis_async.settings.model import Settings, load_settings
from tests.helpers import PrivateRabbitMQ

# The module's tests share one private node: they run on one xdist worker.
pytestmark = pytest.mark.xdist_group("amqp_tls")

PASSPHRASE = "client-key-s3cr3t"


# ----------------------------------------------------------------------------- certificates
def _write_pki(tmp: Path) -> dict[str, Path]:
    """A CA; the broker's certificate (for localhost only: 127.0.0.1 does not match it) and the
    client's, both signed by it; the client key encrypted with PASSPHRASE."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "lis-async test CA")])

    def issue(cn: str, key: ec.EllipticCurvePrivateKey, *, ca: bool = False) -> x509.Certificate:
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
            .issuer_name(ca_name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(hours=2))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        )
        if cn == "localhost":
            builder = builder.add_extension(
                x509.SubjectAlternativeName([x509.DNSName("localhost")]),
                critical=False,
            ).add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), False)
        elif not ca:
            builder = builder.add_extension(
                x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), False
            )
        return builder.sign(ca_key, hashes.SHA256())

    server_key = ec.generate_private_key(ec.SECP256R1())
    client_key = ec.generate_private_key(ec.SECP256R1())
    pem = serialization.Encoding.PEM
    pkcs8 = serialization.PrivateFormat.PKCS8
    files = {
        "ca": issue("lis-async test CA", ca_key, ca=True).public_bytes(pem),
        "server_cert": issue("localhost", server_key).public_bytes(pem),
        "server_key": server_key.private_bytes(pem, pkcs8, serialization.NoEncryption()),
        "client_cert": issue("lis-async", client_key).public_bytes(pem),
        "client_key": client_key.private_bytes(
            pem, pkcs8, serialization.BestAvailableEncryption(PASSPHRASE.encode())
        ),
    }
    out = {}
    for name, data in files.items():
        out[name] = tmp / f"{name}.pem"
        out[name].write_bytes(data)
    return out


# ----------------------------------------------------------------------------- the private node
@dataclass
class TlsNode:
    port: int
    pki: dict[str, Path]


@pytest.fixture(scope="module")
def tls_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsNode]:
    base = tmp_path_factory.mktemp("rabbit-tls")
    pki = _write_pki(base)
    conf = (
        "listeners.tcp = none\n"
        "listeners.ssl.1 = 127.0.0.1:{port}\n"
        f"ssl_options.cacertfile = {pki['ca']}\n"
        f"ssl_options.certfile = {pki['server_cert']}\n"
        f"ssl_options.keyfile = {pki['server_key']}\n"
        "ssl_options.verify = verify_peer\n"
        "ssl_options.fail_if_no_peer_cert = true\n"
    )
    with PrivateRabbitMQ(base, conf) as node:
        yield TlsNode(node.port, pki)


async def _ready(channel: aio_pika.abc.AbstractChannel, name: str) -> bool:
    queue = await channel.declare_queue(name, passive=True)
    return queue.declaration_result.message_count == 0


# ----------------------------------------------------------------------------- tests
BASE_ENV = {
    "OPENCTI_URL": "http://opencti:8080",
    "OPENCTI_TOKEN": "t",
    "CONNECTOR_ID": "0b3c1f2e-6d7a-4b8c-9d0e-1f2a3b4c5d6e",
    "CONFIG_LIS_APIKEY_CTI": "k",
}


def _settings(node: TlsNode, *, pem: bool = False, **env: str) -> Settings:
    def value(name: str) -> str:
        return node.pki[name].read_text() if pem else str(node.pki[name])

    full = {
        "MQ_USE_SSL_CA": value("ca"),
        "MQ_USE_SSL_CERT": value("client_cert"),
        "MQ_USE_SSL_KEY": value("client_key"),
        "MQ_USE_SSL_PASSPHRASE": PASSPHRASE,
    } | env
    return load_settings(env=BASE_ENV | {k: v for k, v in full.items() if v})


def _params(node: TlsNode, settings: Settings, host: str = "localhost") -> AmqpParams:
    return AmqpParams(host, node.port, "/", True, "guest", "guest", tls=settings.mq.tls)


@contextlib.asynccontextmanager
async def _connected(params: AmqpParams) -> AsyncIterator[aio_pika.abc.AbstractRobustConnection]:
    conn = await asyncio.wait_for(connect(params, "lis-async-tls-test", timeout_s=10), 20)
    try:
        yield conn
    finally:
        await conn.close()


async def _round_trip(conn: aio_pika.abc.AbstractRobustConnection) -> bytes:
    channel = await conn.channel()
    queue = await channel.declare_queue(exclusive=True)
    await channel.default_exchange.publish(aio_pika.Message(b"over amqps"), queue.name)
    message = await queue.get(timeout=10)
    await message.ack()
    return message.body


@pytest.mark.parametrize("pem", [False, True], ids=["paths", "pem-texts"])
async def test_private_ca_and_client_certificate(tls_node: TlsNode, pem: bool) -> None:
    """MQ_USE_SSL_CA / CERT / KEY / PASSPHRASE as file paths or as PEM texts (pycti's two
    forms): the broker's certificate is checked against the private CA, host name included,
    and the broker accepts the client certificate."""
    params = _params(tls_node, _settings(tls_node, pem=pem))
    async with _connected(params) as conn:
        assert await _round_trip(conn) == b"over amqps"


async def _refused(params: AmqpParams) -> str:
    """The text of the connection error (aiormq wraps the ssl module's)."""
    with pytest.raises(AMQPConnectionError) as info:
        async with _connected(params):
            pass
    return str(info.value)


async def test_without_the_private_ca_the_broker_is_not_trusted(tls_node: TlsNode) -> None:
    """What lis-async did before MQ_USE_SSL_CA: only the system trust store."""
    text = await _refused(_params(tls_node, _settings(tls_node, MQ_USE_SSL_CA="")))
    assert "CERTIFICATE_VERIFY_FAILED" in text and "self-signed certificate" in text


async def test_the_host_name_is_checked(tls_node: TlsNode) -> None:
    """The broker's certificate names localhost, not 127.0.0.1."""
    text = await _refused(_params(tls_node, _settings(tls_node), host="127.0.0.1"))
    assert "CERTIFICATE_VERIFY_FAILED" in text and "127.0.0.1" in text


async def test_reject_unauthorized_false_skips_the_checks(tls_node: TlsNode) -> None:
    """pycti's MQ_USE_SSL_REJECT_UNAUTHORIZED=false: neither the CA nor the name is checked."""
    settings = _settings(tls_node, MQ_USE_SSL_CA="", MQ_USE_SSL_REJECT_UNAUTHORIZED="false")
    async with _connected(_params(tls_node, settings, host="127.0.0.1")) as conn:
        assert await _round_trip(conn) == b"over amqps"


async def test_the_broker_refuses_a_client_without_certificate(tls_node: TlsNode) -> None:
    settings = _settings(tls_node, MQ_USE_SSL_CERT="", MQ_USE_SSL_KEY="", MQ_USE_SSL_PASSPHRASE="")
    with pytest.raises((AMQPConnectionError, ssl.SSLError, ConnectionError)):
        async with _connected(_params(tls_node, settings)) as conn:
            await _round_trip(conn)


async def test_the_worker_connects_and_consumes_over_amqps(tls_node: TlsNode) -> None:
    """The whole path: the platform double hands out its plain broker at registration, MQ_HOST,
    MQ_PORT and MQ_USE_SSL point the worker at the TLS node instead, and the MQ_USE_SSL_*
    material reaches both of its connections (consumer and publisher)."""
    from lis_async.app import App
    from lis_async.sim.opencti import PlatformSim, PlatformSimConfig
    from tests.helpers import FAST_ENV, poll

    # The platform double declares no queue on the machine's broker: they are declared on the
    # TLS node below.
    config = PlatformSimConfig(token="octi-token-1", amqp_url=None)
    async with PlatformSim(config) as sim:
        connector_id = str(uuid.uuid4())
        names = sim.registration(connector_id)
        settings = _settings(tls_node)
        async with _connected(_params(tls_node, settings)) as admin:
            # The TLS node is not the platform's broker: its queues are declared here.
            channel = await admin.channel()
            for kind in ("listen", "push"):
                exchange = await channel.declare_exchange(
                    names[f"{kind}_exchange"], aio_pika.ExchangeType.DIRECT, durable=True
                )
                queue = await channel.declare_queue(names[kind], durable=True)
                await queue.bind(exchange, names[f"{kind}_routing"])
            env = (
                BASE_ENV
                | FAST_ENV
                | {
                    "OPENCTI_URL": sim.base_url,
                    "OPENCTI_TOKEN": "octi-token-1",
                    "CONNECTOR_ID": connector_id,
                    "MQ_HOST": "localhost",
                    "MQ_PORT": str(tls_node.port),
                    "MQ_USE_SSL": "true",
                    "MQ_USE_SSL_CA": str(tls_node.pki["ca"]),
                    "MQ_USE_SSL_CERT": str(tls_node.pki["client_cert"]),
                    "MQ_USE_SSL_KEY": str(tls_node.pki["client_key"]),
                    "MQ_USE_SSL_PASSPHRASE": PASSPHRASE,
                }
            )
            app = App(load_settings(env=env))
            task = await app.start_in_background(timeout_s=30)
            try:
                checks = app.checks()
                assert checks["consumer"] and checks["publisher"], checks
                # A body that is no job: the worker takes it from the TLS node and acks it.
                await channel.default_exchange.publish(
                    aio_pika.Message(b"not a job"), names["listen"]
                )
                invalid = app.metrics.jobs.labels("invalid")
                assert await poll(lambda: invalid._value.get() == 1, 20)
                assert await _ready(channel, names["listen"])
            finally:
                app.request_stop()
                assert await asyncio.wait_for(task, 60) == 0
            for kind in ("listen", "push"):
                await channel.queue_delete(names[kind])
