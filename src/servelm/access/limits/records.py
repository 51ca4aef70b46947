"""The operator's side of limits in the database: an account's plan, a key's own
limits (used by the CLI and the admin API)."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import select, update

from servelm.errors import InvalidRequest, NotFound
from servelm.store.db import Database
from servelm.store.tables import accounts, api_keys


@dataclass(frozen=True)
class KeyOverrides:
    key_id: str
    account_id: int
    rpm: int | None
    tpm: int | None
    concurrency: int | None

    def as_dict(self) -> dict[str, int | None]:
        return {"rpm": self.rpm, "tpm": self.tpm, "concurrency": self.concurrency}


def _check(name: str, value: int | None) -> None:
    if value is not None and value < 0:
        raise InvalidRequest(f"{name} must be 0 or more.", param=name)


def set_plan(db: Database, account_id: int, plan: str | None) -> None:
    with db.write() as conn:
        done = conn.execute(
            update(accounts).where(accounts.c.id == account_id).values(plan=plan)
        ).rowcount
    if not done:
        raise NotFound(f"No account {account_id}.")


def get_plan(db: Database, account_id: int) -> str | None:
    with db.read() as conn:
        return conn.execute(select(accounts.c.plan).where(accounts.c.id == account_id)).scalar()


def all_plans(db: Database) -> dict[int, str | None]:
    """Every account's plan (the operator console's accounts table)."""
    with db.read() as conn:
        return {r.id: r.plan for r in conn.execute(select(accounts.c.id, accounts.c.plan))}


_UNSET = object()


def set_key_limits(
    db: Database,
    key_id: str,
    *,
    rpm: int | object | None = _UNSET,
    tpm: int | object | None = _UNSET,
    concurrency: int | object | None = _UNSET,
) -> KeyOverrides:
    """Change the limits given (``None`` removes one); the others stay."""
    values = {
        name: v
        for name, v in (("rpm", rpm), ("tpm", tpm), ("concurrency", concurrency))
        if v is not _UNSET
    }
    for name, v in values.items():
        _check(name, v)  # type: ignore[arg-type]
    with db.write() as conn:
        if values:
            conn.execute(update(api_keys).where(api_keys.c.key_id == key_id).values(**values))
        row = conn.execute(
            select(
                api_keys.c.key_id,
                api_keys.c.account_id,
                api_keys.c.rpm,
                api_keys.c.tpm,
                api_keys.c.concurrency,
            ).where(api_keys.c.key_id == key_id)
        ).first()
    if row is None:
        raise NotFound(f"No API key with id '{key_id}'.")
    return KeyOverrides(*row)


def get_key_limits(db: Database, key_id: str) -> KeyOverrides:
    return set_key_limits(db, key_id)
