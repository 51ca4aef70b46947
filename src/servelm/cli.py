"""The ``servelm`` command line."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from servelm import cli_money
from servelm.catalog import DEFAULT_MODEL_SLUG, Catalog
from servelm.config import Settings
from servelm.models_file import ConfigError, load_catalog

app = typer.Typer(
    name="servelm",
    help="A self-hosted serverless LLM API: Segmind and OpenAI chat dialects, "
    "API keys and prepaid credits, models run in-process by llama.cpp.",
    no_args_is_help=True,
    rich_markup_mode="rich",
)
models_app = typer.Typer(help="List and fetch models.", no_args_is_help=True)
app.add_typer(models_app, name="models")
cli_money.register(app)

console = Console()
err_console = Console(stderr=True)

ModelsFileOpt = Annotated[
    Path | None,
    typer.Option(
        help="Models file (TOML) [env: SERVELM_MODELS_FILE; default: ./servelm.toml if present]."
    ),
]


def _models_file(given: Path | None) -> Path | None:
    if given is not None:
        return given
    local = Path("servelm.toml")
    return local if local.is_file() and "SERVELM_MODELS_FILE" not in os.environ else None


def _catalog(settings: Settings) -> Catalog:
    try:
        return load_catalog(settings.model_dir, settings.models_file)
    except ConfigError as exc:
        err_console.print(f"[red]error:[/] {exc}", highlight=False)
        raise typer.Exit(2) from exc


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
    models_file: ModelsFileOpt = None,
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
        models_file=_models_file(models_file),
    )
    logs.setup(settings.log_level, settings.log_json)
    try:
        asgi = create_app(settings)
    except ConfigError as exc:
        err_console.print(f"[red]error:[/] {exc}", highlight=False)
        raise typer.Exit(2) from exc
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    try:
        bundled.ensure_default_model(settings.model_dir, verify=False)
    except bundled.FetchError as exc:
        err_console.print(f"[yellow]default model not available:[/] {exc}")
    _first_start(settings)
    uvicorn.run(
        asgi,
        host=settings.host,
        port=settings.port,
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=10,
    )


@app.command()
def worker(
    model: Annotated[str, typer.Option(help="The catalog model to serve (slug or alias).")],
    port: Annotated[int, typer.Option(help="TCP port.")] = 8100,
    host: Annotated[
        str | None,
        typer.Option(
            help="Interface to listen on [default: 127.0.0.1]; anything else "
            "must be given here, with an API key."
        ),
    ] = None,
    api_key: Annotated[
        str | None,
        typer.Option(
            envvar="SERVELM_WORKER_KEY", help="Key gateways must send [env: SERVELM_WORKER_KEY]."
        ),
    ] = None,
    data_dir: Annotated[
        Path | None, typer.Option(help="Models directory's parent [env: SERVELM_DATA_DIR].")
    ] = None,
    slots: Annotated[int | None, typer.Option(help="Parallel generation slots.")] = None,
    threads: Annotated[int | None, typer.Option(help="CPU threads for the engine.")] = None,
    queue_size: Annotated[
        int | None, typer.Option(help="Requests that may wait before 503.")
    ] = None,
    log_level: Annotated[str | None, typer.Option(help="debug, info, warning, error.")] = None,
    models_file: ModelsFileOpt = None,
) -> None:
    """Serve one model as a bare OpenAI-compatible engine for gateways to route to:
    /v1/chat/completions, /v1/models, /health, /metrics; no accounts, no credits."""
    import ipaddress

    import uvicorn

    from servelm import bundled, logs
    from servelm.api.app import build_engine
    from servelm.worker import Worker

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
    settings = Settings.from_env(
        data_dir=data_dir,
        slots=slots,
        threads=threads,
        queue_size=queue_size,
        log_level=log_level,
        models_file=_models_file(models_file),
    )
    logs.setup(settings.log_level, settings.log_json)
    spec = _catalog(settings).get(model)
    if spec is None:
        err_console.print(f"[red]error:[/] no model '{model}' in the catalog")
        raise typer.Exit(2)
    if spec.slug == DEFAULT_MODEL_SLUG:
        try:
            bundled.ensure_default_model(settings.model_dir, verify=False)
        except bundled.FetchError as exc:
            err_console.print(f"[yellow]default model not available:[/] {exc}")
    asgi = Worker(spec, build_engine(spec, settings), api_key=api_key)
    uvicorn.run(asgi, host=bind, port=port, log_config=None, access_log=False,
                timeout_graceful_shutdown=10)  # fmt: skip


def _first_start(settings: Settings) -> None:
    """On an empty database: a default account with starter credits, and its key,
    printed this once."""
    from rich.panel import Panel

    from servelm.billing.accounts import bootstrap
    from servelm.catalog import MICRO
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
    console.print(f"default model ready: {path}", soft_wrap=True)


@models_app.command("list")
def models_list(
    data_dir: Annotated[Path | None, typer.Option(help="[env: SERVELM_DATA_DIR]")] = None,
    models_file: ModelsFileOpt = None,
    url: Annotated[
        str, typer.Option(help="A running server to ask which models are loaded.")
    ] = "http://127.0.0.1:8000",
) -> None:
    """Every catalog entry: its state, where its weights are, and (from a running
    server) whether it is loaded and the memory it takes."""
    import httpx
    from rich.table import Table

    settings = Settings.from_env(data_dir=data_dir, models_file=_models_file(models_file))
    catalog = _catalog(settings)
    try:
        live = httpx.get(f"{url}/health", timeout=1.0).json().get("models", {})
    except (httpx.HTTPError, ValueError):
        live = None
    table = Table(title="servelm models")
    for col in ("slug", "engine", "state", "weights", "context", "price in/out", "memory"):
        table.add_column(col, overflow="fold")
    hints: list[str] = []
    for spec in catalog:
        if spec.engine == "openai":
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
            if info and info.get("replicas"):
                # A fleet: each replica's state and the requests this gateway has there.
                where = "\n".join(
                    f"{r['url']} {r['state']}, {r['in_flight']} in flight" for r in info["replicas"]
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
    if hints:
        console.print("To install missing weights: " + "; ".join(hints))
    if live is None:
        console.print(f"[dim]no server answered at {url}; load state not shown[/]")


@models_app.command("pull")
def models_pull(
    slug: Annotated[str, typer.Argument(help="The model's slug or alias.")],
    data_dir: Annotated[Path | None, typer.Option(help="[env: SERVELM_DATA_DIR]")] = None,
    models_file: ModelsFileOpt = None,
) -> None:
    """Download a model's GGUF weights from the Hugging Face Hub into the models dir."""
    from servelm import pull

    settings = Settings.from_env(data_dir=data_dir, models_file=_models_file(models_file))
    spec = _catalog(settings).get(slug)
    if spec is None:
        err_console.print(f"[red]error:[/] no model '{slug}' in the catalog")
        raise typer.Exit(2)
    try:
        paths = pull.pull(spec, settings.model_dir)
    except pull.PullError as exc:
        err_console.print(f"[red]error:[/] {exc}", highlight=False)
        raise typer.Exit(1) from exc
    for path in paths:
        console.print(f"{spec.slug}: {path}")


