"""Who is calling: API keys, their format, and authenticating a request by one.

Keys are ``slm_<key id>_<secret>``. The key id (12 lowercase letters/digits) is
public: it finds the key's row. The secret (43 URL-safe characters, 256 bits from
``secrets``) is shown once at creation; only its SHA-256 digest is stored. A
high-entropy random secret needs no slow hash: SHA-256 cannot be reversed and there is
nothing to brute-force. Digests are compared with ``hmac.compare_digest`` so timing
says nothing about how much matched.

``Authenticator`` turns a presented key into a ``Principal``, caching lookups for a
few seconds (a revoked key stops working within that), unknown ids included, so an
attacker guessing ids costs one cache probe each instead of a database query.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import string
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Protocol

from servelm.errors import AuthenticationError, InvalidRequest, PermissionDenied

if TYPE_CHECKING:
    from servelm.catalog.specs import Catalog

PREFIX = "slm_"
KEY_ID_LEN = 12
_ALPHABET = string.ascii_lowercase + string.digits
_KEY_RE = re.compile(rf"^{PREFIX}([a-z0-9]{{{KEY_ID_LEN}}})_([A-Za-z0-9_-]{{43}})$")

MISSING_KEY = (
    "Missing API key: send it in the x-api-key header or as 'Authorization: Bearer <key>'."
)
INVALID_KEY = "Invalid API key."
MAX_CACHED_KEYS = 100_000


# -- the key format ----------------------------------------------------------------


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


def redact(raw: str) -> str:
    """A key as it may appear in logs: the public id, never the secret."""
    m = _KEY_RE.match(raw)
    return f"{PREFIX}{m.group(1)}_***" if m else "***"


def public_id(key_id: str) -> str:
    """How a key is named to people: the prefix and id, never the secret."""
    return f"{PREFIX}{key_id}_***"


# -- the request's credentials -----------------------------------------------------


def key_from_headers(x_api_key: str | None, authorization: str | None) -> str:
    """The key a request carries, from ``x-api-key`` or ``Authorization: Bearer``."""
    if x_api_key:
        return x_api_key.strip()
    if authorization:
        scheme, _, token = authorization.strip().partition(" ")
        if scheme.lower() == "bearer" and token.strip():
            return token.strip()
        raise AuthenticationError("The Authorization header must be 'Bearer <key>'.")
    raise AuthenticationError(MISSING_KEY)


def client_address(request: Any) -> str:
    """Who sent a request, for counting failed secrets: the peer, or the client a
    trusted proxy named (uvicorn's ``forwarded_allow_ips``)."""
    client = getattr(request, "client", None)
    return client.host if client is not None else "unknown"


def check_admin_token(authorization: str | None, token: str | None) -> None:
    """The operator's bearer token for ``/admin/``; never a user key."""
    if not token:
        raise PermissionDenied(
            "The admin API is disabled: start servelm with SERVELM_ADMIN_TOKEN set."
        )
    scheme, _, value = (authorization or "").partition(" ")
    # compare_digest refuses non-ASCII str: compare bytes, so any header is a plain 401.
    given = value.strip().encode("utf-8", "surrogateescape")
    if scheme.lower() != "bearer" or not hmac.compare_digest(given, token.encode()):
        raise AuthenticationError("Invalid or missing admin token.")


def key_grants(
    models: list[str] | None,
    expires_at: datetime | None,
    catalog: Catalog,
    now: datetime,
) -> tuple[list[str] | None, datetime | None]:
    """What a new key may do, checked when it is made: every model named must be in
    the catalog (stored as its canonical slug, since rights are checked against
    slugs: a key made for an alias would otherwise never work), and the expiry must
    be ahead. A date without a zone is UTC."""
    slugs: list[str] | None = None
    if models is not None:
        slugs = []
        for name in models:
            spec = catalog.get(name)
            if spec is None:
                known = ", ".join(s.slug for s in catalog)
                raise InvalidRequest(
                    f"No model '{name}' on this server; known models: {known}.",
                    param="allowed_models",
                )
            slug = spec.slug
            if slug not in slugs:
                slugs.append(slug)
    if expires_at is not None:
        if expires_at.tzinfo is None:
            expires_at = expires_at.replace(tzinfo=UTC)
        if expires_at <= now:
            raise InvalidRequest(
                f"The expiry {expires_at.isoformat()} is in the past.", param="expires_at"
            )
    return slugs, expires_at


@dataclass(frozen=True)
class Principal:
    """Who is calling: the key's account and what the key may do."""

    account_id: int
    key_pk: int
    key_id: str
    key_name: str
    allowed_models: tuple[str, ...] | None
    expires_at: datetime | None
    # False for a caller of a process without accounts (``WorkerKey``): the walk holds,
    # settles and tells no money for it.
    owns_account: bool = True


# Who calls a process without accounts: a gateway, or whoever holds its key.
NO_ACCOUNT = Principal(
    account_id=0,
    key_pk=0,
    key_id="",
    key_name="worker",
    allowed_models=None,
    expires_at=None,
    owns_account=False,
)


def check_model_rights(principal: Principal, slug: str) -> None:
    """A key limited to some models may use only those (403 otherwise)."""
    if principal.allowed_models is not None and slug not in principal.allowed_models:
        raise PermissionDenied(f"This API key may not use model '{slug}'.", param="model")


class KeyRow(Protocol):
    """What authentication needs of a stored key (``billing.accounts.KeyRecord``)."""

    @property
    def id(self) -> int: ...
    @property
    def key_id(self) -> str: ...
    @property
    def account_id(self) -> int: ...
    @property
    def name(self) -> str: ...
    @property
    def allowed_models(self) -> list[str] | None: ...
    @property
    def expires_at(self) -> datetime | None: ...
    @property
    def revoked_at(self) -> datetime | None: ...
    @property
    def digest(self) -> str: ...


KeyLookup = Callable[[str], Awaitable[KeyRow | None]]


@dataclass(frozen=True)
class _Cached:
    digest: str | None  # None: no such key id
    principal: Principal | None  # None: unknown or revoked
    fetched_at: float


class Authenticator:
    """Presented key → ``Principal``, with a short cache of key lookups.

    ``lookup`` reads a key's row by its public id (off the event loop); ``clock`` is
    injectable so tests can move time instead of sleeping.
    """

    def __init__(
        self,
        lookup: KeyLookup,
        *,
        cache_seconds: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self._lookup = lookup
        self.cache_seconds = cache_seconds
        self._clock = clock
        self._now = wall_clock
        self._cache: dict[str, _Cached] = {}

    async def authenticate_request(
        self, x_api_key: str | None, authorization: str | None, session_key_id: str | None
    ) -> Principal:
        """The key in the headers, or else the web console's session (the playground)."""
        if x_api_key is None and authorization is None and session_key_id is not None:
            return await self.authenticate_key_id(session_key_id)
        return await self.authenticate(key_from_headers(x_api_key, authorization))

    async def authenticate(self, raw_key: str) -> Principal:
        key_id, digest = parse(raw_key)
        cached = await self._cached(key_id)
        # The digest comparison runs for unknown ids too, so they take the same time.
        if not matches(digest, cached.digest or "0" * 64) or cached.digest is None:
            raise AuthenticationError(INVALID_KEY)
        return self._usable(cached)

    async def authenticate_key_id(self, key_id: str) -> Principal:
        """A key proven earlier (a web console session signed in with it): the same
        record, cache, revocation and expiry checks, without the secret."""
        cached = await self._cached(key_id)
        if cached.digest is None:
            raise AuthenticationError(INVALID_KEY)
        return self._usable(cached)

    async def _cached(self, key_id: str) -> _Cached:
        now = self._clock()
        cached = self._cache.get(key_id)
        if cached is None or now - cached.fetched_at > self.cache_seconds:
            cached = _cache_entry(await self._lookup(key_id), now)
            if len(self._cache) >= MAX_CACHED_KEYS:
                self._cache.clear()  # a flood of made-up ids must not grow memory
            self._cache[key_id] = cached
        return cached

    def _usable(self, cached: _Cached) -> Principal:
        principal = cached.principal
        if principal is None:
            raise AuthenticationError("This API key has been revoked.")
        if principal.expires_at is not None and principal.expires_at <= self._now():
            raise AuthenticationError("This API key has expired.")
        return principal

    def forget(self, key_id: str) -> None:
        """Drop a cached lookup (a key revoked here or, via pub/sub, elsewhere)."""
        self._cache.pop(key_id, None)

    def forget_account(self, account_id: int) -> None:
        """Drop every cached key of an account (its plan or keys changed elsewhere)."""
        for key_id, cached in list(self._cache.items()):
            if cached.principal is not None and cached.principal.account_id == account_id:
                del self._cache[key_id]

    def forget_all(self) -> None:
        self._cache.clear()


def _cache_entry(record: KeyRow | None, now: float) -> _Cached:
    if record is None:
        return _Cached(None, None, now)
    principal = None
    if record.revoked_at is None:
        principal = Principal(
            account_id=record.account_id,
            key_pk=record.id,
            key_id=record.key_id,
            key_name=record.name,
            allowed_models=tuple(record.allowed_models)
            if record.allowed_models is not None
            else None,
            expires_at=record.expires_at,
        )
    return _Cached(record.digest, principal, now)


class WorkerKey:
    """The key check of a process without accounts (``servelm worker``, the engine
    process of ``serve --workers``): one shared key, or none (then anyone on the
    network it listens on may call). Its callers own no account (``NO_ACCOUNT``)."""

    def __init__(self, key: str | None) -> None:
        self._key = key.encode() if key else None

    def check(self, x_api_key: str | None, authorization: str | None) -> Principal:
        if self._key is None:
            return NO_ACCOUNT
        try:
            given = key_from_headers(x_api_key, authorization).encode("utf-8", "replace")
        except AuthenticationError:
            given = b""
        if not hmac.compare_digest(given, self._key):
            raise AuthenticationError("Invalid or missing worker key.")
        return NO_ACCOUNT

    async def authenticate_request(
        self, x_api_key: str | None, authorization: str | None, session_key_id: str | None
    ) -> Principal:
        return self.check(x_api_key, authorization)
