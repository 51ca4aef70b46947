"""The walk's rules, end to end through real HTTP, against the scripted engine: what
each ending costs, chunk order, output limits, settle-once on a hang-up, overload."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest

from servelm.api.services import services
from servelm.billing import audit
from servelm.billing.money import MICRO
from servelm.catalog.specs import Catalog
from servelm.errors import EngineError, UpstreamError
from tests.conftest import LiveServer, make_settings, start_server
from tests.fast.conftest import SLUG, SPEC, balance, hold_row, new_key, usage_row
from tests.support.scripted_engine import (
    PER_MESSAGE,
    Script,
    ScriptedEngine,
    scripted_factory,
)

USER = [{"role": "user", "content": "hi there"}]
PROMPT = PER_MESSAGE + 2  # the scripted engine's count for USER
FULL = len(Script().tokens)


def post(srv: LiveServer, key: str, route: str = "openai", **body: Any) -> httpx.Response:
    body.setdefault("messages", USER)
    if route == "openai":
        body.setdefault("model", SLUG)
        url = f"{srv.v1}/chat/completions"
    else:
        url = f"{srv.v1}/{SLUG}"
    return httpx.post(url, json=body, headers={"x-api-key": key}, timeout=30)


def sse_events(r: httpx.Response) -> list[str]:
    return [line.removeprefix("data: ") for line in r.text.splitlines() if line]


def wait_for(check: Any, timeout: float = 10.0) -> Any:
    """Poll ``check()`` until it returns something truthy (settlement runs off the
    client's path, a moment after the client saw the end)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := check():
            return value
        time.sleep(0.02)
    raise AssertionError("condition not met in time")


def ledger_ok(srv: LiveServer) -> None:
    assert audit.ledger_check(srv.db) == []


# -- what each ending costs ---------------------------------------------------------------


@pytest.mark.parametrize("route", ["openai", "segmind"])
def test_a_finished_answer_costs_its_prompt_and_output(
    fast: LiveServer, engine: ScriptedEngine, route: str
) -> None:
    key, account = new_key(fast.db, 1000)
    r = post(fast, key, route)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["choices"][0]["message"]["content"] == "".join(Script().tokens)
    assert body["usage"]["prompt_tokens"] == PROMPT
    assert body["usage"]["completion_tokens"] == FULL
    cost = SPEC.cost_micro(PROMPT, FULL)
    assert cost == PROMPT * 2 + FULL * 3
    assert Decimal(r.headers["x-cost"]) * MICRO == cost
    assert balance(fast.db, account) == (1000 - cost, 0)
    assert Decimal(r.headers["x-remaining-credits"]) * MICRO == 1000 - cost
    ledger_ok(fast)


@pytest.mark.parametrize(("route", "envelope"), [("openai", dict), ("segmind", str)])
def test_an_engine_failure_before_output_costs_nothing(
    fast: LiveServer, engine: ScriptedEngine, route: str, envelope: type
) -> None:
    key, account = new_key(fast.db, 1000)
    engine.push(Script(error=EngineError("the engine fell over")))
    r = post(fast, key, route)
    assert r.status_code == 500
    assert isinstance(r.json()["error"], envelope)
    assert r.headers["x-remaining-credits"] == "0.001000"
    assert balance(fast.db, account) == (1000, 0)
    row = usage_row(fast.db, r.headers["x-request-id"])
    assert row is not None and row["cost"] == 0 and row["status"] == "error"
    ledger_ok(fast)


@pytest.mark.parametrize("route", ["openai", "segmind"])
def test_a_stream_that_fails_midway_pays_for_what_it_sent_and_ends_with_an_error_event(
    fast: LiveServer, engine: ScriptedEngine, route: str
) -> None:
    key, account = new_key(fast.db, 1000)
    engine.push(Script(error=UpstreamError("the upstream went away"), fail_after=2))
    r = post(fast, key, route, stream=True)
    assert r.status_code == 200
    events = sse_events(r)
    assert "[DONE]" not in events
    last = json.loads(events[-1])
    if route == "openai":
        assert last["error"]["message"] == "the upstream went away"
        assert last["error"]["code"] == "upstream_error"
    else:
        assert last == {"error": "the upstream went away"}
    sent = "".join(
        c["delta"].get("content") or "" for e in events[:-1] for c in json.loads(e)["choices"]
    )
    assert sent == "".join(Script().tokens[:2])
    cost = SPEC.cost_micro(PROMPT, 2)
    row = wait_for(lambda: usage_row(fast.db, r.headers["x-request-id"]))
    assert row["cost"] == cost and row["status"] == "error"
    assert balance(fast.db, account) == (1000 - cost, 0)
    ledger_ok(fast)


def test_a_plain_answer_that_fails_midway_costs_nothing(
    fast: LiveServer, engine: ScriptedEngine
) -> None:
    key, account = new_key(fast.db, 1000)
    engine.push(Script(error=UpstreamError("cut off"), fail_after=2))
    r = post(fast, key)
    assert r.status_code == 502
    assert r.json()["error"]["code"] == "upstream_error"
    assert balance(fast.db, account) == (1000, 0)
    ledger_ok(fast)


def test_a_client_leaving_a_stream_pays_for_what_was_produced_once(
    fast: LiveServer, engine: ScriptedEngine
) -> None:
    key, account = new_key(fast.db, 1000)
    engine.push(Script(hang_after=3))
    cancelled_before = engine.stats.cancelled_total
    body = {"model": SLUG, "messages": USER, "stream": True}
    with httpx.stream(
        "POST", f"{fast.v1}/chat/completions", json=body, headers={"x-api-key": key}
    ) as r:
        rid = r.headers["x-request-id"]
        content = ""
        for line in r.iter_lines():
            if line.startswith("data: "):
                for choice in json.loads(line[6:])["choices"]:
                    content += choice["delta"].get("content") or ""
            if content == "".join(Script().tokens[:3]):
                break  # hang up with the generation still running
    row = wait_for(lambda: usage_row(fast.db, rid))
    assert row["status"] == "cancelled"
    assert row["completion_tokens"] == 3
    assert row["cost"] == SPEC.cost_micro(PROMPT, 3)
    hold = hold_row(fast.db, rid)
    assert hold is not None and hold["settled_at"] is not None
    assert hold["charged"] == row["cost"]
    assert balance(fast.db, account) == (1000 - row["cost"], 0)
    assert engine.stats.cancelled_total == cancelled_before + 1
    ledger_ok(fast)


def test_a_client_leaving_a_plain_request_pays_nothing(
    fast: LiveServer, engine: ScriptedEngine
) -> None:
    key, account = new_key(fast.db, 1000)
    engine.push(Script(hang_after=2))
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(
            f"{fast.v1}/chat/completions",
            json={"model": SLUG, "messages": USER},
            headers={"x-api-key": key},
            timeout=httpx.Timeout(10, read=0.5),
        )
    wait_for(lambda: balance(fast.db, account)[1] == 0)
    assert balance(fast.db, account) == (1000, 0)
    ledger_ok(fast)


# -- chunk order -----------------------------------------------------------------------


def test_stream_chunks_come_in_openai_order(fast: LiveServer, engine: ScriptedEngine) -> None:
    key, _ = new_key(fast.db, 1000)
    r = post(fast, key, stream=True, stream_options={"include_usage": True})
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/event-stream")
    held = Decimal(r.headers["x-remaining-credits"]) * MICRO
    assert held == 1000 - SPEC.cost_micro(PROMPT, SPEC.default_max_tokens)
    events = sse_events(r)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    finish = [c for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]
    assert len(finish) == 1 and chunks[-2] is finish[0]
    assert finish[0]["choices"][0]["finish_reason"] == "stop"
    assert finish[0]["usage"] is None
    usage = chunks[-1]
    assert usage["choices"] == []
    assert usage["usage"]["completion_tokens"] == FULL
    assert Decimal(str(usage["usage"]["cost"])) * MICRO == SPEC.cost_micro(PROMPT, FULL)
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks[:-1])
    assert text == "".join(Script().tokens)
    assert len({c["id"] for c in chunks}) == 1


