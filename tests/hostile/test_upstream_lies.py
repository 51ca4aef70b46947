"""Points 6-9 of issue 17: an upstream that lies about usage or sends malformed data.

The upstream is ``tests.support.lying_upstream`` in its own process; the gateway is
a real server. Every test ends with `servelm ledger check` passing, no hold open, and
the balance down by exactly what was delivered.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest

from servelm.api.services import services
from servelm.billing.money import MICRO
from servelm.chat.conversation import estimate_prompt_tokens
from servelm.engines.upstream import OpenAIUpstreamEngine
from tests.conftest import LiveServer, drop_pg_database, new_pg_database, provision
from tests.hostile.conftest import LIAR, assert_money_sound, start_liar_gateway, warm_up
from tests.support.lying_upstream import PLAIN_LIES, STREAM_LIES, USAGE_LIES


def new_key(live: LiveServer) -> str:
    return provision(live.db, f"liar-{uuid.uuid4().hex[:8]}", 1)


def balance(live: LiveServer, key: str) -> Decimal:
    r = httpx.get(f"{live.v1}/credits", headers={"x-api-key": key}, timeout=30)
    assert r.status_code == 200, r.text
    return Decimal(r.json()["credits"])


def plain(live: LiveServer, key: str, content: str) -> httpx.Response:
    return httpx.post(
        f"{live.v1}/chat/completions",
        json={"model": LIAR, "messages": [{"role": "user", "content": content}], "max_tokens": 8},
        headers={"x-api-key": key},
        timeout=60,
    )


def stream(live: LiveServer, key: str, content: str) -> tuple[int, list[str]]:
    body = {
        "model": LIAR,
        "messages": [{"role": "user", "content": content}],
        "max_tokens": 8,
        "stream": True,
    }
    with httpx.stream(
        "POST", f"{live.v1}/chat/completions", json=body, headers={"x-api-key": key}, timeout=60
    ) as r:
        events = [line.removeprefix("data: ") for line in r.iter_lines() if line]
        return r.status_code, events


def relayed_text(events: list[str]) -> str:
    text = ""
    for e in events:
        data = json.loads(e) if e != "[DONE]" else {}
        for choice in data.get("choices") or ():
            text += choice.get("delta", {}).get("content") or ""
    return text


def output_cost(live: LiveServer, prompt: int, completion: int) -> Decimal:
    spec = services(live.app).catalog.resolve(LIAR)
    return Decimal(spec.cost_micro(prompt, completion)) / MICRO


def bound(content: str) -> int:
    """The upper bound from the prompt's bytes: what a prompt the engine did not
    count (or counted absurdly) is billed (README, "Credits")."""
    return estimate_prompt_tokens({"messages": [{"role": "user", "content": content}]})


def test_honest_upstream_is_charged_its_usage(liar_gateway: LiveServer) -> None:
    key = new_key(liar_gateway)
    r = plain(liar_gateway, key, "hello")
    assert r.status_code == 200, r.text
    assert Decimal(r.headers["x-cost"]) == output_cost(liar_gateway, 11, 3)
    assert balance(liar_gateway, key) == 1 - output_cost(liar_gateway, 11, 3)
    assert_money_sound(liar_gateway)


LYING_COUNTS = [m for m in USAGE_LIES if m != "usage-no-prompt"]


@pytest.mark.parametrize("mode", LYING_COUNTS)
def test_lying_usage_on_a_plain_call_is_502_at_no_charge(
    liar_gateway: LiveServer, mode: str
) -> None:
    key = new_key(liar_gateway)
    r = plain(liar_gateway, key, f"lie:{mode}")
    assert r.status_code == 502, r.text
    assert "malformed" in r.json()["error"]["message"]
    assert balance(liar_gateway, key) == 1
    assert_money_sound(liar_gateway)


@pytest.mark.parametrize("mode", LYING_COUNTS)
def test_lying_usage_on_a_stream_pays_for_what_was_relayed(
    liar_gateway: LiveServer, mode: str
) -> None:
    key = new_key(liar_gateway)
    status, events = stream(liar_gateway, key, f"lie:{mode}")
    assert status == 200
    assert events[-1] != "[DONE]"
    assert "malformed" in json.loads(events[-1])["error"]["message"]
    assert relayed_text(events) == "abc"
    # Three tokens relayed; the upstream's prompt count is unknown: its upper bound.
    assert balance(liar_gateway, key) == 1 - output_cost(liar_gateway, bound(f"lie:{mode}"), 3)
    assert_money_sound(liar_gateway)


def test_usage_without_prompt_tokens_bills_the_prompts_bound(liar_gateway: LiveServer) -> None:
    """Never 0 for a prompt the engine read: with no count of it, its upper bound."""
    key = new_key(liar_gateway)
    prompt = bound("lie:usage-no-prompt")
    r = plain(liar_gateway, key, "lie:usage-no-prompt")
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["prompt_tokens"] == prompt
    assert Decimal(r.headers["x-cost"]) == output_cost(liar_gateway, prompt, 3)
    status, events = stream(liar_gateway, key, "lie:usage-no-prompt")
    assert status == 200 and events[-1] == "[DONE]"
    assert balance(liar_gateway, key) == 1 - 2 * output_cost(liar_gateway, prompt, 3)
    assert_money_sound(liar_gateway)


@pytest.mark.parametrize("mode", sorted(PLAIN_LIES))
def test_malformed_plain_answer_is_502_at_no_charge(liar_gateway: LiveServer, mode: str) -> None:
    key = new_key(liar_gateway)
    r = plain(liar_gateway, key, f"lie:{mode}")
    assert r.status_code == 502, r.text
    assert balance(liar_gateway, key) == 1
    # One bad answer does not switch the engine to streamed calls for good.
    assert plain(liar_gateway, key, "hello").status_code == 200
    seen = httpx.get(f"http://127.0.0.1:{_liar_port(liar_gateway)}/seen", timeout=10).json()
    assert seen[-1] is False
    assert_money_sound(liar_gateway)


@pytest.mark.parametrize("mode", sorted(STREAM_LIES))
def test_malformed_stream_event_is_an_error_event(liar_gateway: LiveServer, mode: str) -> None:
    key = new_key(liar_gateway)
    status, events = stream(liar_gateway, key, f"lie:{mode}")
    assert status == 200
    error = json.loads(events[-1])["error"]
    assert "malformed" in error["message"], error
    assert error["code"] == "upstream_error"
    # Only the first word got through before the bad event.
    assert relayed_text(events) == "a"
    assert balance(liar_gateway, key) == 1 - output_cost(liar_gateway, bound(f"lie:{mode}"), 1)
    assert_money_sound(liar_gateway)


@pytest.mark.parametrize("mode", ["event-list", "plain-content-int"])
def test_malformed_answers_are_502_on_the_segmind_route_too(
    liar_gateway: LiveServer, mode: str
) -> None:
    key = new_key(liar_gateway)
    body: dict[str, Any] = {"messages": [{"role": "user", "content": f"lie:{mode}"}]}
    body["stream"] = mode.startswith("event")
    r = httpx.post(f"{liar_gateway.v1}/{LIAR}", json=body, headers={"x-api-key": key}, timeout=60)
    if body["stream"]:
        assert r.status_code == 200
        assert "malformed" in r.text
    else:
        assert r.status_code == 502, r.text
    assert_money_sound(liar_gateway)


def _liar_port(live: LiveServer) -> int:
    base = services(live.app).catalog.resolve(LIAR).base_url
    assert base is not None
    return int(base.rsplit(":", 1)[1].split("/")[0])


@pytest.fixture
def pg_liar(liar_port: int, models_dir: Path, tmp_path: Path) -> Iterator[LiveServer]:
    url = new_pg_database()
    live = start_liar_gateway(tmp_path, models_dir, liar_port, database_url=url)
    warm_up(live)
    yield live
    live.stop()
    live.db.dispose()
    drop_pg_database(url)


@pytest.mark.postgres
def test_token_counts_past_int4_never_fail_settlement_on_postgresql(pg_liar: LiveServer) -> None:
    """10^12 prompt tokens overflowed the usage table's int4 column: content went out,
    the settlement failed and nothing was charged. Now it is a lie (502), refused
    before settling, and the ledger holds."""
    key = new_key(pg_liar)
    r = plain(pg_liar, key, "lie:usage-int4")
    assert r.status_code == 502, r.text
    status, events = stream(pg_liar, key, "lie:usage-int4")
    assert status == 200 and relayed_text(events) == "abc"
    assert balance(pg_liar, key) == 1 - output_cost(pg_liar, bound("lie:usage-int4"), 3)
    ok = plain(pg_liar, key, "hello")
    assert ok.status_code == 200
    assert_money_sound(pg_liar)


@pytest.fixture
def deadline_gateway(liar_port: int, models_dir: Path, tmp_path: Path) -> Iterator[LiveServer]:
    # A read timeout of 2 s that a byte a second never trips; a 3 s deadline that does.
    # Probed every 0.2 s: the timeout ejects the only replica (servelm.engines.fleet), and the
    # probe readmits it for the second half of the test.
    live = start_liar_gateway(
        tmp_path, models_dir, liar_port, timeout="2", deadline="3", health_interval="0.2"
    )
    warm_up(live)
    yield live
    live.stop()


def test_a_trickling_upstream_hits_the_calls_deadline(deadline_gateway: LiveServer) -> None:
    """Point 4: the upstream timeout was per read, so a 1 byte/s upstream never
    tripped it. Plain: 504 at no charge. Stream: an error event after what was sent."""
    live = deadline_gateway
    key = new_key(live)
    r = plain(live, key, "lie:trickle")
    assert r.status_code == 504, r.text
    assert balance(live, key) == 1
    engine = services(live.app).engines[LIAR]
    assert isinstance(engine, OpenAIUpstreamEngine)
    replica = engine.replicas.all[0]
    deadline = time.monotonic() + 30
    while not replica.healthy:
        assert time.monotonic() < deadline, "the probe never readmitted the replica"
        time.sleep(0.05)
    status, events = stream(live, key, "lie:trickle")
    assert status == 200
    assert json.loads(events[-1])["error"]["code"] == "upstream_timeout"
    assert relayed_text(events) == "abc"
    assert balance(live, key) == 1 - output_cost(live, bound("lie:trickle"), 3)
    assert_money_sound(live)
