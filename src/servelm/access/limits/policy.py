"""What a caller may do: the catalog's plans (``catalog.specs.Plan``), a key's own
overrides, and the scopes (the key, its account) that one request is counted against.

An account has a plan (``[plans.<name>]`` in the models file; an account without one
gets the plan named ``default`` if there is one). The plan limits the account as a
whole; a key's own ``rpm`` / ``tpm`` / ``concurrency`` limit that key on top, so
several keys of one account share the account's plan and each stays within its own.
Queued work (async requests, batch lines) is counted apart, against the plan's
``batch_tpm`` for the account (scope ``b:<account id>``), never against ``tpm``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import select

from servelm.catalog.specs import Plan
from servelm.errors import InvalidRequest
from servelm.store.db import Database
from servelm.store.tables import accounts, api_keys

DEFAULT_PLAN = "default"


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
    # Queued work's own token budget (the plan's ``batch_tpm``), per account.
    batch: Scope | None = None

    @property
    def unlimited(self) -> bool:
        return not self.scopes

    @property
    def limits_tokens(self) -> bool:
        return any(s.tpm is not None for s in self.scopes)


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
    batch = None
    if plan.batch_tpm is not None:
        batch = Scope(f"b:{limits.account_id}", None, plan.batch_tpm, None, window_ms)
    return Policy(tuple(scopes), slots, batch)


def check_plan(plan: str | None, plans: dict[str, Plan]) -> None:
    """Refuse a plan the models file does not define: an account put on a misspelt
    plan would otherwise run with no limits at all. ``None`` (and the name
    ``default``) put the account back on the default plan."""
    if plan is None or plan == DEFAULT_PLAN or plan in plans:
        return
    known = ", ".join(sorted(plans)) or "none (the models file has no [plans.<name>] tables)"
    raise InvalidRequest(
        f"No plan '{plan}' in the models file; known plans: {known}.", param="plan"
    )


def account_plan(plans: dict[str, Plan], name: str | None) -> Plan:
    """The plan an account runs on (its own, or ``default``; none: no limits)."""
    return plans.get(name or DEFAULT_PLAN) or Plan()


def check_within_plan(plan: Plan, limits: dict[str, int | None]) -> None:
    """A key its owner makes (the console) may limit itself below the account's plan,
    never above it: a limit the plan has is the most a key may ask for."""
    for name, value in limits.items():
        ceiling = getattr(plan, name)
        if value is not None and ceiling is not None and value > ceiling:
            raise InvalidRequest(
                f"{name} {value} is above your plan's {ceiling}; ask for at most {ceiling}.",
                param=name,
            )


def plan_names(plans: dict[str, Plan]) -> list[str]:
    return sorted(plans)


def describe(plan: Plan) -> dict[str, Any]:
    return plan.model_dump()
