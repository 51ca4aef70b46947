"""What the command modules share: the consoles, the models-file option, the catalog."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from servelm.catalog.models_file import ConfigError, load_catalog
from servelm.catalog.specs import Catalog
from servelm.config import Settings

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
