"""Group commit against real databases (SQLite and PostgreSQL): writes queued together
share one transaction, and no write's failure is another's."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from sqlalchemy import select

from servelm.access.keys import Principal
from servelm.billing import accounts, audit, holds
from servelm.billing.service import Billing
from servelm.errors import NotEnoughCredits
from servelm.store.db import Busy, Database
from servelm.store.groupcommit import GroupCommit
from servelm.store.tables import holds as holds_t
from servelm.store.tables import usage
from tests.billing.test_store import TTL, funded


async def _to_thread(fn: Callable[..., Any], *args: Any) -> Any:
    return await asyncio.to_thread(fn, *args)


@pytest.fixture
async def commit(db: Database) -> AsyncIterator[GroupCommit]:
    gc = GroupCommit(db, _to_thread)
    yield gc
    await gc.close()


def reserve(gc: GroupCommit, account_id: int, request_id: str, amount: int) -> Any:
    return gc.write(
        holds.reserve_in,
        account_id=account_id,
        key_id=None,
        request_id=request_id,
        model="m",
        amount=amount,
        ttl=TTL,
    )


async def test_writes_queued_together_share_one_commit(db: Database, commit: GroupCommit) -> None:
    acct = funded(db, 10_000)
    balances = await asyncio.gather(*(reserve(commit, acct, f"r{i}", 100) for i in range(20)))
    assert sorted(balances, reverse=True) == [10_000 - 100 * (i + 1) for i in range(20)]
    assert (commit.writes, commit.batches) == (20, 1)
    settled = await asyncio.gather(
        *(commit.write(holds.settle_in, f"r{i}", charge=40) for i in range(20))
    )
    assert {s.charged for s in settled} == {40}
    assert (commit.writes, commit.batches) == (40, 2)
    a = accounts.get_account(db, acct)
    assert (a.balance, a.held) == (10_000 - 20 * 40, 0)
    assert audit.ledger_check(db) == []


async def test_a_refused_hold_does_not_fail_its_batch(db: Database, commit: GroupCommit) -> None:
    acct = funded(db, 300)
    results = await asyncio.gather(
        *(reserve(commit, acct, f"r{i}", 100) for i in range(5)), return_exceptions=True
    )
    # Queue order is commit order: the first three fit, the last two are refused.
    assert results[:3] == [200, 100, 0]
    assert all(isinstance(r, NotEnoughCredits) and r.balance == 0 for r in results[3:])
    assert commit.batches == 1
    a = accounts.get_account(db, acct)
    assert (a.balance, a.held) == (0, 300)
    assert audit.ledger_check(db) == []


async def test_a_failing_write_fails_alone(db: Database, commit: GroupCommit) -> None:
    acct = funded(db, 1000)
    await reserve(commit, acct, "taken", 100)
    # A duplicate request id breaks the hold table's primary key: the batch rolls back
    # and each write runs again alone, so only the duplicate fails.
    results = await asyncio.gather(
        reserve(commit, acct, "a", 100),
        reserve(commit, acct, "taken", 100),
        reserve(commit, acct, "b", 100),
        return_exceptions=True,
    )
    assert results[0] in (800, 700) and results[2] in (800, 700)
    assert results[0] != results[2]
    assert isinstance(results[1], Exception) and not isinstance(results[1], NotEnoughCredits)
    a = accounts.get_account(db, acct)
    assert (a.balance, a.held) == (700, 300)
    assert audit.ledger_check(db) == []


async def test_a_locked_sqlite_database_waits_off_the_loop(
    db: Database, commit: GroupCommit
) -> None:
    if not db.is_sqlite:
        pytest.skip("SQLite's write lock")
    acct = funded(db, 1000)
    other = sqlite3.connect(db.url.split("///", 1)[1], isolation_level=None)
    other.execute("BEGIN IMMEDIATE")  # another writer holds the lock
    try:
        pending = reserve(commit, acct, "r1", 100)
        # The loop keeps running (this sleep returns) while the write waits.
        await asyncio.sleep(0.3)
        assert not pending.done()
    finally:
        other.execute("COMMIT")
        other.close()
    assert await asyncio.wait_for(pending, timeout=30) == 900
    assert audit.ledger_check(db) == []


async def test_a_broken_postgresql_writer_is_replaced(db: Database, commit: GroupCommit) -> None:
    if db.is_sqlite:
        pytest.skip("PostgreSQL connections")
    import psycopg

    acct = funded(db, 1000)
    assert await reserve(commit, acct, "r1", 100) == 900
    db.dispose()  # the pool's connections go; only the writer's stays
    with db.engine.connect() as conn:
        conn.exec_driver_sql(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE datname = current_database() AND pid <> pg_backend_pid()"
        )
    # The write that finds the connection dead fails (nothing was written)...
    with pytest.raises(psycopg.OperationalError):
        await reserve(commit, acct, "r2", 100)
    # ...and the next one gets a new connection.
    assert await reserve(commit, acct, "r3", 100) == 800
    assert audit.ledger_check(db) == []


async def test_a_hold_whose_caller_left_is_released(db: Database) -> None:
    acct = funded(db, 1000)
    record, _ = accounts.create_key(db, acct, "k")
    billing = Billing(db, hold_ttl=TTL)
    principal = Principal(acct, record.id, record.key_id, "k", None, None)
    try:
        task = asyncio.ensure_future(billing.hold(principal, "gone", "m", 300))
        await asyncio.sleep(0)  # the write is queued
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        # The hold commits all the same (on PostgreSQL, off the loop, a moment
        # later), and then a second write releases it: wait for that end state.
        released = None
        for _ in range(200):
            with db.read() as conn:
                released = conn.execute(
                    select(holds_t.c.settled_at, holds_t.c.charged).where(
                        holds_t.c.request_id == "gone"
                    )
                ).first()
            if released is not None and released.settled_at is not None:
                break
            await asyncio.sleep(0.05)
        assert released is not None and released.settled_at is not None
        assert released.charged == 0
        a = accounts.get_account(db, acct)
        assert (a.balance, a.held) == (1000, 0)
        with db.read() as conn:
            row = conn.execute(select(usage).where(usage.c.request_id == "gone")).one()
        assert (row.status, row.cost) == ("cancelled", 0)
        assert audit.ledger_check(db) == []
    finally:
        await billing.close()


def test_checkpoints_keep_the_wal_bounded_under_steady_writes(db: Database) -> None:
    """A writer that never stops: PASSIVE checkpoints alone never finish before the
    next write, so SQLite would never restart the log and it would grow without end."""
    if not db.is_sqlite:
        pytest.skip("SQLite's write-ahead log")
    acct = funded(db, 10**9)
    stop = threading.Event()

    def write_steadily() -> None:
        writer = db.writer_connection()  # never checkpoints by itself
        i = 0
        try:
            while not stop.is_set():
                try:
                    with writer.transaction() as tx:
                        holds.reserve_in(
                            tx, account_id=acct, key_id=None, request_id=f"r{i}", model="m",
                            amount=1, ttl=TTL,
                        )  # fmt: skip
                except Busy:
                    pass  # a RESTART checkpoint holds writers back a moment (GroupCommit
                    # then waits off the loop); this writer simply tries again
                else:
                    i += 1
                time.sleep(0.0005)
        finally:
            writer.close()

    thread = threading.Thread(target=write_steadily)
    thread.start()
    frames = []
    try:
        for _ in range(20):
            time.sleep(0.1)
            db.checkpoint(max_wal_frames=500)
            frames.append(log_frames(db))
    finally:
        stop.set()
        thread.join()
    # Restarted whenever it passed 500: it never holds much more than 0.1 s of writes.
    assert max(frames[5:]) < 4000, frames
    assert audit.ledger_check(db) == []


def log_frames(db: Database) -> int:
    conn = sqlite3.connect(db.url.split("///", 1)[1])
    try:
        return int(conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()[1])
    finally:
        conn.close()