def test_without_engine_usage_the_gateway_counts_what_it_relayed(
    fast: LiveServer, engine: ScriptedEngine
) -> None:
    key, _ = new_key(fast.db, 1000)
    engine.push(Script(report_usage=False))
    r = post(fast, key)
    assert r.status_code == 200
    assert r.json()["usage"]["completion_tokens"] == FULL


# -- output limits -----------------------------------------------------------------------


def test_max_tokens_above_the_models_limit_is_a_400_naming_it(fast: LiveServer) -> None:
    key, account = new_key(fast.db, 1000)
    r = post(fast, key, max_tokens=SPEC.max_output_tokens + 1)
    assert r.status_code == 400
    assert r.json()["error"]["param"] == "max_tokens"
    assert balance(fast.db, account) == (1000, 0)


@pytest.mark.parametrize("route", ["openai", "segmind"])
def test_prompt_plus_max_tokens_over_the_window_is_a_400(fast: LiveServer, route: str) -> None:
    key, _ = new_key(fast.db, 1000)
    words = " ".join(["word"] * 50)
    r = post(fast, key, route, messages=[{"role": "user", "content": words}], max_tokens=20)
    assert r.status_code == 400
    error = r.json()["error"]
    if route == "openai":
        assert error["code"] == "context_length_exceeded"
    else:
        assert "context window" in error


