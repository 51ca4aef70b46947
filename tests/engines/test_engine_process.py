"""Each loaded llama.cpp model runs in a process of its own (``engines.llamacpp_process``):
closing the engine ends it; a process that dies while loaded (killed here, as the OOM
killer would) costs its requests nothing and the model loads again at the next one;
and a gateway killed outright leaves no model process behind."""

from __future__ import annotations

import os
import shutil
import signal
import threading
import time
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest

from servelm.api.services import services
from servelm.billing import accounts, audit
from servelm.billing.money import MICRO
from servelm.catalog.models_file import load_catalog
from servelm.catalog.specs import ModelSpec
from servelm.engines.llamacpp import LlamaCppEngine
from servelm.engines.pool import ModelPool
from servelm.errors import ModelUnavailable
from servelm.store.db import Database
from tests import procs
from tests.conftest import LiveServer, make_settings, provision, start_server

SLUG = "k"
CREDITS = 1000


def ended(pid: int) -> bool:
    """Whether the process is gone: reaped, or a zombie its new parent has not reaped
    yet (it holds no memory)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] == "Z"


def reaped(pid: int) -> bool:
    return not Path(f"/proc/{pid}").exists()


def wait_for(predicate: Any, what: str, limit: float = 30.0) -> None:
    """Poll until true; the limit only bounds a broken run."""
    end = time.monotonic() + limit
    while not predicate():
        assert time.monotonic() < end, what
        time.sleep(0.02)


def models_file(tmp: Path, seed_models: dict[str, Path]) -> Path:
    path = shutil.copy(seed_models["llama-v3p1-8b-instruct"], tmp / f"{SLUG}.gguf")
    out = tmp / "servelm.toml"
    out.write_text(
        f'[models.{SLUG}]\npath = "{path}"\ncontext_window = 4096\nmax_output_tokens = 1024\n'
        'keep_alive = "10m"\ninput_price = 1000\noutput_price = 2000\n'
        "\n[models.smollm2-135m-instruct]\nenabled = false\n"
    )
    return out


@pytest.fixture(scope="module")
def server(
    seed_models: dict[str, Path], models_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LiveServer]:
    tmp = tmp_path_factory.mktemp("engine-process")
    path = models_file(tmp, seed_models)
    settings = make_settings(tmp, models_dir, slots=2, models_file=path)
    srv = start_server(settings, load_catalog(models_dir, path), credits=CREDITS)
    yield srv
    srv.stop()


def pool(srv: LiveServer) -> ModelPool:
    models: ModelPool = services(srv.app).models
    return models


def engine(srv: LiveServer) -> LlamaCppEngine:
    loaded = pool(srv).engines[SLUG]
    assert isinstance(loaded, LlamaCppEngine)
    return loaded


def ask(srv: LiveServer) -> httpx.Response:
    body = {"model": SLUG, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    return httpx.post(f"{srv.v1}/chat/completions", json=body, headers=srv.headers(), timeout=60)


def money(srv: LiveServer) -> tuple[int, int]:
    """The test account's balance and what it holds, in micro-credits."""
    key = accounts.find_key(srv.db, srv.api_key.split("_")[1])
    assert key is not None
    account = accounts.get_account(srv.db, key.account_id)
    return account.balance, account.held


def cost(r: httpx.Response) -> int:
    """What the answer says it cost, in micro-credits."""
    return int(Decimal(r.headers["x-cost"]) * MICRO)


def metric(srv: LiveServer, line_start: str) -> float:
    text = httpx.get(f"{srv.base_url}/metrics", timeout=10).text
    values = [float(line.split()[-1]) for line in text.splitlines() if line.startswith(line_start)]
    return sum(values)


async def test_close_ends_the_models_process_and_a_failed_load_says_why(
    seed_models: dict[str, Path], tmp_path: Path
) -> None:
    spec = ModelSpec(slug="solo", path=seed_models["llama-v3p1-8b-instruct"], context_window=2048)
    solo = LlamaCppEngine(spec, threads=1, slots=1, queue_size=1)
    await solo.start()
    pid = solo.pid
    assert pid is not None and solo.alive() and not ended(pid)
    assert (await solo.metrics())["n_decode_total"] == 0.0
    await solo.close()
    # Reaped by close itself: not even a zombie is left.
    assert reaped(pid) and not solo.alive() and solo.pid is None

    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"GGUF" + b"\0" * 64)
    bad = LlamaCppEngine(
        ModelSpec(slug="broken", path=broken, context_window=512), threads=1, slots=1, queue_size=1
    )
    with pytest.raises(ModelUnavailable) as failed:
        await bad.start()
    # The process's exit and its last words on stderr (xllamacpp's exception).
    assert "exit status 1" in failed.value.message and "RuntimeError" in failed.value.message
    assert str(broken) in failed.value.message and not bad.alive()


