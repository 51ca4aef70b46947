"""Operator commands for the job queue: ``servelm jobs list`` and ``servelm jobs
cancel``. They work on the database directly, like the money commands."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from servelm.billing.clock import as_utc
from servelm.billing.money import format_credits
from servelm.cli.common import DatabaseUrlOpt, DataDirOpt, fail, open_db, settings_for
from servelm.errors import ServelmError
from servelm.jobs import queue, store

console = Console()
app = typer.Typer(help="List and cancel async requests and batches.", no_args_is_help=True)


@app.command("list")
def list_jobs(
    status: Annotated[str | None, typer.Option(help="only jobs in this state")] = None,
    account: Annotated[int | None, typer.Option(help="only this account's jobs")] = None,
    limit: Annotated[int, typer.Option(min=1, max=1000, help="at most this many jobs")] = 50,
    data_dir: DataDirOpt = None,
    database_url: DatabaseUrlOpt = None,
) -> None:
    """The newest jobs: kind, state, progress and cost."""
    db = open_db(settings_for(data_dir, database_url))
    rows = store.list_jobs(db, account_id=account, status=status, limit=limit)
    depth, age = store.queue_stats(db)
    table = Table(
        "id", "kind", "account", "status", "model", "done", "failed", "total", "cost", "created"
    )
    for r in rows:
        table.add_row(
            r["id"],
            r["kind"],
            str(r["account_id"]),
            r["status"],
            r["model"] or "",
            str(r["completed"]),
            str(r["failed"]),
            str(r["total"]),
            format_credits(r["cost"]),
            f"{as_utc(r['created_at']):%Y-%m-%d %H:%M:%S}",
        )
    console.print(table)
    console.print(f"lines waiting: {depth}, oldest {age:.0f} s")


@app.command()
def cancel(
    job_id: Annotated[str, typer.Argument(help="The job's id (req_… or batch_…).")],
    data_dir: DataDirOpt = None,
    database_url: DatabaseUrlOpt = None,
) -> None:
    """Cancel a batch, or an async request that has not started (its hold released)."""
    db = open_db(settings_for(data_dir, database_url))
    try:
        job = queue.cancel(db, job_id)
    except ServelmError as exc:
        raise fail(exc) from exc
    console.print(f"{job['id']}: {job['status']}")
