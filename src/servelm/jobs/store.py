"""The job queue's rows: jobs, their lines, batch files; claims, leases, endings.

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
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import (
    and_,
    bindparam,
    case,
    delete,
    exists,
    func,
    insert,
    literal_column,
    null,
    or_,
    select,
    tuple_,
    update,
)

from servelm.billing.clock import as_utc, utcnow
from servelm.billing.holds import Superseded
from servelm.errors import NotFound
from servelm.store.db import Database, Tx
from servelm.store.tables import job_files, job_lines, jobs

OPEN_LINE = ("pending", "running")
ACTIVE_JOB = ("queued", "in_progress")
FINISHED_JOB = ("completed", "failed", "cancelled", "expired")


def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


@dataclass(frozen=True)
class Line:
    """One claimed line: what the runner needs to run it."""

    job_id: str
    line_no: int
    kind: str
    body: str
    custom_id: str | None
    attempt: int
    account_id: int
    key_public: str
    held_max_tokens: int | None

    @property
    def hold_id(self) -> str:
        """The hold's request id. An async request's hold is made once, at submission;
        a batch line holds per attempt, so an attempt whose process died leaves a hold
        of its own, which expires and is released, and never one a rerun shares."""
        if self.kind == "async":
            return self.job_id
        return f"{self.job_id}:{self.line_no}:{self.attempt}"


# -- creating --------------------------------------------------------------------------


def create_job(
    db: Database,
    *,
    job_id: str,
    kind: str,
    account_id: int,
    key_id: int,
    key_public: str,
    model: str | None,
    lines: list[tuple[str | None, str]],
    expires_at: datetime,
    webhook_url: str | None = None,
    input_file_id: str | None = None,
    extra: dict[str, Any] | None = None,
    held_max_tokens: int | None = None,
) -> None:
    """A job and its lines (``(custom_id, body)``), queued, in one transaction."""
    now = utcnow()
    with db.write() as conn:
        conn.execute(
            insert(jobs).values(
                id=job_id,
                kind=kind,
                account_id=account_id,
                key_id=key_id,
                key_public=key_public,
                status="queued" if kind == "async" else "in_progress",
                model=model,
                input_file_id=input_file_id,
                output_file_id=new_id("file") if kind == "batch" else None,
                error_file_id=new_id("file") if kind == "batch" else None,
                total=len(lines),
                completed=0,
                failed=0,
                cost=0,
                extra=extra,
                webhook_url=webhook_url,
                webhook_attempts=0,
                created_at=now,
                started_at=now if kind == "batch" else None,
                expires_at=expires_at,
            )
        )
        if lines:
            conn.execute(
                insert(job_lines),
                [
                    {
                        "job_id": job_id,
                        "line_no": n,
                        "custom_id": custom_id,
                        "body": body,
                        "status": "pending",
                        "attempts": 0,
                        "held_max_tokens": held_max_tokens,
                        "cost": 0,
                        "created_at": now,
                    }
                    for n, (custom_id, body) in enumerate(lines)
                ],
            )


def add_file(
    db: Database, *, account_id: int, filename: str, content: str, retention: timedelta
) -> dict[str, Any]:
    now = utcnow()
    row = {
        "id": new_id("file"),
        "account_id": account_id,
        "purpose": "batch",
        "filename": filename,
        "bytes": len(content.encode()),
        "content": content,
        "created_at": now,
        "expires_at": now + retention,
    }
    with db.write() as conn:
        conn.execute(insert(job_files).values(row))
    return row


def get_file(db: Database, account_id: int, file_id: str) -> dict[str, Any]:
    """An uploaded file, or a batch's output or error file (made up from its lines)."""
    with db.read() as conn:
        row = conn.execute(
            select(job_files).where(job_files.c.id == file_id, job_files.c.account_id == account_id)
        ).first()
        if row is not None:
            return dict(row._mapping)
        job = conn.execute(
            select(jobs).where(
                jobs.c.account_id == account_id,
                or_(jobs.c.output_file_id == file_id, jobs.c.error_file_id == file_id),
            )
        ).first()
    if job is None:
        raise NotFound(f"No such File object: {file_id}")
    purpose = "batch_output" if job.output_file_id == file_id else "batch_error"
    return {
        "id": file_id,
        "account_id": account_id,
        "purpose": purpose,
        "filename": f"{job.id}_{purpose.split('_')[1]}.jsonl",
        "bytes": 0,
        "content": None,
        "job_id": job.id,
        "created_at": job.finished_at or job.created_at,
        "expires_at": None,
    }


