"""Serverless local models (issue 27) with the real engine: five copies of the tiny
Llama 3.1 GGUF (8.2 MB each; with the f16 KV cache for a 131,072-token window and the
model's process the estimated footprint is about 67 MB) behind a memory budget that
fits two of them.
One server for the module; the tests run in order and each says what it expects of
the models' state before it starts."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from servelm.api.services import services
from servelm.catalog.models_file import load_catalog
from servelm.engines.llamacpp import LlamaCppEngine, footprint
from servelm.engines.pool import Lease, ModelPool
from tests import procs
from tests.conftest import ADMIN_TOKEN, LiveServer, make_settings, start_server

SLUGS = ("a", "b", "c", "d")
IDLE = "e"  # keep_alive of one second
CONTEXT = 131072


def rss() -> int:
    """Resident memory of this process (the server runs in a thread of it) and of the
    processes below it: each loaded model's."""
    return procs.tree_rss(os.getpid())


@pytest.fixture(scope="module")
def pool_server(
    seed_models: dict[str, Path], models_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[LiveServer, int]]:
    tmp = tmp_path_factory.mktemp("serverless")
    entries = []
    for slug in (*SLUGS, IDLE):
        # Separate files: a mapping of one shared file would be counted once.
        path = shutil.copy(seed_models["llama-v3p1-8b-instruct"], tmp / f"{slug}.gguf")
        keep = "1" if slug == IDLE else '"10m"'
        entries.append(
            f'[models.{slug}]\npath = "{path}"\ncontext_window = {CONTEXT}\n'
            f"max_output_tokens = 1024\nkeep_alive = {keep}\n"
        )
    models_file = tmp / "servelm.toml"
    # The default model stays out: only these five count against the budget.
    models_file.write_text(
        "\n".join(entries) + "\n[models.smollm2-135m-instruct]\nenabled = false\n"
    )
    catalog = load_catalog(models_dir, models_file)
    each = footprint(catalog.resolve("a"))
    assert each is not None and each > 40_000_000
    settings = make_settings(
        tmp,
        models_dir,
        slots=2,
        models_file=models_file,
        model_memory=str(each * 5 // 2),
        admin_token=ADMIN_TOKEN,
    )
    srv = start_server(settings, catalog)
    yield srv, each
    srv.stop()


def ask(srv: LiveServer, slug: str, timeout: float | None = None, **kw: Any) -> httpx.Response:
    headers = srv.headers()
    if timeout is not None:
        headers["x-request-timeout"] = str(timeout)
    body = {"model": slug, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, **kw}
    return httpx.post(f"{srv.v1}/chat/completions", json=body, headers=headers, timeout=120)


def states(srv: LiveServer) -> dict[str, str]:
    r = httpx.get(f"{srv.v1}/models", headers=srv.headers(), timeout=10)
    return {m["id"]: m["state"] for m in r.json()["data"]}


def pool(srv: LiveServer) -> ModelPool:
    models: ModelPool = services(srv.app).models
    return models


def on_server_loop(srv: LiveServer, coro: Any) -> Any:
    return asyncio.run_coroutine_threadsafe(coro, services(srv.app).loop).result(60)


def wait_for(predicate: Any, what: str, limit: float = 30.0) -> None:
    """Poll until true; the limit only bounds a broken run."""
    end = time.monotonic() + limit
    while not predicate():
        assert time.monotonic() < end, what
        time.sleep(0.05)


def test_nothing_loads_before_its_first_request_which_says_it_paid_a_cold_start(
    pool_server: tuple[LiveServer, int],
) -> None:
    srv, _ = pool_server
    assert set(states(srv).values()) == {"unloaded"}
    first = ask(srv, "a")
    assert first.status_code == 200, first.text
    assert int(first.headers["x-servelm-cold-start-ms"]) >= 0
    assert states(srv)["a"] == "loaded"
    warm = ask(srv, "a")
    assert warm.status_code == 200 and "x-servelm-cold-start-ms" not in warm.headers
    metrics = httpx.get(f"{srv.base_url}/metrics", timeout=10).text
    assert 'servelm_model_loads_total{model="a",outcome="ok"} 1.0' in metrics
    assert 'servelm_model_load_duration_seconds_count{model="a"} 1.0' in metrics


def test_models_list_says_which_models_are_loaded(
    pool_server: tuple[LiveServer, int],
) -> None:
    srv, _ = pool_server
    assert states(srv)["a"] == "loaded" and states(srv)[IDLE] == "unloaded"
    env = procs.gateway_env(
        srv.settings.data_dir,
        srv.settings.model_dir,
        SERVELM_ADMIN_TOKEN=ADMIN_TOKEN,
        COLUMNS="200",
    )
    models_file = str(srv.settings.models_file)
    listed = procs.cli(env, "models", "list", "--models-file", models_file, "--url", srv.base_url)
    assert listed.returncode == 0, listed.stderr
    rows = {line.split()[1]: line for line in listed.stdout.splitlines() if line.count("│") > 3}
    assert "loaded" in rows["a"] and "ready, unloaded" in rows[IDLE], listed.stdout


def test_console_pages_show_each_models_state_memory_and_the_budget(
    pool_server: tuple[LiveServer, int],
) -> None:
    """The operator's page: each model's state, estimated memory and keep-alive, and
    what the loaded ones take of the budget; the public model page: whether the model
    is loaded or loads at its next request."""
    from tests.console.conftest import operator_client

    srv, each = pool_server
    assert states(srv)["a"] == "loaded" and states(srv)["b"] == "unloaded"
    mib = 1 << 20
    op = operator_client(srv)
    try:
        page = op.get("/operator").text
    finally:
        op.close()
    assert '<tr data-model="a" data-state="loaded">' in page, page
    assert '<tr data-model="b" data-state="unloaded">' in page
    assert page.count(f"{each / mib:,.1f} MiB</td>") == 5, page  # a..e, one row each
    assert f'id="memory-in-use">{each / mib:,.1f} MiB<' in page  # a alone
    assert f'id="memory-budget-bytes">{each * 5 // 2 / mib:,.1f} MiB<' in page
    assert 'id="memory-loaded">1<' in page
    assert "<td>1 s</td>" in page and "<td>600 s</td>" in page  # e's keep-alive, a's
    loaded = httpx.get(f"{srv.base_url}/models/a", timeout=10).text
    assert '<td id="model-state">Available: loaded</td>' in loaded
    cold = httpx.get(f"{srv.base_url}/models/b", timeout=10).text
    assert "Available: unloaded, loads at its next request" in cold


def test_a_budget_for_two_serves_four_models_evicting_the_least_recently_used(
    pool_server: tuple[LiveServer, int],
) -> None:
    """Four clients, each calling the four models in a different order. Every request
    is served; what the pool holds, sampled every 100 ms, never passes the budget (two
    models), and neither does the RSS of this process and its children (the models'
    processes) over the same samples (this process also holds the clients)."""
    srv, each = pool_server
    models = pool(srv)
    samples: list[int] = []
    held: list[int] = []
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.1):
            samples.append(rss())
            held.append(models.memory_in_use())

    results: list[int] = []
    lock = threading.Lock()

    def client(order: tuple[str, ...]) -> None:
        for slug in order:
            code = ask(srv, slug).status_code
            with lock:
                results.append(code)

    orders = [SLUGS, SLUGS[::-1], SLUGS[1:] + SLUGS[:1], SLUGS[2:] + SLUGS[:2]]

    def run() -> None:
        threads = [threading.Thread(target=client, args=(o,)) for o in orders]
        for t in threads:
            t.start()
        for t in threads:
            t.join(300)

    # A first round grows what four client threads and the server's allocator keep
    # in this process whatever the models; then two models loaded is the baseline.
    run()
    for slug in ("a", "b"):
        assert ask(srv, slug).status_code == 200
    two_loaded = rss()
    sampler = threading.Thread(target=sample)
    sampler.start()
    run()
    done.set()
    sampler.join()
    assert results == [200] * 32, results
    loaded = [s for s, st in states(srv).items() if st == "loaded"]
    assert len(loaded) <= 2, loaded
    metrics = httpx.get(f"{srv.base_url}/metrics", timeout=10).text
    assert 'reason="evicted"' in metrics
    peak = max(samples)
    print(f"RSS with two loaded {two_loaded:,} B, peak {peak:,} B over {len(samples)} samples")
    assert max(held) <= 2 * each and models.budget == each * 5 // 2, max(held)
    # Issue 27.1's bound: the RSS with two models loaded plus 10 %. This process also
    # holds whatever the tests before it grew (the suite runs files in a few
    # processes), so the 10 % can be more than a model: the growth must also stay
    # below one more model's footprint (an unloaded model's process has ended by
    # the time the next load starts: pool._unload), i.e. a third model was never
    # resident.
    assert peak <= two_loaded * 1.10 and peak - two_loaded < each, (two_loaded, peak, each)


