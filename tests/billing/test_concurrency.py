"""200 concurrent requests from one account, through three gateway processes that
share one database (SQLite file, then PostgreSQL), against a balance that pays for 20.

Prices are set so each request's hold equals its charge (input free, 1 credit per
output token, max_tokens 5 with ignore_eos): the balance can then serve exactly 20
requests, whatever the interleaving, and any overspend or lost hold shows up as a
count other than 20 or a balance other than 0.
"""

from __future__ import annotations

import asyncio
from decimal import Decimal
from pathlib import Path

import httpx
import pytest

from servelm.billing import accounts, audit
from servelm.store.db import Database
from servelm.store.tables import usage
from tests import procs
from tests.conftest import provision

pytestmark = pytest.mark.slow  # real engine processes or models: seconds each

PRICES = """
[models.smollm2-135m-instruct]
input_price = 0
output_price = 1000000
"""
REQUESTS = 200
AFFORDABLE = 20
TOKENS = 5


async def fire(gateways: list[procs.Gateway], key: str) -> list[httpx.Response]:
    limits = httpx.Limits(max_connections=REQUESTS)
    async with httpx.AsyncClient(timeout=180, limits=limits) as client:

        async def one(i: int) -> httpx.Response:
            gw = gateways[i % len(gateways)]
            body = {
                "messages": [{"role": "user", "content": f"Say the number {i}."}],
                "max_tokens": TOKENS,
                "ignore_eos": True,
                # Greedy: a sampled token with no text of its own (a control token, a
                # byte of an unfinished character) is rightly not billed, and would
                # make a request cost less than its hold and the count other than 20.
                "temperature": 0,
            }
            if i % 2:
                return await client.post(
                    f"{gw.base_url}/v1/chat/completions",
                    json={**body, "model": "smollm2-135m-instruct"},
                    headers={"Authorization": f"Bearer {key}"},
                )
            return await client.post(
                f"{gw.base_url}/v1/smollm2-135m-instruct", json=body, headers={"x-api-key": key}
            )

        return await asyncio.gather(*(one(i) for i in range(REQUESTS)))


def crowd_env(db_url: str, tmp_path: Path, models_dir: Path) -> dict[str, str]:
    """Gateway settings for the crowd: the prices above, room in the queue for all."""
    models_file = tmp_path / "servelm.toml"
    models_file.write_text(PRICES)
    return procs.gateway_env(
        tmp_path / "data",
        models_dir,
        SERVELM_DATABASE_URL=db_url,
        SERVELM_MODELS_FILE=str(models_file),
        SERVELM_SLOTS="4",
        SERVELM_QUEUE_SIZE="200",
    )


def assert_spent_exactly(
    responses: list[httpx.Response], db: Database, account_id: int, env: dict[str, str]
) -> None:
    """Exactly the affordable requests served, the rest refused naming the need, and
    the balance spent to the last micro-credit with the ledger adding up."""
    statuses = [r.status_code for r in responses]
    served = [r for r in responses if r.status_code == 200]
    refused = [r for r in responses if r.status_code != 200]
    assert len(served) == AFFORDABLE, statuses
    for r in refused:
        openai_route = r.request.url.path.endswith("/chat/completions")
        assert r.status_code == (402 if openai_route else 406), r.text
        message = r.json()["error"]["message"] if openai_route else r.json()["error"]
        assert "Not enough credits" in message and "5.000000" in message
        assert "x-remaining-credits" in r.headers
    for r in served:
        assert r.json()["usage"]["completion_tokens"] == TOKENS
        assert r.headers["x-cost"] == "5.000000"
    charged = sum(Decimal(r.headers["x-cost"]) for r in served)
    assert charged == AFFORDABLE * TOKENS  # never more than the grant

    after = accounts.get_account(db, account_id)
    assert (after.balance, after.held) == (0, 0)
    assert audit.ledger_check(db) == []
    with db.read() as conn:
        rows = conn.execute(usage.select().where(usage.c.account_id == account_id)).all()
    assert len(rows) == AFFORDABLE and {r.status for r in rows} == {"ok"}
    check = procs.cli(env, "ledger", "check")
    assert check.returncode == 0, check.stdout + check.stderr


@pytest.mark.timeout(600)
def test_concurrent_requests_never_overspend(db_url: str, tmp_path: Path, models_dir: Path) -> None:
    env = crowd_env(db_url, tmp_path, models_dir)
    gateways = procs.start(env, tmp_path / "logs", 3)
    try:
        db = Database(db_url)
        key = provision(db, "crowd", AFFORDABLE * TOKENS)
        account = accounts.get_account(db, "crowd")
        responses = asyncio.run(fire(gateways, key))
    finally:
        for gw in gateways:
            gw.stop()
    try:
        assert_spent_exactly(responses, db, account.id, env)
    finally:
        db.dispose()
