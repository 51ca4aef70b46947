"""``Billing``: the async face of the money layer, as the request path uses it.

The common request costs two short writes: reserve and settle. They go through
``GroupCommit`` (writes of requests in flight together share a transaction; on
SQLite it runs on the loop while the write lock is free). Everything else runs on a
small thread pool (the database's, ``Database.run``), so the loop never waits on a
lock or a network.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Callable
from datetime import timedelta
from typing import Any, TypeVar

from servelm.access.keys import Principal
from servelm.billing import accounts, audit, holds, idempotency
from servelm.store.db import Database
from servelm.store.groupcommit import GroupCommit

log = logging.getLogger(__name__)
T = TypeVar("T")
# Bounds the key cache's memory against a flood of made-up key ids.
_MAX_CACHED_KEYS = 100_000


def _log_failure(done: asyncio.Future[Any]) -> None:
    if not done.cancelled() and done.exception() is not None:
        # The hold stays open until it expires; the sweeper releases it then.
        log.error("releasing an abandoned hold failed: %s", done.exception())


class Billing:
    def __init__(
        self,
        db: Database,
        *,
        hold_ttl: timedelta = timedelta(minutes=2),
    ) -> None:
        self.db = db
        self.hold_ttl = hold_ttl
        self._live: set[str] = set()  # request ids with open holds in this process
        self._tasks: list[asyncio.Task[None]] = []
        self._commit = GroupCommit(db, self.run)

    async def run(self, fn: Callable[..., T], *args: Any, **kw: Any) -> T:
        """Run a synchronous store function on the database's thread pool."""
        return await self.db.run(fn, *args, **kw)

    # -- lifecycle -------------------------------------------------------------------

    async def start(self, *, sweep_every: float | None = None) -> None:
        released = await self.run(holds.sweep_expired, self.db)
        if released:
            log.warning("released %d holds left by a stopped process", len(released))
        period = sweep_every or self.hold_ttl.total_seconds() / 3
        self._tasks.append(asyncio.create_task(self._keepalive(period)))
        if self.db.is_sqlite:
            self._tasks.append(asyncio.create_task(self._checkpoints()))

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._commit.close()

    async def _keepalive(self, period: float) -> None:
        """Keep this process's holds alive, and release those of processes that died."""
        while True:
            await asyncio.sleep(period)
            try:
                await self.run(holds.refresh, self.db, list(self._live), self.hold_ttl)
                released = await self.run(holds.sweep_expired, self.db)
                if released:
                    log.warning("released %d expired holds", len(released))
            except Exception:
                # A database hiccup must not kill the loop; the next round retries.
                log.exception("hold keep-alive failed")

    async def _checkpoints(self, period: float = 1.0) -> None:
        """The loop's connection never checkpoints SQLite's WAL (that can take
        milliseconds, with an fsync); this does, off the loop, and keeps the log
        bounded (``Database.checkpoint``)."""
        while True:
            await asyncio.sleep(period)
            try:
                await self.run(self.db.checkpoint)
            except Exception:
                log.exception("WAL checkpoint failed")

    # -- keys ------------------------------------------------------------------------

    async def find_key(self, key_id: str) -> accounts.KeyRecord | None:
        """A key's row by its public id, for ``access.keys.Authenticator``."""
        return await self.run(accounts.find_key, self.db, key_id)

    # -- money -----------------------------------------------------------------------

    async def balance(self, account_id: int) -> int:
        return (await self.run(accounts.get_account, self.db, account_id)).balance

    async def hold(
        self,
        principal: Principal,
        request_id: str,
        model: str,
        amount: int,
        *,
        need: int | None = None,
        ttl: timedelta | None = None,
    ) -> int:
        """Hold ``amount`` of the balance, if it is at least ``need`` (default: the
        amount); the balance left, or NotEnoughCredits.

        ``ttl``: a hold that outlives this process on purpose (an async request's,
        held at submission and settled by whichever process runs it, servelm.jobs):
        it expires then, and is not kept alive by this process's keep-alive."""
        written = self._commit.write(
            holds.reserve_in,
            account_id=principal.account_id,
            key_id=principal.key_pk,
            request_id=request_id,
            model=model,
            amount=amount,
            ttl=ttl or self.hold_ttl,
            need=need,
        )
        try:
            balance: int = await asyncio.shield(written)
        except asyncio.CancelledError:
            # The caller left (client gone) but the hold may commit all the same:
            # release it then, charging nothing, rather than leave it to expire.
            written.add_done_callback(functools.partial(self._release_abandoned, request_id))
            raise
        if ttl is None:
            self._live.add(request_id)
        return balance

    def _release_abandoned(self, request_id: str, written: asyncio.Future[int]) -> None:
        if written.cancelled() or written.exception() is not None:
            return  # no hold was made
        released = self._commit.write(holds.settle_in, request_id, charge=0, status="cancelled")
        released.add_done_callback(_log_failure)

    async def settle(
        self,
        request_id: str,
        *,
        charge: int,
        prompt_tokens: int,
        completion_tokens: int,
        status: str,
        latency_ms: int,
        record: holds.Record | None = None,
    ) -> holds.Settlement:
        """Charge and release, once per request id. ``record``: rows that must commit
        with the charge (``holds.settle_with``); they go in a transaction of their own
        rather than a group commit, as queued work is not waited on by anyone."""
        kw: dict[str, Any] = {
            "charge": charge,
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "status": status,
            "latency_ms": latency_ms,
        }
        try:
            if record is None:
                settlement: holds.Settlement = await self._commit.write(
                    holds.settle_in, request_id, **kw
                )
                return settlement
            try:
                settlement = await self.run(holds.settle_with, self.db, request_id, record, **kw)
                return settlement
            except holds.Superseded as lost:
                if not lost.release:
                    # The hold is the other attempt's to settle: nothing moves here.
                    return holds.Settlement(0, 0, already=True)
                settlement = await self._commit.write(
                    holds.settle_in, request_id, **{**kw, "charge": 0, "status": "superseded"}
                )
                return settlement
        finally:
            self._live.discard(request_id)

    async def usage(self, account_id: int) -> list[dict[str, Any]]:
        return await self.run(audit.usage_summary, self.db, account_id)

    # -- idempotency -----------------------------------------------------------------

    async def idempotency_begin(
        self, account_id: int, key: str, body_hash: str
    ) -> idempotency.Replay | None:
        # A claim older than a hold's lifetime belongs to a process that died mid-request.
        return await self.run(idempotency.begin, self.db, account_id, key, body_hash, self.hold_ttl)

    async def idempotency_finish(
        self, account_id: int, key: str, status_code: int, body: dict[str, Any], cost: int
    ) -> None:
        await self.run(idempotency.finish, self.db, account_id, key, status_code, body, cost)

    async def idempotency_abort(self, account_id: int, key: str) -> None:
        await self.run(idempotency.abort, self.db, account_id, key)
