"""Every file under deploy/ parses, and every servelm command line in it (and in
docs/deploy.md) names a real subcommand with real options; the models files load."""

from __future__ import annotations

import json
import math
import re
import shlex
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import typer.main
import yaml

# Typer carries its own copy of click; its parser is what `servelm` runs.
from typer._click.core import Command, Context
from typer._click.exceptions import UsageError
from typer.core import TyperGroup as Group

from servelm.api.services import front
from servelm.catalog.models_file import load_catalog
from servelm.cli import app
from servelm.processes.lifecycle import SHUTDOWN_MARGIN

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
    for path, replicas in zip(files, (2, 4), strict=True):
        spec = load_catalog(tmp_path, path).resolve("smollm2-135m-instruct")
        assert spec.engine == "openai" and len(spec.replicas) == replicas


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


# -- shutdown: grace periods and probes sized on the drain ------------------------------

# What a drain may take on top of SERVELM_DRAIN_SECONDS: the requests it stopped are
# settled (servelm.processes.lifecycle gives them up to 10 s).
SETTLE_SECONDS = 10
DEFAULT_DRAIN = 30.0


def _seconds(value: str | int | float) -> float:
    """Compose durations: "45s", "1m30s", or a number of seconds."""
    if isinstance(value, (int, float)):
        return float(value)
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|h|m|s)", value)
    assert parts and "".join(n + u for n, u in parts) == value, f"bad duration {value!r}"
    scale = {"h": 3600, "m": 60, "s": 1, "ms": 0.001}
    return sum(float(n) * scale[u] for n, u in parts)


def _drain(env: dict[str, str]) -> float:
    return float(env.get("SERVELM_DRAIN_SECONDS", DEFAULT_DRAIN))


def _role(command: list[str]) -> str:
    assert command[:1] == ["servelm"] and command[1] in ("serve", "worker"), command
    return command[1]


def test_compose_grace_periods_and_health_checks_follow_the_drain() -> None:
    services = yaml.safe_load((DEPLOY / "compose.yaml").read_text())["services"]
    roles = {}
    for name, svc in services.items():
        if svc.get("command", [None])[0] != "servelm":
            continue
        roles[name] = role = _role(svc["command"])
        drain = _drain(svc["environment"])
        # Docker's default (10 s) would kill a draining process mid-stream.
        grace = _seconds(svc["stop_grace_period"])
        assert grace >= drain + SETTLE_SECONDS, (name, grace, drain)
        probe = " ".join(svc["healthcheck"]["test"])
        # Gateways: healthy only when ready (database, a model able to serve).
        path = "/readyz" if role == "serve" else "/health"
        assert re.search(rf"http://127\.0\.0\.1:\d+{path}'", probe), (name, probe)
        assert _seconds(svc["healthcheck"]["start_period"]) >= 60, name
    assert sorted(roles.values()) == ["serve", "serve", "worker", "worker"]


