"""The queue's moves: claims, leases, a line's ending, a job's ending, cancel, expiry,
webhook scheduling.

Every function here is synchronous and runs on the billing pool (``Billing.run``).

Claiming is the one contended write. A claim selects candidate lines
``FOR UPDATE SKIP LOCKED`` (PostgreSQL: gateways sharing the database never wait on
each other's claims; SQLite renders no such clause and serialises writers with
``BEGIN IMMEDIATE`` instead), then takes each with a conditional UPDATE that repeats
the candidate's condition, so a line is claimed by one process at a time on either
database. A claim is a lease: the runner pushes ``lease_until`` forward while it
works; a process that died stops doing so, and its lines are claimed again once the
lease has passed (their ``attempts`` counter says how often).

A line's ending is written by ``record_line`` inside the transaction that settles
its credits (``billing.holds.settle_with``): output row and charge commit together
or not at all. The write is conditional on the lease still being this attempt's;
a runner that lost its lease raises ``Superseded`` and its transaction rolls back.
"""

from __future__ import annotations

import json
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import (
    and_,
    bindparam,
    case,
    delete,
    exists,
    literal_column,
    null,
    or_,
    select,
    tuple_,
    update,
)

from servelm.billing.clock import utcnow
from servelm.billing.holds import Superseded, settle_with
from servelm.errors import Conflict, NotFound
from servelm.jobs.store import ACTIVE_JOB, FINISHED_JOB, OPEN_LINE, Line, get_job
from servelm.store.db import Database, Tx
from servelm.store.tables import job_files, job_lines, jobs

# -- claiming and leases ---------------------------------------------------------------

_ACTIVE = jobs.c.status.in_(ACTIVE_JOB)


def claim(db: Database, owner: str, lease: timedelta, limit: int) -> list[Line]:
    """Up to ``limit`` lines, oldest first: pending ones, and running ones whose lease
    has passed (their process died)."""
    now = utcnow()
    claimable = or_(
        job_lines.c.status == "pending",
        and_(job_lines.c.status == "running", job_lines.c.lease_until < now),
    )
    candidates = (
        select(
            job_lines.c.job_id,
            job_lines.c.line_no,
            job_lines.c.status,
            job_lines.c.attempts,
            job_lines.c.custom_id,
            job_lines.c.body,
            job_lines.c.held_max_tokens,
            jobs.c.kind,
            jobs.c.account_id,
            jobs.c.key_public,
        )
        .join(jobs, jobs.c.id == job_lines.c.job_id)
        .where(claimable, _ACTIVE)
        .order_by(job_lines.c.created_at, job_lines.c.job_id, job_lines.c.line_no)
        .limit(limit)
        .with_for_update(skip_locked=True, of=job_lines)
    )
    claimed: list[Line] = []
    with db.write() as conn:
        for row in conn.execute(candidates).all():
            taken = conn.execute(
                update(job_lines)
                .where(
                    job_lines.c.job_id == row.job_id,
                    job_lines.c.line_no == row.line_no,
                    job_lines.c.attempts == row.attempts,
                    claimable,
                )
                .values(
                    status="running",
                    lease_owner=owner,
                    lease_until=now + lease,
                    attempts=row.attempts + 1,
                )
            ).rowcount
            if taken != 1:
                continue
            conn.execute(
                update(jobs)
                .where(jobs.c.id == row.job_id, jobs.c.status == "queued")
                .values(status="in_progress", started_at=now)
            )
            claimed.append(
                Line(
                    job_id=row.job_id,
                    line_no=row.line_no,
                    kind=row.kind,
                    body=row.body,
                    custom_id=row.custom_id,
                    attempt=row.attempts + 1,
                    account_id=row.account_id,
                    key_public=row.key_public,
                    held_max_tokens=row.held_max_tokens,
                )
            )
    return claimed


