"""``Idempotency-Key``: a retried request is charged once and gets the same answer.

The first request with a key claims it (INSERT of a pending row; the primary key
makes the claim atomic across processes). A retry with the same body gets the stored
answer; with another body, 409; while the first is still running, 409 too. A
request that fails without an answer gives the key back so a retry can run, and a
claim left pending longer than ``stale_after`` (its process died) can be taken over.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from sqlalchemy import delete, insert, select, update
from sqlalchemy.exc import IntegrityError

from servelm.billing.clock import as_utc, utcnow
from servelm.errors import Conflict
from servelm.store.db import Database
from servelm.store.tables import idempotency


@dataclass(frozen=True)
class Replay:
    status_code: int
    body: dict[str, Any]
    cost: int


def begin(
    db: Database,
    account_id: int,
    key: str,
    body_hash: str,
    stale_after: timedelta = timedelta(minutes=10),
) -> Replay | None:
    """Claim ``key`` (returns None: go ahead) or return the stored answer."""
    try:
        with db.write() as conn:
            conn.execute(
                insert(idempotency).values(
                    account_id=account_id,
                    key=key,
                    body_hash=body_hash,
                    state="pending",
                    created_at=utcnow(),
                )
            )
        return None
    except IntegrityError:
        pass  # claimed before: look at what the first request left
    with db.read() as conn:
        row = conn.execute(
            select(idempotency).where(
                idempotency.c.account_id == account_id, idempotency.c.key == key
            )
        ).first()
    if row is None:  # given back between our insert and this read; let the client retry
        raise Conflict("A request with this Idempotency-Key just failed; retry it.")
    if row.body_hash != body_hash:
        raise Conflict("This Idempotency-Key was already used with a different request body.")
    if row.state != "done":
        created = as_utc(row.created_at)
        if created is not None and created < utcnow() - stale_after and _take_over(db, row):
            return None
        raise Conflict("A request with this Idempotency-Key is still in progress.")
    return Replay(int(row.status_code), json.loads(row.response), int(row.cost or 0))


def _take_over(db: Database, row: Any) -> bool:
    """Claim a pending row whose owner stopped (conditional on it being unchanged, so
    two retries cannot both take it)."""
    with db.write() as conn:
        result = conn.execute(
            update(idempotency)
            .where(
                idempotency.c.account_id == row.account_id,
                idempotency.c.key == row.key,
                idempotency.c.state == "pending",
                idempotency.c.created_at == row.created_at,
            )
            .values(created_at=utcnow())
        )
    return bool(result.rowcount)


def finish(
    db: Database, account_id: int, key: str, status_code: int, body: dict[str, Any], cost: int
) -> None:
    with db.write() as conn:
        conn.execute(
            update(idempotency)
            .where(idempotency.c.account_id == account_id, idempotency.c.key == key)
            .values(state="done", status_code=status_code, response=json.dumps(body), cost=cost)
        )


def abort(db: Database, account_id: int, key: str) -> None:
    with db.write() as conn:
        conn.execute(
            delete(idempotency).where(
                idempotency.c.account_id == account_id,
                idempotency.c.key == key,
                idempotency.c.state == "pending",
            )
        )