def test_a_model_in_use_is_not_evicted_and_a_load_that_needs_it_waits(
    pool_server: tuple[LiveServer, int],
) -> None:
    """Two models held in flight fill the budget: a request for a third gets a 503
    saying it waited for memory when its own (short) deadline passes; once one of the
    two is released the third loads in its place, the other one untouched."""
    srv, _ = pool_server
    models = pool(srv)
    catalog = services(srv.app).catalog
    held: list[Lease] = [
        on_server_loop(srv, models.acquire(catalog.resolve(s))) for s in ("a", "b")
    ]
    try:
        refused = ask(srv, "c", timeout=1)
        assert refused.status_code == 503, refused.text
        assert "waiting for memory" in refused.json()["error"]["message"]
        assert states(srv)["a"] == "loaded" and states(srv)["b"] == "loaded"
    finally:
        services(srv.app).loop.call_soon_threadsafe(held[0].release)
    served = ask(srv, "c")
    assert served.status_code == 200, served.text
    assert "x-servelm-cold-start-ms" in served.headers
    now = states(srv)
    assert now["a"] == "unloaded" and now["b"] == "loaded" and now["c"] == "loaded"
    services(srv.app).loop.call_soon_threadsafe(held[1].release)


@contextlib.contextmanager
def paused(models: ModelPool, slug: str) -> Iterator[None]:
    """The model's llama.cpp process stopped (SIGSTOP) for the block: a request on it
    stays in flight, unfinished, however fast the tiny model would have answered it
    (it would have, before the test could look: generation has a process of its own)."""
    engine = models.engines[slug]
    assert isinstance(engine, LlamaCppEngine) and engine.pid is not None
    pid = engine.pid
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(pid, signal.SIGCONT)