def renew(db: Database, owner: str, lines: list[tuple[str, int]], lease: timedelta) -> int:
    """Push forward the leases of the lines this process is running."""
    if not lines:
        return 0
    with db.write() as conn:
        return int(
            conn.execute(
                update(job_lines)
                .where(
                    job_lines.c.lease_owner == owner,
                    job_lines.c.status == "running",
                    tuple_(job_lines.c.job_id, job_lines.c.line_no).in_(lines),
                )
                .values(lease_until=utcnow() + lease)
            ).rowcount
            or 0
        )


def hand_back(db: Database, owner: str) -> int:
    """A stopping process's running lines, queued again at once (not after their
    lease): a later attempt runs them; this one can no longer record them."""
    with db.write() as conn:
        return int(
            conn.execute(
                update(job_lines)
                .where(job_lines.c.lease_owner == owner, job_lines.c.status == "running")
                .values(status="pending", lease_owner=None, lease_until=None)
            ).rowcount
            or 0
        )


# -- a line's ending (inside the settlement's transaction) -------------------------------

# Statements prepared once (``Database.prepare``): every value a bind parameter
# named here, constants written as SQL literals.
_P = bindparam
_FINISH_LINE = (
    update(job_lines)
    .where(
        job_lines.c.job_id == _P("job_id"),
        job_lines.c.line_no == _P("line_no"),
        job_lines.c.status == literal_column("'running'"),
        job_lines.c.lease_owner == _P("owner"),
        job_lines.c.attempts == _P("attempt"),
    )
    .values(
        status=_P("status"),
        status_code=_P("status_code"),
        result=_P("result"),
        cost=_P("cost"),
        finished_at=_P("now"),
        lease_owner=null(),
        lease_until=null(),
    )
)
_COUNT_LINE = (
    update(jobs)
    .where(jobs.c.id == _P("job_id"))
    .values(
        completed=jobs.c.completed + _P("ok"),
        failed=jobs.c.failed + _P("bad"),
        cost=jobs.c.cost + _P("cost"),
    )
)


def record_line(
    tx: Tx, line: Line, owner: str, status_code: int, body: dict[str, Any], cost: int
) -> None:
    """The line's output row and its job's counters, in the caller's transaction;
    ``Superseded`` when this attempt no longer holds the line."""
    ok = status_code == 200
    won = tx.execute(
        _FINISH_LINE,
        {
            "job_id": line.job_id,
            "line_no": line.line_no,
            "owner": owner,
            "attempt": line.attempt,
            "status": "done" if ok else "failed",
            "status_code": status_code,
            "result": json.dumps(body, ensure_ascii=False, separators=(",", ":")),
            "cost": cost,
            "now": utcnow(),
        },
    )
    if won != 1:
        # An async request's hold is the request's, not this attempt's: leave it to
        # the attempt that holds the line now.
        raise Superseded(release=line.kind != "async")
    tx.execute(
        _COUNT_LINE,
        {"job_id": line.job_id, "ok": int(ok), "bad": int(not ok), "cost": cost},
    )


def fail_line(db: Database, line: Line, owner: str, status_code: int, body: dict[str, Any]) -> None:
    """A line that ended before it held anything (refused, invalid): no money moves."""
    with db.transaction() as tx:
        record_line(tx, line, owner, status_code, body, 0)


# -- endings of jobs -------------------------------------------------------------------


def finalize(db: Database, job_id: str) -> bool:
    """A job whose lines have all ended: completed (an async request that failed:
    failed), or cancelled. True when this call ended it (and so queued its webhook)."""
    now = utcnow()
    open_lines = exists().where(job_lines.c.job_id == job_id, job_lines.c.status.in_(OPEN_LINE))
    # Lines left unrun by the completion window: the job expired (OpenAI's status).
    expired_lines = exists().where(job_lines.c.job_id == job_id, job_lines.c.status == "expired")
    with db.write() as conn:
        ended = conn.execute(
            update(jobs)
            .where(
                jobs.c.id == job_id,
                jobs.c.status.in_((*ACTIVE_JOB, "cancelling")),
                ~open_lines,
            )
            .values(
                status=case(
                    (jobs.c.status == "cancelling", "cancelled"),
                    (expired_lines, "expired"),
                    (and_(jobs.c.kind == "async", jobs.c.failed > 0), "failed"),
                    else_="completed",
                ),
                finished_at=now,
                webhook_next_at=case((jobs.c.webhook_url.is_not(None), now), else_=None),
            )
        ).rowcount
    return ended == 1