def _k8s_pods() -> Iterator[tuple[str, dict[str, Any]]]:
    for path in sorted((DEPLOY / "k8s").glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc and doc["kind"] in ("Deployment", "StatefulSet"):
                yield f"{path.name}:{doc['metadata']['name']}", doc["spec"]["template"]["spec"]


def test_k8s_grace_periods_pre_stop_and_probes_follow_the_drain() -> None:
    roles = set()
    for where, pod in _k8s_pods():
        (container,) = pod["containers"]
        role = _role(container["command"])
        roles.add(role)
        env = {e["name"]: e["value"] for e in container["env"] if "value" in e}
        drain = _drain(env)
        pre_stop = container["lifecycle"]["preStop"]["exec"]["command"]
        assert pre_stop[0] == "sleep", where
        delay = float(pre_stop[1])
        # The load balancer stops sending before SIGTERM starts the drain.
        assert delay >= 5, where
        # The kubelet's clock includes the preStop: all of it must fit, with the
        # settlement of what the drain stopped.
        assert pod["terminationGracePeriodSeconds"] >= delay + drain + SETTLE_SECONDS, where
        probes = {k: container[k]["httpGet"]["path"] for k in
                  ("readinessProbe", "livenessProbe", "startupProbe")}  # fmt: skip
        if role == "serve":
            assert probes == {
                "readinessProbe": "/readyz",
                "livenessProbe": "/healthz",
                "startupProbe": "/healthz",
            }, where
        else:
            # A worker's /health is 503 while loading and draining: readiness, and
            # the startup probe that holds liveness off while weights load.
            assert probes["readinessProbe"] == probes["startupProbe"] == "/health", where
            assert probes["livenessProbe"] != "/health", where
        startup = container["startupProbe"]
        assert startup["periodSeconds"] * startup["failureThreshold"] >= 120, where
    assert roles == {"serve", "worker"}


@pytest.mark.parametrize(
    ("env", "flags", "expected"),
    [({}, [], 30), ({"SERVELM_DRAIN_SECONDS": "75"}, [], 75),
     ({"SERVELM_DRAIN_SECONDS": "75"}, ["--drain-seconds", "2.5"], 3)],
)  # fmt: skip
def test_a_worker_drains_for_the_configured_window(
    models_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    env: dict[str, str],
    flags: list[str],
    expected: int,
) -> None:
    """What the deploy files' grace periods are sized on reaches the worker's drain,
    which lets running streams finish that long after SIGTERM (it was a fixed 10 s);
    uvicorn's own shutdown, which starts when the drain is over, gets only a margin."""
    import uvicorn
    from typer.testing import CliRunner

    seen: dict[str, Any] = {}
    # Only the server's run is replaced: the command line, settings, catalog and
    # engine construction are the real ones.
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: seen.update(kw, app=app))
    for name in ("SERVELM_DRAIN_SECONDS", "SERVELM_WORKER_KEY", "SERVELM_MODELS_FILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("SERVELM_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("SERVELM_MODELS_DIR", str(models_dir))
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    result = CliRunner().invoke(app, ["worker", "--model", "smollm2-135m-instruct", *flags])
    assert result.exit_code == 0, result.output
    assert math.ceil(front(seen["app"]).lifecycle.drain_seconds) == expected
    assert seen["timeout_graceful_shutdown"] == math.ceil(SHUTDOWN_MARGIN)


# -- autoscaling: the manifest scales workers on metrics /metrics really exports ---------

SCALER = DEPLOY / "k8s" / "autoscaling" / "keda-workers.yaml"
SERIES = re.compile(r"(servelm_[a-z_]+)\{model=\"([^\"]+)\"\}")


def test_the_autoscaler_targets_the_workers_within_the_listed_replicas(tmp_path: Path) -> None:
    (scaler,) = yaml.safe_load_all(SCALER.read_text())
    assert scaler["kind"] == "ScaledObject"
    target = scaler["spec"]["scaleTargetRef"]
    workers = [
        d for d in yaml.safe_load_all((DEPLOY / "k8s" / "workers.yaml").read_text())
        if d["kind"] == "StatefulSet"
    ]  # fmt: skip
    assert (target["kind"], target["name"]) == ("StatefulSet", workers[0]["metadata"]["name"])
    # Without discovery the gateways reach only the listed workers.
    for doc in yaml.safe_load_all((DEPLOY / "k8s" / "secrets.yaml").read_text()):
        if "servelm.toml" in doc.get("stringData", {}):
            (tmp_path / "k8s.toml").write_text(doc["stringData"]["servelm.toml"])
    spec = load_catalog(tmp_path, tmp_path / "k8s.toml").resolve("smollm2-135m-instruct")
    lo, hi = scaler["spec"]["minReplicaCount"], scaler["spec"]["maxReplicaCount"]
    assert 1 <= lo <= workers[0]["spec"]["replicas"] <= hi <= len(spec.replicas)
    # The threshold is per worker: below its slots, so it scales before requests queue.
    (container,) = workers[0]["spec"]["template"]["spec"]["containers"]
    slots = int(container["command"][container["command"].index("--slots") + 1])
    for trigger in scaler["spec"]["triggers"]:
        assert trigger["type"] == "prometheus"
        assert 0 < float(trigger["metadata"]["threshold"]) <= slots
        assert SERIES.findall(trigger["metadata"]["query"]), trigger


def test_the_autoscaler_queries_series_that_gateways_and_workers_export(
    tmp_path: Path, models_dir: Path
) -> None:
    from servelm.catalog.specs import Catalog, ModelSpec
    from tests.conftest import make_settings, start_server
    from tests.fleet import fleetprocs
    from tests.servers import serve_in_thread
    from tests.support import instant_upstream

    (scaler,) = yaml.safe_load_all(SCALER.read_text())
    wanted = {s for t in scaler["spec"]["triggers"] for s in SERIES.findall(t["metadata"]["query"])}
    slug = "smollm2-135m-instruct"
    assert {model for _, model in wanted} == {slug}
    # A gateway relaying the model (as deploy/k8s's do) and a worker serving it.
    upstream = serve_in_thread(instant_upstream.make_app())
    remote = ModelSpec(slug=slug, engine="openai", replicas=[f"{upstream.base_url}/v1"])  # type: ignore[arg-type]
    gateway = start_server(make_settings(tmp_path, models_dir), Catalog([remote]))
    worker = fleetprocs.worker(tmp_path, models_dir).start()
    try:
        worker.wait_ready()
        exported = set()
        for url in (gateway.base_url, worker.url):
            text = httpx.get(f"{url}/metrics", timeout=10).text
            exported |= set(SERIES.findall(text))
    finally:
        worker.stop()
        gateway.stop()
        upstream.stop()
    assert wanted <= exported, wanted - exported


def test_a_gateway_counts_its_requests_in_flight_on_a_remote_model(tmp_path: Path) -> None:
    """The gateways' half of the signal: a stream held open at a replica is running."""
    from servelm.catalog.specs import Catalog, ModelSpec
    from tests.conftest import make_settings, start_server
    from tests.servers import serve_in_thread
    from tests.support import instant_upstream

    # One chunk every 0.2 s: the stream stays open while the test looks.
    upstream = serve_in_thread(instant_upstream.make_app(chunk_delay=0.2))
    spec = ModelSpec(slug="far", engine="openai", replicas=[f"{upstream.base_url}/v1"])  # type: ignore[arg-type]
    gateway = start_server(make_settings(tmp_path, tmp_path / "models"), Catalog([spec]))
    running = 'servelm_engine_running{model="far"} '

    def gauge() -> float:
        text = httpx.get(f"{gateway.base_url}/metrics", timeout=10).text
        (line,) = [x for x in text.splitlines() if x.startswith(running)]
        return float(line.removeprefix(running))

    try:
        assert gauge() == 0
        body = {"model": "far", "stream": True, "max_tokens": 200,
                "messages": [{"role": "user", "content": "hi"}]}  # fmt: skip
        with httpx.stream("POST", f"{gateway.base_url}/v1/chat/completions", json=body,
                          headers=gateway.headers(), timeout=30) as resp:  # fmt: skip
            assert resp.status_code == 200
            lines = resp.iter_lines()  # kept: a dropped iterator closes the response
            next(lines)  # the first chunk: the request is at the replica
            assert gauge() == 1
        deadline = time.monotonic() + 30
        while gauge() != 0:  # the hang-up reaches the relay
            assert time.monotonic() < deadline
            time.sleep(0.05)
    finally:
        gateway.stop()
        # The upstream would otherwise finish the abandoned stream before stopping.
        upstream.server.force_exit = True
        upstream.stop()