class Stream(threading.Thread):
    """A long streamed request to ``slug`` on a thread of its own: whether it ended
    properly (a finish reason, no error event) and when (``order``)."""

    def __init__(self, srv: LiveServer, slug: str, order: list[str]) -> None:
        super().__init__()
        self.srv, self.slug, self.order = srv, slug, order
        self.status: int | None = None
        self.finish: str | None = None
        self.chunks = 0
        self.errors: list[object] = []

    def run(self) -> None:
        body = {
            "model": self.slug,
            "messages": [{"role": "user", "content": "tell me a long story"}],
            "max_tokens": 1000,
            "stream": True,
        }
        url = f"{self.srv.v1}/chat/completions"
        with httpx.stream("POST", url, json=body, headers=self.srv.headers(), timeout=120) as r:
            self.status = r.status_code
            for line in r.iter_lines():
                if not line.startswith("data: {"):
                    continue
                event = json.loads(line[6:])
                if "error" in event:
                    self.errors.append(event)
                for choice in event.get("choices") or ():
                    self.chunks += 1
                    self.finish = choice.get("finish_reason") or self.finish
        self.order.append(f"{self.slug} ended")


def test_a_stream_keeps_going_while_other_models_need_its_memory(
    pool_server: tuple[LiveServer, int],
) -> None:
    """While a stream on ``d`` is unfinished, ``a`` and ``b`` both need memory beside
    it (a budget for two): they are served in turn by evicting each other, never
    ``d``; then ``d``'s stream runs to its end, uncut."""
    srv, _ = pool_server
    models = pool(srv)
    assert ask(srv, "d").status_code == 200  # loaded, so that it can be paused
    order: list[str] = []
    stream = Stream(srv, "d", order)
    with paused(models, "d"):
        stream.start()
        wait_for(lambda: models.describe("d")["in_flight"] == 1, "the stream on d never began")
        others = [ask(srv, s) for s in ("a", "b")]
        during = states(srv)["d"]
    stream.join(120)
    assert [o.status_code for o in others] == [200, 200], [o.text for o in others]
    assert during == "loaded" and order == ["d ended"], (during, order)
    assert stream.status == 200 and not stream.errors, stream.errors
    assert stream.finish in ("stop", "length") and stream.chunks > 1