def unfinished(db: Database, limit: int = 100) -> list[str]:
    """Jobs still open with no open line: their last runner died after its line's
    ending and before the job's (``finalize`` catches them up)."""
    open_lines = exists().where(job_lines.c.job_id == jobs.c.id, job_lines.c.status.in_(OPEN_LINE))
    with db.read() as conn:
        return list(
            conn.execute(
                select(jobs.c.id)
                .where(jobs.c.status.in_((*ACTIVE_JOB, "cancelling")), ~open_lines)
                .limit(limit)
            ).scalars()
        )


def cancel(db: Database, job_id: str) -> dict[str, Any]:
    """An operator's cancel (``servelm jobs cancel``): a batch as its owner would; an
    async request only before it starts, its hold released with it."""
    job = get_job(db, job_id)
    if job["kind"] == "batch":
        return cancel_batch(db, job_id, None)
    return cancel_async_request(db, job_id, None)


def cancel_async_request(db: Database, job_id: str, account_id: int | None) -> dict[str, Any]:
    """An async request cancelled before it starts: its hold from submission released
    in full in the transaction that ends its line (409 once it has started: it runs to
    its end and settles as usual). Cancelling a cancelled request changes nothing."""
    job = get_job(db, job_id, account_id)
    if job["kind"] != "async":
        raise NotFound(f"No request {job_id}.")
    by = "an operator" if account_id is None else "its owner"
    if job["status"] == "queued":
        try:
            settle_with(
                db,
                job_id,
                lambda tx, _s: cancel_async(tx, job_id, by),
                charge=0,
                status="cancelled",
            )
        except Superseded:
            started = f"Request {job_id} has started; it can no longer be cancelled."
            raise Conflict(started) from None
        finalize(db, job_id)
    elif job["status"] not in ("cancelling", "cancelled"):
        raise Conflict(
            f"Request {job_id} has {job['status'].replace('_', ' ')}; it cannot be cancelled."
        )
    return get_job(db, job_id, account_id)


def cancel_batch(db: Database, job_id: str, account_id: int | None) -> dict[str, Any]:
    """Lines not started are cancelled (they held nothing: a batch holds per line when
    the line starts); running ones finish and settle, then the batch is cancelled."""
    job = get_job(db, job_id, account_id)
    if job["kind"] != "batch":
        raise NotFound(f"No batch {job_id}.")
    now = utcnow()
    with db.write() as conn:
        conn.execute(
            update(jobs)
            .where(jobs.c.id == job_id, jobs.c.status.in_(ACTIVE_JOB))
            .values(status="cancelling")
        )
        conn.execute(
            update(job_lines)
            .where(job_lines.c.job_id == job_id, job_lines.c.status == "pending")
            .values(
                status="cancelled",
                status_code=499,
                finished_at=now,
                result=json.dumps(
                    {"error": {"code": "batch_cancelled", "message": "The batch was cancelled."}}
                ),
            )
        )
    finalize(db, job_id)
    return get_job(db, job_id, account_id)


