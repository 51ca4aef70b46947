"""The job queue's rows: jobs, their lines, batch files; creating and reading them.

Every function here is synchronous and runs on the billing pool (``Billing.run``);
claims, leases and endings are ``servelm.jobs.queue``'s.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import (
    and_,
    func,
    insert,
    or_,
    select,
)

from servelm.billing.clock import as_utc, utcnow
from servelm.errors import NotFound
from servelm.store.db import Database
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
