"""Rate limits on one gateway (the in-process store), against the real engine with
real clients: a burst against 5 requests per window on each route, the openai SDK's
own retry after the window, and tokens reserved up front and refunded at settlement.

Windows are a minute, except for the retry test, whose account is on a plan with a
3 s window so that the reset comes in seconds.
"""

from __future__ import annotations

import asyncio
import functools
import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam

from servelm.access.limits.records import set_key_limits, set_plan
from servelm.billing import accounts
from tests.conftest import LiveServer, make_settings, provision, start_server

SLUG = "smollm2-135m-instruct"
HI: list[ChatCompletionMessageParam] = [{"role": "user", "content": "Say hi."}]
WINDOW = 3

PLANS = f"""
[plans.short]
window = {WINDOW}

[plans.pro]
rpm = 7
"""


@pytest.fixture(scope="module")
def limited(models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    tmp = tmp_path_factory.mktemp("limits")
    models_file = tmp / "servelm.toml"
    models_file.write_text(PLANS)
    srv = start_server(make_settings(tmp, models_dir, models_file=models_file, slots=4))
    yield srv
    srv.stop()


def new_key(srv: LiveServer, name: str, plan: str | None = None, **limits: int) -> str:
    key = provision(srv.db, name, credits=100)
    set_key_limits(srv.db, key.split("_")[1], **limits)
    if plan is not None:
        set_plan(srv.db, accounts.get_account(srv.db, name).id, plan)
    return key


async def burst(url: str, key: str, body: dict[str, object], n: int) -> list[httpx.Response]:
    async with httpx.AsyncClient(timeout=120, headers={"x-api-key": key}) as client:
        return list(await asyncio.gather(*(client.post(url, json=body) for _ in range(n))))


@pytest.mark.parametrize("route", ["openai", "segmind"])
def test_burst_of_20_against_5_per_window_gets_exactly_5_through(
    limited: LiveServer, route: str
) -> None:
    key = new_key(limited, f"burst-{route}", rpm=5)
    body: dict[str, object]
    if route == "openai":
        url, body = f"{limited.v1}/chat/completions", {"model": SLUG, "messages": HI}
    else:
        url, body = f"{limited.v1}/{SLUG}", {"messages": HI}
    body["max_tokens"] = 2
    balance_before = accounts.get_account(limited.db, f"burst-{route}").balance

    responses = asyncio.run(burst(url, key, body, 20))

    ok = [r for r in responses if r.status_code == 200]
    refused = [r for r in responses if r.status_code == 429]
    assert (len(ok), len(refused)) == (5, 15), [r.status_code for r in responses]
    assert sorted(int(r.headers["x-ratelimit-remaining-requests"]) for r in ok) == [0, 1, 2, 3, 4]
    for r in responses:
        assert r.headers["x-ratelimit-limit-requests"] == "5"
        assert r.headers["ratelimit-policy"] == '"requests";q=5;w=60'
        assert r.headers["ratelimit"].startswith('"requests";r=')
        assert "x-remaining-credits" in r.headers
    for r in refused:
        assert r.headers["x-ratelimit-remaining-requests"] == "0"
        assert 1 <= int(r.headers["retry-after"]) <= 60
        assert r.headers["x-ratelimit-reset-requests"].endswith("s")
        if route == "openai":
            err = r.json()["error"]
            assert (err["type"], err["code"]) == ("rate_limit_error", "rate_limit_exceeded")
        else:
            assert isinstance(r.json()["error"], str)
            assert "Rate limit" in r.json()["error"]
    # The 15 refused held and charged nothing: the account paid for the 5 answers.
    account = accounts.get_account(limited.db, f"burst-{route}")
    assert account.held == 0
    charged = balance_before - account.balance
    assert charged == sum(_micro(r.headers["x-cost"]) for r in ok)


def test_openai_sdk_retries_past_the_reset(limited: LiveServer) -> None:
    key = new_key(limited, "sdk-retry", plan="short", rpm=2)
    client = openai.OpenAI(base_url=limited.v1, api_key=key, max_retries=2, timeout=60)
    for _ in range(2):
        client.chat.completions.create(model=SLUG, messages=HI, max_tokens=2)
    before = _refusals(limited)
    # The window is full: the first try gets 429 + Retry-After, the SDK waits that
    # long on its own and its retry gets through.
    raw = client.chat.completions.with_raw_response.create(model=SLUG, messages=HI, max_tokens=2)
    assert raw.http_response.status_code == 200
    assert raw.parse().choices[0].message.content is not None
    assert raw.retries_taken >= 1
    assert _refusals(limited) >= before + 1


def test_refusals_before_the_limit_step_and_replays_carry_its_headers(
    limited: LiveServer,
) -> None:
    """A 400, 403 or 404 decided before the limit step, and an idempotent replay,
    still say where the key stands, and none of them uses up a request."""
    key = new_key(limited, "early-refusals", rpm=5)
    h = {"x-api-key": key}
    url = f"{limited.v1}/chat/completions"
    post = functools.partial(httpx.post, timeout=120)
    served = post(url, json={"model": SLUG, "messages": HI, "max_tokens": 2}, headers=h)
    assert served.headers["x-ratelimit-remaining-requests"] == "4"
    early = [
        post(url, content=b"{not json", headers=h),
        post(url, json={"model": "no-such-model", "messages": HI}, headers=h),
        post(f"{limited.v1}/no-such-model", json={"messages": HI}, headers=h),
    ]
    assert [r.status_code for r in early] == [400, 404, 404]
    for r in early:
        assert r.headers["x-ratelimit-limit-requests"] == "5"
        assert r.headers["x-ratelimit-remaining-requests"] == "4"
        assert r.headers["ratelimit-policy"] == '"requests";q=5;w=60'
    replay_h = {**h, "idempotency-key": "early-refusals-1"}
    body = {"model": SLUG, "messages": HI, "max_tokens": 2}
    first = post(url, json=body, headers=replay_h)
    again = post(url, json=body, headers=replay_h)
    assert first.status_code == again.status_code == 200
    assert first.headers["x-ratelimit-remaining-requests"] == "3"
    assert again.headers["idempotent-replayed"] == "true"
    assert again.headers["x-ratelimit-remaining-requests"] == "3"


def _micro(credits: str) -> int:
    whole, _, frac = credits.partition(".")
    return int(whole) * 1_000_000 + int(frac.ljust(6, "0"))


def _refusals(srv: LiveServer) -> float:
    text = httpx.get(f"{srv.base_url}/metrics").text
    total = 0.0
    for line in text.splitlines():
        if line.startswith("servelm_ratelimit_refusals_total{"):
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_account_plan_limits_all_keys_together(limited: LiveServer) -> None:
    key1 = provision(limited.db, "pro-account", credits=100)
    account = accounts.get_account(limited.db, "pro-account")
    _, key2 = accounts.create_key(limited.db, account.id, "second")
    set_plan(limited.db, account.id, "pro")
    url = f"{limited.v1}/chat/completions"
    body = {"model": SLUG, "messages": HI, "max_tokens": 2}

    async def both() -> list[httpx.Response]:
        return [*await burst(url, key1, body, 5), *await burst(url, key2, body, 5)]

    codes = sorted(r.status_code for r in asyncio.run(both()))
    assert codes == [200] * 7 + [429] * 3


def test_tokens_reserved_up_front_and_refunded_at_settlement(limited: LiveServer) -> None:
    tpm = 1000
    key = new_key(limited, "tokens", tpm=tpm)
    http = httpx.Client(base_url=limited.v1, headers={"x-api-key": key}, timeout=60)
    # Greedy: sampled, the tiny model once wrote 800 tokens with none of these stops.
    body = {"model": SLUG, "messages": HI, "max_tokens": 800, "temperature": 0,
            "stop": [" ", "\n", "!", "."]}  # fmt: skip

    first = http.post("/chat/completions", json=body)
    assert first.status_code == 200, first.text
    prompt = first.json()["usage"]["prompt_tokens"]
    used = first.json()["usage"]["total_tokens"]
    assert used < 200  # a short answer
    # Reserved at prompt + 800 while it ran:
    assert int(first.headers["x-ratelimit-remaining-tokens"]) == tpm - prompt - 800

    # Without the refund only ~170 tokens would be left now, and this could not fit.
    second = http.post("/chat/completions", json=body)
    assert second.status_code == 200, second.text
    assert int(second.headers["x-ratelimit-remaining-tokens"]) == tpm - used - prompt - 800
    used += second.json()["usage"]["total_tokens"]

    # One token more than is left: refused before any hold, with the tokens headers.
    too_many = {**body, "max_tokens": tpm - used - prompt + 1}
    refused = http.post("/chat/completions", json=too_many)
    assert refused.status_code == 429, refused.text
    assert refused.json()["error"]["code"] == "rate_limit_exceeded"
    assert int(refused.headers["x-ratelimit-remaining-tokens"]) == tpm - used
    assert int(refused.headers["retry-after"]) >= 1
    # Exactly what is left still fits.
    fits = http.post("/chat/completions", json={**too_many, "max_tokens": tpm - used - prompt})
    assert fits.status_code == 200, fits.text
    assert accounts.get_account(limited.db, "tokens").held == 0


def test_concurrency_limit_refuses_a_second_request_in_flight(limited: LiveServer) -> None:
    key = new_key(limited, "concurrency", concurrency=1)
    headers = {"x-api-key": key}
    body = {"model": SLUG, "messages": HI, "max_tokens": 64, "stream": True, "ignore_eos": True}
    with (
        httpx.Client(base_url=limited.v1, headers=headers, timeout=60) as http,
        http.stream("POST", "/chat/completions", json=body) as running,
    ):
        assert running.status_code == 200
        second = http.post("/chat/completions", json={**body, "stream": False})
        assert second.status_code == 429
        assert "in flight" in second.json()["error"]["message"]
        for _ in running.iter_lines():
            pass
    # The stream settled: the slot is free again.
    after = httpx.post(
        f"{limited.v1}/chat/completions",
        headers=headers,
        json={**body, "stream": False, "max_tokens": 2},
        timeout=60,
    )
    assert after.status_code == 200, after.text


def test_deadline_stops_a_request_the_client_asked_to_bound(limited: LiveServer) -> None:
    key = new_key(limited, "deadline")
    headers = {"x-api-key": key, "x-request-timeout": "1"}
    long = {"model": SLUG, "messages": HI, "max_tokens": 1500, "ignore_eos": True}
    with httpx.Client(base_url=limited.v1, headers=headers, timeout=60) as http:
        plain = http.post("/chat/completions", json=long)
        assert plain.status_code == 504, plain.text
        assert plain.json()["error"]["code"] == "deadline_exceeded"
        # Long enough for the first token on a busy machine, far too short for 1500.
        streamed = {**long, "stream": True}
        with http.stream(
            "POST", "/chat/completions", json=streamed, headers={"x-request-timeout": "5"}
        ) as r:
            assert r.status_code == 200
            events = [line for line in r.iter_lines() if line.startswith("data: ")]
    last = json.loads(events[-1].removeprefix("data: "))
    assert last["error"]["code"] == "deadline_exceeded"
    assert "data: [DONE]" not in events
    account = accounts.get_account(limited.db, "deadline")
    assert account.held == 0
