"""``servelm serve``: the gateway, and the first start's account and key."""

from __future__ import annotations

import inspect
import logging
import os
import sys
import types
import typing
from typing import Any

import typer

from servelm.catalog.models_file import ConfigError, load_catalog
from servelm.catalog.specs import Catalog
from servelm.cli import server_state
from servelm.cli.common import console, err_console, models_file_option
from servelm.config import Settings, default_text, is_placeholder

log = logging.getLogger(__name__)


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

    from servelm.api.app import create_app
    from servelm.catalog.weights import default_model
    from servelm.telemetry import logs, tracing

    if flags.get("models_file") is None:
        flags["models_file"] = models_file_option(None)
    settings = Settings.from_env(**flags)
    logs.setup(settings.log_level, settings.json_logs)
    if settings.workers <= 1:
        # With --workers, each worker turns it on in its own process (multiproc).
        tracing.setup(settings, "servelm-gateway")
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
        catalog = load_catalog(settings.model_dir, settings.models_file)
    except ConfigError as exc:
        err_console.print(f"[red]error:[/] {exc}", highlight=False)
        raise typer.Exit(2) from exc
    _refuse_placeholders(settings, catalog)
    asgi = create_app(settings, catalog)
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    try:
        default_model.ensure_default_model(settings.model_dir, verify=False)
    except default_model.FetchError as exc:
        err_console.print(f"[yellow]default model not available:[/] {exc}")
    _first_start(settings)
    # `servelm models list` finds this server by it, whatever port it was given.
    state = server_state.write(settings)
    try:
        _run(asgi, settings)
    finally:
        server_state.remove(state)


def _run(asgi: Any, settings: Settings) -> None:
    import uvicorn

    from servelm.api import conn_guard

    conn_guard.raise_fd_limit(settings.max_connections + 256)
    from servelm.api.services import front

    if settings.workers > 1:
        # Several processes on one socket, local models in one of their own
        # (servelm.processes.multiproc).
        from servelm.processes import multiproc

        multiproc.serve(settings, settings.workers)
        return
    config = uvicorn.Config(
        asgi,
        host=settings.host,
        port=settings.port,
        # Header time and size, connection caps (servelm.api.conn_guard).
        http=conn_guard.protocol_for(conn_guard.ConnLimits.from_settings(settings)),
        **conn_guard.uvicorn_options(settings),
    )
    server = uvicorn.Server(config)
    # SIGTERM drains first (servelm.processes.lifecycle), then tells uvicorn to stop.
    front(asgi).lifecycle.server = server
    server.run()


def _refuse_placeholders(settings: Settings, catalog: Catalog) -> None:
    """A secret left at the deploy files' placeholder is known to everyone who read
    them: refuse to start, naming every value to set."""
    found = settings.placeholder_secrets()
    for spec in catalog:
        keys = [spec.api_key, *(r.api_key for r in spec.replicas)]
        if any(is_placeholder(k) for k in keys):
            found.append(f"api_key of model {spec.slug} in {settings.models_file} (the worker key)")
    if found:
        err_console.print(
            "[red]error:[/] refusing to start: these hold a placeholder from the deploy "
            f"files or docs, set each to a secret of your own: {'; '.join(found)}",
            highlight=False,
            soft_wrap=True,
        )
        raise typer.Exit(2)


# Where the first start leaves the key when no terminal is there to show it.
FIRST_KEY_FILE = "first-api-key"


def _first_start(settings: Settings) -> None:
    """On an empty database: a default account with starter credits, and its key,
    shown this once: on the terminal, or where no terminal is (a container's log is
    read by many), in a file only this user can read, named in one log line."""
    from rich.panel import Panel

    from servelm.billing.accounts import bootstrap
    from servelm.billing.money import MICRO
    from servelm.store.db import Database

    db = Database(settings.db_url)
    db.upgrade()
    key = bootstrap(db, settings.starter_credits * MICRO)
    db.dispose()
    if key is None:
        return
    if not sys.stdout.isatty():
        path = settings.data_dir / FIRST_KEY_FILE
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as out:
            os.fchmod(fd, 0o600)  # the file may have been there with another mode
            out.write(key + "\n")
        log.warning(
            "first start: the API key of account 'default' (%d credits) is in %s, "
            "readable by this user only; keep it elsewhere and delete the file",
            settings.starter_credits,
            path,
        )
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
