"""Keys, credits and their headers through the HTTP API, with httpx and the openai SDK."""

from __future__ import annotations

import json
import logging
import subprocess
import time
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam

from servelm.api.services import services
from servelm.billing import accounts, audit
from servelm.billing.money import MICRO
from tests.conftest import ADMIN_TOKEN, LiveServer, provision

SLUG = "smollm2-135m-instruct"
HELLO = {"messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 8}


def segmind(
    live: LiveServer, key: str | None, body: dict[str, Any] | None = None, /, **headers: str
) -> httpx.Response:
    h = {"x-api-key": key} if key else {}
    return httpx.post(f"{live.v1}/{SLUG}", json=body or HELLO, headers={**h, **headers}, timeout=60)


def openai_route(
    live: LiveServer, key: str | None, body: dict[str, Any] | None = None, **headers: str
) -> httpx.Response:
    h = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.post(
        f"{live.v1}/chat/completions",
        json={"model": SLUG, **(body or HELLO)},
        headers={**h, **headers},
        timeout=60,
    )


def credits_of(r: httpx.Response) -> Decimal:
    return Decimal(r.headers["x-remaining-credits"])


# -- headers and arithmetic ------------------------------------------------------------


def test_remaining_credits_fall_by_exactly_the_cost_of_each_request(live: LiveServer) -> None:
    key = provision(live.db, "arith", 1)
    spec = services(live.app).catalog.resolve(SLUG)
    before = Decimal(1)
    for send in (segmind, openai_route, segmind, openai_route):
        r = send(live, key)
        assert r.status_code == 200, r.text
        cost = Decimal(r.headers["x-cost"])
        u = r.json()["usage"]
        assert cost * MICRO == spec.cost_micro(u["prompt_tokens"], u["completion_tokens"])
        assert cost > 0
        assert credits_of(r) == before - cost
        # usage has JSON numbers (issue 30); the headers the exact decimals.
        assert isinstance(u["cost"], float) and isinstance(u["remaining_credits"], float)
        assert Decimal(str(u["cost"])) == cost
        assert Decimal(str(u["remaining_credits"])) == credits_of(r)
        before = credits_of(r)
    assert audit.ledger_check(live.db) == []


def test_a_stream_says_the_held_balance_up_front_and_the_cost_at_the_end(
    live: LiveServer,
) -> None:
    key = provision(live.db, "streamer", 1)
    body = {**HELLO, "stream": True, "stream_options": {"include_usage": True}}
    with httpx.stream(
        "POST", f"{live.v1}/{SLUG}", json=body, headers={"x-api-key": key}, timeout=60
    ) as r:
        assert r.status_code == 200
        held_balance = credits_of(r)
        events = [line.removeprefix("data: ") for line in r.iter_lines() if line]
    assert events[-1] == "[DONE]"
    usage = json.loads(events[-2])["usage"]
    assert held_balance < 1  # the worst case is reserved before the first token
    remaining, cost = Decimal(str(usage["remaining_credits"])), Decimal(str(usage["cost"]))
    assert remaining == 1 - cost
    assert remaining >= held_balance  # the unused hold came back
    credits = httpx.get(f"{live.v1}/credits", headers={"x-api-key": key}).json()
    assert Decimal(credits["credits"]) == remaining


def test_balance_and_usage_endpoints(live: LiveServer) -> None:
    key = provision(live.db, "reader", 2)
    assert segmind(live, key).status_code == 200
    h = {"x-api-key": key}
    credits = httpx.get(f"{live.v1}/credits", headers=h).json()
    segmind_credits = httpx.get(f"{live.v1}/get-user-credits", headers=h).json()
    assert Decimal(credits["credits"]) < 2
    assert segmind_credits["credits"] == pytest.approx(float(credits["credits"]))
    (row,) = httpx.get(f"{live.v1}/usage", headers=h).json()["data"]
    assert row["model"] == SLUG and row["requests"] == 1
    assert Decimal(row["cost"]) == 2 - Decimal(credits["credits"])
    assert httpx.get(f"{live.v1}/credits").status_code == 401


def test_without_max_tokens_generation_is_capped_at_what_the_balance_affords(
    live: LiveServer,
) -> None:
    """No max_tokens: not a 406 but as many tokens as the balance pays for."""
    spec = services(live.app).catalog.resolve(SLUG)
    probe = segmind(live, live.api_key, {"messages": HELLO["messages"], "max_tokens": 1})
    prompt = probe.json()["usage"]["prompt_tokens"]
    grant = spec.cost_micro(prompt, 3)
    # What that grant buys, found by brute force rather than by the code under test.
    affordable = max(
        n for n in range(spec.default_max_tokens) if spec.cost_micro(prompt, n) <= grant
    )
    assert 3 <= affordable < spec.default_max_tokens
    account = accounts.create_account(live.db, "pauper")
    accounts.grant(live.db, account.id, grant)
    _, key = accounts.create_key(live.db, account.id)
    body = {"messages": HELLO["messages"], "ignore_eos": True}
    r = segmind(live, key, body)
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] == affordable
    assert r.json()["choices"][0]["finish_reason"] == "length"
    cost = spec.cost_micro(prompt, affordable)
    assert Decimal(r.headers["x-cost"]) * MICRO == cost
    assert Decimal(r.headers["x-remaining-credits"]) * MICRO == grant - cost


