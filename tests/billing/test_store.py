"""The money layer against real databases: every test runs on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import threading
from datetime import timedelta

import pytest
from sqlalchemy import func, select, text, update
from sqlalchemy.exc import IntegrityError

from servelm.access import keys
from servelm.billing import accounts, audit, holds, idempotency
from servelm.billing.clock import utcnow
from servelm.billing.money import MICRO, affordable_max_tokens
from servelm.errors import AuthenticationError, Conflict, NotEnoughCredits
from servelm.store import tables
from servelm.store.db import Database
from servelm.store.tables import accounts as accounts_t
from servelm.store.tables import api_keys, ledger, usage

TTL = timedelta(minutes=2)


def funded(db: Database, micro: int, name: str = "acme") -> int:
    account = accounts.create_account(db, name)
    accounts.grant(db, account.id, micro, note="test")
    return account.id


def hold(db: Database, account_id: int, request_id: str, amount: int) -> int:
    return holds.reserve(
        db,
        account_id=account_id,
        key_id=None,
        request_id=request_id,
        model="m",
        amount=amount,
        ttl=TTL,
    )


def test_reserve_then_settle_charges_usage_and_releases_the_rest(db: Database) -> None:
    acct = funded(db, 1000)
    assert hold(db, acct, "r1", 300) == 700
    a = accounts.get_account(db, acct)
    assert (a.balance, a.held) == (700, 300)

    s = holds.settle(db, "r1", charge=120, prompt_tokens=10, completion_tokens=5)
    assert (s.charged, s.balance, s.already) == (120, 880, False)
    a = accounts.get_account(db, acct)
    assert (a.balance, a.held) == (880, 0)
    with db.read() as conn:
        row = conn.execute(select(usage).where(usage.c.request_id == "r1")).one()
    assert (row.prompt_tokens, row.completion_tokens, row.cost, row.status) == (10, 5, 120, "ok")
    assert audit.ledger_check(db) == []


def test_reserve_beyond_balance_is_refused_and_changes_nothing(db: Database) -> None:
    acct = funded(db, 1000)
    with pytest.raises(NotEnoughCredits) as err:
        hold(db, acct, "r1", 1001)
    assert (err.value.balance, err.value.needed) == (1000, 1001)
    assert "0.001001" in str(err.value) and "0.001000" in str(err.value)
    a = accounts.get_account(db, acct)
    assert (a.balance, a.held) == (1000, 0)
    assert holds.open_holds_total(db, acct) == 0


def test_settle_is_exactly_once(db: Database) -> None:
    acct = funded(db, 1000)
    hold(db, acct, "r1", 500)
    first = holds.settle(db, "r1", charge=100)
    again = holds.settle(db, "r1", charge=400)
    assert not first.already and again.already
    assert again.charged == 100 and again.balance == 900
    with db.read() as conn:
        charges = conn.execute(
            select(func.count()).select_from(ledger).where(ledger.c.kind == "charge")
        ).scalar()
    assert charges == 1
    assert accounts.get_account(db, acct).balance == 900
    assert audit.ledger_check(db) == []


def test_settle_never_charges_more_than_the_hold(db: Database) -> None:
    acct = funded(db, 1000)
    hold(db, acct, "r1", 200)
    assert holds.settle(db, "r1", charge=5000).charged == 200
    assert accounts.get_account(db, acct).balance == 800
    assert audit.ledger_check(db) == []


def test_concurrent_reserves_never_overspend(db: Database) -> None:
    """40 threads race for a balance that covers exactly 10 holds."""
    acct = funded(db, 10 * 100)
    results: list[str] = []
    lock = threading.Lock()
    barrier = threading.Barrier(40)

    def worker(i: int) -> None:
        barrier.wait()
        try:
            hold(db, acct, f"r{i}", 100)
            outcome = "held"
        except NotEnoughCredits:
            outcome = "refused"
        with lock:
            results.append(outcome)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(40)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results.count("held") == 10 and results.count("refused") == 30
    a = accounts.get_account(db, acct)
    assert (a.balance, a.held) == (0, 1000)
    assert audit.ledger_check(db) == []


def test_database_refuses_a_negative_balance_whatever_the_code_does(db: Database) -> None:
    acct = funded(db, 10)
    with pytest.raises(IntegrityError), db.write() as conn:
        conn.execute(update(accounts_t).where(accounts_t.c.id == acct).values(balance=-1))
    assert accounts.get_account(db, acct).balance == 10


def test_sweeper_releases_only_expired_holds(db: Database) -> None:
    acct = funded(db, 1000)
    hold(db, acct, "dead", 300)
    hold(db, acct, "alive", 200)
    later = utcnow() + TTL + timedelta(seconds=1)
    # The live process refreshes its hold; the dead one's is left to expire.
    with db.write() as conn:
        conn.execute(
            update(tables.holds)
            .where(tables.holds.c.request_id == "alive")
            .values(expires_at=later + timedelta(minutes=5))
        )
    assert holds.sweep_expired(db, now=later) == ["dead"]
    a = accounts.get_account(db, acct)
    assert (a.balance, a.held) == (800, 200)
    with db.read() as conn:
        status = conn.execute(select(usage.c.status).where(usage.c.request_id == "dead")).scalar()
    assert status == "expired"
    assert holds.sweep_expired(db, now=later) == []  # already released
    assert audit.ledger_check(db) == []


def test_refresh_keeps_a_hold_alive(db: Database) -> None:
    acct = funded(db, 1000)
    hold(db, acct, "r1", 100)
    assert holds.refresh(db, ["r1"], timedelta(hours=1)) == 1
    assert holds.sweep_expired(db, now=utcnow() + TTL + timedelta(seconds=1)) == []
    holds.settle(db, "r1", charge=0)
    assert holds.refresh(db, ["r1"], timedelta(hours=1)) == 0  # settled holds stay settled


def test_ledger_check_finds_money_that_appeared_from_nowhere(db: Database) -> None:
    acct = funded(db, 1000)
    assert audit.ledger_check(db) == []
    with db.write() as conn:
        conn.execute(update(accounts_t).where(accounts_t.c.id == acct).values(balance=1500))
    problems = audit.ledger_check(db)
    assert len(problems) == 1 and problems[0].account_id == acct
    assert "1000" in problems[0].problem and "1500" in problems[0].problem


def test_keys_store_only_a_digest(db: Database) -> None:
    acct = funded(db, 1)
    record, plaintext = accounts.create_key(db, acct, "ci", allowed_models=["a", "b"])
    key_id, digest = keys.parse(plaintext)
    assert key_id == record.key_id
    secret = plaintext.split("_", 2)[2]
    with db.read() as conn:
        row = conn.execute(select(api_keys)).one()
        dump = " ".join(str(v) for v in row)
    assert secret not in dump and plaintext not in dump
    assert row.digest == digest and keys.matches(digest, row.digest)
    assert accounts.find_key(db, key_id).allowed_models == ["a", "b"]  # type: ignore[union-attr]
    revoked = accounts.revoke_key(db, key_id)
    assert revoked.revoked_at is not None
    assert accounts.revoke_key(db, key_id).revoked_at == revoked.revoked_at


@pytest.mark.parametrize(
    "raw",
    ["", "sk-abc", "slm_short_x", "slm_" + "a" * 12 + "_" + "b" * 42, "slm_" + "A" * 12 + "_" * 44],
)
def test_malformed_keys_are_refused_before_any_lookup(raw: str) -> None:
    with pytest.raises(AuthenticationError):
        keys.parse(raw)


def test_a_redacted_key_keeps_the_id_and_drops_the_secret() -> None:
    new = keys.generate()
    shown = keys.redact(new.plaintext)
    assert new.key_id in shown and new.plaintext.split("_", 2)[2] not in shown


def test_idempotency_claims_replays_and_refuses_a_different_body(db: Database) -> None:
    acct = funded(db, 1)
    assert idempotency.begin(db, acct, "k1", "h1") is None
    with pytest.raises(Conflict, match="still in progress"):
        idempotency.begin(db, acct, "k1", "h1")
    idempotency.finish(db, acct, "k1", 200, {"id": "chatcmpl-1"}, 42)
    replay = idempotency.begin(db, acct, "k1", "h1")
    assert replay is not None and replay.body == {"id": "chatcmpl-1"} and replay.cost == 42
    with pytest.raises(Conflict, match="different request body"):
        idempotency.begin(db, acct, "k1", "h2")
    # A failed first attempt gives the key back.
    assert idempotency.begin(db, acct, "k2", "h1") is None
    idempotency.abort(db, acct, "k2")
    assert idempotency.begin(db, acct, "k2", "h1") is None


def test_a_claim_left_by_a_dead_process_can_be_taken_over(db: Database) -> None:
    acct = funded(db, 1)
    assert idempotency.begin(db, acct, "k", "h") is None  # and then the process dies
    with pytest.raises(Conflict, match="still in progress"):
        idempotency.begin(db, acct, "k", "h", stale_after=timedelta(minutes=1))
    assert idempotency.begin(db, acct, "k", "h", stale_after=timedelta(0)) is None
    # The take-over renewed the claim: a second retry right away still waits.
    with pytest.raises(Conflict, match="still in progress"):
        idempotency.begin(db, acct, "k", "h", stale_after=timedelta(minutes=1))


def test_bootstrap_creates_one_funded_key_once(db: Database) -> None:
    key = accounts.bootstrap(db, 10 * MICRO)
    assert key is not None and keys.parse(key)
    assert accounts.bootstrap(db, 10 * MICRO) is None
    (account,) = accounts.list_accounts(db)
    assert account.name == "default" and account.balance == 10 * MICRO
    assert audit.ledger_check(db) == []


def test_schema_is_at_head_on_both_backends(db: Database) -> None:
    with db.read() as conn:
        version = conn.execute(text("SELECT version_num FROM alembic_version")).scalar()
    assert version is not None
    db.upgrade()  # idempotent


@pytest.mark.parametrize(
    ("balance", "prompt", "p_in", "p_out", "wanted", "expected"),
    [
        (1000, 0, 0, 1_000_000, 5000, 1000),  # 1 micro-credit per output token
        (1000, 400, 1_000_000, 1_000_000, 5000, 600),
        (1000, 400, 1_000_000, 1_000_000, 100, 100),  # the balance is not the limit
        (1000, 1000, 1_000_000, 1_000_000, 100, 0),
        (1000, 0, 0, 0, 77, 77),  # free output
        (10, 0, 0, 300_000, 100, 33),  # 33 tokens cost ceil(9.9) = 10; 34 would cost 11
        # Sub-micro prices: the prompt alone costs 1.5 micro-credits, rounded up once
        # together with the output, so 2 micro-credits still buy 5 output tokens.
        (2, 30, 50_000, 100_000, 256, 5),
    ],
)
def test_affordable_max_tokens(
    balance: int, prompt: int, p_in: int, p_out: int, wanted: int, expected: int
) -> None:
    n = affordable_max_tokens(balance, prompt, p_in, p_out, wanted)
    assert n == expected

    def cost(tokens: int) -> int:
        return -(-(prompt * p_in + tokens * p_out) // MICRO)

    if n > 0:
        assert cost(n) <= balance
    if n < wanted:
        assert cost(n + 1) > balance


def test_run_does_store_work_on_the_database_threads_not_the_loop(db: Database) -> None:
    """``Database.run``, the thread hop the admin API, the probes and the console use:
    the store function runs on the database's own pool and its result comes back."""
    account_id = funded(db, 5 * MICRO)

    async def main() -> tuple[str, str, int]:
        where = await db.run(lambda: threading.current_thread().name)
        acct = await db.run(accounts.get_account, db, account_id)
        return threading.current_thread().name, where, acct.balance

    loop_thread, where, balance = asyncio.run(main())
    assert where != loop_thread and where.startswith("db")
    assert balance == 5 * MICRO
