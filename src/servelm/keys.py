"""API keys: ``slm_<key id>_<secret>``.

The key id (12 lowercase letters/digits) is public: it finds the key's row. The
secret (43 URL-safe characters, 256 bits from ``secrets``) is shown once at creation;
only its SHA-256 digest is stored. A high-entropy random secret needs no slow hash:
SHA-256 cannot be reversed and there is nothing to brute-force. Digests are compared
with ``hmac.compare_digest`` so timing says nothing about how much matched.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import string
from dataclasses import dataclass

from servelm.errors import AuthenticationError

PREFIX = "slm_"
KEY_ID_LEN = 12
_ALPHABET = string.ascii_lowercase + string.digits
_KEY_RE = re.compile(rf"^{PREFIX}([a-z0-9]{{{KEY_ID_LEN}}})_([A-Za-z0-9_-]{{43}})$")

MISSING_KEY = (
    "Missing API key: send it in the x-api-key header or as 'Authorization: Bearer <key>'."
)
INVALID_KEY = "Invalid API key."


@dataclass(frozen=True)
class NewKey:
    key_id: str
    digest: str
    plaintext: str


def digest_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def generate() -> NewKey:
    key_id = "".join(secrets.choice(_ALPHABET) for _ in range(KEY_ID_LEN))
    secret = secrets.token_urlsafe(32)
    return NewKey(key_id, digest_secret(secret), f"{PREFIX}{key_id}_{secret}")


def parse(raw: str) -> tuple[str, str]:
    """(key id, secret digest) of a presented key; malformed → 401."""
    m = _KEY_RE.match(raw)
    if not m:
        raise AuthenticationError(INVALID_KEY)
    return m.group(1), digest_secret(m.group(2))


def matches(presented_digest: str, stored_digest: str) -> bool:
    return hmac.compare_digest(presented_digest, stored_digest)


def from_headers(x_api_key: str | None, authorization: str | None) -> str:
    """The key a request carries, from ``x-api-key`` or ``Authorization: Bearer``."""
    if x_api_key:
        return x_api_key.strip()
    if authorization:
        scheme, _, token = authorization.strip().partition(" ")
        if scheme.lower() == "bearer" and token.strip():
            return token.strip()
        raise AuthenticationError("The Authorization header must be 'Bearer <key>'.")
    raise AuthenticationError(MISSING_KEY)


def redact(raw: str) -> str:
    """A key as it may appear in logs: the public id, never the secret."""
    m = _KEY_RE.match(raw)
    return f"{PREFIX}{m.group(1)}_***" if m else "***"
