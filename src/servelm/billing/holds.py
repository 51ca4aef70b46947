"""Credit holds and settlement: the two statements every chat request costs.

reserve: one conditional UPDATE moves the worst-case cost from ``balance`` to
``held`` only if the balance covers it (``WHERE balance >= :need``: the amount, or
more where the caller wants room left, see ``ChatService._hold``). The database
serialises writers on the account row, so concurrent requests can never together
spend more than the balance: overspend is impossible by construction, not by a
read-then-write check.

settle: exactly once per request id. The hold row is marked settled by a conditional
UPDATE (``WHERE settled_at IS NULL``); only the caller that wins that update moves the
money, so a retry, a sweeper and a late ``finally`` can all call it safely.

On PostgreSQL each is ONE statement (data-modifying CTEs: the same conditional
UPDATEs, then the inserts that select from what they returned), so a hold and a
settlement cost one round trip each, or one per group-commit batch (``Tx.submit``).
They return a ``Later``: the answer is read once the batch has gone out. The rare
answers (a refusal and the balance it saw, a hold settled before) come back in the
same statement's row, so nothing is read again after it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, NoReturn

from sqlalchemy import bindparam, case, func, insert, select, update

from servelm.billing.clock import utcnow
from servelm.billing.money import not_enough
from servelm.errors import NotFound
from servelm.store.db import Database, Later, PgBatch, Row, Tx, outcome
from servelm.store.tables import accounts, holds, ledger, usage


@dataclass(frozen=True)
class Settlement:
    charged: int
    balance: int
    already: bool  # True when an earlier call had settled it; nothing moved now


# The request path's statements, built once with bind parameters and compiled once
# per database (``Database.prepare``): constructing and compiling a statement costs
# far more than SQLite spends running it.
_P = bindparam
_RESERVE = (
    update(accounts)
    .where(accounts.c.id == _P("account_id"), accounts.c.balance >= _P("need"))
    .values(balance=accounts.c.balance - _P("amount"), held=accounts.c.held + _P("amount"))
    .returning(accounts.c.balance)
)
_BALANCE = select(accounts.c.balance).where(accounts.c.id == _P("account_id"))
_NEW_HOLD = insert(holds).values(
    {name: _P(name) for name in ("request_id", "account_id", "key_id", "model", "amount")}
    | {"created_at": _P("now"), "expires_at": _P("expires_at")}
)
_CLAIM = (
    update(holds)
    .where(holds.c.request_id == _P("rid"), holds.c.settled_at.is_(None))
    .values(
        settled_at=_P("now"),
        # Never more than was held: the hold is the promise made to the user.
        charged=case((holds.c.amount < _P("charge"), holds.c.amount), else_=_P("charge")),
    )
    .returning(holds.c.account_id, holds.c.key_id, holds.c.model, holds.c.amount, holds.c.charged)
)
_SETTLED = select(holds.c.account_id, holds.c.charged).where(holds.c.request_id == _P("rid"))
_RELEASE = (
    update(accounts)
    .where(accounts.c.id == _P("account_id"))
    .values(
        held=accounts.c.held - _P("amount"),
        balance=accounts.c.balance + (_P("amount") - _P("charged")),
    )
    .returning(accounts.c.balance)
)
_LEDGER = insert(ledger).values(
    {name: _P(name) for name in ("account_id", "kind", "amount", "request_id", "note")}
    | {"created_at": _P("now")}
)
_USAGE = insert(usage).values(
    {
        name: _P(name)
        for name in (
            "request_id",
            "account_id",
            "key_id",
            "model",
            "prompt_tokens",
            "completion_tokens",
            "cost",
            "status",
            "latency_ms",
        )
    }
    | {"created_at": _P("now")}
)

# PostgreSQL's single statements. In a WITH, every data-modifying part runs exactly
# once, in full, whether or not the final SELECT reads it; the UPDATEs keep their
# row locks and re-check their WHERE against a row a concurrent writer just changed
# (READ COMMITTED), so the conditional updates keep the same guarantees as above.
# Parameters in SELECT lists carry casts: PostgreSQL cannot infer their types there.
# Each also answers its rare case in the same row (``won`` false): the balance a
# refused hold saw, or what an earlier settlement charged; these parts read the
# statement's snapshot, from before its own updates.
_PG_RESERVE = """
WITH r AS (
    UPDATE accounts SET balance = balance - %(amount)s, held = held + %(amount)s
    WHERE id = %(account_id)s AND balance >= %(need)s
    RETURNING balance
), h AS (
    INSERT INTO holds (request_id, account_id, key_id, model, amount, created_at, expires_at)
    SELECT %(request_id)s::varchar, %(account_id)s::integer, %(key_id)s::integer,
           %(model)s::varchar, %(amount)s::bigint, %(now)s::timestamptz,
           %(expires_at)s::timestamptz
    FROM r
)
SELECT balance, true FROM r
UNION ALL
SELECT balance, false FROM accounts
WHERE id = %(account_id)s AND NOT EXISTS (SELECT 1 FROM r)
"""
_PG_SETTLE = """
WITH c AS (
    UPDATE holds SET settled_at = %(now)s, charged = LEAST(amount, %(charge)s)
    WHERE request_id = %(rid)s AND settled_at IS NULL
    RETURNING account_id, key_id, model, amount, charged
), a AS (
    UPDATE accounts SET held = accounts.held - c.amount,
                        balance = accounts.balance + (c.amount - c.charged)
    FROM c WHERE accounts.id = c.account_id
    RETURNING accounts.balance
), l AS (
    INSERT INTO ledger (account_id, kind, amount, request_id, note, created_at)
    SELECT account_id, 'charge', charged, %(rid)s::varchar, model, %(now)s::timestamptz
    FROM c WHERE charged > 0
), u AS (
    INSERT INTO usage (request_id, account_id, key_id, model, prompt_tokens,
                       completion_tokens, cost, status, latency_ms, created_at)
    SELECT %(rid)s::varchar, account_id, key_id, model, %(prompt_tokens)s::integer,
           %(completion_tokens)s::integer, charged, %(status)s::varchar,
           %(latency_ms)s::integer, %(now)s::timestamptz
    FROM c
)
SELECT c.charged, a.balance, true FROM c, a
UNION ALL
SELECT COALESCE(h.charged, 0), acc.balance, false
FROM holds h JOIN accounts acc ON acc.id = h.account_id
WHERE h.request_id = %(rid)s AND NOT EXISTS (SELECT 1 FROM c)
"""


def reserve(db: Database, **kw: Any) -> int:
    """Hold ``amount``; returns the balance left. Raises NotEnoughCredits.

    Keywords as ``reserve_in``; this opens its own transaction."""
    with db.transaction() as tx:
        return int(outcome(reserve_in(tx, **kw)))


def reserve_in(
    tx: Tx | PgBatch,
    *,
    account_id: int,
    key_id: int | None,
    request_id: str,
    model: str,
    amount: int,
    ttl: timedelta,
    need: int | None = None,
) -> int | Later:
    """Hold ``amount`` if the balance is at least ``need`` (default: ``amount``)."""
    need = amount if need is None else need
    now = utcnow()
    hold = {
        "request_id": request_id,
        "account_id": account_id,
        "key_id": key_id,
        "model": model,
        "amount": amount,
        "need": need,
        "now": now,
        "expires_at": now + ttl,
    }
    if tx.postgresql:
        answer = tx.submit(_PG_RESERVE, hold)
        return Later(lambda: _reserved(answer(), account_id, amount))
    assert isinstance(tx, Tx)
    row = tx.first(_RESERVE, {"account_id": account_id, "amount": amount, "need": need})
    if row is None:
        _refuse(tx, account_id, amount)
    tx.execute(_NEW_HOLD, hold)
    return int(row[0])


def _reserved(row: Row, account_id: int, amount: int) -> int:
    if row is None:
        raise NotFound(f"No account {account_id}.")
    balance, won = row
    if not won:
        raise not_enough(int(balance), amount)
    return int(balance)


def _refuse(tx: Tx, account_id: int, amount: int) -> NoReturn:
    current = tx.first(_BALANCE, {"account_id": account_id})
    if current is None:
        raise NotFound(f"No account {account_id}.")
    raise not_enough(int(current[0]), amount)


def settle(db: Database, request_id: str, **kw: Any) -> Settlement:
    """Charge ``min(charge, hold)``, release the rest, record ledger and usage rows.

    Keywords as ``settle_in``; this opens its own transaction."""
    with db.transaction() as tx:
        result: Settlement = outcome(settle_in(tx, request_id, **kw))
        return result


def settle_in(
    tx: Tx | PgBatch,
    request_id: str,
    *,
    charge: int,
    prompt_tokens: int = 0,
    completion_tokens: int = 0,
    status: str = "ok",
    latency_ms: int = 0,
) -> Settlement | Later:
    now = utcnow()
    charge = max(0, charge)
    if tx.postgresql:
        answer = tx.submit(
            _PG_SETTLE,
            {
                "rid": request_id,
                "now": now,
                "charge": charge,
                # Clamped to the INTEGER columns, as below.
                "prompt_tokens": _int4(prompt_tokens),
                "completion_tokens": _int4(completion_tokens),
                "status": status,
                "latency_ms": _int4(latency_ms),
            },
        )
        return Later(lambda: _settled(request_id, answer()))
    assert isinstance(tx, Tx)
    won = tx.first(_CLAIM, {"rid": request_id, "now": now, "charge": charge})
    if won is None:
        return _settled_before(tx, request_id)
    account_id, key_id, model, amount, charged = won
    row = tx.first(_RELEASE, {"account_id": account_id, "amount": amount, "charged": charged})
    assert row is not None
    if charged:
        tx.execute(
            _LEDGER,
            {
                "account_id": account_id,
                "kind": "charge",
                "amount": charged,
                "request_id": request_id,
                "note": model,
                "now": now,
            },
        )
    tx.execute(
        _USAGE,
        {
            "request_id": request_id,
            "account_id": account_id,
            "key_id": key_id,
            "model": model,
            # Clamped to the INTEGER columns (int4 on PostgreSQL): an overflow here
            # once failed the whole settlement after the answer was delivered.
            "prompt_tokens": _int4(prompt_tokens),
            "completion_tokens": _int4(completion_tokens),
            "cost": charged,
            "status": status,
            "latency_ms": _int4(latency_ms),
            "now": now,
        },
    )
    return Settlement(int(charged), int(row[0]), already=False)


class Superseded(Exception):
    """Raised by a ``settle_with`` record: the work it would record was recorded by
    someone else (a lease lost to another process). Its transaction rolls back;
    ``release`` says whether this attempt's hold is then released (a hold of its own)
    or left to the one who recorded the work (a hold they share)."""

    def __init__(self, *, release: bool) -> None:
        super().__init__("superseded")
        self.release = release


Record = Callable[[Tx, Settlement], None]


def settle_with(db: Database, request_id: str, record: Record, **kw: Any) -> Settlement:
    """``settle_in`` and the caller's rows in ONE transaction: a job line's output row
    commits with its charge, so a crash leaves both or neither (servelm.jobs). The
    record sees the settlement (what was charged, the balance after)."""
    with db.transaction() as tx:
        settlement: Settlement = outcome(settle_in(tx, request_id, **kw))
        record(tx, settlement)
        return settlement


def _int4(n: int) -> int:
    return max(0, min(int(n), 2**31 - 1))


def _settled(request_id: str, row: Row) -> Settlement:
    if row is None:
        raise NotFound(f"No hold for request {request_id}.")
    charged, balance, won = row
    return Settlement(int(charged), int(balance), already=not won)


def _settled_before(tx: Tx, request_id: str) -> Settlement:
    """The claim matched nothing: an earlier call settled this hold, or there is none."""
    hold = tx.first(_SETTLED, {"rid": request_id})
    if hold is None:
        raise NotFound(f"No hold for request {request_id}.")
    held_by, charged_before = hold
    balance = tx.first(_BALANCE, {"account_id": held_by})
    assert balance is not None  # the hold's account exists (foreign key)
    return Settlement(int(charged_before or 0), int(balance[0]), already=True)


def refresh(db: Database, request_ids: list[str], ttl: timedelta) -> int:
    """Push the expiry of live requests' holds forward (this process is alive)."""
    if not request_ids:
        return 0
    with db.write() as conn:
        result = conn.execute(
            update(holds)
            .where(holds.c.request_id.in_(request_ids), holds.c.settled_at.is_(None))
            .values(expires_at=utcnow() + ttl)
        )
    return int(result.rowcount or 0)


def sweep_expired(db: Database, now: datetime | None = None) -> list[str]:
    """Release (charge nothing for) holds whose process stopped refreshing them."""
    now = now or utcnow()
    with db.read() as conn:
        expired = [
            r[0]
            for r in conn.execute(
                select(holds.c.request_id).where(
                    holds.c.settled_at.is_(None), holds.c.expires_at < now
                )
            )
        ]
    released = []
    for request_id in expired:
        if not settle(db, request_id, charge=0, status="expired").already:
            released.append(request_id)
    return released


def open_holds_total(db: Database, account_id: int) -> int:
    with db.read() as conn:
        return int(
            conn.execute(
                select(func.coalesce(func.sum(holds.c.amount), 0)).where(
                    holds.c.account_id == account_id, holds.c.settled_at.is_(None)
                )
            ).scalar_one()
        )