def test_max_tokens_cuts_the_answer_with_finish_reason_length(
    fast: LiveServer, engine: ScriptedEngine
) -> None:
    key, account = new_key(fast.db, 1000)
    r = post(fast, key, max_tokens=2)
    body = r.json()
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["usage"]["completion_tokens"] == 2
    assert engine.bodies[-1]["max_tokens"] == 2
    assert balance(fast.db, account) == (1000 - SPEC.cost_micro(PROMPT, 2), 0)


def test_without_max_tokens_generation_is_capped_at_what_the_balance_affords(
    fast: LiveServer, engine: ScriptedEngine
) -> None:
    affordable = 3
    key, account = new_key(fast.db, SPEC.cost_micro(PROMPT, affordable))
    r = post(fast, key)
    assert r.status_code == 200, r.text
    assert engine.bodies[-1]["max_tokens"] == affordable
    assert r.json()["usage"]["completion_tokens"] == affordable
    assert balance(fast.db, account) == (0, 0)


@pytest.mark.parametrize(("route", "status"), [("openai", 402), ("segmind", 406)])
def test_an_unaffordable_request_is_refused_before_generating(
    fast: LiveServer, engine: ScriptedEngine, route: str, status: int
) -> None:
    key, account = new_key(fast.db, 10)
    calls = len(engine.bodies)
    r = post(fast, key, route, max_tokens=10)
    assert r.status_code == status
    assert r.headers["x-remaining-credits"] == "0.000010"
    message = r.json()["error"] if route == "segmind" else r.json()["error"]["message"]
    assert "balance is 0.000010" in message
    assert len(engine.bodies) == calls
    assert balance(fast.db, account) == (10, 0)


# -- idempotency and overload -----------------------------------------------------------


