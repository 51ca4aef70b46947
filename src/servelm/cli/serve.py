"""``servelm serve``: the gateway, and the first start's account and key."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from servelm.cli.common import ModelsFileOpt, console, err_console, models_file_option
from servelm.config import Settings
from servelm.models_file import ConfigError


def serve(
    host: Annotated[str, typer.Option(help="Interface to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port.")] = 8000,
    data_dir: Annotated[
        Path | None, typer.Option(help="Database and models directory [env: SERVELM_DATA_DIR].")
    ] = None,
    slots: Annotated[
        int | None, typer.Option(help="Parallel generation slots per model (continuous batching).")
    ] = None,
    threads: Annotated[int | None, typer.Option(help="CPU threads for the engine.")] = None,
    queue_size: Annotated[
        int | None, typer.Option(help="Requests that may wait per model before 503.")
    ] = None,
    workers: Annotated[
        int | None,
        typer.Option(help="Gateway processes sharing the port; local models load once."),
    ] = None,
    log_level: Annotated[str | None, typer.Option(help="debug, info, warning, error.")] = None,
    log_json: Annotated[
        bool, typer.Option("--log-json", help="One JSON object per log line.")
    ] = False,
    models_file: ModelsFileOpt = None,
) -> None:
    """Serve the chat API (Segmind: POST /v1/{model}; OpenAI: POST /v1/chat/completions)."""
    import uvicorn

    from servelm import logs
    from servelm.api.app import create_app
    from servelm.weights import default_model

    settings = Settings.from_env(
        host=host,
        port=port,
        data_dir=data_dir,
        slots=slots,
        threads=threads,
        queue_size=queue_size,
        workers=workers,
        log_level=log_level,
        log_json=log_json or None,
        models_file=models_file_option(models_file),
    )
    logs.setup(settings.log_level, settings.log_json)
    try:
        asgi = create_app(settings)
    except ConfigError as exc:
        err_console.print(f"[red]error:[/] {exc}", highlight=False)
        raise typer.Exit(2) from exc
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    try:
        default_model.ensure_default_model(settings.model_dir, verify=False)
    except default_model.FetchError as exc:
        err_console.print(f"[yellow]default model not available:[/] {exc}")
    _first_start(settings)
    if settings.workers > 1:
        # Hook (issue 15): several processes on one socket, local models in one of
        # their own (servelm.multiproc).
        from servelm import multiproc

        multiproc.serve(settings, settings.workers)
        return
    uvicorn.run(
        asgi,
        host=settings.host,
        port=settings.port,
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=10,
    )


def _first_start(settings: Settings) -> None:
    """On an empty database: a default account with starter credits, and its key,
    printed this once."""
    from rich.panel import Panel

    from servelm.billing.accounts import bootstrap
    from servelm.money import MICRO
    from servelm.store.db import Database

    db = Database(settings.db_url)
    db.upgrade()
    key = bootstrap(db, settings.starter_credits * MICRO)
    db.dispose()
    if key is None:
        return
    url = f"http://{settings.host}:{settings.port}"
    console.print(
        Panel(
            f"[bold]{key}[/]\n\nAccount 'default' has {settings.starter_credits} starter "
            "credits. This key is shown once; keep it.",
            title="servelm: your API key",
            expand=False,
        )
    )
    # Plain print: a terminal must not wrap the command inside a box.
    print(
        f"curl {url}/v1/smollm2-135m-instruct -H 'x-api-key: {key}' \\\n"
        """  -d '{"messages":[{"role":"user","content":"tell me a joke on cats"}]}'\n""",
        flush=True,
    )
