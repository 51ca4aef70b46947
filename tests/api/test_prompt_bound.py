"""``prompt_count = "bound"`` and ``"auto"`` (issue 15, goal 4): the embedded engine's
prompt is not counted before admission; the hold takes an upper bound and the
engine's own usage settles the charge, which must come out exactly as with the exact
count. ``auto`` (the default, so the ``live`` server's) counts wherever the bound would
decide something: the window, a balance near its end, a token budget (that last one:
tests/access/test_limits.py::test_tokens_reserved_up_front_and_refunded_at_settlement,
whose reservation is the exact prompt plus the output)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path

import httpx
import pytest

from servelm.api.services import services
from servelm.billing import accounts
from servelm.billing.money import MICRO
from servelm.catalog.builtins import default_spec
from servelm.catalog.specs import Catalog
from servelm.chat.conversation import estimate_prompt_tokens
from servelm.engines.base import Engine
from servelm.engines.llamacpp import LlamaCppEngine
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
    engine = services(bound.app).engines[SLUG]
    # The setting reached the engine: it does not count (no call into llama.cpp).
    assert asyncio.run(engine.count_prompt_tokens({"messages": MESSAGES})) is None
    ask = {"model": SLUG, "messages": MESSAGES, "max_tokens": 6, "temperature": 0}
    with httpx.Client(base_url=bound.base_url, timeout=60, headers=bound.headers()) as http:
        r = http.post("/v1/chat/completions", json=ask)
    assert r.status_code == 200, r.text
    usage = r.json()["usage"]
    # The same request on the default server: the same prompt tokens, so the bound
    # server billed the engine's count, not its upper bound.
    with httpx.Client(base_url=live.base_url, timeout=60, headers=live.headers()) as http:
        exact = http.post("/v1/chat/completions", json=ask).json()["usage"]
    assert usage["prompt_tokens"] == exact["prompt_tokens"] > 10
    assert Decimal(r.headers["x-cost"]) == Decimal(str(usage["cost"])) == _cost(models_dir, usage)
    assert Decimal(str(usage["remaining_credits"])) == 1000 - Decimal(str(usage["cost"]))


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
    spec_cost = (
        services(bound.app).catalog.resolve(SLUG).cost_micro(exact_prompt, last.completion_tokens)
    )
    assert last.cost == spec_cost
    assert accounts.get_account(bound.db, "tests").held == 0


# -- prompt_count = "auto" ----------------------------------------------------------------


def _counted(srv: LiveServer, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Record each count the walk asks the server's engine for before admission."""
    engine: Engine = services(srv.app).engines[SLUG]
    original = engine.count_prompt_tokens
    calls: list[int] = []

    async def counting(body: dict[str, object]) -> int | None:
        calls.append(1)
        return await original(body)

    monkeypatch.setattr(engine, "count_prompt_tokens", counting)
    return calls


def _exact_count(srv: LiveServer, messages: list[dict[str, str]]) -> int:
    engine = services(srv.app).engines[SLUG]
    assert isinstance(engine, LlamaCppEngine)
    run = asyncio.run_coroutine_threadsafe(
        engine.count_prompt({"messages": messages}), services(srv.app).loop
    )
    return int(run.result(timeout=30))


def test_auto_mode_skips_the_count_where_the_bound_decides_nothing(
    live: LiveServer, models_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert services(live.app).chat.lazy_count
    counted = _counted(live, monkeypatch)
    ask = {"model": SLUG, "messages": MESSAGES, "max_tokens": 6, "temperature": 0}
    with httpx.Client(base_url=live.base_url, timeout=60, headers=live.headers()) as http:
        r = http.post("/v1/chat/completions", json=ask)
    assert r.status_code == 200, r.text
    assert counted == []
    usage = r.json()["usage"]
    # Billed from the engine's usage: the exact count, not the bound it held.
    assert usage["prompt_tokens"] == _exact_count(live, MESSAGES) > 10
    assert Decimal(r.headers["x-cost"]) == Decimal(str(usage["cost"])) == _cost(models_dir, usage)
    # A message with a name is not plain text (a template may print the name): counted.
    named = [{**MESSAGES[1], "name": "n" * 300}]
    with httpx.Client(base_url=live.base_url, timeout=60, headers=live.headers()) as http:
        r = http.post("/v1/chat/completions", json={**ask, "messages": named})
    assert r.status_code == 200, r.text
    assert counted == [1]


def test_auto_mode_holds_a_balance_near_its_end_exactly(
    live: LiveServer, models_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A balance of exactly this request's cost: the bound (several times the prompt)
    would be refused, so the walk counts and holds exactly, and serves it."""
    counted = _counted(live, monkeypatch)
    prompt = _exact_count(live, MESSAGES)
    cost = default_spec(models_dir).cost_micro(prompt, 4)
    account = accounts.create_account(live.db, "last-credits")
    accounts.grant(live.db, account.id, cost)
    _, key = accounts.create_key(live.db, account.id)
    ask = {"model": SLUG, "messages": MESSAGES, "max_tokens": 4, "ignore_eos": True}
    with httpx.Client(base_url=live.base_url, timeout=60) as http:
        r = http.post("/v1/chat/completions", json=ask, headers={"x-api-key": key})
    assert r.status_code == 200, r.text
    assert counted == [1]
    assert r.json()["usage"]["completion_tokens"] == 4
    assert Decimal(r.headers["x-cost"]) * MICRO == cost
    assert Decimal(r.headers["x-remaining-credits"]) == 0
    assert accounts.get_account(live.db, "last-credits").held == 0
    # A balance that covers the bound a few times, but not with room for many more
    # such holds, is held exactly too: near its end, a request in flight holds no
    # more than its worst case.
    bound = default_spec(models_dir).cost_micro(estimate_prompt_tokens({"messages": MESSAGES}), 4)
    account = accounts.create_account(live.db, "few-credits")
    accounts.grant(live.db, account.id, 4 * bound)
    _, key = accounts.create_key(live.db, account.id)
    with httpx.Client(base_url=live.base_url, timeout=60) as http:
        r = http.post("/v1/chat/completions", json=ask, headers={"x-api-key": key})
    assert r.status_code == 200, r.text
    assert counted == [1, 1]
    assert Decimal(r.headers["x-remaining-credits"]) * MICRO == 4 * bound - cost


@pytest.fixture(scope="module")
def small_window(
    models_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LiveServer]:
    spec = default_spec(models_dir).model_copy(update={"context_window": 600})
    settings = make_settings(tmp_path_factory.mktemp("small-window"), models_dir)
    srv = start_server(settings, Catalog([spec]), credits=1000)
    yield srv
    srv.stop()


def test_auto_mode_counts_a_prompt_whose_bound_would_not_fit_the_window(
    small_window: LiveServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    counted = _counted(small_window, monkeypatch)
    http = httpx.Client(base_url=small_window.base_url, timeout=60, headers=small_window.headers())
    short = [{"role": "user", "content": "Say hi."}]
    # About 70 tokens, but 400 bytes: the bound (bytes plus the template's allowance)
    # and 8 output tokens exceed the 600-token window, so the window needs the count.
    long = [{"role": "user", "content": "hello " * 66}]
    for messages, counts in ((short, []), (long, [1])):
        ask = {"model": SLUG, "messages": messages, "max_tokens": 8}
        r = http.post("/v1/chat/completions", json=ask)
        assert r.status_code == 200, r.text
        assert counted == counts
        assert r.json()["usage"]["prompt_tokens"] == _exact_count(small_window, messages)
