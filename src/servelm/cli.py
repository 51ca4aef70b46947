"""The ``servelm`` command line."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from servelm.config import Settings

app = typer.Typer(
    name="servelm",
    help="A self-hosted serverless LLM API: Segmind and OpenAI chat dialects, "
    "API keys and prepaid credits, models run in-process by llama.cpp.",
    no_args_is_help=True,
    rich_markup_mode="rich",
)
models_app = typer.Typer(help="List and fetch models.", no_args_is_help=True)
app.add_typer(models_app, name="models")

console = Console()
err_console = Console(stderr=True)


@app.command()
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
    log_level: Annotated[str | None, typer.Option(help="debug, info, warning, error.")] = None,
    log_json: Annotated[
        bool, typer.Option("--log-json", help="One JSON object per log line.")
    ] = False,
) -> None:
    """Serve the chat API (Segmind: POST /v1/{model}; OpenAI: POST /v1/chat/completions)."""
    import uvicorn

    from servelm import bundled, logs
    from servelm.api.app import create_app

    settings = Settings.from_env(
        host=host,
        port=port,
        data_dir=data_dir,
        slots=slots,
        threads=threads,
        queue_size=queue_size,
        log_level=log_level,
        log_json=log_json or None,
    )
    logs.setup(settings.log_level, settings.log_json)
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    try:
        bundled.ensure_default_model(settings.model_dir, verify=False)
    except bundled.FetchError as exc:
        err_console.print(f"[yellow]default model not available:[/] {exc}")
    uvicorn.run(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=10,
    )


@models_app.command("fetch-default")
def fetch_default(
    data_dir: Annotated[Path | None, typer.Option(help="[env: SERVELM_DATA_DIR]")] = None,
) -> None:
    """Fetch SmolLM2-135M-Instruct (the default model) if it is missing, and verify it."""
    from servelm import bundled

    settings = Settings.from_env(data_dir=data_dir)
    try:
        path = bundled.ensure_default_model(settings.model_dir)
    except bundled.FetchError as exc:
        err_console.print(f"[red]error:[/] {exc}")
        raise typer.Exit(1) from exc
    console.print(f"default model ready: {path}")


def main() -> None:
    app()
