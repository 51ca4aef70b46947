"""Signed session cookies and CSRF tokens for the web console.

A cookie value is ``base64url(json payload) "." base64url(HMAC-SHA256)``; the payload
carries its own expiry. Two sessions exist, in two cookies: a user's (``sub`` =
``"key"``, the id of the API key they signed in with -- never the secret) and the
operator's (``sub`` = ``"admin"``, with a fingerprint of the admin token, so changing
the token signs every operator out).

A cookie names a session kept on the server (``sid``; the ``console_sessions`` table
holds its SHA-256): signing out ends the session, not just this browser's copy of
the cookie, and the operator can end every session at once. A signature alone never
opens a page.

CSRF: every browser gets a random nonce in an HttpOnly cookie; the token that forms
and the playground's ``x-csrf-token`` header carry is ``HMAC(secret, nonce)``. A
session remembers the nonce it was signed in with, so a request with a session
cookie but without the matching token is refused. The cookies are SameSite=Strict as
well, a second line rather than the only one.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import secrets
import time
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import insert, select, update

from servelm.billing.clock import as_utc, utcnow
from servelm.config import Settings
from servelm.store.db import Database
from servelm.store.tables import console_sessions

SESSION_COOKIE = "servelm_session"
OPERATOR_COOKIE = "servelm_operator"
CSRF_COOKIE = "servelm_csrf"
CSRF_HEADER = "x-csrf-token"
CSRF_FIELD = "csrf_token"
SECRET_FILE = "session_secret"


def load_secret(settings: Settings) -> bytes:
    """``SERVELM_SESSION_SECRET``, or a random one created once in the data dir (so
    restarts keep sessions, and gateways sharing a data dir share it)."""
    if settings.session_secret:
        return settings.session_secret.encode()
    path = Path(settings.data_dir) / SECRET_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        value = path.read_text().strip()
        if value:
            return value.encode()
        # An empty file: a concurrent first start is writing it; take ours instead
        # only if it stays empty (never sign with an empty key).
        time.sleep(0.1)
        value = path.read_text().strip()
        if not value:
            raise RuntimeError(
                f"{path} is empty; delete it or set SERVELM_SESSION_SECRET"
            ) from None
        return value.encode()
    value = secrets.token_urlsafe(32)
    with os.fdopen(fd, "w") as out:
        out.write(value + "\n")
    return value.encode()


def app_secret(app: Any, settings: Settings) -> bytes:
    """The app's session secret, loaded (from ``settings``) on first use and kept with
    the app."""
    state = app.state
    secret: bytes | None = getattr(state, "console_secret", None)
    if secret is None:
        secret = load_secret(settings)
        state.console_secret = secret
    return secret


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _mac(secret: bytes, purpose: str, data: bytes) -> bytes:
    return hmac.new(secret, purpose.encode() + b"\0" + data, hashlib.sha256).digest()


def sign(secret: bytes, payload: dict[str, Any]) -> str:
    body = json.dumps(payload, separators=(",", ":"), sort_keys=True).encode()
    return f"{_b64(body)}.{_b64(_mac(secret, 'session', body))}"


def unsign(secret: bytes, value: str | None) -> dict[str, Any] | None:
    """The payload of a cookie we signed that has not expired; otherwise None."""
    if not value or value.count(".") != 1:
        return None
    body_text, mac_text = value.split(".")
    try:
        body = _unb64(body_text)
        mac = _unb64(mac_text)
    except ValueError:
        return None
    if not hmac.compare_digest(mac, _mac(secret, "session", body)):
        return None
    try:
        payload = json.loads(body)
    except ValueError:
        return None
    if not isinstance(payload, dict) or not isinstance(payload.get("exp"), int):
        return None
    if payload["exp"] <= time.time():
        return None
    return payload


def new_nonce() -> str:
    return secrets.token_urlsafe(24)


def csrf_token(secret: bytes, nonce: str) -> str:
    return _b64(_mac(secret, "csrf", nonce.encode()))


def csrf_ok(secret: bytes, nonce: str | None, token: str | None) -> bool:
    if not nonce or not token:
        return False
    return hmac.compare_digest(token.encode(), csrf_token(secret, nonce).encode())


def user_session(secret: bytes, sid: str, key_id: str, nonce: str, ttl: int) -> str:
    payload = {"sub": "key", "sid": sid, "kid": key_id, "n": nonce}
    return sign(secret, {**payload, "exp": int(time.time()) + ttl})


def admin_fingerprint(admin_token: str) -> str:
    return hashlib.sha256(b"servelm-admin\0" + admin_token.encode()).hexdigest()[:32]


def operator_session(secret: bytes, sid: str, admin_token: str, nonce: str, ttl: int) -> str:
    payload = {"sub": "admin", "sid": sid, "tf": admin_fingerprint(admin_token), "n": nonce}
    return sign(secret, {**payload, "exp": int(time.time()) + ttl})


def parse_cookies(header: str) -> dict[str, str]:
    """A Cookie header's name=value pairs (the first of each name wins)."""
    out: dict[str, str] = {}
    for part in header.split(";"):
        name, sep, value = part.strip().partition("=")
        if sep and name and name not in out:
            out[name] = value.strip().strip('"')
    return out


