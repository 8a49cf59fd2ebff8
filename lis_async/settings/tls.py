"""TLS contexts toward RabbitMQ from pycti's ``MQ_USE_SSL_*`` settings (docs/protocol.md §1.6).

pycti's meanings, kept exactly:

* ``MQ_USE_SSL_CA``: the CA to trust, added to the system store; a file path, or the PEM text
  itself (a value starting with ``-----BEGIN``);
* ``MQ_USE_SSL_CERT`` / ``MQ_USE_SSL_KEY``: the client certificate and its private key (paths or
  PEM texts; without a key the certificate file must hold it); ``MQ_USE_SSL_PASSPHRASE``: the
  key's passphrase;
* ``MQ_USE_SSL_REJECT_UNAUTHORIZED``: whether the broker's certificate and host name are
  checked. pycti checks nothing unless it is set to true; lis-async checks unless it is set to
  false (a deliberate difference, docs/protocol.md §9).

PEM texts are written to private temporary files only while they are loaded (the ``ssl`` module
loads certificate chains from files only), then removed.
"""

from __future__ import annotations

import contextlib
import os
import ssl
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field

__all__ = ["AmqpTls", "is_pem", "mq_context"]


def is_pem(value: str) -> bool:
    """pycti's test: PEM text rather than a file path."""
    return value.lstrip().startswith("-----BEGIN")


@dataclass(frozen=True, slots=True)
class AmqpTls:
    """The client side of AMQPS. Key and passphrase never show in repr."""

    verify: bool = True
    ca: str | None = None
    cert: str | None = None
    key: str | None = field(default=None, repr=False)
    passphrase: str | None = field(default=None, repr=False)


@contextlib.contextmanager
def _as_file(value: str | None) -> Iterator[str | None]:
    """A path for ``value``: itself if it is one, else a private temporary file with the PEM."""
    if value is None or not is_pem(value):
        yield value
        return
    fd, path = tempfile.mkstemp(prefix="lis-tls-", suffix=".pem")  # mode 0600
    try:
        with os.fdopen(fd, "w", encoding="ascii") as out:
            out.write(value)
        yield path
    finally:
        os.unlink(path)


def mq_context(tls: AmqpTls) -> ssl.SSLContext:
    """The TLS context of an AMQPS connection. Raises ``OSError`` (a file cannot be read) or
    ``ssl.SSLError`` (not PEM, wrong passphrase, key not matching the certificate)."""
    if tls.verify:
        context = ssl.create_default_context()
    else:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    if tls.ca is not None:
        if is_pem(tls.ca):
            context.load_verify_locations(cadata=tls.ca)
        else:
            context.load_verify_locations(cafile=tls.ca)
    if tls.cert is not None:
        with _as_file(tls.cert) as cert, _as_file(tls.key) as key:
            assert cert is not None
            context.load_cert_chain(cert, key, tls.passphrase)
    return context