def test_a_killed_model_process_is_loaded_again_at_the_next_request(server: LiveServer) -> None:
    first = ask(server)
    assert first.status_code == 200, first.text
    dead = engine(server)
    pid = dead.pid
    assert pid is not None
    os.kill(pid, signal.SIGKILL)  # what the OOM killer does
    wait_for(lambda: not dead.alive(), "the engine never saw its process end")
    assert dead.describe()["loaded"] is False

    again = ask(server)
    assert again.status_code == 200, again.text
    assert "x-servelm-cold-start-ms" in again.headers  # it waited for a load
    reloaded = engine(server)
    assert reloaded is not dead and reloaded.pid not in (None, pid) and reloaded.alive()
    assert metric(server, f'servelm_model_unloads_total{{model="{SLUG}",reason="died"}}') == 1
    assert metric(server, f'servelm_model_loads_total{{model="{SLUG}",outcome="ok"}}') == 2
    paid = sum(cost(r) for r in (first, again))
    assert paid > 0
    assert money(server) == (CREDITS * MICRO - paid, 0)
    assert audit.ledger_check(server.db) == []


def test_a_request_whose_model_process_dies_gets_a_503_and_pays_nothing(
    server: LiveServer,
) -> None:
    """The process stopped (SIGSTOP) so that the request is certainly in flight on it,
    then killed: the client hears to retry, not an engine error, and pays nothing;
    the next request loads the model again."""
    assert ask(server).status_code == 200
    before = money(server)
    unloads = metric(server, f'servelm_model_unloads_total{{model="{SLUG}",reason="died"}}')
    pid = engine(server).pid
    assert pid is not None
    answers: list[httpx.Response] = []
    body = {
        "model": SLUG,
        "messages": [{"role": "user", "content": "tell me a story"}],
        "max_tokens": 64,
        "stream": True,
    }

    def call() -> None:
        with httpx.stream(
            "POST", f"{server.v1}/chat/completions", json=body, headers=server.headers(), timeout=60
        ) as r:
            r.read()
            answers.append(r)

    os.kill(pid, signal.SIGSTOP)
    caller = threading.Thread(target=call)
    try:
        caller.start()
        wait_for(lambda: pool(server).describe(SLUG)["in_flight"] == 1, "the request never began")
    finally:
        os.kill(pid, signal.SIGKILL)
    caller.join(60)
    (cut,) = answers
    assert cut.status_code == 503, cut.text
    assert cut.json()["error"]["code"] == "model_unavailable"
    assert "killed by SIGKILL" in cut.json()["error"]["message"]
    assert cut.headers["retry-after"] == "1"
    wait_for(lambda: money(server)[1] == 0, "the request's hold stayed open")
    assert money(server) == before
    again = ask(server)
    assert again.status_code == 200 and "x-servelm-cold-start-ms" in again.headers
    assert money(server) == (before[0] - cost(again), 0)
    assert (
        metric(server, f'servelm_model_unloads_total{{model="{SLUG}",reason="died"}}')
        == unloads + 1
    )
    assert audit.ledger_check(server.db) == []


def test_a_gateway_killed_outright_leaves_no_model_process(
    seed_models: dict[str, Path], models_dir: Path, tmp_path: Path
) -> None:
    db_url = f"sqlite:///{tmp_path / 'servelm.db'}"
    env = procs.gateway_env(
        tmp_path,
        models_dir,
        SERVELM_MODELS_FILE=str(models_file(tmp_path, seed_models)),
        SERVELM_DATABASE_URL=db_url,
    )
    (gw,) = procs.start(env, tmp_path / "logs", 1)
    try:
        db = Database(db_url)
        key = provision(db, "killed", 10)
        db.dispose()
        body = {"model": SLUG, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
        r = httpx.post(
            f"{gw.base_url}/v1/chat/completions",
            json=body,
            headers={"x-api-key": key},
            timeout=60,
        )
        assert r.status_code == 200, r.text
        children = _children(gw.proc.pid)
        assert len(children) == 1, children  # the one model's process
        gw.kill()
        wait_for(lambda: all(ended(pid) for pid in children), "a model process outlived it")
    finally:
        gw.stop()


def _children(pid: int) -> list[int]:
    """The processes ``pid`` started, from any of its threads."""
    tasks = Path(f"/proc/{pid}/task")
    return [int(c) for task in tasks.iterdir() for c in (task / "children").read_text().split()]


def test_a_worker_whose_model_process_died_says_it_is_not_healthy(
    tmp_path: Path, models_dir: Path
) -> None:
    """``servelm worker`` keeps its one model: once that model's process is gone it
    can serve nothing, and its ``/health`` says so (gateways' checks and readiness
    probes take it out of rotation)."""
    from tests.fleet import fleetprocs

    worker = fleetprocs.worker(tmp_path, models_dir).start()
    try:
        worker.wait_ready()
        assert worker.proc is not None
        (child,) = _children(worker.proc.pid)
        os.kill(child, signal.SIGKILL)
        wait_for(
            lambda: httpx.get(f"{worker.url}/health", timeout=10).status_code == 503,
            "the worker still says it is healthy",
        )
        health = httpx.get(f"{worker.url}/health", timeout=10).json()
        assert health["status"] == "engine stopped", health
        body = {"model": fleetprocs.SLUG, "messages": [{"role": "user", "content": "hi"}]}
        r = httpx.post(f"{worker.url}/v1/chat/completions", json=body, timeout=30)
        assert r.status_code == 503 and r.json()["error"]["code"] == "model_unavailable", r.text
    finally:
        worker.stop()