def result_lines(db: Database, job_id: str, *, errors: bool) -> list[dict[str, Any]]:
    """A batch's output (status 200) or error lines, in input order."""
    ok = job_lines.c.status_code == 200
    with db.read() as conn:
        rows = conn.execute(
            select(job_lines)
            .where(
                job_lines.c.job_id == job_id,
                job_lines.c.status.in_(("done", "failed", "cancelled", "expired")),
                ~ok if errors else ok,
            )
            .order_by(job_lines.c.line_no)
        ).all()
    return [dict(r._mapping) for r in rows]


# -- reading ---------------------------------------------------------------------------


def get_job(db: Database, job_id: str, account_id: int | None = None) -> dict[str, Any]:
    where = [jobs.c.id == job_id]
    if account_id is not None:
        where.append(jobs.c.account_id == account_id)
    with db.read() as conn:
        row = conn.execute(select(jobs).where(*where)).first()
    if row is None:
        raise NotFound(f"No job {job_id}.")
    return dict(row._mapping)


def first_line(db: Database, job_id: str) -> dict[str, Any]:
    with db.read() as conn:
        row = conn.execute(
            select(job_lines).where(job_lines.c.job_id == job_id, job_lines.c.line_no == 0)
        ).first()
    if row is None:
        raise NotFound(f"No job {job_id}.")
    return dict(row._mapping)


def list_jobs(
    db: Database,
    *,
    account_id: int | None = None,
    kind: str | None = None,
    status: str | None = None,
    after: str | None = None,
    limit: int = 20,
) -> list[dict[str, Any]]:
    """Newest first; ``after``: the page after that job id (OpenAI's cursor)."""
    q = select(jobs)
    if account_id is not None:
        q = q.where(jobs.c.account_id == account_id)
    if kind is not None:
        q = q.where(jobs.c.kind == kind)
    if status is not None:
        q = q.where(jobs.c.status == status)
    if after is not None:
        anchor = select(jobs.c.created_at).where(jobs.c.id == after).scalar_subquery()
        q = q.where(
            or_(
                jobs.c.created_at < anchor,
                and_(jobs.c.created_at == anchor, jobs.c.id < after),
            )
        )
    q = q.order_by(jobs.c.created_at.desc(), jobs.c.id.desc()).limit(limit)
    with db.read() as conn:
        return [dict(r._mapping) for r in conn.execute(q)]


def queue_stats(db: Database) -> tuple[int, float]:
    """Lines waiting to run, and the age in seconds of the oldest (0 when none)."""
    with db.read() as conn:
        count, oldest = conn.execute(
            select(func.count(), func.min(job_lines.c.created_at)).where(
                job_lines.c.status == "pending"
            )
        ).one()
    if not count or oldest is None:
        return 0, 0.0
    age = (utcnow() - as_utc(oldest)).total_seconds()  # type: ignore[operator]
    return int(count), max(0.0, age)


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


_EXPIRE_ASYNC = (
    update(job_lines)
    .where(job_lines.c.job_id == _P("job_id"), job_lines.c.status == literal_column("'pending'"))
    .values(
        status=literal_column("'expired'"),
        status_code=literal_column("408"),
        finished_at=_P("now"),
        result=_P("result"),
    )
)


def expire_async(tx: Tx, job_id: str) -> None:
    """An async request not run within its window, in its hold's release transaction."""
    body = {"error": {"code": "expired", "message": "The request was not run in time."}}
    won = tx.execute(_EXPIRE_ASYNC, {"job_id": job_id, "now": utcnow(), "result": json.dumps(body)})
    if won != 1:
        raise Superseded(release=False)
    tx.execute(_COUNT_LINE, {"job_id": job_id, "ok": 0, "bad": 1, "cost": 0})


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