def test_a_retry_with_the_same_idempotency_key_is_charged_once(fast: LiveServer) -> None:
    key, account = new_key(fast.db, 1000)
    headers = {"x-api-key": key, "Idempotency-Key": "order-1"}
    body = {"model": SLUG, "messages": USER}
    first = httpx.post(f"{fast.v1}/chat/completions", json=body, headers=headers)
    again = httpx.post(f"{fast.v1}/chat/completions", json=body, headers=headers)
    assert first.status_code == again.status_code == 200
    assert again.json() == first.json()
    assert again.headers["x-cost"] == "0.000000"
    assert again.headers["idempotent-replayed"] == "true"
    assert balance(fast.db, account) == (1000 - SPEC.cost_micro(PROMPT, FULL), 0)
    other = httpx.post(
        f"{fast.v1}/chat/completions", json={**body, "max_tokens": 1}, headers=headers
    )
    assert other.status_code == 409


async def test_past_slots_and_queue_the_answer_is_503_with_retry_after(
    fast: LiveServer, engine: ScriptedEngine
) -> None:
    key, account = new_key(fast.db, 10_000)
    engine.push(*[Script(hang_after=0)] * 3)  # 2 slots + 1 queued, all held
    body = {"model": SLUG, "messages": USER, "stream": True}
    headers = {"x-api-key": key}
    async with httpx.AsyncClient(base_url=fast.v1, timeout=30) as client:

        async def hold_open() -> None:
            async with client.stream("POST", "/chat/completions", json=body, headers=headers):
                await asyncio.Event().wait()

        holders = [asyncio.create_task(hold_open()) for _ in range(3)]
        deadline = time.monotonic() + 10
        while engine.stats.running + engine.stats.waiting < 3:
            assert time.monotonic() < deadline, "requests did not reach the engine"
            await asyncio.sleep(0.02)
        counted = engine.counted
        r = await client.post("/chat/completions", json=body, headers=headers)
        assert r.status_code == 503
        assert r.headers["retry-after"] == "1"
        assert r.json()["error"]["code"] == "overloaded"
        # Refused before the walk spent anything on it: its prompt was never counted.
        assert engine.counted == counted
        for task in holders:
            task.cancel()
        await asyncio.gather(*holders, return_exceptions=True)
    wait_for(lambda: balance(fast.db, account)[1] == 0)
    assert balance(fast.db, account) == (10_000, 0)  # nothing was generated
    ledger_ok(fast)


# -- slow readers -------------------------------------------------------------------------


def test_clients_that_stop_reading_lose_their_slots(tmp_path: Path) -> None:
    """Two clients that never read fill both slots with streams far larger than the
    sockets' buffers; once a write has waited past the send timeout they are stopped,
    and an ordinary request is served."""
    settings = make_settings(tmp_path, tmp_path / "models", slots=2, send_timeout=1.0)
    srv = start_server(settings, Catalog([SPEC]), engine_factory=scripted_factory)
    try:
        engine = services(srv.app).engines[SLUG]
        assert isinstance(engine, ScriptedEngine)
        # 512 KiB a token, 32 tokens: 16 MiB per stream, past any loopback buffer.
        huge = Script(tokens=("x" * 524288,) * 32)
        engine.push(huge, huge)
        body = json.dumps(
            {"model": SLUG, "messages": USER, "stream": True, "max_tokens": 32}
        ).encode()
        head = (
            f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nx-api-key: {srv.api_key}\r\n"
            f"content-type: application/json\r\ncontent-length: {len(body)}\r\n\r\n"
        ).encode()
        readers = []
        port = int(srv.base_url.rsplit(":", 1)[1])
        for _ in range(2):
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.connect(("127.0.0.1", port))
            sock.sendall(head + body)
            readers.append(sock)
        try:
            wait_for(lambda: engine.stats.running == 2)
            r = httpx.post(
                f"{srv.v1}/chat/completions",
                json={"model": SLUG, "messages": USER, "max_tokens": 2},
                headers=srv.headers(),
                timeout=60,
            )
            assert r.status_code == 200
            assert engine.stats.cancelled_total >= 2  # both readers were stopped
        finally:
            for sock in readers:
                sock.close()
        wait_for(lambda: audit.ledger_check(srv.db) == [] and engine.stats.running == 0)
    finally:
        srv.stop()
