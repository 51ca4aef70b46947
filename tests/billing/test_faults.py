"""Money under failure: a client killed mid-stream, a gateway killed mid-request.

Both run against gateways as real processes, and both end with the operator's own
``servelm ledger check``.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import select

from servelm.billing import accounts, audit
from servelm.billing.money import MICRO
from servelm.store.db import Database
from servelm.store.tables import holds, usage
from tests import procs
from tests.conftest import provision

pytestmark = pytest.mark.slow  # real engine processes or models: seconds each

# 0.001 credit per prompt token, 1 credit per completion token.
PRICES = """
[models.smollm2-135m-instruct]
input_price = 1000
output_price = 1000000
"""
GRANT = 5000  # credits: covers the 1,500-token worst case
LONG = {
    "messages": [{"role": "user", "content": "Write a very long story about a lighthouse."}],
    "max_tokens": 1500,
    "ignore_eos": True,
    "stream": True,
}

# A client in its own process, so the test can kill it like any crashed program.
CLIENT = """
import sys, httpx
url, key, body = sys.argv[1], sys.argv[2], sys.argv[3]
with httpx.stream("POST", url, content=body, headers={"x-api-key": key,
        "content-type": "application/json"}, timeout=120) as r:
    for line in r.iter_lines():
        if line:
            print(line, flush=True)
"""


def gateway_env(tmp_path: Path, models_dir: Path, db_url: str, **extra: str) -> dict[str, str]:
    models_file = tmp_path / "servelm.toml"
    models_file.write_text(PRICES)
    return procs.gateway_env(
        tmp_path / "data",
        models_dir,
        SERVELM_DATABASE_URL=db_url,
        SERVELM_MODELS_FILE=str(models_file),
        **extra,
    )


def wait_until(predicate: object, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def open_holds(db: Database) -> int:
    with db.read() as conn:
        return len(
            conn.execute(select(holds.c.request_id).where(holds.c.settled_at.is_(None))).all()
        )


@pytest.mark.timeout(300)
def test_client_killed_mid_stream_pays_for_the_tokens_produced(
    db_url: str, tmp_path: Path, models_dir: Path
) -> None:
    env = gateway_env(tmp_path, models_dir, db_url)
    (gw,) = procs.start(env, tmp_path / "logs")
    db = Database(db_url)
    try:
        key = provision(db, "victim", GRANT)
        account = accounts.get_account(db, "victim")
        # The prompt's exact token count, from a request that runs to the end.
        probe = httpx.post(
            f"{gw.base_url}/v1/smollm2-135m-instruct",
            json={**LONG, "stream": False, "max_tokens": 1},
            headers={"x-api-key": key},
            timeout=60,
        )
        assert probe.status_code == 200, probe.text
        prompt_tokens = probe.json()["usage"]["prompt_tokens"]
        balance_before = accounts.get_account(db, account.id).balance

        client = subprocess.Popen(
            [
                sys.executable,
                "-c",
                CLIENT,
                f"{gw.base_url}/v1/smollm2-135m-instruct",
                key,
                json.dumps(LONG),
            ],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert client.stdout is not None
        chunks: list[dict[str, Any]] = []
        while len(chunks) < 6:
            line = client.stdout.readline()
            assert line, "the stream ended before the client was killed"
            chunks.append(json.loads(line.removeprefix("data: ")))
        client.kill()
        client.wait()
        wait_until(lambda: open_holds(db) == 0, 60, "the killed client's hold to be settled")
        with db.read() as conn:
            last = conn.execute(
                select(usage).where(usage.c.account_id == account.id).order_by(usage.c.id.desc())
            ).first()
        assert last is not None
    finally:
        gw.stop()

    content_chunks = sum(1 for c in chunks if c["choices"] and c["choices"][0]["delta"])
    assert last.status == "cancelled"
    assert last.prompt_tokens == prompt_tokens
    # Generation stopped early, and no token the client got went unpaid.
    assert content_chunks - 1 <= last.completion_tokens < LONG["max_tokens"]
    expected = prompt_tokens * 1000 + last.completion_tokens * MICRO
    assert last.cost == expected
    after = accounts.get_account(db, account.id)
    assert (after.balance, after.held) == (balance_before - expected, 0)
    assert audit.ledger_check(db) == []
    db.dispose()
    check = procs.cli(env, "ledger", "check")
    assert check.returncode == 0, check.stdout + check.stderr


@pytest.mark.timeout(300)
def test_gateway_killed_mid_request_leaves_a_hold_the_sweeper_releases(
    db_url: str, tmp_path: Path, models_dir: Path
) -> None:
    env = gateway_env(tmp_path, models_dir, db_url, SERVELM_HOLD_TTL_SECONDS="3")
    (gw,) = procs.start(env, tmp_path / "logs")
    db = Database(db_url)
    key = provision(db, "crash", GRANT)
    account = accounts.get_account(db, "crash")
    with httpx.stream(
        "POST",
        f"{gw.base_url}/v1/smollm2-135m-instruct",
        json=LONG,
        headers={"x-api-key": key},
        timeout=60,
    ) as r:
        assert r.status_code == 200
        # The iterator is kept: one dropped after a single next() is closed at once,
        # and closing it closes the connection, so the gateway saw a hang-up (and
        # settled) before the kill whenever it was quicker than this process.
        lines = r.iter_lines()
        assert next(lines).startswith("data: ")
        gw.kill()  # mid-request: the hold is open, nothing settled
    mid = accounts.get_account(db, account.id)
    hold_amount = 1500 * MICRO  # at least the output part of the worst case
    assert mid.held > hold_amount and mid.balance == GRANT * MICRO - mid.held
    # The ledger still adds up while the hold is open: the money is reserved, not lost.
    assert audit.ledger_check(db) == []

    (restarted,) = procs.start(env, tmp_path / "logs")
    try:
        wait_until(
            lambda: accounts.get_account(db, account.id).held == 0,
            30,
            "the restarted gateway's sweeper to release the dead hold",
        )
    finally:
        restarted.stop()
    after = accounts.get_account(db, account.id)
    assert after.balance == GRANT * MICRO  # nothing charged for the crashed request
    with db.read() as conn:
        rows = conn.execute(select(usage).where(usage.c.account_id == account.id)).all()
    assert [(r.status, r.cost) for r in rows] == [("expired", 0)]
    db.dispose()
    check = procs.cli(env, "ledger", "check")
    assert check.returncode == 0, check.stdout + check.stderr
