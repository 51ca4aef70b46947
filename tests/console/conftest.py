"""A console server for the browser tests: the real default model, plus a paced
upstream model (one chunk every few tens of milliseconds, text chosen by the test)
so that streaming, stopping and hostile model output are deterministic; and a
headless Chromium driven by Playwright."""

from __future__ import annotations

import asyncio
import json
import os
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from servelm.billing import accounts
from servelm.billing.money import MICRO
from servelm.store.db import Database
from tests.conftest import ADMIN_TOKEN, LiveServer, make_settings, start_server
from tests.servers import serve_in_thread
from tests.support.instant_upstream import lifespan, read_body

PACED = "paced"
# Slow enough that the chunks in flight while a loaded browser hangs up stay within
# the stop test's allowance of two (at 0.04 s, twelve were charged for seven shown).
CHUNK_DELAY = 0.1
# A reply this model gives when the last user message asks for it.
XSS_REPLY = '<img src=x onerror="alert(1)"><script>alert(2)</script><b id="injected">bold</b>'
CHROMIUM = os.environ.get("SERVELM_CHROMIUM", "/usr/bin/chromium")
SCREENSHOTS = Path(__file__).parents[2] / "docs" / "screenshots"


def paced_app() -> Any:
    """OpenAI-compatible: streams ``max_tokens`` words (or the XSS reply, in pieces),
    one every ``CHUNK_DELAY`` seconds; no usage when cut short, like a real stream."""

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            await lifespan(receive, send)
            return
        if scope["path"] == "/health":  # the gateway's health probe (servelm.engines.fleet)
            headers = [(b"content-type", b"application/json")]
            await send({"type": "http.response.start", "status": 200, "headers": headers})
            await send({"type": "http.response.body", "body": b'{"status":"ok"}'})
            return
        body = json.loads(await read_body(receive))
        last = str(body["messages"][-1]["content"])
        n = int(body.get("max_tokens") or 16)
        content = body["messages"][-1]["content"]
        images = (
            [p for p in content if p.get("type") == "image_url"]
            if isinstance(content, list)
            else []
        )
        if images:
            pieces = ["saw ", f"{len(images)} image"]
        elif "xss" in last:
            pieces = [XSS_REPLY[i : i + 8] for i in range(0, len(XSS_REPLY), 8)]
        else:
            pieces = [f"word{i} " for i in range(1, n + 1)]
        usage = {
            "prompt_tokens": 9,
            "completion_tokens": len(pieces),
            "total_tokens": 9 + len(pieces),
        }
        if not body.get("stream"):
            message = {"role": "assistant", "content": "".join(pieces)}
            answer = {
                "id": "chatcmpl-paced",
                "object": "chat.completion",
                "created": int(time.time()),
                "model": PACED,
                "choices": [{"index": 0, "message": message, "finish_reason": "stop"}],
                "usage": usage,
            }
            await send(
                {
                    "type": "http.response.start",
                    "status": 200,
                    "headers": [(b"content-type", b"application/json")],
                }
            )
            await send({"type": "http.response.body", "body": json.dumps(answer).encode()})
            return
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"text/event-stream")],
            }
        )

        async def event(data: dict[str, Any]) -> None:
            line = f"data: {json.dumps(data)}\n\n".encode()
            await send({"type": "http.response.body", "body": line, "more_body": True})

        # Stops when the gateway hangs up, as a real engine does: otherwise a stream
        # the stop test cut went on for its 1,024 words, and closing this server at
        # the end waited 26 s for it.
        gone = asyncio.Event()

        async def watch() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass
            gone.set()

        watcher = asyncio.ensure_future(watch())
        try:
            await event({"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]})
            for piece in pieces:
                await asyncio.sleep(CHUNK_DELAY)
                if gone.is_set():
                    return
                await event({"choices": [{"index": 0, "delta": {"content": piece}}]})
        finally:
            watcher.cancel()
        await event({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
        await event({"choices": [], "usage": usage})
        await send({"type": "http.response.body", "body": b"data: [DONE]\n\n"})

    return app


@pytest.fixture(scope="module")
def console(models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    """A server with the default model, the paced model and the admin token."""
    from servelm.catalog.models_file import load_catalog

    upstream = serve_in_thread(paced_app())
    port = upstream.port
    tmp = tmp_path_factory.mktemp("console")
    models_file = tmp / "servelm.toml"
    models_file.write_text(
        f'[models.{PACED}]\nengine = "openai"\nbase_url = "http://127.0.0.1:{port}/v1"\n'
        "context_window = 4096\nmax_output_tokens = 1024\ninput_price = 1\noutput_price = 2\n"
        'description = "Paced test model"\nvision = true\n'
        # What an operator writes for a page (issue 29.4): Markdown, hostile HTML too.
        'display_name = "Paced Test Model"\n'
        'features = ["**Deterministic** replies", "<img src=x onerror=alert(1)> is text"]\n'
        # Every account's plan: generous, but a ceiling for the keys users make.
        "\n[plans.default]\nrpm = 1000\nconcurrency = 50\n"
    )
    settings = make_settings(
        tmp,
        models_dir,
        admin_token=ADMIN_TOKEN,
        key_cache_seconds=1.0,
        models_file=models_file,
        # A budget for the operator page to show (issue 27): room for the default model.
        model_memory="2G",
    )
    # The first start's "default" account and key, as `servelm serve` makes them.
    db = Database(settings.db_url)
    db.upgrade()
    first_start_key = accounts.bootstrap(db, 10 * MICRO)
    db.dispose()
    assert first_start_key is not None
    live = start_server(settings, load_catalog(models_dir, models_file))
    live.api_key = first_start_key  # instead of start_server's own account's key
    yield live
    live.stop()
    upstream.stop()


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """Headless Chromium (Debian's package) under Playwright, or a one-line skip."""
    reason = ""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        reason = "the playwright package is not installed (pip install -e '.[test]')"
    if not reason and not Path(CHROMIUM).is_file():
        reason = f"no Chromium at {CHROMIUM}: apt-get install chromium (make test tries)"
    if reason:
        if os.environ.get("SERVELM_REQUIRE_BROWSER"):
            pytest.fail(f"browser tests required but cannot run: {reason}")
        pytest.skip(reason)
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=CHROMIUM, headless=True)
        yield chromium
        chromium.close()


def csrf_from(html: str) -> str:
    match = re.search(r'name="csrf_token" value="([^"]+)"', html) or re.search(
        r'name="csrf-token" content="([^"]+)"', html
    )
    assert match, "no CSRF token on the page"
    return match.group(1)


def signed_in_client(live: LiveServer, key: str) -> httpx.Client:
    """An HTTP client holding a user session, as a browser would after signing in."""
    client = httpx.Client(base_url=live.base_url, timeout=60)
    token = csrf_from(client.get("/account").text)
    r = client.post("/account/signin", data={"csrf_token": token, "api_key": key})
    assert r.status_code == 303, r.text
    return client


def operator_client(live: LiveServer) -> httpx.Client:
    client = httpx.Client(base_url=live.base_url, timeout=60)
    token = csrf_from(client.get("/operator").text)
    r = client.post("/operator/signin", data={"csrf_token": token, "admin_token": ADMIN_TOKEN})
    assert r.status_code == 303, r.text
    return client
