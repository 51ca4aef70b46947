"""``servelm worker``: one catalog model as a bare OpenAI-compatible engine, for
gateways to route to (servelm.engines.fleet); no accounts, no credits."""

from __future__ import annotations

import ipaddress
import math
from pathlib import Path
from typing import Annotated

import typer

from servelm.catalog.specs import DEFAULT_MODEL_SLUG
from servelm.cli.common import (
    ModelsFileOpt,
    err_console,
    load_catalog_or_exit,
    models_file_option,
)
from servelm.config import Settings, is_placeholder


def worker(
    model: Annotated[str, typer.Option(help="The catalog model to serve (slug or alias).")],
    port: Annotated[int, typer.Option(help="TCP port.")] = 8100,
    host: Annotated[
        str | None,
        typer.Option(
            help="Interface to listen on (default: 127.0.0.1); anything else "
            "must be given here, with an API key."
        ),
    ] = None,
    api_key: Annotated[
        str | None,
        typer.Option(
            envvar="SERVELM_WORKER_KEY", help="Key gateways must send (env: SERVELM_WORKER_KEY)."
        ),
    ] = None,
    data_dir: Annotated[
        Path | None, typer.Option(help="Models directory's parent (env: SERVELM_DATA_DIR).")
    ] = None,
    slots: Annotated[int | None, typer.Option(help="Parallel generation slots.")] = None,
    threads: Annotated[int | None, typer.Option(help="CPU threads for the engine.")] = None,
    queue_size: Annotated[
        int | None, typer.Option(help="Requests that may wait before 503.")
    ] = None,
    log_level: Annotated[str | None, typer.Option(help="debug, info, warning, error.")] = None,
    drain_seconds: Annotated[
        float | None,
        typer.Option(
            help="After SIGTERM, how long running requests may finish "
            "(env: SERVELM_DRAIN_SECONDS; default: 30)."
        ),
    ] = None,
    models_file: ModelsFileOpt = None,
) -> None:
    """Serve one model as a bare OpenAI-compatible engine for gateways to route to:
    /v1/chat/completions, /v1/models, /health, /metrics; no accounts, no credits."""
    import uvicorn

    from servelm.catalog.weights import default_model
    from servelm.engines.registry import build_engine
    from servelm.processes.lifecycle import SHUTDOWN_MARGIN
    from servelm.processes.worker import worker_app
    from servelm.telemetry import logs, tracing

    bind = host or "127.0.0.1"
    try:
        loopback = bind == "localhost" or ipaddress.ip_address(bind).is_loopback
    except ValueError:
        loopback = False
    if not loopback and not api_key:
        # A worker has no accounts: whoever reaches it generates for free.
        err_console.print(
            f"[red]error:[/] refusing to listen on {bind} without an API key; "
            "set --api-key or SERVELM_WORKER_KEY"
        )
        raise typer.Exit(2)
    if is_placeholder(api_key):
        # Copied from deploy/ or the docs: a key everyone who read them knows.
        err_console.print(
            "[red]error:[/] refusing to start: the worker key (--api-key or "
            "SERVELM_WORKER_KEY) is a placeholder from the deploy files or docs; set it "
            "to a secret of your own, and the same in the gateways' models file",
            highlight=False,
        )
        raise typer.Exit(2)
    settings = Settings.from_env(
        data_dir=data_dir,
        slots=slots,
        threads=threads,
        queue_size=queue_size,
        log_level=log_level,
        drain_seconds=drain_seconds,
        models_file=models_file_option(models_file),
    )
    logs.setup(settings.log_level, settings.json_logs)
    tracing.setup(settings, "servelm-worker")
    spec = load_catalog_or_exit(settings).get(model)
    if spec is None:
        err_console.print(f"[red]error:[/] no model '{model}' in the catalog")
        raise typer.Exit(2)
    if spec.slug == DEFAULT_MODEL_SLUG:
        try:
            default_model.ensure_default_model(settings.model_dir, verify=False)
        except default_model.FetchError as exc:
            err_console.print(f"[yellow]default model not available:[/] {exc}")
    asgi = worker_app(spec, build_engine(spec, settings), settings, api_key=api_key)
    # Streams running at SIGTERM get the drain window the deploy files size their
    # grace periods on (processes.lifecycle, which takes the signal); uvicorn's own
    # shutdown starts when that window is over, and gets only a margin on top of it.
    uvicorn.run(asgi, host=bind, port=port, log_config=None, access_log=False,
                timeout_graceful_shutdown=math.ceil(SHUTDOWN_MARGIN))  # fmt: skip
