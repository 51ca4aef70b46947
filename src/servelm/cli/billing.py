"""Operator commands for money: accounts, keys, credits, usage, the ledger audit.

They work on the database directly (``--database-url``/``SERVELM_DATABASE_URL`` or
the SQLite file in the data directory, as ``serve`` does), so they need no running
server.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Annotated

import typer

from servelm.access.keys import key_grants
from servelm.access.revocation import announce
from servelm.billing import accounts as acct
from servelm.billing import audit
from servelm.billing.money import format_credits, parse_credits
from servelm.cli import limits as cli_limits
from servelm.cli.common import (
    DatabaseUrlOpt,
    DataDirOpt,
    ModelsFileOpt,
    console,
    err_console,
    fail,
    find_account_id,
    load_catalog_or_exit,
    open_db,
    print_rows,
    settings_for,
)
from servelm.errors import ServelmError

accounts_app = typer.Typer(help="Create and list accounts.", no_args_is_help=True)
keys_app = typer.Typer(help="Create, list and revoke API keys.", no_args_is_help=True)
credits_app = typer.Typer(help="Grant credits and read balances.", no_args_is_help=True)
ledger_app = typer.Typer(help="Audit the ledger.", no_args_is_help=True)

AccountRef = Annotated[str, typer.Argument(help="Account id or name.")]


@accounts_app.command("create")
def accounts_create(
    name: str,
    plan: Annotated[
        str | None,
        typer.Option(help=r"Rate-limit plan (a \[plans.NAME] table of the models file)."),
    ] = None,
    data_dir: DataDirOpt = None,
    database_url: DatabaseUrlOpt = None,
    models_file: ModelsFileOpt = None,
) -> None:
    """Create an account (with no credits yet)."""
    settings = settings_for(data_dir, database_url, models_file)
    db = open_db(settings)
    try:
        if plan is not None:  # before the account exists: a refused plan leaves none
            cli_limits.check_plan(plan, settings)
        a = acct.create_account(db, name)
        if plan is not None:
            cli_limits.apply_plan(db, a.id, plan, settings)
    except ServelmError as exc:
        raise fail(exc) from exc
    console.print(f"account {a.id} '{a.name}' created" + (f", plan {plan}" if plan else ""))


@accounts_app.command("list")
def accounts_list(data_dir: DataDirOpt = None, database_url: DatabaseUrlOpt = None) -> None:
    """Every account with its balance and credits held by requests in flight."""
    rows = [
        [
            str(a.id),
            a.name,
            format_credits(a.balance),
            format_credits(a.held),
            a.created_at.strftime("%Y-%m-%d %H:%M"),
        ]
        for a in acct.list_accounts(open_db(settings_for(data_dir, database_url)))
    ]
    print_rows(["id", "name", "credits", "held", "created"], rows)


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
    rpm: cli_limits.Rpm = None,
    tpm: cli_limits.Tpm = None,
    concurrency: cli_limits.Concurrency = None,
    data_dir: DataDirOpt = None,
    database_url: DatabaseUrlOpt = None,
    models_file: ModelsFileOpt = None,
) -> None:
    """Create an API key. Its secret is printed once and never stored. --model takes
    slugs or aliases; --rpm, --tpm and --concurrency give it rate limits of its own."""
    # The catalog `servelm serve` would load, to check the models the key may use.
    settings = settings_for(data_dir, database_url, models_file)
    catalog = load_catalog_or_exit(settings)
    db = open_db(settings)
    try:
        models, expires_at = key_grants(model or None, expires, catalog, datetime.now(UTC))
        record, plaintext = acct.create_key(
            db, find_account_id(db, account), name, models, expires_at
        )
        if (rpm, tpm, concurrency) != (None, None, None):
            cli_limits.apply_key_limits(db, record.key_id, rpm, tpm, concurrency, settings)
    except ServelmError as exc:
        raise fail(exc) from exc
    console.print(f"key {record.key_id} for account {record.account_id}:")
    print(plaintext)
    console.print("[dim]Store it now: only its digest is kept.[/]")


@keys_app.command("list")
def keys_list(
    account: Annotated[str | None, typer.Argument(help="Only this account's keys.")] = None,
    data_dir: DataDirOpt = None,
    database_url: DatabaseUrlOpt = None,
) -> None:
    """Every key (or one account's): its id for `keys revoke`, models, expiry, state.
    Piped or redirected, one tab-separated line per key with nothing cut."""
    db = open_db(settings_for(data_dir, database_url))
    try:
        account_id = find_account_id(db, account) if account else None
    except ServelmError as exc:
        raise fail(exc) from exc
    rows = [
        [
            k.redacted,
            str(k.account_id),
            k.name,
            ", ".join(k.allowed_models) if k.allowed_models is not None else "all",
            k.expires_at.strftime("%Y-%m-%d %H:%M") if k.expires_at else "never",
            "revoked" if k.revoked_at else "active",
        ]
        for k in acct.list_keys(db, account_id)
    ]
    print_rows(["key id", "account", "name", "models", "expires", "state"], rows)


@keys_app.command("revoke")
def keys_revoke(
    key_id: Annotated[str, typer.Argument(help="The key id (the part after slm_).")],
    data_dir: DataDirOpt = None,
    database_url: DatabaseUrlOpt = None,
) -> None:
    """Revoke a key; servers stop accepting it within their key cache time (5 s)."""
    key_id = key_id.removeprefix("slm_").split("_")[0]
    settings = settings_for(data_dir, database_url)
    try:
        acct.revoke_key(open_db(settings), key_id)
    except ServelmError as exc:
        raise fail(exc) from exc
    # Gateways sharing Redis drop the key from their caches at once.
    announce(settings.redis_url, settings.redis_prefix, f"key:{key_id}")
    console.print(f"key {key_id} revoked")


@credits_app.command("grant")
def credits_grant(
    account: AccountRef,
    credits: Annotated[str, typer.Argument(help="Credits to add, e.g. 10 or 0.5.")],
    note: Annotated[str, typer.Option(help="Why, for the ledger.")] = "",
    data_dir: DataDirOpt = None,
    database_url: DatabaseUrlOpt = None,
) -> None:
    """Add prepaid credits to an account."""
    db = open_db(settings_for(data_dir, database_url))
    try:
        balance = acct.grant(db, find_account_id(db, account), parse_credits(credits), note)
    except ServelmError as exc:
        raise fail(exc) from exc
    console.print(f"balance now {format_credits(balance)} credits")


@credits_app.command("balance")
def credits_balance(
    account: AccountRef, data_dir: DataDirOpt = None, database_url: DatabaseUrlOpt = None
) -> None:
    """An account's balance in credits (the held credits of requests in flight not
    counted), as a bare number for scripts."""
    db = open_db(settings_for(data_dir, database_url))
    try:
        a = acct.get_account(db, find_account_id(db, account))
    except ServelmError as exc:
        raise fail(exc) from exc
    print(format_credits(a.balance))


def usage(
    account: Annotated[str | None, typer.Argument(help="Only this account.")] = None,
    data_dir: DataDirOpt = None,
    database_url: DatabaseUrlOpt = None,
) -> None:
    """Requests, tokens and cost per key, model and day."""
    db = open_db(settings_for(data_dir, database_url))
    try:
        account_id = find_account_id(db, account) if account else None
    except ServelmError as exc:
        raise fail(exc) from exc
    rows = [
        [
            str(r["day"]),
            str(r["key_id"] or "-"),
            r["model"],
            str(r["requests"]),
            str(r["prompt_tokens"]),
            str(r["completion_tokens"]),
            format_credits(r["cost"]),
        ]
        for r in audit.usage_summary(db, account_id)
    ]
    print_rows(["day", "key", "model", "requests", "prompt", "completion", "cost"], rows)


@ledger_app.command("check")
def ledger_check(data_dir: DataDirOpt = None, database_url: DatabaseUrlOpt = None) -> None:
    """Verify granted = balance + held + charged for every account; exit 1 if not."""
    settings = settings_for(data_dir, database_url)
    db = open_db(settings)
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