# -- refusals in both dialects -----------------------------------------------------------


def test_missing_and_bad_keys_are_401_in_each_dialect(live: LiveServer) -> None:
    forged = live.api_key[:-4] + ("AAAA" if not live.api_key.endswith("AAAA") else "BBBB")
    cases = [
        (None, "Missing API key"),
        ("not-a-key", "Invalid API key"),
        (forged, "Invalid API key"),
    ]
    for key, words in cases:
        r = segmind(live, key)
        assert r.status_code == 401 and words in r.json()["error"], r.text
        assert "x-remaining-credits" not in r.headers
        r = openai_route(live, key)
        assert r.status_code == 401
        err = r.json()["error"]
        assert words in err["message"] and err["code"] == "invalid_api_key"
    r = httpx.post(
        f"{live.v1}/{SLUG}", json=HELLO, headers={"Authorization": "Basic abc"}, timeout=30
    )
    assert r.status_code == 401 and "Bearer" in r.json()["error"]


def test_key_limited_to_other_models_is_403_in_each_dialect(live: LiveServer) -> None:
    key = provision(live.db, "narrow", 1, allowed_models=["llama-v3p1-8b-instruct"])
    r = segmind(live, key)
    assert r.status_code == 403 and SLUG in r.json()["error"]
    assert r.headers["x-remaining-credits"] == "1.000000"
    r = openai_route(live, key)
    assert r.status_code == 403
    assert r.json()["error"]["code"] == "model_not_allowed"
    assert r.json()["error"]["param"] == "model"


def test_unaffordable_request_is_406_on_segmind_and_402_on_openai(live: LiveServer) -> None:
    key = provision(live.db, "broke", 0)
    body = {**HELLO, "max_tokens": 100}
    r = segmind(live, key, body)
    assert r.status_code == 406, r.text
    assert "Not enough credits" in r.json()["error"] and "balance is 0.000000" in r.json()["error"]
    assert r.headers["x-remaining-credits"] == "0.000000"
    r = openai_route(live, key, body)
    assert r.status_code == 402
    err = r.json()["error"]
    assert err["code"] == "insufficient_credits" and "Not enough credits" in err["message"]
    assert r.headers["x-remaining-credits"] == "0.000000"


def test_sdk_raises_its_own_exception_classes(live: LiveServer) -> None:
    def client(key: str) -> openai.OpenAI:
        return openai.OpenAI(base_url=live.v1, api_key=key, max_retries=0)

    msgs: list[ChatCompletionMessageParam] = [{"role": "user", "content": "hi"}]
    with pytest.raises(openai.AuthenticationError) as auth:
        client("slm_wrong").chat.completions.create(model=SLUG, messages=msgs)
    assert auth.value.status_code == 401 and "Invalid API key" in auth.value.message
    narrow = provision(live.db, "sdk-narrow", 1, allowed_models=["mixtral-8x7b-instruct"])
    with pytest.raises(openai.PermissionDeniedError) as denied:
        client(narrow).chat.completions.create(model=SLUG, messages=msgs)
    assert "may not use model" in denied.value.message
    broke = provision(live.db, "sdk-broke", 0)
    with pytest.raises(openai.APIStatusError) as poor:
        client(broke).chat.completions.create(model=SLUG, messages=msgs, max_tokens=5)
    assert poor.value.status_code == 402 and poor.value.code == "insufficient_credits"


def test_revoked_key_stops_working_within_the_cache_time(live: LiveServer) -> None:
    key = provision(live.db, "revokee", 1)
    assert segmind(live, key).status_code == 200
    key_id = key.split("_")[1]
    admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    r = httpx.post(f"{live.base_url}/admin/keys/{key_id}/revoke", headers=admin)
    assert r.status_code == 200 and r.json()["revoked"] is True
    time.sleep(live.settings.key_cache_seconds + 0.2)
    r = segmind(live, key)
    assert r.status_code == 401 and "revoked" in r.json()["error"]


def test_expired_key_is_401(live: LiveServer) -> None:
    from datetime import timedelta

    from servelm.billing.clock import utcnow

    key = provision(live.db, "expired", 1, expires_at=utcnow() - timedelta(seconds=1))
    r = openai_route(live, key)
    assert r.status_code == 401 and "expired" in r.json()["error"]["message"]


