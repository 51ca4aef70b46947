"""Segmind's async API end to end: real server, real engine, real money."""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from decimal import Decimal
from pathlib import Path

import httpx
import pytest
from sqlalchemy import select

from servelm.api.services import services
from servelm.billing.money import MICRO
from servelm.jobs.webhooks import verify
from servelm.store.tables import holds
from tests.conftest import LiveServer, provision
from tests.jobs.conftest import SLUG, Receiver, jobs_server, ledger_clean, poll

# 50 in the acceptance (run by hand with SERVELM_TEST_ASYNC_COUNT=50); fewer
# in the suite, which checks the same things.
COUNT = int(os.environ.get("SERVELM_TEST_ASYNC_COUNT", "12"))


def balance(client: httpx.Client) -> int:
    return int(client.get("/v1/credits").json()["micro_credits"])


def body(i: int, **extra: object) -> dict[str, object]:
    messages = [{"role": "user", "content": f"Say a word about {i}."}]
    return {"messages": messages, "max_tokens": 4, **extra}


@pytest.fixture(scope="module")
def jobs_live(models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    """SQLite only: the queue's moves on PostgreSQL are test_queue's and
    test_batches' (the suite's time matters more than a second run of the same walk)."""
    srv = jobs_server(tmp_path_factory.mktemp("async"), models_dir)
    yield srv
    srv.stop()


@pytest.fixture
def client(jobs_live: LiveServer) -> httpx.Client:
    return httpx.Client(base_url=jobs_live.base_url, headers=jobs_live.headers(), timeout=60)


def test_async_requests_complete_and_cost_exactly_what_they_say(
    jobs_live: LiveServer, client: httpx.Client
) -> None:
    before = balance(client)
    with ThreadPoolExecutor(8) as pool:
        subs = list(pool.map(lambda i: client.post(f"/v2/{SLUG}", json=body(i)), range(COUNT)))
    assert {r.status_code for r in subs} == {200}
    for r in subs:
        sub = r.json()
        assert sub["status"] == "QUEUED" and sub["request_id"].startswith("req_")
        assert sub["status_url"].endswith(f"/v2/requests/{sub['request_id']}/status")
    statuses = [
        poll(client, r.json()["status_url"], lambda s: s["status"] in ("COMPLETED", "FAILED"))
        for r in subs
    ]
    assert {s["status"] for s in statuses} == {"COMPLETED"}
    costs = 0
    for r in subs:
        out = client.get(r.json()["response_url"])
        assert out.status_code == 200
        answer = out.json()
        # The same shape as POST /v1/{slug}.
        assert answer["object"] == "chat.completion" and answer["model"] == SLUG
        assert answer["choices"][0]["message"]["role"] == "assistant"
        assert answer["usage"]["completion_tokens"] >= 1
        costs += int(Decimal(str(answer["usage"]["cost"])) * MICRO)
    assert costs > 0
    assert before - balance(client) == costs
    sync = client.post(f"/v1/{SLUG}", json=body(0)).json()
    assert set(sync) == set(client.get(subs[0].json()["response_url"]).json())


def test_zero_balance_is_refused_at_submission(jobs_live: LiveServer) -> None:
    key = provision(jobs_live.db, "broke-async", 0)
    r = httpx.post(f"{jobs_live.base_url}/v2/{SLUG}", json=body(1), headers={"x-api-key": key})
    assert r.status_code == 406
    assert "Not enough credits" in r.json()["error"]
    assert r.headers["x-remaining-credits"] == "0.000000"


def test_bad_body_and_stream_are_refused_at_submission(client: httpx.Client) -> None:
    r = client.post(f"/v2/{SLUG}", json={"messages": "nope"})
    assert r.status_code == 400 and isinstance(r.json()["error"], str)
    r = client.post(f"/v2/{SLUG}", json=body(1, stream=True))
    assert r.status_code == 400 and "stream" in r.json()["error"]
    assert client.get("/v2/requests/req_nothing/status").status_code == 404


def test_webhook_is_signed_and_retried_until_taken(
    jobs_live: LiveServer, client: httpx.Client, receiver: Receiver
) -> None:
    secret = client.get("/v2/webhook-secret").json()["secret"]
    assert secret.startswith("whsec_")
    path = f"/hook-{jobs_live.settings.data_dir.name}-fail2"
    sub = client.post(f"/v2/{SLUG}", json=body(2, webhook_url=receiver.url + path)).json()
    calls = receiver.wait_for(lambda cs: sum(c.path == path for c in cs) >= 3)
    mine = [c for c in calls if c.path == path]
    assert len(mine) == 3  # failed twice, taken the third time, then no more
    assert all(verify(secret, c.headers, c.body) for c in mine)
    assert len({c.headers["webhook-id"] for c in mine}) == 1
    event = json.loads(mine[-1].body)
    assert event["type"] == "request.completed"
    assert event["data"]["request_id"] == sub["request_id"]
    # A forged body does not verify.
    assert not verify(secret, mine[-1].headers, mine[-1].body + b" ")


def test_private_webhook_url_is_refused_at_submission(client: httpx.Client) -> None:
    before = balance(client)
    for url in ("http://10.1.2.3/hook", "http://192.168.0.1:8080/x", "file:///etc/passwd"):
        r = client.post(f"/v2/{SLUG}", json=body(3, webhook_url=url))
        assert r.status_code == 400, url
        assert "webhook" in r.json()["error"].lower()
    assert balance(client) == before  # nothing held


# SmolLM2's <|endoftext|>, <|im_start|> and <|im_end|>: banned, a stream runs to
# max_tokens, holding its slot while the test looks.
NO_END = {"0": -100, "1": -100, "2": -100}


def open_hold(live: LiveServer, request_id: str) -> bool:
    with live.db.read() as conn:
        row = conn.execute(
            select(holds.c.settled_at).where(holds.c.request_id == request_id)
        ).first()
    assert row is not None, f"no hold for {request_id}"
    return row.settled_at is None


def test_the_owner_cancels_a_queued_request_and_gets_its_hold_back(
    jobs_live: LiveServer,
) -> None:
    key = provision(jobs_live.db, "cancel-owner", 1)
    owner = httpx.Client(base_url=jobs_live.base_url, headers={"x-api-key": key}, timeout=60)
    start = balance(owner)
    engine = services(jobs_live.app).engines
    with contextlib.ExitStack() as streams:
        # Every slot taken by a live stream (a key each: one key holds all but one):
        # queued work is not claimed while live traffic uses the slots.
        for n in range(jobs_live.settings.slots):
            live_key = provision(jobs_live.db, f"cancel-live{n}", 1)
            stream = streams.enter_context(
                httpx.stream(
                    "POST",
                    f"{jobs_live.v1}/chat/completions",
                    json={
                        **body(n),
                        "model": SLUG,
                        "max_tokens": 400,
                        "stream": True,
                        "logit_bias": NO_END,
                    },
                    headers={"x-api-key": live_key},
                    timeout=60,
                )
            )
            assert stream.status_code == 200
        deadline = time.monotonic() + 120
        while engine[SLUG].stats.running < jobs_live.settings.slots:
            assert time.monotonic() < deadline, "the live streams never took every slot"
            time.sleep(0.02)
        sub = owner.post(f"/v2/{SLUG}", json=body(5)).json()
        rid = sub["request_id"]
        assert balance(owner) < start and open_hold(jobs_live, rid)  # held at submission
        assert owner.get(sub["status_url"]).json()["status"] == "QUEUED"
        # Another account's key does not see it.
        other = httpx.post(
            f"{jobs_live.base_url}/v2/requests/{rid}/cancel", headers=jobs_live.headers()
        )
        assert other.status_code == 404
        cancelled = owner.post(f"/v2/requests/{rid}/cancel")
        assert cancelled.status_code == 200, cancelled.text
        assert cancelled.json()["status"] == "CANCELLED"
        # Again: the same answer, nothing released twice.
        assert owner.post(f"/v2/requests/{rid}/cancel").json()["status"] == "CANCELLED"
    assert balance(owner) == start  # the hold released exactly
    assert not open_hold(jobs_live, rid)
    assert owner.get(sub["status_url"]).json()["status"] == "CANCELLED"
    gone = owner.get(sub["response_url"])
    assert gone.status_code == 410 and "cancelled by its owner" in gone.json()["error"]
    # A request that has finished cannot be cancelled; it paid what it cost.
    done = owner.post(f"/v2/{SLUG}", json=body(6)).json()
    poll(owner, done["status_url"], lambda s: s["status"] == "COMPLETED")
    late = owner.post(f"/v2/requests/{done['request_id']}/cancel")
    assert late.status_code == 409 and "cannot be cancelled" in late.json()["error"]
    cost = Decimal(str(owner.get(done["response_url"]).json()["usage"]["cost"]))
    assert start - balance(owner) == int(cost * MICRO) > 0
    assert owner.post("/v2/requests/req_nothing/cancel").status_code == 404


def test_ledger_stays_clean(jobs_live: LiveServer) -> None:
    assert ledger_clean(jobs_live)
