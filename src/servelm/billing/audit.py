"""The ledger audit and usage reports.

Invariant, for every account at every moment (all in micro-credits)::

    grants + refunds + adjustments − charges  =  balance + held
    held = Σ amount of the account's unsettled holds,   balance ≥ 0

i.e. everything ever granted is either still spendable, reserved by a request in
flight, or was charged. ``servelm ledger check`` runs this.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Row, case, exists, func, select

from servelm.billing.clock import as_utc, utcnow
from servelm.store.db import Database
from servelm.store.tables import accounts, api_keys, holds, jobs, ledger, usage

_WAITING = ("queued", "in_progress")


@dataclass(frozen=True)
class Discrepancy:
    account_id: int
    name: str
    problem: str


def ledger_check(db: Database, hold_ttl: timedelta | None = None) -> list[Discrepancy]:
    """Every account whose credits do not add up; with ``hold_ttl``, also every open
    hold older than that (issue 17: a hold whose settlement failed was kept alive by
    its process's keep-alive, and the sums alone cannot see it)."""
    signed = case((ledger.c.kind == "charge", -ledger.c.amount), else_=ledger.c.amount)
    with db.read() as conn:
        net = dict(
            conn.execute(
                select(ledger.c.account_id, func.coalesce(func.sum(signed), 0)).group_by(
                    ledger.c.account_id
                )
            ).all()
        )
        open_held = dict(
            conn.execute(
                select(holds.c.account_id, func.coalesce(func.sum(holds.c.amount), 0))
                .where(holds.c.settled_at.is_(None))
                .group_by(holds.c.account_id)
            ).all()
        )
        rows = conn.execute(
            select(accounts.c.id, accounts.c.name, accounts.c.balance, accounts.c.held)
        ).all()
        stale: Sequence[Row[Any, Any, Any, Any]] = []
        if hold_ttl is not None:
            stale = conn.execute(
                select(holds.c.account_id, accounts.c.name, holds.c.request_id, holds.c.amount)
                .join(accounts, accounts.c.id == holds.c.account_id)
                .where(
                    holds.c.settled_at.is_(None),
                    holds.c.created_at < utcnow() - hold_ttl,
                    # An async request's hold waits, on purpose, for its job to run.
                    ~exists().where(jobs.c.id == holds.c.request_id, jobs.c.status.in_(_WAITING)),
                )
                .order_by(holds.c.created_at)
            ).all()
    problems: list[Discrepancy] = [
        Discrepancy(
            account_id,
            name,
            f"hold {request_id} ({amount}) has been open longer than the hold TTL "
            f"({hold_ttl.total_seconds():g} s)",
        )
        for account_id, name, request_id, amount in stale
        if hold_ttl is not None
    ]
    for account_id, name, balance, held in rows:
        ledger_net = int(net.get(account_id, 0))
        if ledger_net != balance + held:
            problems.append(
                Discrepancy(
                    account_id,
                    name,
                    f"ledger says {ledger_net} but balance + held = {balance} + {held}",
                )
            )
        if held != int(open_held.get(account_id, 0)):
            problems.append(
                Discrepancy(
                    account_id,
                    name,
                    f"held {held} but open holds sum to {open_held.get(account_id, 0)}",
                )
            )
        if balance < 0 or held < 0:
            problems.append(
                Discrepancy(account_id, name, f"negative: balance {balance}, held {held}")
            )
    return problems


def usage_summary(
    db: Database, account_id: int | None = None, since: datetime | None = None
) -> list[dict[str, Any]]:
    """Requests, tokens and cost per key, model and day."""
    day = func.substr(func.cast(usage.c.created_at, usage.c.model.type), 1, 10)
    q = (
        select(
            day.label("day"),
            api_keys.c.key_id,
            usage.c.model,
            func.count().label("requests"),
            func.sum(usage.c.prompt_tokens).label("prompt_tokens"),
            func.sum(usage.c.completion_tokens).label("completion_tokens"),
            func.sum(usage.c.cost).label("cost"),
        )
        .select_from(usage.outerjoin(api_keys, usage.c.key_id == api_keys.c.id))
        .group_by(day, api_keys.c.key_id, usage.c.model)
        .order_by(day, api_keys.c.key_id, usage.c.model)
    )
    if account_id is not None:
        q = q.where(usage.c.account_id == account_id)
    if since is not None:
        q = q.where(usage.c.created_at >= since)
    with db.read() as conn:
        return [
            {
                k: (
                    int(v) if k in ("requests", "prompt_tokens", "completion_tokens", "cost") else v
                )
                for k, v in r._mapping.items()
            }
            for r in conn.execute(q)
        ]


def recent_requests(db: Database, account_id: int, limit: int = 20) -> list[dict[str, Any]]:
    """An account's latest requests, newest first: what the dashboard lists."""
    q = (
        select(
            usage.c.request_id,
            usage.c.created_at,
            usage.c.model,
            api_keys.c.key_id,
            usage.c.prompt_tokens,
            usage.c.completion_tokens,
            usage.c.cost,
            usage.c.status,
            usage.c.latency_ms,
        )
        .select_from(usage.outerjoin(api_keys, usage.c.key_id == api_keys.c.id))
        .where(usage.c.account_id == account_id)
        .order_by(usage.c.id.desc())
        .limit(limit)
    )
    with db.read() as conn:
        return [dict(r._mapping) for r in conn.execute(q)]


def keys_last_used(db: Database, account_id: int) -> dict[str, datetime]:
    """Key id → when the key last made a request (keys never used are absent)."""
    q = (
        select(api_keys.c.key_id, func.max(usage.c.created_at))
        .select_from(usage.join(api_keys, usage.c.key_id == api_keys.c.id))
        .where(usage.c.account_id == account_id)
        .group_by(api_keys.c.key_id)
    )
    with db.read() as conn:
        return {key_id: as_utc(when) for key_id, when in conn.execute(q)}  # type: ignore[misc]
