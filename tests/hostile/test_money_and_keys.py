"""Points 10, 12, 14 and 15 of issue 17: amounts that would leave BIGINT, an admin
token with non-ASCII bytes, keys scoped by alias, unknown key ids, /health."""

from __future__ import annotations

import asyncio
import os
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import event

from servelm.access.keys import Authenticator
from servelm.billing import accounts, audit
from servelm.billing.money import MAX_ACCOUNT_MICRO, MAX_GRANT_MICRO, MICRO
from servelm.billing.service import Billing
from servelm.catalog.specs import DEFAULT_MODEL_SLUG
from servelm.errors import AuthenticationError, InvalidRequest
from servelm.store.db import Database
from tests.conftest import ADMIN_TOKEN, LiveServer
from tests.hostile.conftest import assert_money_sound
from tests.procs import cli

ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
HUGE = [
    "9223372036854.775807",
    "1e30",
    "Infinity",
    "-Infinity",
    "NaN",
    "sNaN",
    "1e999999",
    "9" * 90,
]


def cli_env(live: LiveServer) -> dict[str, str]:
    env = {**os.environ, "SERVELM_DATA_DIR": str(live.settings.data_dir)}
    env.pop("SERVELM_DATABASE_URL", None)
    return env


@pytest.mark.parametrize("amount", HUGE)
def test_admin_refuses_amounts_that_would_leave_bigint(live: LiveServer, amount: str) -> None:
    account = httpx.post(
        f"{live.base_url}/admin/accounts",
        json={"name": f"big-{uuid.uuid4().hex[:8]}"},
        headers=ADMIN,
    ).json()
    r = httpx.post(
        f"{live.base_url}/admin/accounts/{account['id']}/credits",
        json={"credits": amount},
        headers=ADMIN,
        timeout=30,
    )
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == "credits"
    check = httpx.get(f"{live.base_url}/admin/ledger/check", headers=ADMIN, timeout=30)
    assert check.status_code == 200 and check.json()["ok"], check.text
    assert_money_sound(live)


def test_cli_refuses_a_grant_past_bigint_with_a_clear_error(live: LiveServer) -> None:
    env = cli_env(live)
    name = f"cli-{uuid.uuid4().hex[:8]}"
    assert cli(env, "accounts", "create", name).returncode == 0
    done = cli(env, "credits", "grant", name, "9223372036854.775807")
    assert done.returncode == 1, done.stdout + done.stderr
    assert "at most" in done.stderr and "Traceback" not in done.stderr
    assert cli(env, "credits", "grant", name, "5").returncode == 0
    balance = cli(env, "credits", "balance", name)
    assert balance.returncode == 0 and balance.stdout.strip() == "5.000000"
    assert_money_sound(live)


def test_grants_stop_at_the_account_cap(db: Database) -> None:
    """However many grants arrive, a balance stays an exact integer far inside BIGINT."""
    account = accounts.create_account(db, "rich")
    grants = MAX_ACCOUNT_MICRO // MAX_GRANT_MICRO
    for _ in range(grants):
        accounts.grant(db, account.id, MAX_GRANT_MICRO)
    with pytest.raises(InvalidRequest, match="above"):
        accounts.grant(db, account.id, 1)
    with pytest.raises(InvalidRequest, match="at most"):
        accounts.grant(db, account.id, MAX_GRANT_MICRO + 1)
    got = accounts.get_account(db, account.id)
    assert isinstance(got.balance, int) and got.balance == MAX_ACCOUNT_MICRO
    assert got.balance < 2**63 - 1
    assert audit.ledger_check(db) == []


def test_non_ascii_admin_token_is_401(live: LiveServer) -> None:
    for value in (b"Bearer \xc3\xa9t\xc3\xa9", b"Bearer \xff\xfe", "Bearer ø".encode()):
        r = httpx.get(f"{live.base_url}/admin/accounts", headers=[(b"Authorization", value)])
        assert r.status_code == 401, r.text


def chat(live: LiveServer, key: str) -> httpx.Response:
    return httpx.post(
        f"{live.v1}/{DEFAULT_MODEL_SLUG}",
        json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
        headers={"x-api-key": key},
        timeout=60,
    )


def test_a_key_scoped_by_alias_may_use_that_model(live: LiveServer) -> None:
    account = httpx.post(
        f"{live.base_url}/admin/accounts",
        json={"name": f"alias-{uuid.uuid4().hex[:8]}"},
        headers=ADMIN,
    ).json()
    httpx.post(
        f"{live.base_url}/admin/accounts/{account['id']}/credits",
        json={"credits": "1"},
        headers=ADMIN,
    )
    made = httpx.post(
        f"{live.base_url}/admin/accounts/{account['id']}/keys",
        json={"allowed_models": ["smollm2"]},
        headers=ADMIN,
    ).json()
    assert made["allowed_models"] == [DEFAULT_MODEL_SLUG]
    assert chat(live, made["key"]).status_code == 200
    # The same through the command line.
    done = cli(cli_env(live), "keys", "create", str(account["id"]), "--model", "smollm2")
    assert done.returncode == 0, done.stderr
    key = next(line for line in done.stdout.splitlines() if line.startswith("slm_"))
    assert chat(live, key).status_code == 200
    assert_money_sound(live)


def test_unknown_key_ids_are_cached_briefly(tmp_path: Path) -> None:
    """Each unknown id cost a database lookup per request (and answered slower than a
    known one, which told which ids exist)."""
    db = Database(f"sqlite:///{tmp_path / 'keys.db'}")
    db.upgrade()
    lookups: list[str] = []

    def count(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if "api_keys" in statement:
            lookups.append(statement)

    event.listen(db.engine, "before_cursor_execute", count)
    unknown = "slm_" + "a" * 12 + "_" + "b" * 43

    async def go() -> None:
        billing = Billing(db)
        authenticator = Authenticator(billing.find_key, cache_seconds=60)
        try:
            for _ in range(50):
                with pytest.raises(AuthenticationError, match="Invalid API key"):
                    await authenticator.authenticate(unknown)
        finally:
            await billing.close()

    asyncio.run(go())
    db.dispose()
    assert len(lookups) == 1


def test_unknown_key_is_401_on_a_live_server(live: LiveServer) -> None:
    for _ in range(3):
        assert chat(live, "slm_" + "z" * 12 + "_" + "y" * 43).status_code == 401


def test_health_shows_no_weight_paths(live: LiveServer, models_dir: Path) -> None:
    text = httpx.get(f"{live.base_url}/health", timeout=10).text
    assert str(models_dir) not in text
    assert ".gguf" not in text
    assert DEFAULT_MODEL_SLUG in text  # still says what is loaded


def test_money_sound_after_all(live: LiveServer) -> None:
    assert_money_sound(live)
    assert MICRO  # the ledger check above is the assertion that matters
