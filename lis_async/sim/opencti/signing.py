"""The simulated platform's connector signing key: the ``jwks`` answer and connector JWTs.

OpenCTI publishes a JWK Set in the registration answer (``jwks``) and signs the JWTs of the
API listen protocol with the matching key. The simulator makes one Ed25519 key per process,
on first use. Both packages are optional and imported only when needed:

* ``cryptography``: the key itself, i.e. any answer that selects ``jwks``;
* ``PyJWT`` (``import jwt``): :func:`connector_jwt` only.
"""

from __future__ import annotations

import base64
import functools
import time
import uuid
from typing import TYPE_CHECKING

import orjson

from lis_async.sim.opencti.errors import SimDependencyError
from lis_async.sim.opencti.formats import NAMESPACE

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

__all__ = ["connector_jwt", "jwks_json"]


@functools.lru_cache(maxsize=1)
def _signing_key() -> tuple[Ed25519PrivateKey, str, str]:
    """One Ed25519 key per process: (private key, kid, JWK Set JSON text)."""
    try:
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
        from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
    except ImportError as exc:
        raise SimDependencyError(
            "PlatformSim needs the 'cryptography' package to answer the jwks field"
        ) from exc
    key = Ed25519PrivateKey.generate()
    raw = key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    x = base64.urlsafe_b64encode(raw).rstrip(b"=").decode()
    kid = "sim-" + uuid.uuid5(NAMESPACE, x).hex[:16]
    jwks = {
        "keys": [{"kty": "OKP", "crv": "Ed25519", "x": x, "kid": kid, "use": "sig", "alg": "EdDSA"}]
    }
    return key, kid, orjson.dumps(jwks).decode()


def jwks_json() -> str:
    """The JWK Set (JSON text) the registration answer publishes as ``jwks``."""
    return _signing_key()[2]


def connector_jwt(ttl_s: int = 3600) -> str:
    """A JWT signed with the key published in ``jwks`` (needs PyJWT and cryptography)."""
    try:
        import jwt
    except ImportError as exc:
        raise SimDependencyError("PlatformSim.connector_jwt() needs the 'PyJWT' package") from exc
    key, kid, _ = _signing_key()
    now = int(time.time())
    return jwt.encode(
        {"iss": "opencti", "sub": "connector", "iat": now, "exp": now + ttl_s},
        key,
        algorithm="EdDSA",
        headers={"kid": kid},
    )
