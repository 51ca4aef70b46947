"""``servelm bench``: load-test any OpenAI-compatible endpoint."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Annotated, Any

import typer

from servelm.cli.common import console, err_console


def _numbers(text: str | None, kind: type[int] | type[float]) -> list[Any]:
    return [kind(x) for x in text.split(",")] if text else []


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
    seed: Annotated[
        int,
        typer.Option(
            help="Multi-turn mode: seed of the conversations' text; a new one per run keeps "
            "a run from finding an earlier run's prompts cached."
        ),
    ] = 0,
    think_time: Annotated[
        float,
        typer.Option(
            help="Multi-turn mode: mean seconds between an answer and the next turn "
            "(exponential, from --seed); 0 sends the next turn at once."
        ),
    ] = 0.0,
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
            _numbers(concurrency, int)[:1] or [8], input_len, output_len, out, seed, think_time,
        )  # fmt: skip
        return

    from rich.progress import Progress
    from rich.table import Table

    from servelm.cli.loadgen import bench as bench_mod

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
                        on_done=functools.partial(progress.advance, task),
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
    seed: int,
    think_time: float,
) -> None:
    import asyncio
    import json

    from rich.table import Table

    from servelm.cli.loadgen import bench_turns

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
            seed=seed,
            think_time=think_time,
        )
    )
    table = Table("ok", "fail", "req/s", "TTFT turn 1 p50 ms", "TTFT turn ≥2 p50/p99 ms",
                  "turn ≥2 prompt cached", "E2E p50/p99 ms", "replica share")  # fmt: skip
    total = sum(r["replica_share"].values()) or 1
    table.add_row(
        str(r["completed"]),
        str(r["failed"]),
        f"{r['request_throughput']:.2f}",
        f"{r['ttft_first_turn_ms']['p50']:.0f}",
        f"{r['ttft_later_turns_ms']['p50']:.0f} / {r['ttft_later_turns_ms']['p99']:.0f}",
        f"{r['cached_share_later_turns']:.0%}",
        f"{r['e2e_ms']['p50']:.0f} / {r['e2e_ms']['p99']:.0f}",
        ", ".join(f"{url}: {n / total:.0%}" for url, n in r["replica_share"].items()) or "-",
    )
    console.print(table)
    for error in r["errors"]:
        err_console.print(f"[yellow]error seen:[/] {error}", highlight=False)
    if out is not None:
        out.write_text(json.dumps(r, indent=2))
        console.print(f"results written to {out}")
