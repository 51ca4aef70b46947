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

ModelsFileOpt = Annotated[
    Path | None,
    typer.Option(
        help="Models file (TOML) [env: SERVELM_MODELS_FILE; default: ./servelm.toml if present]."
    ),
]


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
