"""OpenAI's Batch API through the official ``openai`` SDK, on SQLite and PostgreSQL."""

from __future__ import annotations

import json
import time
from decimal import Decimal

import httpx
import openai
import pytest

from servelm.billing.money import MICRO
from servelm.jobs.webhooks import verify
from servelm.store.tables import usage
from tests.conftest import LiveServer
from tests.jobs.conftest import (
    SLUG,
    Receiver,
    counts,
    credits,
    jobs_catalog,
    ledger_clean,
    open_holds,
)

CHAT = "/v1/chat/completions"
LINES = 50
BAD = {7, 31}  # lines whose body is wrong: they land in the error file


def jsonl(lines: int, prefix: str) -> bytes:
    out = []
    for i in range(lines):
        body: dict[str, object] = {
            "model": SLUG,
            "messages": [{"role": "user", "content": f"Count to {i}."}],
            "max_tokens": 3,
        }
        if i in BAD:
            body["messages"] = [{"role": "wizard", "content": "x"}]
        line = {"custom_id": f"{prefix}-{i}", "method": "POST", "url": CHAT, "body": body}
        out.append(json.dumps(line))
    return ("\n".join(out) + "\n").encode()


@pytest.fixture
def client(jobs_live: LiveServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=jobs_live.v1, api_key=jobs_live.api_key, max_retries=0)


def wait_batch(client: openai.OpenAI, batch_id: str) -> openai.types.Batch:
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        batch = client.batches.retrieve(batch_id)
        if batch.status in ("completed", "failed", "cancelled", "expired"):
            return batch
        time.sleep(0.1)
    raise AssertionError(f"batch {batch_id} did not finish: {batch}")


@pytest.mark.timeout(600)  # 50 generations; a loaded machine takes minutes
def test_sdk_batch_runs_at_the_batch_price(
    jobs_live: LiveServer, client: openai.OpenAI, receiver: Receiver
) -> None:
    start = credits(jobs_live)
    uploaded = client.files.create(file=("in.jsonl", jsonl(LINES, "row")), purpose="batch")
    assert uploaded.purpose == "batch" and uploaded.bytes > 0
    hook = f"{receiver.url}/batch-{jobs_live.settings.data_dir.name}"
    batch = client.batches.create(
        input_file_id=uploaded.id,
        endpoint="/v1/chat/completions",
        completion_window="24h",
        metadata={"run": "test"},
        extra_body={"webhook_url": hook},
    )
    assert batch.status == "in_progress" and counts(batch).total == LINES
    done = wait_batch(client, batch.id)
    assert done.status == "completed"
    assert counts(done).completed == LINES - len(BAD)
    assert counts(done).failed == len(BAD)
    assert done.metadata == {"run": "test"}
    assert done.output_file_id and done.error_file_id

    output = [json.loads(x) for x in client.files.content(done.output_file_id).text.splitlines()]
    errors = [json.loads(x) for x in client.files.content(done.error_file_id).text.splitlines()]
    assert sorted(o["custom_id"] for o in output) == sorted(
        f"row-{i}" for i in range(LINES) if i not in BAD
    )
    assert [e["custom_id"] for e in errors] == [f"row-{i}" for i in sorted(BAD)]
    assert all(e["response"]["status_code"] == 400 for e in errors)
    assert all("role" in e["error"]["message"] for e in errors)

    # Each line paid the batch price: half of what the same tokens cost live.
    spec = next(iter(jobs_catalog(jobs_live.settings.model_dir)))
    half = spec.batch_priced()
    total = 0
    for o in output:
        assert o["response"]["status_code"] == 200
        u = o["response"]["body"]["usage"]
        cost = int(Decimal(str(u["cost"])) * MICRO)
        assert cost == half.cost_micro(u["prompt_tokens"], u["completion_tokens"])
        assert cost < spec.cost_micro(u["prompt_tokens"], u["completion_tokens"])
        total += cost
    assert start - credits(jobs_live) == total
    assert done.model_extra is not None and Decimal(str(done.model_extra["cost"])) * MICRO == total

    # One charge per line that ran, none for the bad ones (refused before any hold).
    with jobs_live.db.read() as conn:
        rows = conn.execute(usage.select().where(usage.c.request_id.like(f"{batch.id}:%"))).all()
    assert len(rows) == LINES - len(BAD) and not open_holds(jobs_live, batch.id)
    assert ledger_clean(jobs_live)

    listed = client.batches.list(limit=5)
    assert batch.id in [b.id for b in listed.data]
    # The webhook came, signed.
    url = f"{jobs_live.base_url}/v2/webhook-secret"
    secret = httpx.get(url, headers=jobs_live.headers()).json()["secret"]
    path = hook[len(receiver.url) :]
    calls = receiver.wait_for(lambda cs: any(c.path == path for c in cs))
    mine = [c for c in calls if c.path == path]
    assert len(mine) == 1 and verify(secret, mine[0].headers, mine[0].body)
    assert json.loads(mine[0].body)["type"] == "batch.completed"


def test_cancel_releases_what_was_not_used(jobs_live: LiveServer, client: openai.OpenAI) -> None:
    start = credits(jobs_live)
    uploaded = client.files.create(file=("c.jsonl", jsonl(200, "cx")), purpose="batch")
    batch = client.batches.create(
        input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    cancelled = client.batches.cancel(batch.id)
    assert cancelled.status in ("cancelling", "cancelled")
    done = wait_batch(client, batch.id)
    assert done.status == "cancelled"
    ran = counts(done).completed
    assert ran < 200
    # What ran paid; the rest held nothing and paid nothing.
    with jobs_live.db.read() as conn:
        paid = conn.execute(usage.select().where(usage.c.request_id.like(f"{batch.id}:%"))).all()
    assert not open_holds(jobs_live, batch.id)
    assert start - credits(jobs_live) == sum(r.cost for r in paid)
    assert done.error_file_id
    errors = [json.loads(e) for e in client.files.content(done.error_file_id).text.splitlines()]
    unrun = 200 - ran - counts(done).failed
    assert sum(e["error"]["code"] == "batch_cancelled" for e in errors) == unrun


def test_bad_batches_are_refused_with_400(jobs_live: LiveServer, client: openai.OpenAI) -> None:
    dup = b'{"custom_id":"a","method":"POST","url":"/v1/chat/completions","body":{}}\n' * 2
    for content, word in ((b"not json\n", "JSON"), (dup, "twice"), (b"\n", "no requests")):
        f = client.files.create(file=("x.jsonl", content), purpose="batch")
        with pytest.raises(openai.BadRequestError, match=word):
            client.batches.create(
                input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h"
            )
    with pytest.raises(openai.BadRequestError, match="purpose"):
        client.files.create(file=("x.jsonl", b"{}"), purpose="fine-tune")
    with pytest.raises(openai.NotFoundError):
        client.batches.retrieve("batch_nothing")
    with pytest.raises(openai.BadRequestError, match=r"(?i)webhook"):
        f = client.files.create(file=("y.jsonl", jsonl(1, "y")), purpose="batch")
        client.batches.create(
            input_file_id=f.id,
            endpoint="/v1/chat/completions",
            completion_window="24h",
            extra_body={"webhook_url": "http://169.254.169.254/latest"},
        )
