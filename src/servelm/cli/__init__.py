"""The ``servelm`` command line: one module per group of commands."""

from __future__ import annotations

import typer

from servelm.cli import bench, billing, jobs, models, serve, worker

app = typer.Typer(
    name="servelm",
    help="A self-hosted serverless LLM API: Segmind and OpenAI chat dialects, "
    "API keys and prepaid credits, models run in-process by llama.cpp.",
    no_args_is_help=True,
    rich_markup_mode="rich",
)
app.command()(serve.serve)
app.command()(worker.worker)
app.command()(bench.bench)
app.add_typer(models.app, name="models")
app.add_typer(jobs.app, name="jobs")
billing.register(app)


def main() -> None:
    app()
