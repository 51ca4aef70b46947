"""Accounts, API keys and credit grants: the operator's side of money."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import insert, select, update
from sqlalchemy.exc import IntegrityError

from servelm.access import keys as auth
from servelm.billing.clock import as_utc, utcnow
from servelm.billing.money import MAX_ACCOUNT_MICRO, MAX_GRANT_MICRO, MICRO
from servelm.errors import Conflict, InvalidRequest, NotFound
from servelm.store.db import Database
from servelm.store.tables import accounts, api_keys, ledger


@dataclass(frozen=True)
class Account:
    id: int
    name: str
    balance: int
    held: int
    created_at: datetime


@dataclass(frozen=True)
class KeyRecord:
    id: int
    key_id: str
    account_id: int
    name: str
    allowed_models: list[str] | None
    expires_at: datetime | None
    revoked_at: datetime | None
    created_at: datetime
    digest: str = ""

    @property
    def redacted(self) -> str:
        return auth.public_id(self.key_id)


def _account(row: object) -> Account:
    m = row._mapping  # type: ignore[attr-defined]
    return Account(m["id"], m["name"], m["balance"], m["held"], as_utc(m["created_at"]))  # type: ignore[arg-type]


def _key(row: object) -> KeyRecord:
    m = row._mapping  # type: ignore[attr-defined]
    return KeyRecord(
        id=m["id"],
        key_id=m["key_id"],
        account_id=m["account_id"],
        name=m["name"],
        allowed_models=m["allowed_models"],
        expires_at=as_utc(m["expires_at"]),
        revoked_at=as_utc(m["revoked_at"]),
        created_at=as_utc(m["created_at"]),  # type: ignore[arg-type]
        digest=m["digest"],
    )


def create_account(db: Database, name: str) -> Account:
    if not name.strip():
        raise InvalidRequest("An account needs a name.", param="name")
    try:
        with db.write() as conn:
            row = conn.execute(
                insert(accounts)
                .values(name=name, balance=0, held=0, created_at=utcnow())
                .returning(*accounts.c)
            ).one()
    except IntegrityError:
        raise Conflict(f"An account named '{name}' already exists.") from None
    return _account(row)


def get_account(db: Database, ref: int | str) -> Account:
    """By id, or by name."""
    cond = accounts.c.id == ref if isinstance(ref, int) else accounts.c.name == ref
    with db.read() as conn:
        row = conn.execute(select(accounts).where(cond)).first()
    if row is None:
        raise NotFound(f"No account {ref!r}.")
    return _account(row)


def list_accounts(db: Database) -> list[Account]:
    with db.read() as conn:
        return [_account(r) for r in conn.execute(select(accounts).order_by(accounts.c.id))]


def check_grant_amount(amount: int) -> None:
    """Issue 17: one grant is bounded, so no sum of a few can leave BIGINT (SQLite
    silently turned such a balance into a REAL, and the audit crashed on it)."""
    if amount <= 0:
        raise InvalidRequest("A grant must be a positive amount of credits.", param="credits")
    if amount > MAX_GRANT_MICRO:
        raise InvalidRequest(
            f"A grant may be at most {MAX_GRANT_MICRO // MICRO} credits.", param="credits"
        )


def grant(db: Database, account_id: int, amount: int, note: str = "") -> int:
    """Add ``amount`` micro-credits; returns the new balance. Ledger row in the same
    transaction, so the audit always adds up."""
    check_grant_amount(amount)
    with db.write() as conn:
        # The cap is in the statement itself: concurrent grants cannot pass it together.
        row = conn.execute(
            update(accounts)
            .where(
                accounts.c.id == account_id,
                accounts.c.balance + accounts.c.held <= MAX_ACCOUNT_MICRO - amount,
            )
            .values(balance=accounts.c.balance + amount)
            .returning(accounts.c.balance)
        ).first()
        if row is None:
            exists = conn.execute(select(accounts.c.id).where(accounts.c.id == account_id))
            if exists.first() is None:
                raise NotFound(f"No account {account_id}.")
            raise InvalidRequest(
                f"This grant would take the account above {MAX_ACCOUNT_MICRO // MICRO} "
                "credits, the most one account may hold.",
                param="credits",
            )
        conn.execute(
            insert(ledger).values(
                account_id=account_id, kind="grant", amount=amount, note=note, created_at=utcnow()
            )
        )
    return int(row[0])


def create_key(
    db: Database,
    account_id: int,
    name: str = "",
    allowed_models: list[str] | None = None,
    expires_at: datetime | None = None,
) -> tuple[KeyRecord, str]:
    """A new key; the plaintext is returned here and never again."""
    new = auth.generate()
    with db.write() as conn:
        exists = conn.execute(select(accounts.c.id).where(accounts.c.id == account_id)).first()
        if exists is None:
            raise NotFound(f"No account {account_id}.")
        row = conn.execute(
            insert(api_keys)
            .values(
                key_id=new.key_id,
                digest=new.digest,
                account_id=account_id,
                name=name,
                allowed_models=allowed_models,
                expires_at=expires_at,
                created_at=utcnow(),
            )
            .returning(*api_keys.c)
        ).one()
    return _key(row), new.plaintext


def find_key(db: Database, key_id: str) -> KeyRecord | None:
    with db.read() as conn:
        row = conn.execute(select(api_keys).where(api_keys.c.key_id == key_id)).first()
    return _key(row) if row else None


def list_keys(db: Database, account_id: int | None = None) -> list[KeyRecord]:
    q = select(api_keys).order_by(api_keys.c.id)
    if account_id is not None:
        q = q.where(api_keys.c.account_id == account_id)
    with db.read() as conn:
        return [_key(r) for r in conn.execute(q)]


def revoke_key(db: Database, key_id: str) -> KeyRecord:
    with db.write() as conn:
        row = conn.execute(
            update(api_keys)
            .where(api_keys.c.key_id == key_id, api_keys.c.revoked_at.is_(None))
            .values(revoked_at=utcnow())
            .returning(*api_keys.c)
        ).first()
    if row is None:
        found = find_key(db, key_id)
        if found is None:
            raise NotFound(f"No key {key_id}.")
        return found  # already revoked: revoking twice is not an error
    return _key(row)


def bootstrap(db: Database, starter_micro: int) -> str | None:
    """On an empty database: a "default" account with starter credits and one key,
    whose plaintext is returned (to print once). Otherwise None."""
    with db.read() as conn:
        if conn.execute(select(accounts.c.id).limit(1)).first() is not None:
            return None
    try:
        account = create_account(db, "default")
    except Conflict:
        return None  # another worker got there first
    if starter_micro > 0:
        grant(db, account.id, starter_micro, note="starter credits")
    _, plaintext = create_key(db, account.id, name="default")
    return plaintext
