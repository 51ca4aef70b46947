"""Issue 25.1 on the real engine: long prompts that each fit the model's window but
not together. llama.cpp's slots share one KV cache of the window's size; before
admission counted it, three concurrent ~480-token prompts on a 512-token model
filled it halfway through their prefills and llama.cpp failed all of them with a 500
("Context size has been exceeded"). Now each reserves its prompt plus ``max_tokens``
before it runs: they wait for one another, all end 200, and each is charged exactly
its usage. A short request sent beside them answers too (it fits beside one long one).

The same rule as the 8,192-token case of the issue (7,532-token prompts), at a
small part of the CPU. Prompts are made of words: SmolLM2's tokenizer splits digits.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import select

from servelm.api.services import services
from servelm.billing import accounts, audit
from servelm.billing.money import MICRO
from servelm.catalog.models_file import load_catalog
from servelm.store.tables import usage
from tests.conftest import LiveServer, engine_of, make_settings, provision, start_server
from tests.hostile.conftest import wait_no_open_holds
from tests.support.prompts import word_prompt

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

SLUG = "kv-small"
WINDOW = 512
LONG = 3
LONG_WORDS = 440  # ~480 tokens: one fits the 512-token window, two do not


@pytest.fixture(scope="module")
def small_window(
    models_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LiveServer]:
    tmp = tmp_path_factory.mktemp("kv")
    gguf = models_dir / "SmolLM2-135M-Instruct.Q4_1.gguf"
    models_file = tmp / "servelm.toml"
    models_file.write_text(
        f'[models.{SLUG}]\npath = "{gguf}"\ncontext_window = {WINDOW}\n'
        "default_max_tokens = 16\nmax_output_tokens = 64\n"
        "[models.smollm2-135m-instruct]\nenabled = false\n"
    )
    # Four slots: every long prompt gets one at once, as in the issue.
    settings = make_settings(tmp, models_dir, slots=4, models_file=models_file)
    srv = start_server(settings, load_catalog(models_dir, models_file))
    yield srv
    srv.stop()


def test_long_prompts_that_fit_alone_but_not_together_all_answer(
    small_window: LiveServer,
) -> None:
    live = small_window
    key = provision(live.db, "kv", credits=100)
    results: dict[str, httpx.Response] = {}
    go = threading.Barrier(LONG + 1)

    def post(name: str, content: str, max_tokens: int) -> None:
        body = {
            "model": SLUG,
            "messages": [{"role": "user", "content": content}],
            "max_tokens": max_tokens,
        }
        with httpx.Client(timeout=300, headers={"x-api-key": key}) as client:
            go.wait()
            results[name] = client.post(f"{live.v1}/chat/completions", json=body)

    threads = [
        threading.Thread(target=post, args=(f"long{i}", word_prompt(i, LONG_WORDS), 2))
        for i in range(LONG)
    ]
    threads.append(threading.Thread(target=post, args=("short", "Say hello.", 8)))
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)

    assert sorted(results) == [*(f"long{i}" for i in range(LONG)), "short"]
    for name, r in results.items():
        assert r.status_code == 200, (name, r.status_code, r.text[:300])
    answers: dict[str, dict[str, Any]] = {n: r.json() for n, r in results.items()}
    prompts = [answers[f"long{i}"]["usage"]["prompt_tokens"] for i in range(LONG)]
    # The case of the issue: each fits the window alone, no two fit together.
    for p in prompts:
        assert p + 2 <= WINDOW < 2 * p, prompts

    # Charged exactly: each usage row is the answer's usage at the model's prices, the
    # balance fell by their sum, and the ledger adds up with no hold left open.
    wait_no_open_holds(live.db)
    spec = services(live.app).catalog.resolve(SLUG)
    with live.db.read() as conn:
        rows = {
            r.request_id: r
            for r in conn.execute(
                select(usage).where(
                    usage.c.request_id.in_([r.headers["x-request-id"] for r in results.values()])
                )
            )
        }
    assert len(rows) == len(results)
    total = 0
    for r in results.values():
        row = rows[r.headers["x-request-id"]]
        u = r.json()["usage"]
        assert (row.prompt_tokens, row.completion_tokens) == (
            u["prompt_tokens"],
            u["completion_tokens"],
        )
        assert row.cost == spec.cost_micro(u["prompt_tokens"], u["completion_tokens"])
        total += row.cost
    account = accounts.get_account(live.db, "kv")
    assert (account.balance, account.held) == (100 * MICRO - total, 0)
    assert audit.ledger_check(live.db) == []
    engine = engine_of(live, SLUG)
    assert engine.describe()["kv_used"] == 0