def session_key_id(headers: Mapping[str, str], secret: bytes) -> tuple[str, str] | None:
    """The API key id and session id of a validly signed, unexpired user session
    whose CSRF header matches; None otherwise. Whether the session is still live is
    the store's to say (``session_live``). ``headers`` has lower-case names."""
    payload = unsign(secret, parse_cookies(headers.get("cookie", "")).get(SESSION_COOKIE))
    if payload is None or payload.get("sub") != "key" or not isinstance(payload.get("kid"), str):
        return None
    if not isinstance(payload.get("sid"), str):
        return None
    if not csrf_ok(secret, payload.get("n"), headers.get(CSRF_HEADER)):
        return None
    return str(payload["kid"]), str(payload["sid"])


# -- sessions on the server --------------------------------------------------------------


def _digest(sid: str) -> str:
    return hashlib.sha256(sid.encode()).hexdigest()


def start_session(db: Database, kind: str, key_id: str | None, ttl: int) -> str:
    """A new session; returns its id, for the cookie (only its digest is stored)."""
    sid = secrets.token_urlsafe(24)
    now = utcnow()
    with db.write() as conn:
        conn.execute(
            insert(console_sessions).values(
                digest=_digest(sid),
                kind=kind,
                key_id=key_id,
                created_at=now,
                expires_at=datetime.fromtimestamp(now.timestamp() + ttl, UTC),
            )
        )
    return sid


def session_live(db: Database, sid: str) -> bool:
    with db.read() as conn:
        row = conn.execute(
            select(console_sessions.c.expires_at).where(
                console_sessions.c.digest == _digest(sid), console_sessions.c.ended_at.is_(None)
            )
        ).first()
    expires = as_utc(row[0]) if row is not None else None
    return expires is not None and expires > utcnow()


def end_session(db: Database, sid: str) -> None:
    with db.write() as conn:
        conn.execute(
            update(console_sessions)
            .where(console_sessions.c.digest == _digest(sid), console_sessions.c.ended_at.is_(None))
            .values(ended_at=utcnow())
        )


def end_all_sessions(db: Database) -> int:
    """The operator's "sign out everywhere": every live session ends (theirs too);
    returns how many."""
    now = utcnow()
    with db.write() as conn:
        # Expired ones go too: nothing ever reads them again.
        conn.execute(console_sessions.delete().where(console_sessions.c.expires_at <= now))
        return int(
            conn.execute(
                update(console_sessions)
                .where(console_sessions.c.ended_at.is_(None))
                .values(ended_at=now)
            ).rowcount
        )
