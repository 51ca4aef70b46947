"""The queue's moves on both databases, without a model: claims, leases, a line's
ending committed with its settlement or not at all."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta

import pytest

from servelm.billing import accounts, holds
from servelm.billing.clock import utcnow
from servelm.billing.holds import Superseded
from servelm.errors import NotFound
from servelm.jobs import queue, store
from servelm.store.db import Database
from servelm.store.tables import job_lines, jobs

LEASE = timedelta(seconds=60)


def new_batch(db: Database, lines: int) -> tuple[str, int]:
    account = accounts.create_account(db, "q")
    accounts.grant(db, account.id, 1_000_000, note="t")
    key, _ = accounts.create_key(db, account.id, "q")
    job_id = store.new_id("batch")
    store.create_job(
        db,
        job_id=job_id,
        kind="batch",
        account_id=account.id,
        key_id=key.id,
        key_public=key.key_id,
        model=None,
        lines=[(f"c{i}", "{}") for i in range(lines)],
        expires_at=utcnow() + timedelta(hours=24),
    )
    return job_id, account.id


def test_two_claimers_never_take_the_same_line(db: Database) -> None:
    new_batch(db, 40)

    def drain(owner: str) -> list[tuple[str, int]]:
        got: list[tuple[str, int]] = []
        while lines := queue.claim(db, owner, LEASE, 3):
            got += [(x.job_id, x.line_no) for x in lines]
        return got

    with ThreadPoolExecutor(2) as pool:
        a, b = pool.map(drain, ["a", "b"])
    assert len(a) + len(b) == 40
    assert not set(a) & set(b)


def test_an_expired_lease_is_claimed_again_and_the_old_attempt_cannot_record(
    db: Database,
) -> None:
    job_id, _ = new_batch(db, 1)
    (first,) = queue.claim(db, "dead", timedelta(seconds=-1), 1)  # its lease has passed
    (second,) = queue.claim(db, "alive", LEASE, 1)
    assert (second.line_no, second.attempt) == (first.line_no, first.attempt + 1)
    assert first.hold_id != second.hold_id  # each attempt holds on its own
    with pytest.raises(Superseded) as lost:
        queue.fail_line(db, first, "dead", 400, {"error": {}})
    assert lost.value.release  # a batch attempt's own hold goes back
    queue.fail_line(db, second, "alive", 400, {"error": {"message": "bad"}})
    assert queue.finalize(db, job_id)
    assert store.get_job(db, job_id)["failed"] == 1


def test_a_line_and_its_charge_commit_together_or_not_at_all(db: Database) -> None:
    job_id, account_id = new_batch(db, 1)
    (line,) = queue.claim(db, "me", LEASE, 1)
    holds.reserve(
        db,
        account_id=account_id,
        key_id=None,
        request_id=line.hold_id,
        model="m",
        amount=500,
        ttl=LEASE,
    )

    def broken(tx: object, settlement: holds.Settlement) -> None:
        raise RuntimeError("the output row could not be written")

    with pytest.raises(RuntimeError):
        holds.settle_with(db, line.hold_id, broken, charge=300)
    # Nothing moved: the hold is open, the line still running, the balance held.
    assert holds.open_holds_total(db, account_id) == 500
    assert accounts.get_account(db, account_id).balance == 1_000_000 - 500

    def record(tx: object, settlement: holds.Settlement) -> None:
        queue.record_line(tx, line, "me", 200, {"ok": True}, settlement.charged)  # type: ignore[arg-type]

    settled = holds.settle_with(db, line.hold_id, record, charge=300)
    assert settled.charged == 300 and not settled.already
    assert accounts.get_account(db, account_id).balance == 1_000_000 - 300
    with db.read() as conn:
        row = conn.execute(job_lines.select().where(job_lines.c.job_id == job_id)).one()
    assert (row.status, row.cost) == ("done", 300)
    assert store.get_job(db, job_id)["cost"] == 300


def test_cancel_drops_unstarted_lines_and_waits_for_running_ones(db: Database) -> None:
    job_id, _ = new_batch(db, 5)
    (running,) = queue.claim(db, "me", LEASE, 1)
    job = queue.cancel_batch(db, job_id, None)
    assert job["status"] == "cancelling"  # one line still runs
    assert queue.claim(db, "other", LEASE, 5) == []
    queue.fail_line(db, running, "me", 400, {"error": {}})
    assert queue.finalize(db, job_id)
    assert store.get_job(db, job_id)["status"] == "cancelled"


def test_lines_past_the_window_expire_and_old_results_are_purged(db: Database) -> None:
    job_id, _ = new_batch(db, 3)
    (ran,) = queue.claim(db, "me", LEASE, 1)
    queue.fail_line(db, ran, "me", 400, {"error": {}})
    with db.write() as conn:
        conn.execute(jobs.update().where(jobs.c.id == job_id).values(expires_at=utcnow()))
    assert queue.expire_and_purge(db, timedelta(hours=1)) == []  # no async hold to release
    assert queue.finalize(db, job_id)
    job = store.get_job(db, job_id)
    assert job["status"] == "expired" and job["failed"] == 1
    assert len(store.result_lines(db, job_id, errors=True)) == 3
    queue.expire_and_purge(db, timedelta(seconds=-1))  # everything finished is old now
    with pytest.raises(NotFound):
        store.get_job(db, job_id)


def test_a_stopping_process_hands_its_lines_back_at_once(db: Database) -> None:
    new_batch(db, 2)
    mine = queue.claim(db, "stopping", LEASE, 2)
    assert queue.claim(db, "next", LEASE, 2) == []  # leased, and the lease is young
    assert queue.hand_back(db, "stopping") == 2
    again = queue.claim(db, "next", LEASE, 2)
    assert [x.attempt for x in again] == [x.attempt + 1 for x in mine]
    with pytest.raises(Superseded):
        queue.fail_line(db, mine[0], "stopping", 400, {"error": {}})
