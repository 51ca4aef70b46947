"""PostgreSQL's money writes: one statement each, a batch in one pipeline, every
commit durable."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest

from servelm.billing import accounts, audit, holds
from servelm.errors import NotEnoughCredits
from servelm.store.db import Database
from servelm.store.groupcommit import GroupCommit
from tests.billing.test_groupcommit import reserve
from tests.billing.test_store import funded


async def _to_thread(fn: Any, *args: Any) -> Any:
    return await asyncio.to_thread(fn, *args)


@pytest.fixture
async def commit(db: Database) -> AsyncIterator[GroupCommit]:
    if db.is_sqlite:
        pytest.skip("PostgreSQL's pipeline")
    gc = GroupCommit(db, _to_thread)
    yield gc
    await gc.close()


async def session_setting(gc: GroupCommit) -> str:
    """Read on the writer's own connection, the one the request path commits on."""
    assert gc._pg is not None and gc._pg._conn is not None
    cur = gc._pg._conn.cursor()
    await cur.execute("SHOW synchronous_commit")
    row = await cur.fetchone()
    assert row is not None
    return str(row[0])


async def test_lone_and_batched_writes_keep_the_session_durable(
    db: Database, commit: GroupCommit
) -> None:
    acct = funded(db, 10_000)
    # A lone hold, a lone settlement (each autocommitted), then mixed batches: every
    # commit waits for the disk, and the session keeps that setting.
    assert await reserve(commit, acct, "a", 100) == 9_900
    assert await session_setting(commit) == "on"
    settled = await commit.write(holds.settle_in, "a", charge=60)
    assert (settled.charged, settled.balance, settled.already) == (60, 9_940, False)
    assert await session_setting(commit) == "on"
    results = await asyncio.gather(
        reserve(commit, acct, "b", 100),
        commit.write(holds.settle_in, "a", charge=60),  # settled before: nothing moves
        reserve(commit, acct, "c", 100_000),  # refused
        return_exceptions=True,
    )
    assert results[0] == 9_840
    assert isinstance(results[1], holds.Settlement)
    assert results[1].already and results[1].charged == 60
    assert isinstance(results[2], NotEnoughCredits) and results[2].balance == 9_840
    assert await session_setting(commit) == "on"
    assert (commit.writes, commit.batches) == (5, 3)
    a = accounts.get_account(db, acct)
    assert (a.balance, a.held) == (9_840, 100)
    assert audit.ledger_check(db) == []


async def test_a_settlement_of_no_hold_is_not_found(db: Database, commit: GroupCommit) -> None:
    from servelm.errors import NotFound

    with pytest.raises(NotFound):
        await commit.write(holds.settle_in, "never-held", charge=1)


async def test_the_writer_waits_on_one_reader_and_a_closed_server_does_not_spin_it(
    db: Database, commit: GroupCommit, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``LoopConnection`` registers its reader once, not once per wait; and when the
    server goes away while nobody waits, the reader takes the news and stops, rather
    than firing at every turn of the loop."""
    import psycopg

    from servelm.store.pgloop import LoopConnection

    loop = asyncio.get_running_loop()
    registered: list[int] = []
    add_reader = loop.add_reader

    def counting_add_reader(fd: int, callback: Any, *args: Any) -> None:
        registered.append(fd)
        add_reader(fd, callback, *args)

    monkeypatch.setattr(loop, "add_reader", counting_add_reader)
    fired = 0
    on_readable = LoopConnection._on_readable

    def counting(self: LoopConnection) -> None:
        nonlocal fired
        fired += 1
        on_readable(self)

    monkeypatch.setattr(LoopConnection, "_on_readable", counting)
    acct = funded(db, 100_000)
    for i in range(20):
        assert await reserve(commit, acct, f"r{i}", 100) == 100_000 - 100
        if i == 0:
            registered.clear()  # what connecting and the first wait registered
        await commit.write(holds.settle_in, f"r{i}", charge=0)
    assert registered == []  # 39 more statements, the same reader
    assert commit._pg is not None and commit._pg._conn is not None
    conn = commit._pg._conn
    with psycopg.connect(db.url.replace("+psycopg", ""), autocommit=True) as admin:
        admin.execute("SELECT pg_terminate_backend(%s)", (conn.info.backend_pid,))
    fired_before = fired
    await asyncio.sleep(0.5)
    assert 1 <= fired - fired_before <= 3  # the news, then the reader is off
    assert conn._watched is None and conn.closed
    # Seen closed before anything was sent on it: the next write connects again.
    assert await reserve(commit, acct, "again", 100) == 100_000 - 100
    assert commit._pg._conn is not conn
    assert audit.ledger_check(db) == []
