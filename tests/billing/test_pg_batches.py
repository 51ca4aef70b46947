"""PostgreSQL's money writes: one statement each, a batch in one pipeline, every
commit durable."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest

from servelm.billing import accounts, audit, holds
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
    gc.close()


def session_setting(gc: GroupCommit) -> str:
    writer = gc._writer
    assert writer is not None
    cur = writer._pg.cursor()
    cur.execute("SHOW synchronous_commit")
    return str(cur.fetchone()[0])


async def test_lone_and_batched_writes_keep_the_session_durable(
    db: Database, commit: GroupCommit
) -> None:
    acct = funded(db, 10_000)
    # A lone hold, a lone settlement (each autocommitted), then mixed batches: every
    # commit waits for the disk, and the session keeps that setting.
    assert await reserve(commit, acct, "a", 100) == 9_900
    assert session_setting(commit) == "on"
    settled = await commit.write(holds.settle_in, "a", charge=60)
    assert (settled.charged, settled.balance, settled.already) == (60, 9_940, False)
    assert session_setting(commit) == "on"
    results = await asyncio.gather(
        reserve(commit, acct, "b", 100),
        commit.write(holds.settle_in, "a", charge=60),  # settled before: nothing moves
        reserve(commit, acct, "c", 100_000),  # refused
        return_exceptions=True,
    )
    assert results[0] == 9_840
    assert isinstance(results[1], holds.Settlement)
    assert results[1].already and results[1].charged == 60
    assert isinstance(results[2], holds.NotEnoughCredits) and results[2].balance == 9_840
    assert session_setting(commit) == "on"
    assert (commit.writes, commit.batches) == (5, 3)
    a = accounts.get_account(db, acct)
    assert (a.balance, a.held) == (9_840, 100)
    assert audit.ledger_check(db) == []


async def test_a_settlement_of_no_hold_is_not_found(db: Database, commit: GroupCommit) -> None:
    from servelm.errors import NotFound

    with pytest.raises(NotFound):
        await commit.write(holds.settle_in, "never-held", charge=1)
