"""``prompt_count = "bound"`` (issue 15, goal 4): the embedded engine's prompt is not
counted before admission; the hold takes an upper bound and the engine's own usage
settles the charge, which must come out exactly as with the exact count."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path

import httpx
import pytest

from servelm.billing import accounts
from servelm.catalog import default_spec
from servelm.money import MICRO
from tests.conftest import LiveServer, make_settings, start_server

SLUG = "smollm2-135m-instruct"
MESSAGES = [
    {"role": "system", "content": "You answer in one short sentence."},
    {"role": "user", "content": "Why is the sea salty?"},
]


@pytest.fixture(scope="module")
def bound(models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    settings = make_settings(tmp_path_factory.mktemp("bound"), models_dir, prompt_count="bound")
    srv = start_server(settings, credits=1000)
    yield srv
    srv.stop()


def _cost(models_dir: Path, usage: dict[str, int]) -> Decimal:
    micro = default_spec(models_dir).cost_micro(usage["prompt_tokens"], usage["completion_tokens"])
    return Decimal(micro) / MICRO


def test_bound_mode_skips_the_count_and_charges_the_engines_usage(
    bound: LiveServer, live: LiveServer, models_dir: Path
) -> None:
    engine = bound.app.state.chat.engines[SLUG]
    # The setting reached the engine: it does not count (no call into llama.cpp).
    assert asyncio.run(engine.count_prompt_tokens({"messages": MESSAGES})) is None
    ask = {"model": SLUG, "messages": MESSAGES, "max_tokens": 6, "temperature": 0}
    with httpx.Client(base_url=bound.base_url, timeout=60, headers=bound.headers()) as http:
        r = http.post("/v1/chat/completions", json=ask)
    assert r.status_code == 200, r.text
    usage = r.json()["usage"]
    # The same request on the exact-counting server: the same prompt tokens, so the
    # bound server billed the engine's count, not its upper bound.
    with httpx.Client(base_url=live.base_url, timeout=60, headers=live.headers()) as http:
        exact = http.post("/v1/chat/completions", json=ask).json()["usage"]
    assert usage["prompt_tokens"] == exact["prompt_tokens"] > 10
    assert Decimal(r.headers["x-cost"]) == Decimal(usage["cost"]) == _cost(models_dir, usage)
    assert Decimal(usage["remaining_credits"]) == 1000 - Decimal(usage["cost"])


def test_bound_mode_stream_settles_from_the_final_usage(
    bound: LiveServer, models_dir: Path
) -> None:
    ask = {
        "model": SLUG,
        "messages": MESSAGES,
        "max_tokens": 5,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    usage: dict[str, object] = {}
    with (
        httpx.Client(base_url=bound.base_url, timeout=60, headers=bound.headers()) as http,
        http.stream("POST", "/v1/chat/completions", json=ask) as r,
    ):
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: {"):
                usage = json.loads(line[6:]).get("usage") or usage
    assert usage["completion_tokens"] == 5
    assert Decimal(str(usage["cost"])) == _cost(models_dir, usage)  # type: ignore[arg-type]
    # Settled, not left held: the balance moved by exactly the cost.
    account = accounts.get_account(bound.db, "tests")
    assert account.held == 0
    assert Decimal(str(usage["remaining_credits"])) == Decimal(account.balance) / MICRO


def test_bound_mode_stream_cut_short_pays_its_exact_prompt(
    bound: LiveServer, live: LiveServer
) -> None:
    """The client leaves after a few tokens, so the engine's usage never comes: the
    prompt is counted then (``count_prompt_after``), and the charge is what the exact
    server would have billed for the same tokens."""
    import time

    from sqlalchemy import select

    from servelm.store.tables import usage as usage_t

    ask = {"model": SLUG, "messages": MESSAGES, "max_tokens": 200, "temperature": 0}
    with httpx.Client(base_url=live.base_url, timeout=60, headers=live.headers()) as http:
        exact_prompt = http.post("/v1/chat/completions", json={**ask, "max_tokens": 1}).json()[
            "usage"
        ]["prompt_tokens"]
    received = 0
    with (
        httpx.Client(base_url=bound.base_url, timeout=60, headers=bound.headers()) as http,
        http.stream("POST", "/v1/chat/completions", json={**ask, "stream": True}) as r,
    ):
        assert r.status_code == 200
        lines = r.iter_lines()
        for line in lines:
            if line.startswith("data: {") and json.loads(line[6:])["choices"][0]["delta"]:
                received += 1
                if received == 3:
                    break  # the client hangs up here, with the stream open
    assert received == 3
    account = accounts.get_account(bound.db, "tests")
    last = None
    for _ in range(200):
        with bound.db.read() as conn:
            last = conn.execute(
                select(usage_t)
                .where(usage_t.c.account_id == account.id)
                .order_by(usage_t.c.id.desc())
            ).first()
        if last is not None and last.status == "cancelled":
            break
        time.sleep(0.05)
    assert last is not None and last.status == "cancelled"
    assert last.prompt_tokens == exact_prompt > 10
    assert last.completion_tokens >= 2  # the role chunk carries no token
    spec_cost = bound.app.state.chat.catalog.get(SLUG).cost_micro(
        exact_prompt, last.completion_tokens
    )
    assert last.cost == spec_cost
    assert accounts.get_account(bound.db, "tests").held == 0
