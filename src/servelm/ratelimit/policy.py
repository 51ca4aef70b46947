"""What a caller may do: plans from the models file, a key's own overrides, and the
scopes (the key, its account) that one request is counted against.

An account has a plan (``[plans.<name>]`` in the models file; an account without one
gets the plan named ``default`` if there is one). The plan limits the account as a
whole; a key's own ``rpm`` / ``tpm`` / ``concurrency`` limit that key on top, so
several keys of one account share the account's plan and each stays within its own.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from sqlalchemy import select

from servelm.models_file import ConfigError
from servelm.store.db import Database
from servelm.store.tables import accounts, api_keys

DEFAULT_PLAN = "default"


class Plan(BaseModel):
    """``[plans.<name>]``: requests and tokens per window, requests in flight."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    rpm: int | None = Field(default=None, ge=0)
    tpm: int | None = Field(default=None, ge=0)
    concurrency: int | None = Field(default=None, ge=0)
    # Slots of one model an account may hold at once (servelm.engines.base.SlotShares);
    # None: all but one, so that one account never holds every slot.
    slots: int | None = Field(default=None, ge=1)
    # "per minute" unless the operator says otherwise (tests use a few seconds).
    window: float = Field(default=60.0, gt=0)


@dataclass(frozen=True)
class Scope:
    """One counter set: ``k:<key pk>`` or ``a:<account id>``. ``None``: unlimited."""

    name: str
    rpm: int | None
    tpm: int | None
    concurrency: int | None
    window_ms: int


@dataclass(frozen=True)
class Policy:
    scopes: tuple[Scope, ...]
    slots: int | None = None  # the plan's share of a model's slots (None: the default)

    @property
    def unlimited(self) -> bool:
        return not self.scopes

    @property
    def limits_tokens(self) -> bool:
        return any(s.tpm is not None for s in self.scopes)


def load_plans(models_file: Path | None) -> dict[str, Plan]:
    """The ``[plans.*]`` tables of the models file (none without a file)."""
    if models_file is None or not models_file.is_file():
        return {}
    data = tomllib.loads(models_file.read_text())
    tables = data.get("plans", {})
    if not isinstance(tables, dict):
        raise ConfigError(f"{models_file}: 'plans' must be a table of [plans.<name>] tables")
    plans: dict[str, Plan] = {}
    for name, entry in tables.items():
        try:
            plans[name] = Plan.model_validate(entry)
        except ValidationError as exc:
            err = exc.errors(include_url=False)[0]
            field = ".".join(str(p) for p in err["loc"]) or "?"
            raise ConfigError(f"{models_file}: plans.{name}.{field}: {err['msg']}") from None
    return plans


@dataclass(frozen=True)
class KeyLimits:
    """What the database says about a key: its overrides and its account's plan."""

    account_id: int
    plan: str | None
    rpm: int | None
    tpm: int | None
    concurrency: int | None


def read_key_limits(db: Database, key_pk: int) -> KeyLimits | None:
    with db.read() as conn:
        row = conn.execute(
            select(
                api_keys.c.account_id,
                accounts.c.plan,
                api_keys.c.rpm,
                api_keys.c.tpm,
                api_keys.c.concurrency,
            )
            .join(accounts, accounts.c.id == api_keys.c.account_id)
            .where(api_keys.c.id == key_pk)
        ).first()
    return KeyLimits(*row) if row is not None else None


def build_policy(key_pk: int, limits: KeyLimits | None, plans: dict[str, Plan]) -> Policy:
    if limits is None:
        return Policy(())
    plan = plans.get(limits.plan or DEFAULT_PLAN) or Plan()
    slots = plan.slots
    window_ms = int(plan.window * 1000)
    scopes: list[Scope] = []
    if (limits.rpm, limits.tpm, limits.concurrency) != (None, None, None):
        scopes.append(Scope(f"k:{key_pk}", limits.rpm, limits.tpm, limits.concurrency, window_ms))
    if (plan.rpm, plan.tpm, plan.concurrency) != (None, None, None):
        scopes.append(
            Scope(f"a:{limits.account_id}", plan.rpm, plan.tpm, plan.concurrency, window_ms)
        )
    return Policy(tuple(scopes), slots)


def plan_names(plans: dict[str, Plan]) -> list[str]:
    return sorted(plans)


def describe(plan: Plan) -> dict[str, Any]:
    return plan.model_dump()
