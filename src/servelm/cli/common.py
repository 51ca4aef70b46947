"""What the command modules share: the consoles, the common options, the settings and
database a command works on, the catalog, and how a refusal is printed."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape

from servelm.billing import accounts as acct
from servelm.catalog.models_file import ConfigError, load_catalog
from servelm.catalog.specs import Catalog
from servelm.config import Settings
from servelm.errors import ServelmError
from servelm.store.db import Database

console = Console()
err_console = Console(stderr=True)

# Help text is rich markup: a bracket would be read as a tag and vanish, so the
# environment variables and defaults go in parentheses (as ``serve``'s flags do).
ModelsFileOpt = Annotated[
    Path | None,
    typer.Option(
        help="Models file (TOML) (env: SERVELM_MODELS_FILE; default: ./servelm.toml if present)."
    ),
]
DataDirOpt = Annotated[
    Path | None,
    typer.Option(
        help="Data directory: database and models "
        "(env: SERVELM_DATA_DIR; default: ~/.local/share/servelm)."
    ),
]
DatabaseUrlOpt = Annotated[
    str | None,
    typer.Option(
        help="The database serve uses (env: SERVELM_DATABASE_URL; default: the SQLite file "
        "in the data directory)."
    ),
]


def print_rows(headers: list[str], rows: list[list[str]], title: str | None = None) -> None:
    """A table on a terminal; on a pipe or a file, tab-separated lines with nothing cut
    (a table squeezed into 80 columns would cut key ids that are meant to be pasted)."""
    if not console.is_terminal:
        print("\t".join(headers))
        for row in rows:
            print("\t".join(cell.replace("\n", " ") for cell in row))
        return
    from rich.table import Table

    table = Table(*headers, title=title)
    for row in rows:
        table.add_row(*row)
    console.print(table)


def models_file_option(given: Path | None) -> Path | None:
    if given is not None:
        return given
    local = Path("servelm.toml")
    return local if local.is_file() and "SERVELM_MODELS_FILE" not in os.environ else None


def load_catalog_or_exit(settings: Settings) -> Catalog:
    try:
        return load_catalog(settings.model_dir, settings.models_file)
    except ConfigError as exc:
        err_console.print(f"[red]error:[/] {exc}", highlight=False)
        raise typer.Exit(2) from exc


def settings_for(
    data_dir: Path | None, database_url: str | None, models_file: Path | None = None
) -> Settings:
    """The settings ``serve`` would read, with the command's flags winning."""
    return Settings.from_env(
        data_dir=data_dir, database_url=database_url, models_file=models_file_option(models_file)
    )


def open_db(settings: Settings) -> Database:
    """The database ``serve`` uses, migrated to the current schema."""
    db = Database(settings.db_url)
    db.upgrade()
    return db


def find_account_id(db: Database, ref: str) -> int:
    """An account given by id or name."""
    return acct.get_account(db, int(ref) if ref.isdigit() else ref).id


def fail(exc: ServelmError) -> typer.Exit:
    """Print a refusal in the operator's terms; the caller raises what it returns."""
    # Escaped: a message may quote "[plans.<name>]", which rich would take for a tag.
    err_console.print(f"[red]error:[/] {escape(exc.message)}", highlight=False)
    return typer.Exit(1)
