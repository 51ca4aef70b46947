"""Operator commands for money: accounts, keys, credits, usage, the ledger audit.

They work on the database directly (``SERVELM_DATABASE_URL`` or the SQLite file in
the data directory), so they need no running server.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from servelm.auth.keys import key_grants
from servelm.billing import accounts as acct
from servelm.billing import audit
from servelm.billing.money import format_credits, parse_credits
from servelm.cli import limits as cli_limits
from servelm.cli.common import ModelsFileOpt, load_catalog_or_exit, models_file_option
from servelm.config import Settings
from servelm.errors import ServelmError
from servelm.ratelimit import announce
from servelm.store.db import Database

console = Console()
err_console = Console(stderr=True)

accounts_app = typer.Typer(help="Create and list accounts.", no_args_is_help=True)
keys_app = typer.Typer(help="Create, list and revoke API keys.", no_args_is_help=True)
credits_app = typer.Typer(help="Grant credits and read balances.", no_args_is_help=True)
ledger_app = typer.Typer(help="Audit the ledger.", no_args_is_help=True)

DataDir = Annotated[Path | None, typer.Option(help="[env: SERVELM_DATA_DIR]")]
AccountRef = Annotated[str, typer.Argument(help="Account id or name.")]


def open_db(data_dir: Path | None) -> Database:
    settings = Settings.from_env(data_dir=data_dir)
    db = Database(settings.db_url)
    db.upgrade()
    return db


def _account_id(db: Database, ref: str) -> int:
    return acct.get_account(db, int(ref) if ref.isdigit() else ref).id


def _fail(exc: ServelmError) -> typer.Exit:
    err_console.print(f"[red]error:[/] {exc.message}", highlight=False)
    return typer.Exit(1)


@accounts_app.command("create")
def accounts_create(
    name: str,
    plan: Annotated[
        str | None, typer.Option(help="Rate-limit plan ([plans.<name>] of the models file).")
    ] = None,
    data_dir: DataDir = None,
) -> None:
    """Create an account (with no credits yet)."""
    db = open_db(data_dir)
    try:
        a = acct.create_account(db, name)
        if plan is not None:
            cli_limits.apply_plan(db, a.id, plan)
    except ServelmError as exc:
        raise _fail(exc) from exc
    console.print(f"account {a.id} '{a.name}' created" + (f", plan {plan}" if plan else ""))


@accounts_app.command("list")
def accounts_list(data_dir: DataDir = None) -> None:
    """Every account with its balance and credits held by requests in flight."""
    table = Table("id", "name", "credits", "held", "created")
    for a in acct.list_accounts(open_db(data_dir)):
        table.add_row(
            str(a.id),
            a.name,
            format_credits(a.balance),
            format_credits(a.held),
            a.created_at.strftime("%Y-%m-%d %H:%M"),
        )
    console.print(table)


@keys_app.command("create")
def keys_create(
    account: AccountRef,
    name: Annotated[str, typer.Option(help="A label for the key.")] = "",
    model: Annotated[
        list[str] | None, typer.Option(help="Limit the key to this model (repeatable).")
    ] = None,
    expires: Annotated[
        datetime | None, typer.Option(help="Expiry, e.g. 2027-01-31 or 2027-01-31T12:00.")
    ] = None,
    rpm: cli_limits.Limit = None,
    tpm: cli_limits.Limit = None,
    concurrency: cli_limits.Limit = None,
    data_dir: DataDir = None,
    models_file: ModelsFileOpt = None,
) -> None:
    """Create an API key. Its secret is printed once and never stored. --model takes
    slugs or aliases; --rpm, --tpm and --concurrency give it rate limits of its own."""
    # The catalog `servelm serve` would load, to check the models the key may use.
    settings = Settings.from_env(data_dir=data_dir, models_file=models_file_option(models_file))
    catalog = load_catalog_or_exit(settings)
    db = open_db(data_dir)
    try:
        models, expires_at = key_grants(model or None, expires, catalog, datetime.now(UTC))
        record, plaintext = acct.create_key(db, _account_id(db, account), name, models, expires_at)
        if (rpm, tpm, concurrency) != (None, None, None):
            cli_limits.apply_key_limits(db, record.key_id, rpm, tpm, concurrency)
    except ServelmError as exc:
        raise _fail(exc) from exc
    console.print(f"key {record.key_id} for account {record.account_id}:")
    print(plaintext)
    console.print("[dim]Store it now: only its digest is kept.[/]")


@keys_app.command("list")
def keys_list(
    account: Annotated[str | None, typer.Argument(help="Only this account's keys.")] = None,
    data_dir: DataDir = None,
) -> None:
    db = open_db(data_dir)
    account_id = _account_id(db, account) if account else None
    table = Table("key id", "account", "name", "models", "expires", "state")
    for k in acct.list_keys(db, account_id):
        table.add_row(
            k.redacted,
            str(k.account_id),
            k.name,
            ", ".join(k.allowed_models) if k.allowed_models is not None else "all",
            k.expires_at.strftime("%Y-%m-%d %H:%M") if k.expires_at else "never",
            "revoked" if k.revoked_at else "active",
        )
    console.print(table)


@keys_app.command("revoke")
def keys_revoke(
    key_id: Annotated[str, typer.Argument(help="The key id (the part after slm_).")],
    data_dir: DataDir = None,
) -> None:
    """Revoke a key; servers stop accepting it within their key cache time (5 s)."""
    key_id = key_id.removeprefix("slm_").split("_")[0]
    try:
        acct.revoke_key(open_db(data_dir), key_id)
    except ServelmError as exc:
        raise _fail(exc) from exc
    settings = Settings.from_env(data_dir=data_dir)
    # Gateways sharing Redis drop the key from their caches at once.
    announce(settings.redis_url, settings.redis_prefix, f"key:{key_id}")
    console.print(f"key {key_id} revoked")


@credits_app.command("grant")
def credits_grant(
    account: AccountRef,
    credits: Annotated[str, typer.Argument(help="Credits to add, e.g. 10 or 0.5.")],
    note: Annotated[str, typer.Option(help="Why, for the ledger.")] = "",
    data_dir: DataDir = None,
) -> None:
    """Add prepaid credits to an account."""
    db = open_db(data_dir)
    try:
        balance = acct.grant(db, _account_id(db, account), parse_credits(credits), note)
    except ServelmError as exc:
        raise _fail(exc) from exc
    console.print(f"balance now {format_credits(balance)} credits")


@credits_app.command("balance")
def credits_balance(account: AccountRef, data_dir: DataDir = None) -> None:
    db = open_db(data_dir)
    try:
        a = acct.get_account(db, _account_id(db, account))
    except ServelmError as exc:
        raise _fail(exc) from exc
    print(format_credits(a.balance))


def usage(
    account: Annotated[str | None, typer.Argument(help="Only this account.")] = None,
    data_dir: DataDir = None,
) -> None:
    """Requests, tokens and cost per key, model and day."""
    db = open_db(data_dir)
    account_id = _account_id(db, account) if account else None
    table = Table("day", "key", "model", "requests", "prompt", "completion", "cost")
    for r in audit.usage_summary(db, account_id):
        table.add_row(
            str(r["day"]),
            str(r["key_id"] or "-"),
            r["model"],
            str(r["requests"]),
            str(r["prompt_tokens"]),
            str(r["completion_tokens"]),
            format_credits(r["cost"]),
        )
    console.print(table)


@ledger_app.command("check")
def ledger_check(data_dir: DataDir = None) -> None:
    """Verify granted = balance + held + charged for every account; exit 1 if not."""
    settings = Settings.from_env(data_dir=data_dir)
    db = Database(settings.db_url)
    db.upgrade()
    problems = audit.ledger_check(db, timedelta(seconds=settings.hold_ttl_seconds))
    if problems:
        for p in problems:
            err_console.print(f"[red]account {p.account_id} '{p.name}':[/] {p.problem}")
        raise typer.Exit(1)
    console.print("ledger ok: every account's credits add up")


def register(app: typer.Typer) -> None:
    cli_limits.register(keys_app, accounts_app)
    app.add_typer(accounts_app, name="accounts")
    app.add_typer(keys_app, name="keys")
    app.add_typer(credits_app, name="credits")
    app.add_typer(ledger_app, name="ledger")
    app.command("usage")(usage)
