"""What the gateway asks of a remote engine: a plain call for a plain client, a stream
for a streaming one, and what happens when the answer is not what it should be.

The upstream here is a scripted OpenAI-compatible server on loopback that records
every request it gets; each test sets how it answers.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest

from servelm.api.services import services
from servelm.billing.money import MICRO
from servelm.chat.conversation import estimate_prompt_tokens
from tests.conftest import LiveServer, make_settings, start_server
from tests.servers import serve_in_thread
from tests.support.instant_upstream import lifespan, read_body

SLUG = "scripted"
MSGS = [{"role": "user", "content": "hello there"}]


@dataclass
class Script:
    """How the upstream answers, and what it saw."""

    usage: bool = True  # include usage in plain answers
    malformed: bool = False  # answer plain calls with something that is not JSON
    delay: float = 0.0  # seconds before a plain answer
    seen: list[dict[str, Any]] = field(default_factory=list)
    disconnects: int = 0


def scripted_app(script: Script) -> Any:
    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            await lifespan(receive, send)
            return
        if scope["method"] == "GET":  # health probes: none here, which the gateway takes
            await send({"type": "http.response.start", "status": 404, "headers": []})
            await send({"type": "http.response.body", "body": b""})
            return
        body = json.loads(await read_body(receive))
        script.seen.append(body)
        usage = {"prompt_tokens": 11, "completion_tokens": 3, "total_tokens": 14}
        if body.get("stream"):
            await send(
                {
                    "type": "http.response.start",
                    "status": 200,
                    "headers": [(b"content-type", b"text/event-stream")],
                }
            )
            events = [
                {"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]},
                *({"choices": [{"index": 0, "delta": {"content": w}}]} for w in ("a", "b", "c")),
                {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]},
                {"choices": [], "usage": usage},
            ]
            for e in events:
                data = f"data: {json.dumps(e)}\n\n".encode()
                await send({"type": "http.response.body", "body": data, "more_body": True})
            await send({"type": "http.response.body", "body": b"data: [DONE]\n\n"})
            return
        if script.delay:
            # Hold the answer back; a client that leaves meanwhile closes the connection.
            waiter = asyncio.ensure_future(receive())
            done, _ = await asyncio.wait({waiter}, timeout=script.delay)
            if done and waiter.result()["type"] == "http.disconnect":
                script.disconnects += 1
                return
        if script.malformed:
            answer = b"<html>oops</html>"
        else:
            reply: dict[str, Any] = {
                "id": "x",
                "object": "chat.completion",
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": "abc"},
                        "finish_reason": "stop",
                    }
                ],
            }
            if script.usage:
                reply["usage"] = usage
            answer = json.dumps(reply).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"application/json")],
            }
        )
        await send({"type": "http.response.body", "body": answer})

    return app


@pytest.fixture
def script() -> Script:
    return Script()


@pytest.fixture
def kind() -> str:
    """The upstream as a known kind of engine: those get plain calls once warm."""
    return "servelm"


@pytest.fixture
def gateway(
    script: Script, kind: str, models_dir: Path, tmp_path: Path
) -> Iterator[tuple[LiveServer, Script]]:
    upstream = serve_in_thread(scripted_app(script))
    port = upstream.port
    models_file = tmp_path / "servelm.toml"
    models_file.write_text(
        f'[models.{SLUG}]\nengine = "openai"\nbase_url = "http://127.0.0.1:{port}/v1"\n'
        "context_window = 4096\nmax_output_tokens = 512\ninput_price = 1000\n"
        f'output_price = 2000\nupstream_kind = "{kind}"\n'
        "[models.smollm2-135m-instruct]\nenabled = false\n"
    )
    live = start_server(make_settings(tmp_path, models_dir, models_file=models_file))
    # The first answer is streamed whatever the client wants, until the upstream has
    # shown that it reports usage; from then on a plain client gets a plain call.
    assert chat(live).status_code == 200
    assert script.seen[-1]["stream"] is True
    script.seen.clear()
    yield live, script
    live.stop()
    upstream.stop()


def chat(live: LiveServer, **extra: Any) -> httpx.Response:
    return httpx.post(
        f"{live.v1}/chat/completions",
        json={"model": SLUG, "messages": MSGS, "max_tokens": 8, **extra},
        headers=live.headers(),
        timeout=30,
    )


def test_plain_client_gets_a_plain_call_and_a_streaming_one_a_stream(
    gateway: tuple[LiveServer, Script],
) -> None:
    live, script = gateway
    r = chat(live)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"] == "abc"
    assert r.json()["usage"]["prompt_tokens"] == 11
    spec = services(live.app).catalog.resolve(SLUG)
    assert Decimal(r.headers["x-cost"]) * MICRO == spec.cost_micro(11, 3)
    assert script.seen[-1]["stream"] is False
    assert "stream_options" not in script.seen[-1]

    with httpx.stream(
        "POST",
        f"{live.v1}/chat/completions",
        json={"model": SLUG, "messages": MSGS, "max_tokens": 8, "stream": True},
        headers=live.headers(),
        timeout=30,
    ) as s:
        text = "".join(
            (json.loads(line[6:])["choices"] or [{}])[0].get("delta", {}).get("content") or ""
            for line in s.iter_lines()
            if line.startswith("data: {")
        )
    assert text == "abc"
    assert script.seen[-1]["stream"] is True
    assert script.seen[-1]["stream_options"] == {"include_usage": True}


def test_an_upstream_without_usage_is_streamed_from_then_on(
    gateway: tuple[LiveServer, Script],
) -> None:
    live, script = gateway
    script.usage = False
    first = chat(live)
    assert first.status_code == 200, first.text
    # No usage: the prompt is billed at its upper bound from its bytes, and the answer,
    # which came in one piece, at its bytes over 4 ("abc": 1).
    bound = estimate_prompt_tokens({"messages": MSGS})
    assert first.json()["usage"]["completion_tokens"] == 1
    assert first.json()["usage"]["prompt_tokens"] == bound
    spec = services(live.app).catalog.resolve(SLUG)
    assert Decimal(first.headers["x-cost"]) * MICRO == spec.cost_micro(bound, 1)
    assert script.seen[-1]["stream"] is False
    second = chat(live)
    assert second.status_code == 200, second.text
    assert script.seen[-1]["stream"] is True  # where tokens can be counted
    assert second.json()["choices"][0]["message"]["content"] == "abc"
    assert second.json()["usage"]["completion_tokens"] == 3


@pytest.mark.parametrize("kind", ["openai"])
def test_an_upstream_of_unknown_kind_is_always_streamed(
    gateway: tuple[LiveServer, Script],
) -> None:
    """Issue 25.5: a warm plain answer without usage could only be estimated from its
    bytes. An upstream of unknown habits never gets a plain call: each token it
    delivers is counted, whatever its usage says."""
    live, script = gateway
    script.usage = False
    r = chat(live)
    assert r.status_code == 200, r.text
    assert script.seen[-1]["stream"] is True
    assert r.json()["choices"][0]["message"]["content"] == "abc"
    assert r.json()["usage"]["completion_tokens"] == 3


def test_a_malformed_plain_answer_is_502_and_costs_nothing(
    gateway: tuple[LiveServer, Script],
) -> None:
    live, script = gateway
    script.malformed = True
    before = httpx.get(f"{live.v1}/credits", headers=live.headers()).json()["credits"]
    r = chat(live)
    assert r.status_code == 502
    assert "malformed answer" in r.json()["error"]["message"]
    assert r.headers["x-remaining-credits"] == before


def test_a_plain_client_leaving_closes_the_upstream_call(
    gateway: tuple[LiveServer, Script],
) -> None:
    live, script = gateway
    script.delay = 5.0
    before = httpx.get(f"{live.v1}/credits", headers=live.headers()).json()["credits"]
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(
            f"{live.v1}/chat/completions",
            json={"model": SLUG, "messages": MSGS, "max_tokens": 8},
            headers=live.headers(),
            timeout=0.5,
        )
    deadline = time.monotonic() + 5
    while script.disconnects == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert script.disconnects == 1  # the upstream learned at once, not after 5 s
    after = httpx.get(f"{live.v1}/credits", headers=live.headers()).json()["credits"]
    assert after == before  # no answer reached anyone: nothing charged
