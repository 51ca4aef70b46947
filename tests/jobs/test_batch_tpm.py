"""Queued work's own tokens-per-window budget (issue 28: "a plan may give batch its
own TPM"): the plan's ``batch_tpm`` meters async requests and batch lines, apart from
the interactive ``tpm``. A line waits for room instead of failing; a line larger than
the whole budget fails with 429 in the error file. Real server, engine and SDK."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from servelm.api.services import services
from servelm.catalog.specs import Catalog, Plan
from tests.conftest import LiveServer, make_settings, start_server
from tests.jobs.conftest import SLUG, counts, jobs_catalog
from tests.jobs.test_batches import wait_batch

CHAT = "/v1/chat/completions"
WINDOW = 4.0
# Interactive: about two small requests per window; queued work: one line of some 40
# tokens (prompt + 4 out), so of the two lines the runner claims at once, one always
# waits for the other to leave the window, however fast or slow the machine is.
TPM = 100
BATCH_TPM = 60


@pytest.fixture(scope="module")
def tpm_live(models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    (spec,) = jobs_catalog(models_dir)
    plans = {"default": Plan(tpm=TPM, batch_tpm=BATCH_TPM, window=WINDOW)}
    settings = make_settings(
        tmp_path_factory.mktemp("batch-tpm"), models_dir, jobs_poll_seconds=0.05
    )
    srv = start_server(settings, Catalog([spec], plans), credits=100)
    yield srv
    srv.stop()


def lines(n: int, max_tokens: int, prefix: str) -> bytes:
    out = []
    for i in range(n):
        body = {
            "model": SLUG,
            "messages": [{"role": "user", "content": f"Count to {i}."}],
            "max_tokens": max_tokens,
        }
        out.append(
            json.dumps({"custom_id": f"{prefix}-{i}", "method": "POST", "url": CHAT, "body": body})
        )
    return ("\n".join(out) + "\n").encode()


def test_batch_lines_wait_for_their_own_budget_and_leave_the_interactive_one_alone(
    tpm_live: LiveServer,
) -> None:
    client = openai.OpenAI(base_url=tpm_live.v1, api_key=tpm_live.api_key, max_retries=0)
    limiter = services(tpm_live.app).limiter
    waits = limiter.queued_waits._value.get()
    # Three lines of some 40 tokens each: more than one window of batch_tpm holds (and
    # more than the interactive tpm), so some must wait; none fails for it.
    f = client.files.create(file=("t.jsonl", lines(3, 4, "tpm")), purpose="batch")
    batch = client.batches.create(
        input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    # While it runs, an interactive request has the whole interactive budget: its
    # headers count its own reservation and nothing of the batch's.
    live = httpx.post(
        f"{tpm_live.v1}/chat/completions",
        headers=tpm_live.headers(),
        json={"model": SLUG, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4},
        timeout=120,
    )
    assert live.status_code == 200, live.text
    reserved = live.json()["usage"]["prompt_tokens"] + 4
    assert int(live.headers["x-ratelimit-remaining-tokens"]) == TPM - reserved
    done = wait_batch(client, batch.id)
    assert done.status == "completed"
    assert (counts(done).completed, counts(done).failed) == (3, 0)
    assert limiter.queued_waits._value.get() > waits  # lines waited for batch_tpm


def test_a_line_larger_than_the_whole_batch_budget_fails_with_429(tpm_live: LiveServer) -> None:
    client = openai.OpenAI(base_url=tpm_live.v1, api_key=tpm_live.api_key, max_retries=0)
    f = client.files.create(file=("big.jsonl", lines(1, BATCH_TPM + 1, "big")), purpose="batch")
    batch = client.batches.create(
        input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    done = wait_batch(client, batch.id)
    assert (counts(done).completed, counts(done).failed) == (0, 1)
    assert done.error_file_id is not None
    (error,) = [json.loads(x) for x in client.files.content(done.error_file_id).text.splitlines()]
    assert error["custom_id"] == "big-0"
    assert error["response"]["status_code"] == 429
    assert "queued work" in error["response"]["body"]["error"]["message"]
