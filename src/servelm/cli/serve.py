"""``servelm serve``: the gateway, and the first start's account and key."""

from __future__ import annotations

import inspect
import types
import typing
from typing import Any

import typer

from servelm.cli.common import console, err_console, models_file_option
from servelm.config import Settings, default_text
from servelm.models_file import ConfigError


def _flag_type(annotation: Any) -> Any:
    """The flag's type for a settings field: None dropped (an unset flag is None),
    lists of hosts as the same comma-separated text the environment variable takes."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) is typing.Annotated:
        return _flag_type(args[0])
    if args and typing.get_origin(annotation) in (types.UnionType, typing.Union):
        return _flag_type(args[0])
    if typing.get_origin(annotation) is tuple:
        return str
    return annotation


def settings_flags() -> list[inspect.Parameter]:
    """One ``servelm serve`` flag per ``Settings`` field, named after it, with the
    field's description and its environment variable: flags and variables cannot
    drift apart because both come from the one class."""
    params = []
    for name, field in Settings.model_fields.items():
        kind = _flag_type(field.annotation)
        flag = "--" + name.replace("_", "-")
        decls = [f"{flag}/--no-{flag[2:]}"] if kind is bool else [flag]
        text = field.description or ""
        default = default_text(name)
        option = typer.Option(
            *decls,
            # Parentheses, not brackets: rich would read [env: ...] as markup.
            help=f"{text[:1].upper()}{text[1:]} (env: SERVELM_{name.upper()}"
            f"{'' if default is None else '; default: ' + default})",
            show_default=False,
        )
        params.append(
            inspect.Parameter(
                name,
                inspect.Parameter.KEYWORD_ONLY,
                annotation=typing.Annotated[kind | None, option],
                default=None,
            )
        )
    return params


def serve(**flags: Any) -> None:
    """Serve the chat API (Segmind: POST /v1/{model}; OpenAI: POST /v1/chat/completions)."""
    import uvicorn

    from servelm import conn_guard, logs
    from servelm.api.app import create_app
    from servelm.weights import default_model

    if flags.get("models_file") is None:
        flags["models_file"] = models_file_option(None)
    settings = Settings.from_env(**flags)
    logs.setup(settings.log_level, settings.json_logs)
    if settings.workers > 1 and not settings.redis_url:
        # Each worker would count rate limits on its own (N times the limit) and keep
        # serving a key revoked through another worker until its cache expired.
        err_console.print(
            "[red]error:[/] --workers above 1 needs --redis-url (SERVELM_REDIS_URL): the "
            "workers share rate limits and key revocations through Redis",
            highlight=False,
        )
        raise typer.Exit(2)
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
    conn_guard.raise_fd_limit(settings.max_connections + 256)
    if settings.workers > 1:
        # Several processes on one socket, local models in one of their own
        # (servelm.multiproc).
        from servelm import multiproc

        multiproc.serve(settings, settings.workers)
        return
    config = uvicorn.Config(
        asgi,
        host=settings.host,
        port=settings.port,
        # Header time and size, connection caps (servelm.conn_guard).
        http=conn_guard.protocol_for(conn_guard.ConnLimits.from_settings(settings)),
        **conn_guard.uvicorn_options(settings),
    )
    server = uvicorn.Server(config)
    # SIGTERM drains first (servelm.lifecycle), then tells uvicorn to stop.
    asgi.state.lifecycle.server = server
    server.run()


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


serve.__signature__ = inspect.Signature(settings_flags())  # type: ignore[attr-defined]