def _numbers(text: str | None, kind: type[int] | type[float]) -> list[Any]:
    return [kind(x) for x in text.split(",")] if text else []


@app.command()
def bench(
    base_url: Annotated[
        str, typer.Argument(help="An OpenAI-compatible base URL, e.g. http://127.0.0.1:8000/v1")
    ],
    model: Annotated[str, typer.Option(help="Model name to send.")] = "smollm2-135m-instruct",
    api_key: Annotated[
        str | None, typer.Option(envvar="SERVELM_BENCH_API_KEY", help="Sent as a Bearer key.")
    ] = None,
    concurrency: Annotated[
        str | None, typer.Option(help="Closed-loop sweep, e.g. 1,16,64.")
    ] = None,
    rate: Annotated[
        str | None, typer.Option(help="Poisson request-rate sweep (per second), e.g. 5,20.")
    ] = None,
    requests: Annotated[int, typer.Option(help="Requests per point of the sweep.")] = 200,
    input_len: Annotated[int, typer.Option(help="Words of random prompt.")] = 128,
    output_len: Annotated[int, typer.Option(help="Output tokens asked for (ignore_eos).")] = 64,
    stream: Annotated[bool, typer.Option(help="Stream the responses (TTFT and ITL).")] = True,
    warmup: Annotated[int, typer.Option(help="Unmeasured requests before each point.")] = 2,
    out: Annotated[Path | None, typer.Option(help="Write all results to this JSON file.")] = None,
    conversations: Annotated[
        int | None,
        typer.Option(help="Multi-turn mode: this many conversations (see --turns)."),
    ] = None,
    turns: Annotated[int, typer.Option(help="Multi-turn mode: turns per conversation.")] = 4,
    system_tokens: Annotated[
        int, typer.Option(help="Multi-turn mode: words of system prompt.")
    ] = 1000,
    system_prompts: Annotated[
        int, typer.Option(help="Multi-turn mode: distinct system prompts, shared in turn.")
    ] = 1,
) -> None:
    """Load-test an OpenAI-compatible chat endpoint: request and token throughput,
    TTFT, TPOT, ITL and end-to-end latency (mean, p50, p90, p99), vLLM's definitions.
    With --conversations: multi-turn conversations, TTFT of later turns apart, and
    each replica's share when the endpoint is a servelm gateway."""
    import asyncio
    import json

    if conversations is not None:
        _bench_turns(
            base_url, model, api_key, conversations, turns, system_tokens, system_prompts,
            _numbers(concurrency, int)[:1] or [8], input_len, output_len, out,
        )  # fmt: skip
        return

    from rich.progress import Progress
    from rich.table import Table

    from servelm import bench as bench_mod

    loads = [bench_mod.Load(concurrency=c) for c in _numbers(concurrency, int)]
    loads += [bench_mod.Load(rate=r) for r in _numbers(rate, float)]
    if not loads:
        loads = [bench_mod.Load(concurrency=1)]
    url = base_url.rstrip("/") + "/chat/completions"
    results = []
    with Progress(console=err_console, transient=True) as progress:
        for load in loads:
            task = progress.add_task(load.label, total=requests)
            results.append(
                asyncio.run(
                    bench_mod.run(
                        url,
                        model=model,
                        load=load,
                        requests=requests,
                        input_len=input_len,
                        output_len=output_len,
                        stream=stream,
                        api_key=api_key,
                        warmup=warmup,
                        on_done=lambda task=task: progress.advance(task),
                    )
                )
            )
    table = Table("load", "ok", "fail", "req/s", "out tok/s", "TTFT p50/p99 ms",
                  "ITL p50/p99 ms", "E2E p50/p99 ms")  # fmt: skip
    for load, r in zip(loads, results, strict=True):
        table.add_row(
            load.label,
            str(r["completed"]),
            str(r["failed"]),
            f"{r['request_throughput']:.1f}",
            f"{r['output_throughput']:.0f}",
            f"{r['ttft_ms']['p50']:.2f} / {r['ttft_ms']['p99']:.2f}",
            f"{r['itl_ms']['p50']:.3f} / {r['itl_ms']['p99']:.3f}",
            f"{r['e2e_ms']['p50']:.2f} / {r['e2e_ms']['p99']:.2f}",
        )
    console.print(table)
    for r in results:
        for error in r["errors"]:
            err_console.print(f"[yellow]error seen:[/] {error}", highlight=False)
    if out is not None:
        out.write_text(json.dumps(results, indent=2))
        console.print(f"results written to {out}")


