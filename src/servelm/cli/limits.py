"""Operator commands for rate limits: ``servelm keys limits`` and
``servelm accounts plan`` (``--rpm/--tpm/--concurrency`` on ``keys create`` and
``--plan`` on ``accounts create`` use the same functions)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from servelm.config import Settings
from servelm.errors import ServelmError
from servelm.ratelimit import announce
from servelm.ratelimit.records import KeyOverrides, set_key_limits, set_plan
from servelm.store.db import Database

Limit = Annotated[int | None, typer.Option(min=0)]
DataDir = Annotated[Path | None, typer.Option(help="[env: SERVELM_DATA_DIR]")]


def apply_key_limits(
    db: Database,
    key_id: str,
    rpm: int | None,
    tpm: int | None,
    concurrency: int | None,
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
        settings = Settings.from_env()
        announce(settings.redis_url, settings.redis_prefix, f"key:{key_id}")
    return record


def apply_plan(db: Database, account_id: int, plan: str | None) -> None:
    set_plan(db, account_id, plan)
    settings = Settings.from_env()
    announce(settings.redis_url, settings.redis_prefix, f"account:{account_id}")


def show(record: KeyOverrides) -> str:
    parts = [f"{k}={'-' if v is None else v}" for k, v in record.as_dict().items()]
    return f"key {record.key_id}: " + " ".join(parts)


def keys_limits(
    key_id: Annotated[str, typer.Argument(help="The key id (the part after slm_).")],
    rpm: Limit = None,
    tpm: Limit = None,
    concurrency: Limit = None,
    clear: Annotated[bool, typer.Option(help="Remove the key's own limits.")] = False,
    data_dir: DataDir = None,
) -> None:
    """Show or change a key's own rate limits (requests and tokens per window,
    requests in flight); its account's plan applies as well."""
    from servelm.cli.billing import _fail, open_db

    key_id = key_id.removeprefix("slm_").split("_")[0]
    try:
        record = apply_key_limits(open_db(data_dir), key_id, rpm, tpm, concurrency, clear)
    except ServelmError as exc:
        raise _fail(exc) from exc
    print(show(record))


def accounts_plan(
    account: Annotated[str, typer.Argument(help="Account id or name.")],
    plan: Annotated[
        str | None,
        typer.Argument(help="A [plans.<name>] of the models file; omit for the default."),
    ] = None,
    data_dir: DataDir = None,
) -> None:
    """Put an account on a rate-limit plan."""
    from servelm.cli.billing import _account_id, _fail, open_db

    db = open_db(data_dir)
    try:
        apply_plan(db, _account_id(db, account), plan)
    except ServelmError as exc:
        raise _fail(exc) from exc
    print(f"account {account}: plan {plan or 'default'}")


def register(keys_app: typer.Typer, accounts_app: typer.Typer) -> None:
    keys_app.command("limits")(keys_limits)
    accounts_app.command("plan")(accounts_plan)