def test_loads_that_need_a_streaming_models_memory_wait_for_its_end_then_succeed(
    pool_server: tuple[LiveServer, int],
) -> None:
    """Issue 27.3, strictly: ``c`` held in flight and a stream on ``d`` fill the budget,
    so ``a`` and ``b`` can only load into ``d``'s memory. Both are seen waiting for
    memory while the stream is unfinished; the stream runs to its end, uncut; then
    both are served (``d`` evicted only once idle)."""
    srv, _ = pool_server
    models = pool(srv)
    held = on_server_loop(srv, models.acquire(services(srv.app).catalog.resolve("c")))
    others: dict[str, httpx.Response] = {}
    order: list[str] = []

    def call(slug: str) -> None:
        others[slug] = ask(srv, slug)
        order.append(slug)

    starters = [threading.Thread(target=call, args=(s,)) for s in ("a", "b")]
    try:
        assert ask(srv, "d").status_code == 200  # loaded beside c, so that it can be paused
        stream = Stream(srv, "d", order)
        with paused(models, "d"):
            stream.start()
            wait_for(lambda: models.describe("d")["in_flight"] == 1, "the stream on d never began")
            for t in starters:
                t.start()
            wait_for(
                lambda: (
                    models.describe("a").get("waiting_for_memory") is True
                    or models.describe("b").get("waiting_for_memory") is True
                ),
                "neither a nor b waited for memory",
            )
            waited = states(srv)["d"] == "loaded" and not order
        stream.join(120)
        for t in starters:
            t.join(120)
    finally:
        services(srv.app).loop.call_soon_threadsafe(held.release)
    assert waited, "a load began before the stream on d ended"
    assert stream.status == 200 and not stream.errors, stream.errors
    assert stream.finish in ("stop", "length"), stream.finish
    assert order[0] == "d ended", order
    assert {s: r.status_code for s, r in others.items()} == {"a": 200, "b": 200}, others
    assert all("x-servelm-cold-start-ms" in r.headers for r in others.values())


def test_an_idle_model_unloads_and_gives_its_memory_back(
    pool_server: tuple[LiveServer, int], caplog: pytest.LogCaptureFixture
) -> None:
    srv, each = pool_server
    caplog.set_level(logging.INFO, logger="servelm.access")
    assert ask(srv, IDLE).status_code == 200
    loaded = rss()
    wait_for(lambda: states(srv)[IDLE] == "unloaded", "e never unloaded")
    # The KV cache is freed by llama.cpp's thread as it stops: wait for the memory.
    wait_for(lambda: loaded - rss() >= each * 0.8, f"RSS fell only {loaded - rss():,} B")
    print(f"footprint {each:,} B; RSS fell {loaded - rss():,} B after the idle unload")
    again = ask(srv, IDLE)
    assert again.status_code == 200 and "x-servelm-cold-start-ms" in again.headers
    cold = [
        getattr(r, "fields", {}).get("cold_start_ms")
        for r in caplog.records
        if r.name == "servelm.access"
    ]
    assert any(ms is not None for ms in cold), cold
    metrics = httpx.get(f"{srv.base_url}/metrics", timeout=10).text
    assert 'servelm_model_unloads_total{model="e",reason="idle"} 1.0' in metrics


def test_a_failed_load_answers_503_and_backs_off(
    tmp_path: Path, models_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Weights llama.cpp cannot load: a 503 whose cause is in the operator's log, and
    the next request within the back-off is refused without a second try."""
    from servelm.catalog.specs import Catalog, ModelSpec
    from servelm.errors import ModelUnavailable

    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"GGUF" + b"\0" * 64)
    spec = ModelSpec(slug="broken", path=broken, context_window=512, max_output_tokens=256)
    settings = make_settings(tmp_path, models_dir)
    caplog.set_level(logging.ERROR, logger="servelm.engines.pool")

    async def go() -> tuple[ModelUnavailable, ModelUnavailable]:
        models = ModelPool(Catalog([spec]), settings)
        await models.start()
        assert models.state("broken") == "unloaded"
        with pytest.raises(ModelUnavailable) as first:
            await models.acquire(spec)
        with pytest.raises(ModelUnavailable) as second:
            await models.acquire(spec)
        assert models.state("broken") == "failed"
        await models.close()
        return first.value, second.value

    first, second = asyncio.run(go())
    assert first.status_code == 503 and "could not be loaded" in first.message
    assert "not retried" in second.message and int(second.headers["Retry-After"]) >= 1
    failures = [r for r in caplog.records if "failed to load" in r.getMessage()]
    assert len(failures) == 1 and str(broken) in failures[0].getMessage()


def test_a_model_that_can_never_fit_is_refused_at_start_up(
    tmp_path: Path, models_dir: Path, seed_models: dict[str, Path]
) -> None:
    from servelm.catalog.specs import Catalog, ModelSpec
    from servelm.engines.pool import ModelsConfigError

    spec = ModelSpec(slug="big", path=seed_models["llama-v3p1-8b-instruct"], context_window=4096)
    settings = make_settings(tmp_path, models_dir, model_memory="1M")
    with pytest.raises(
        ModelsConfigError, match=r"big needs about .* more than SERVELM_MODEL_MEMORY"
    ):
        asyncio.run(ModelPool(Catalog([spec]), settings).start())
