"""Operator commands for rate limits: ``servelm keys limits`` and
``servelm accounts plan`` (``--rpm/--tpm/--concurrency`` on ``keys create`` and
``--plan`` on ``accounts create`` use the same functions)."""

from __future__ import annotations

from typing import Annotated

import typer

from servelm.access.limits import policy
from servelm.access.limits.records import KeyOverrides, set_key_limits, set_plan
from servelm.access.revocation import announce
from servelm.catalog.models_file import load_plans
from servelm.cli.common import (
    DatabaseUrlOpt,
    DataDirOpt,
    ModelsFileOpt,
    fail,
    find_account_id,
    open_db,
    settings_for,
)
from servelm.config import Settings
from servelm.errors import ServelmError
from servelm.store.db import Database

Rpm = Annotated[
    int | None, typer.Option(min=0, help="Requests per minute (per the plan's window).")
]
Tpm = Annotated[
    int | None,
    typer.Option(min=0, help="Tokens per minute, prompt and output (per the plan's window)."),
]
Concurrency = Annotated[int | None, typer.Option(min=0, help="Requests in flight at once.")]


def apply_key_limits(
    db: Database,
    key_id: str,
    rpm: int | None,
    tpm: int | None,
    concurrency: int | None,
    settings: Settings,
    clear: bool = False,
) -> KeyOverrides:
    """Set the limits given (``clear``: remove all first), and tell running gateways."""
    changes: dict[str, int | None] = {}
    if clear:
        changes = {"rpm": None, "tpm": None, "concurrency": None}
    for name, value in (("rpm", rpm), ("tpm", tpm), ("concurrency", concurrency)):
        if value is not None:
            changes[name] = value
    record = set_key_limits(db, key_id, **changes)
    if changes:
        announce(settings.redis_url, settings.redis_prefix, f"key:{key_id}")
    return record


def check_plan(plan: str | None, settings: Settings) -> None:
    """Refuse a plan the models file (as ``serve`` reads it) does not define."""
    policy.check_plan(plan, load_plans(settings.models_file))


def apply_plan(db: Database, account_id: int, plan: str | None, settings: Settings) -> None:
    check_plan(plan, settings)
    set_plan(db, account_id, plan)
    announce(settings.redis_url, settings.redis_prefix, f"account:{account_id}")


def show(record: KeyOverrides) -> str:
    parts = [f"{k}={'-' if v is None else v}" for k, v in record.as_dict().items()]
    return f"key {record.key_id}: " + " ".join(parts)


def keys_limits(
    key_id: Annotated[str, typer.Argument(help="The key id (the part after slm_).")],
    rpm: Rpm = None,
    tpm: Tpm = None,
    concurrency: Concurrency = None,
    clear: Annotated[bool, typer.Option(help="Remove the key's own limits.")] = False,
    data_dir: DataDirOpt = None,
    database_url: DatabaseUrlOpt = None,
) -> None:
    """Show or change a key's own rate limits (requests and tokens per window,
    requests in flight); its account's plan applies as well."""
    key_id = key_id.removeprefix("slm_").split("_")[0]
    settings = settings_for(data_dir, database_url)
    try:
        record = apply_key_limits(open_db(settings), key_id, rpm, tpm, concurrency, settings, clear)
    except ServelmError as exc:
        raise fail(exc) from exc
    print(show(record))


def accounts_plan(
    account: Annotated[str, typer.Argument(help="Account id or name.")],
    plan: Annotated[
        str | None,
        typer.Argument(
            help=r"A plan (a \[plans.NAME] table of the models file); omit for the default."
        ),
    ] = None,
    data_dir: DataDirOpt = None,
    database_url: DatabaseUrlOpt = None,
    models_file: ModelsFileOpt = None,
) -> None:
    """Put an account on a rate-limit plan; a plan the models file does not define is
    refused."""
    settings = settings_for(data_dir, database_url, models_file)
    db = open_db(settings)
    try:
        apply_plan(db, find_account_id(db, account), plan, settings)
    except ServelmError as exc:
        raise fail(exc) from exc
    print(f"account {account}: plan {plan or 'default'}")


def register(keys_app: typer.Typer, accounts_app: typer.Typer) -> None:
    keys_app.command("limits")(keys_limits)
    accounts_app.command("plan")(accounts_plan)
