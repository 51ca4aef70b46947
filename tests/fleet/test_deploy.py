"""Every file under deploy/ parses, and every servelm command line in it (and in
docs/deploy.md) names a real subcommand with real options; the models files load."""

from __future__ import annotations

import json
import re
import shlex
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import typer.main
import yaml

# Typer carries its own copy of click; its parser is what `servelm` runs.
from typer._click.core import Command, Context
from typer._click.exceptions import UsageError
from typer.core import TyperGroup as Group

from servelm.catalog.models_file import load_catalog
from servelm.cli import app

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"


def command_lines() -> Iterator[tuple[str, list[str]]]:
    """(where, argv) of every servelm command a deploy file runs."""
    for path in sorted(DEPLOY.rglob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            for argv in _commands(doc):
                yield str(path.relative_to(ROOT)), argv
    for line in (DEPLOY / "Dockerfile").read_text().splitlines():
        if line.startswith("CMD "):
            parts = [json.loads(line.removeprefix("CMD "))]
        else:
            parts = [shlex.split(p) for p in re.split(r"&&|\\", line.removeprefix("RUN "))]
        for words in parts:
            if words and words[0] == "servelm":
                yield "deploy/Dockerfile", words
    shell = False
    for line in (ROOT / "docs" / "deploy.md").read_text().splitlines():
        if line.startswith("```"):
            shell = line.strip() == "```sh"
        elif shell and line.strip().startswith("servelm "):
            yield "docs/deploy.md", shlex.split(line.split("#")[0].rstrip(" &"))


def _commands(node: Any) -> Iterator[list[str]]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("command", "CMD") and isinstance(value, list) and value[:1] == ["servelm"]:
                yield [str(v) for v in value]
            else:
                yield from _commands(value)
    elif isinstance(node, list):
        for item in node:
            yield from _commands(item)


def check_argv(argv: list[str]) -> None:
    group = typer.main.get_command(app)
    assert isinstance(group, Group)
    ctx = Context(group)
    command: Command = group
    args = argv[1:]
    while isinstance(command, Group):
        assert args, f"{argv}: no subcommand"
        sub = command.get_command(ctx, args[0])
        assert sub is not None, f"{argv}: no command '{args[0]}'"
        command, args = sub, args[1:]
    # Parsing checks option names, values of the right type, and argument counts.
    command.make_context(command.name or "", list(args), resilient_parsing=False)


ALL = list(command_lines())


def test_deploy_files_run_servelm_commands() -> None:
    where = {w for w, _ in ALL}
    assert {"deploy/compose.yaml", "deploy/k8s/gateway.yaml", "deploy/k8s/workers.yaml"} <= where
    assert {argv[1] for _, argv in ALL} >= {"serve", "worker"}


@pytest.mark.parametrize(("where", "argv"), ALL, ids=[f"{w}:{' '.join(a[1:3])}" for w, a in ALL])
def test_each_command_exists_with_those_flags(where: str, argv: list[str]) -> None:
    check_argv(argv)


def test_a_made_up_flag_is_caught() -> None:
    with pytest.raises(UsageError):
        check_argv(["servelm", "worker", "--model", "x", "--replicas", "3"])
    with pytest.raises(AssertionError):
        check_argv(["servelm", "gateway"])


def test_the_models_files_load(tmp_path: Path) -> None:
    files = [DEPLOY / "servelm.toml"]
    for doc in yaml.safe_load_all((DEPLOY / "k8s" / "secrets.yaml").read_text()):
        if "servelm.toml" in doc.get("stringData", {}):
            path = tmp_path / "k8s.toml"
            path.write_text(doc["stringData"]["servelm.toml"])
            files.append(path)
    assert len(files) == 2
    for path in files:
        spec = load_catalog(tmp_path, path).resolve("smollm2-135m-instruct")
        assert spec.engine == "openai" and len(spec.replicas) == 2


def test_compose_wires_gateways_to_workers() -> None:
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    services = compose["services"]
    assert {"gateway-1", "gateway-2", "worker-1", "worker-2", "postgres", "redis"} <= set(services)
    toml = (DEPLOY / "servelm.toml").read_text()
    for name in ("worker-1", "worker-2"):
        assert f"http://{name}:8100/v1" in toml
    # The commented GPU services carry the exact vllm command lines.
    text = (DEPLOY / "compose.yaml").read_text()
    assert "vllm serve meta-llama/Llama-3.1-8B-Instruct" in text
    assert re.search(
        r"vllm serve mistralai/Mixtral-8x7B-Instruct-v0.1 .*--tensor-parallel-size 2", text
    )