def expire_and_purge(db: Database, retention: timedelta) -> list[str]:
    """Batch lines not started within their window expire (they held nothing); jobs
    finished longer ago than ``retention`` are deleted with their lines and files.
    Async requests that never ran are returned: their holds must be released."""
    now = utcnow()
    with db.write() as conn:
        overdue = select(jobs.c.id).where(_ACTIVE, jobs.c.expires_at < now)
        conn.execute(
            update(job_lines)
            .where(
                job_lines.c.job_id.in_(overdue.where(jobs.c.kind == "batch")),
                job_lines.c.status == "pending",
            )
            .values(
                status="expired",
                status_code=408,
                finished_at=now,
                result=json.dumps(
                    {
                        "error": {
                            "code": "batch_expired",
                            "message": "This line was not run within the completion window.",
                        }
                    }
                ),
            )
        )
        stale_async = list(
            conn.execute(
                select(job_lines.c.job_id).where(
                    job_lines.c.job_id.in_(overdue.where(jobs.c.kind == "async")),
                    job_lines.c.status == "pending",
                )
            ).scalars()
        )
        old = select(jobs.c.id).where(
            jobs.c.status.in_(FINISHED_JOB), jobs.c.finished_at < now - retention
        )
        conn.execute(delete(job_lines).where(job_lines.c.job_id.in_(old)))
        conn.execute(delete(job_files).where(job_files.c.expires_at < now))
        conn.execute(delete(jobs).where(jobs.c.id.in_(old)))
    return stale_async


_END_UNSTARTED = (
    update(job_lines)
    .where(job_lines.c.job_id == _P("job_id"), job_lines.c.status == literal_column("'pending'"))
    .values(status=_P("status"), status_code=_P("code"), finished_at=_P("now"), result=_P("result"))
)
_CANCEL_JOB = (
    update(jobs)
    .where(jobs.c.id == _P("job_id"), jobs.c.status == literal_column("'queued'"))
    .values(status=literal_column("'cancelling'"))
)


def _end_unstarted(tx: Tx, job_id: str, status: str, code: int, message: str) -> None:
    """An async request that never started, ended in its hold's release transaction;
    ``Superseded`` when it started meanwhile (its runner settles it)."""
    body = {"error": {"code": status, "message": message}}
    values = {"job_id": job_id, "status": status, "code": code, "now": utcnow()}
    if tx.execute(_END_UNSTARTED, {**values, "result": json.dumps(body)}) != 1:
        raise Superseded(release=False)
    tx.execute(_COUNT_LINE, {"job_id": job_id, "ok": 0, "bad": 1, "cost": 0})


def expire_async(tx: Tx, job_id: str) -> None:
    _end_unstarted(tx, job_id, "expired", 408, "The request was not run in time.")


def cancel_async(tx: Tx, job_id: str, by: str = "an operator") -> None:
    tx.execute(_CANCEL_JOB, {"job_id": job_id})
    _end_unstarted(tx, job_id, "cancelled", 499, f"The request was cancelled by {by}.")


# -- webhooks --------------------------------------------------------------------------


def due_webhooks(db: Database, hold: timedelta, limit: int = 20) -> list[dict[str, Any]]:
    """Jobs whose webhook is due, each taken for ``hold`` (pushed past now, so another
    process leaves it alone while this one sends it)."""
    now = utcnow()
    taken: list[dict[str, Any]] = []
    with db.write() as conn:
        rows = conn.execute(
            select(jobs)
            .where(jobs.c.webhook_next_at <= now, jobs.c.webhook_done_at.is_(None))
            .order_by(jobs.c.webhook_next_at)
            .limit(limit)
            .with_for_update(skip_locked=True)
        ).all()
        for row in rows:
            won = conn.execute(
                update(jobs)
                .where(jobs.c.id == row.id, jobs.c.webhook_next_at == row.webhook_next_at)
                .values(webhook_next_at=now + hold)
            ).rowcount
            if won == 1:
                taken.append(dict(row._mapping))
    return taken


def webhook_sent(db: Database, job_id: str) -> None:
    with db.write() as conn:
        conn.execute(
            update(jobs)
            .where(jobs.c.id == job_id)
            .values(
                webhook_done_at=utcnow(),
                webhook_next_at=None,
                webhook_attempts=jobs.c.webhook_attempts + 1,
                webhook_error=None,
            )
        )


def webhook_failed(db: Database, job_id: str, error: str, retry_at: datetime | None) -> None:
    with db.write() as conn:
        conn.execute(
            update(jobs)
            .where(jobs.c.id == job_id)
            .values(
                webhook_next_at=retry_at,
                webhook_attempts=jobs.c.webhook_attempts + 1,
                webhook_error=error[:500],
            )
        )
