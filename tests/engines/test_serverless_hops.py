"""The cold-start header through a hop (issue 27): ``serve --workers``' engine process
owns the model pool, and a gateway relays a ``servelm`` replica; either way the client
hears that its request paid for a load, in ``x-servelm-cold-start-ms`` and in the
access line. The tiny Llama 3.1 GGUF (8.2 MB; about 67 MB estimated loaded, its process
included)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests import procs
from tests.conftest import make_settings, start_server

CONTEXT = 131072


@pytest.mark.parametrize("prompt_count", ["auto", "exact"])
def test_under_workers_the_engine_process_loads_on_demand_within_the_budget(
    tmp_path: Path, models_dir: Path, seed_models: dict[str, Path], prompt_count: str
) -> None:
    """``serve --workers 2`` with two models and a budget for one: the engine process
    owns the pool, so whichever worker takes a request, the model loads there once and
    the other is evicted. Each cold request says so to its client, through the worker
    hop: in the header and in the worker's access line. Under ``prompt_count = "exact"``
    the worker asks the engine process for the prompt's count first, and the load is
    paid in that call; under "auto" (plain text) in the chat call itself."""
    import uuid

    from servelm.catalog.specs import ModelSpec
    from servelm.engines.llamacpp import footprint
    from servelm.store.db import Database
    from tests.conftest import provision

    entries = []
    for slug in ("a", "b"):
        path = shutil.copy(seed_models["llama-v3p1-8b-instruct"], tmp_path / f"{slug}.gguf")
        entries.append(f'[models.{slug}]\npath = "{path}"\ncontext_window = {CONTEXT}\n')
    each = footprint(ModelSpec(slug="a", path=tmp_path / "a.gguf", context_window=CONTEXT))
    assert each is not None
    models_file = tmp_path / "servelm.toml"
    models_file.write_text(
        "\n".join(entries) + "\n[models.smollm2-135m-instruct]\nenabled = false\n"
    )
    db_url = f"sqlite:///{tmp_path / 'servelm.db'}"
    env = procs.gateway_env(
        tmp_path,
        models_dir,
        SERVELM_MODELS_FILE=str(models_file),
        SERVELM_DATABASE_URL=db_url,
        SERVELM_REDIS_URL="redis://127.0.0.1:6379/0",
        SERVELM_REDIS_PREFIX=f"t{uuid.uuid4().hex[:8]}",
        SERVELM_MODEL_MEMORY=str(each * 3 // 2),  # one tiny model, not two
        SERVELM_PROMPT_COUNT=prompt_count,
        SERVELM_LOG_JSON="true",
    )
    (gw,) = procs.start(env, tmp_path / "logs", 1, "--workers", "2")
    cold: list[str | None] = []
    codes: list[int] = []
    ids: list[str] = []
    try:
        db = Database(db_url)
        key = provision(db, "w", 100)
        db.dispose()
        # a, b, a, b: each one cold (the other evicted it); then b once more, warm.
        for slug, stream in (("a", False), ("b", True), ("a", True), ("b", False), ("b", True)):
            body = {
                "model": slug,
                "messages": [{"role": "user", "content": "hi"}],
                "max_tokens": 4,
                "stream": stream,
            }
            with httpx.stream(
                "POST",
                f"{gw.base_url}/v1/chat/completions",
                headers={"x-api-key": key},
                json=body,
                timeout=120,
            ) as r:
                r.read()
                codes.append(r.status_code)
                cold.append(r.headers.get("x-servelm-cold-start-ms"))
                ids.append(r.headers["x-request-id"])
    finally:
        gw.stop()
    assert codes == [200] * 5, codes
    assert all(ms is not None and int(ms) >= 0 for ms in cold[:4]), cold
    assert cold[4] is None, cold
    log = gw.log.read_text()
    assert log.count("model a loaded") == 2 and log.count("model b loaded") == 2, log
    assert log.count("unloaded (evicted)") == 3, log
    # The worker's access line (the one with the account: the engine process's caller
    # owns none) carries the same field.
    access = {}
    for line in log.splitlines():
        if not line.startswith("{"):
            continue
        entry = json.loads(line)
        if entry.get("logger") == "servelm.access" and "account_id" in entry:
            access[entry["request_id"]] = entry
    assert [access[i].get("cold_start_ms") for i in ids] == [
        int(ms) if ms is not None else None for ms in cold
    ], [access.get(i) for i in ids]


def test_a_gateway_relays_a_servelm_upstreams_cold_start_and_only_a_servelm_ones(
    tmp_path: Path, models_dir: Path
) -> None:
    """A replica of kind ``servelm`` (a ``servelm worker``, or the engine process of
    ``serve --workers``) that says it paid a cold start: the gateway's client hears of
    it in the header (the access line takes the same value: the workers test); the
    same header from an upstream of another kind is not trusted. (A ``servelm worker``
    keeps its model loaded and never says so: this upstream stands in for one that
    did.)"""
    from servelm.catalog.models_file import load_catalog
    from tests.servers import serve_in_thread
    from tests.support.instant_upstream import make_app

    inner = make_app()

    async def says_cold(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["path"] == "/health":
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b'{"status":"ok"}'})
            return

        async def with_header(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                headers = [*message.get("headers", []), (b"x-servelm-cold-start-ms", b"417")]
                message = {**message, "headers": headers}
            await send(message)

        await inner(scope, receive, with_header)

    upstream = serve_in_thread(says_cold)
    models_file = tmp_path / "servelm.toml"
    models_file.write_text(
        "".join(
            f'[models.{slug}]\nengine = "openai"\nupstream_kind = "{kind}"\n'
            f'base_url = "http://127.0.0.1:{upstream.port}/v1"\n'
            "context_window = 4096\nmax_output_tokens = 1024\n\n"
            for slug, kind in (("behind-servelm", "servelm"), ("behind-openai", "openai"))
        )
        + "[models.smollm2-135m-instruct]\nenabled = false\n"
    )
    settings = make_settings(tmp_path, models_dir, models_file=models_file)
    srv = start_server(settings, load_catalog(models_dir, models_file))
    try:
        got = {}
        for slug in ("behind-servelm", "behind-openai"):
            for stream in (False, True):
                body = {
                    "model": slug,
                    "messages": [{"role": "user", "content": "hi"}],
                    "max_tokens": 3,
                    "stream": stream,
                }
                with httpx.stream(
                    "POST",
                    f"{srv.v1}/chat/completions",
                    json=body,
                    headers=srv.headers(),
                    timeout=60,
                ) as r:
                    r.read()
                    assert r.status_code == 200
                    got[slug, stream] = r.headers.get("x-servelm-cold-start-ms")
    finally:
        srv.stop()
        upstream.stop()
    assert got == {
        ("behind-servelm", False): "417",
        ("behind-servelm", True): "417",
        ("behind-openai", False): None,
        ("behind-openai", True): None,
    }, got