# -- idempotency -------------------------------------------------------------------------


def test_idempotent_retry_is_charged_once_and_answered_the_same(live: LiveServer) -> None:
    key = provision(live.db, "retrier", 1)
    first = segmind(live, key, **{"Idempotency-Key": "order-42"})
    again = segmind(live, key, **{"Idempotency-Key": "order-42"})
    assert first.status_code == again.status_code == 200
    assert again.json() == first.json()
    assert again.headers["idempotent-replayed"] == "true"
    assert again.headers["x-cost"] == "0.000000"
    assert credits_of(again) == credits_of(first)  # no second charge
    other = {**HELLO, "max_tokens": 7}
    r = segmind(live, key, other, **{"Idempotency-Key": "order-42"})
    assert r.status_code == 409 and "different request body" in r.json()["error"]
    r = openai_route(live, key, other, **{"Idempotency-Key": "order-42"})
    assert r.status_code == 409 and r.json()["error"]["code"] == "conflict"
    usage = httpx.get(f"{live.v1}/usage", headers={"x-api-key": key}).json()["data"]
    assert sum(row["requests"] for row in usage) == 1


# -- the admin API -----------------------------------------------------------------------


def test_admin_api_needs_the_admin_token_not_a_user_key(live: LiveServer) -> None:
    url = f"{live.base_url}/admin/accounts"
    assert httpx.get(url).status_code == 401
    assert httpx.get(url, headers={"Authorization": f"Bearer {live.api_key}"}).status_code == 401
    assert httpx.get(url, headers={"x-api-key": live.api_key}).status_code == 401
    assert httpx.get(url, headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}).status_code == 200


def test_admin_api_runs_an_account_from_creation_to_audit(live: LiveServer) -> None:
    admin = httpx.Client(
        base_url=f"{live.base_url}/admin", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}
    )
    account = admin.post("/accounts", json={"name": "via-admin"}).json()
    r = admin.post(f"/accounts/{account['id']}/credits", json={"credits": "0.5", "note": "x"})
    assert r.json()["credits"] == "0.500000"
    created = admin.post(f"/accounts/{account['id']}/keys", json={"name": "k"})
    assert created.status_code == 201
    key = created.json()["key"]
    assert segmind(live, key).status_code == 200
    listed = admin.get("/keys", params={"account_id": account["id"]}).json()["data"]
    assert [k["key_id"] for k in listed] == [created.json()["key_id"]]
    # The plaintext is shown once only; listings show the public id.
    assert listed[0]["key"].endswith("_***") and key.split("_", 2)[2] not in str(listed)
    usage = admin.get("/usage", params={"account_id": account["id"]}).json()["data"]
    assert usage[0]["requests"] == 1
    assert admin.get("/ledger/check").json() == {"ok": True, "problems": []}
    dup = admin.post("/accounts", json={"name": "via-admin"})
    assert dup.status_code == 409
    bad = admin.post(f"/accounts/{account['id']}/credits", json={"credits": "-3"})
    assert bad.status_code == 400
    missing = admin.post("/accounts/999999/credits", json={"credits": "1"})
    assert missing.status_code == 404


# -- secrets stay secret ---------------------------------------------------------------


def test_no_key_material_in_database_or_logs(
    live: LiveServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    account = accounts.create_account(live.db, "secretive")
    accounts.grant(live.db, account.id, MICRO)
    created = httpx.post(
        f"{live.base_url}/admin/accounts/{account.id}/keys", json={"name": "s"}, headers=admin
    ).json()
    key = created["key"]
    wrong = key[:-6] + "XXXXXX"
    segmind(live, key)
    openai_route(live, key)
    segmind(live, wrong)
    segmind(live, key, {"messages": "not a list"})
    secrets = [key, key.split("_", 2)[2], wrong.split("_", 2)[2], ADMIN_TOKEN]

    logged = caplog.text
    # The requests were logged (so the check below looks at real log lines).
    assert f"POST /v1/{SLUG} 401" in logged and "/admin/accounts" in logged
    db_file = Path(live.settings.data_dir) / "servelm.db"
    # Read in another process: closing a descriptor of the database file in this one
    # would drop the POSIX locks the live server's SQLite holds on it, and the next
    # process to close the database would then take itself for the last and delete
    # the write-ahead log under the server (SQLite's documented POSIX-locks caveat).
    files = [str(p) for p in db_file.parent.glob("servelm.db*") if p.is_file()]
    stored = subprocess.run(["cat", *files], capture_output=True, check=True).stdout
    assert len(stored) > 0
    for secret in secrets:
        assert secret not in logged
        assert secret.encode() not in stored
