"""``servelm models``: list the catalog, fetch the default model, pull weights."""

from __future__ import annotations

from typing import Annotated

import typer

from servelm.cli import server_state
from servelm.cli.common import (
    DataDirOpt,
    ModelsFileOpt,
    console,
    err_console,
    load_catalog_or_exit,
    models_file_option,
)
from servelm.config import Settings
from servelm.engines.registry import is_local

app = typer.Typer(help="List and fetch models.", no_args_is_help=True)


@app.command("fetch-default")
def fetch_default(
    data_dir: DataDirOpt = None,
) -> None:
    """Fetch SmolLM2-135M-Instruct (the default model) if it is missing, and verify it."""
    from servelm.catalog.weights import default_model

    settings = Settings.from_env(data_dir=data_dir)
    try:
        path = default_model.ensure_default_model(settings.model_dir)
    except default_model.FetchError as exc:
        err_console.print(f"[red]error:[/] {exc}")
        raise typer.Exit(1) from exc
    console.print(f"default model ready: {path}", soft_wrap=True)


@app.command("list")
def models_list(
    data_dir: DataDirOpt = None,
    models_file: ModelsFileOpt = None,
    url: Annotated[
        str | None,
        typer.Option(
            help="A running server to ask which models are loaded "
            "(default: the server `servelm serve` last started with this data directory, "
            "else SERVELM_HOST and SERVELM_PORT)."
        ),
    ] = None,
) -> None:
    """Every catalog entry: its state, where its weights are, and (from a running
    server) whether it is loaded, the memory it takes and, with SERVELM_ADMIN_TOKEN
    set, why a model is not."""
    import httpx
    from rich.table import Table

    settings = Settings.from_env(data_dir=data_dir, models_file=models_file_option(models_file))
    catalog = load_catalog_or_exit(settings)
    url = (url or server_state.running_url(settings) or server_url(settings)).rstrip("/")
    reasons: dict[str, str] = {}
    pool_states: dict[str, str] = {}
    try:
        live = httpx.get(f"{url}/health", timeout=1.0).json().get("models", {})
        if settings.admin_token:
            admin = httpx.get(
                f"{url}/admin/models",
                timeout=1.0,
                headers={"authorization": f"Bearer {settings.admin_token}"},
            )
            if admin.status_code == 200:
                data = admin.json()["data"]
                reasons = {m["id"]: m["reason"] for m in data if m["reason"]}
                # loaded / loading / unloaded / failed (engines.pool).
                pool_states = {m["id"]: m["state"] for m in data}
    except (httpx.HTTPError, ValueError):
        live = None
    table = Table(title="servelm models")
    for col in ("slug", "engine", "state", "weights", "context", "price in/out", "memory"):
        table.add_column(col, overflow="fold")
    hints: list[str] = []
    for spec in catalog:
        if not is_local(spec):
            state = "remote"
            where = "\n".join(r.url for r in spec.replicas) or spec.base_url or ""
        elif spec.path is not None and spec.path.is_file():
            state, where = "ready", str(spec.path)
        else:
            state, where = "[yellow]missing[/]", str(spec.path)
            hints.append(f"servelm models pull {spec.slug}")
        memory = "-"
        if live is not None:
            info = live.get(spec.slug)
            state = "[green]loaded[/]" if info else f"{state}, not loaded"
            if spec.slug in pool_states and not info:
                # Local models load at their first request: say which ones are
                # loading or unloaded rather than "not loaded".
                state = f"{state.split(',')[0]}, {pool_states[spec.slug]}"
            if info and info.get("replicas"):
                # A fleet: each replica's state and the requests this gateway has there
                # (/health lists them in the models file's order, without addresses).
                urls = [r.url for r in spec.replicas] or [spec.base_url or "?"]
                where = "\n".join(
                    f"{u} {r['state']}, {r['in_flight']} in flight"
                    for u, r in zip(urls, info["replicas"], strict=False)
                )
            if info and info.get("memory_bytes"):
                memory = f"{info['memory_bytes'] / 2**20:,.0f} MiB"
        table.add_row(
            spec.slug,
            spec.engine,
            state,
            where,
            f"{spec.context_window:,}",
            f"{spec.input_price}/{spec.output_price}",
            memory,
        )
    console.print(table)
    for slug, reason in reasons.items():
        console.print(f"{slug}: {reason}", highlight=False, soft_wrap=True)
    if hints:
        console.print("To install missing weights: " + "; ".join(hints))
    if live is None:
        console.print(
            f"no server answered at {url}; load state not shown. Start one with "
            "`servelm serve`, or point this command at yours with --url (or the "
            "SERVELM_PORT and SERVELM_DATA_DIR it was started with).",
            highlight=False,
            soft_wrap=True,
        )
    else:
        console.print(f"load state from the server at {url}", highlight=False)


def server_url(settings: Settings) -> str:
    """Where the server that reads these settings listens (a wildcard address is
    reached on loopback)."""
    return server_state.loopback_url(settings.host, settings.port)


@app.command("pull")
def models_pull(
    slug: Annotated[str, typer.Argument(help="The model's slug or alias.")],
    data_dir: DataDirOpt = None,
    models_file: ModelsFileOpt = None,
) -> None:
    """Download a model's GGUF weights from the Hugging Face Hub into the models dir."""
    from servelm.catalog.weights import hub

    settings = Settings.from_env(data_dir=data_dir, models_file=models_file_option(models_file))
    spec = load_catalog_or_exit(settings).get(slug)
    if spec is None:
        err_console.print(f"[red]error:[/] no model '{slug}' in the catalog")
        raise typer.Exit(2)
    try:
        paths = hub.pull(spec, settings.model_dir)
    except hub.PullError as exc:
        err_console.print(f"[red]error:[/] {exc}", highlight=False)
        raise typer.Exit(1) from exc
    for path in paths:
        console.print(f"{spec.slug}: {path}")