def _bench_turns(
    base_url: str,
    model: str,
    api_key: str | None,
    conversations: int,
    turns: int,
    system_tokens: int,
    system_prompts: int,
    concurrency: list[int],
    input_len: int,
    output_len: int,
    out: Path | None,
) -> None:
    import asyncio
    import json

    from rich.table import Table

    from servelm import bench_turns

    r = asyncio.run(
        bench_turns.run(
            base_url.rstrip("/") + "/chat/completions",
            model=model,
            conversations=conversations,
            turns=turns,
            system_tokens=system_tokens,
            system_prompts=system_prompts,
            input_len=input_len,
            output_len=output_len,
            concurrency=concurrency[0],
            api_key=api_key,
        )
    )
    table = Table("ok", "fail", "req/s", "TTFT turn 1 p50 ms", "TTFT turn ≥2 p50/p99 ms",
                  "E2E p50/p99 ms", "replica share")  # fmt: skip
    total = sum(r["replica_share"].values()) or 1
    table.add_row(
        str(r["completed"]),
        str(r["failed"]),
        f"{r['request_throughput']:.2f}",
        f"{r['ttft_first_turn_ms']['p50']:.0f}",
        f"{r['ttft_later_turns_ms']['p50']:.0f} / {r['ttft_later_turns_ms']['p99']:.0f}",
        f"{r['e2e_ms']['p50']:.0f} / {r['e2e_ms']['p99']:.0f}",
        ", ".join(f"{url}: {n / total:.0%}" for url, n in r["replica_share"].items()) or "-",
    )
    console.print(table)
    for error in r["errors"]:
        err_console.print(f"[yellow]error seen:[/] {error}", highlight=False)
    if out is not None:
        out.write_text(json.dumps(r, indent=2))
        console.print(f"results written to {out}")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
