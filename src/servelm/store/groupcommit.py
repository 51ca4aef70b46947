"""Group commit: the money writes of requests that arrive together share one transaction.

Every chat request costs two write transactions (a hold, a settlement), and on SQLite
the commit is most of their cost: it appends every page the transaction touched to
the write-ahead log (80 µs of the 0.2 ms a hold and a settlement take). Requests in
flight together hold and settle within the same turn of the event loop, so those
writes are queued and run back to back in one transaction, committed once, before any
of their callers goes on. Each write is still committed before its request proceeds;
only the commit is shared. With one request in flight a batch holds one write and
nothing changes.

Where a batch runs, on one dedicated connection (``WriterConnection``):
- SQLite: on the event loop itself (tens of microseconds, where a thread hop costs
  more and, under load, queues for the GIL behind the busy loop); if another
  connection holds the write lock (``Busy``), on the thread pool instead.
- PostgreSQL: from the event loop too, on psycopg's async connection (``PgWriter``),
  one batch at a time: writes that arrive meanwhile form the next batch, so batches
  grow with the load, one round trip and one commit each. Each write is ONE statement
  that the batch only queues (``PgBatch``) and returns a ``Later``, answered once the
  batch is in. No thread hop: two of them per request had cost more gateway CPU than
  psycopg itself.

A write is a function ``fn(tx, ...)`` that raises ``ServelmError`` only before it has
written anything (``NotEnoughCredits``: the conditional UPDATE matched no row). Such an
error goes to its caller and the batch goes on. Anything else rolls the batch back and
each of its writes is run again alone, so one failure cannot fail its neighbours.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from servelm.errors import ServelmError
from servelm.store.db import Busy, Database, Later, PgBatch, PgWriter, Tx, WriterConnection

log = logging.getLogger(__name__)

Blocking = Callable[..., Awaitable[Any]]


@dataclass
class _Write:
    fn: Callable[..., Any]
    args: tuple[Any, ...]
    kw: dict[str, Any]
    future: asyncio.Future[Any]
    result: Any = None
    error: BaseException | None = None


class GroupCommit:
    def __init__(self, db: Database, blocking: Blocking) -> None:
        """``blocking(fn, *args)`` runs ``fn`` off the loop (the billing thread pool)."""
        self._db = db
        self._blocking = blocking
        # SQLite's connects now; PostgreSQL's on its first batch, and again after it breaks.
        self._writer: WriterConnection | None = db.writer_connection() if db.is_sqlite else None
        self._pg: PgWriter | None = None if db.is_sqlite else db.pg_writer()
        self._queue: list[_Write] = []
        self._busy = False  # a PostgreSQL batch is in flight on the writer connection
        self._running: set[asyncio.Task[None]] = set()
        self.batches = 0  # counters: how much sharing there was (the tests read them)
        self.writes = 0

    def write(self, fn: Callable[..., Any], *args: Any, **kw: Any) -> asyncio.Future[Any]:
        """Queue ``fn(tx, *args, **kw)``; the future resolves once it is committed."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._queue.append(_Write(fn, args, kw, future))
        if len(self._queue) == 1 and not self._busy:
            # Everything queued before the loop comes back round joins this batch.
            loop.call_soon(self._flush)
        return future

    async def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        if self._pg is not None:
            await self._pg.close()

    def _flush(self) -> None:
        if self._busy or not self._queue:
            return
        batch, self._queue = self._queue, []
        self.batches += 1
        self.writes += len(batch)
        if self._db.is_sqlite:
            assert self._writer is not None
            try:
                with self._writer.transaction() as tx:
                    _apply(tx, batch)
                    _answer(batch)
            except Busy:
                # Another process is writing: wait for the lock off the loop, on a
                # pooled connection (the writer is the loop's).
                self._spawn(self._pooled(batch))
            except Exception as exc:
                self._failed(batch, exc)
            else:
                _resolve(batch)
            return
        self._busy = True
        self._spawn(self._on_writer(batch))

    async def _on_writer(self, batch: list[_Write]) -> None:
        assert self._pg is not None
        try:
            queued = PgBatch()
            _apply(queued, batch)
            await self._pg.send(queued)
        except Exception as exc:
            self._failed(batch, exc)
        else:
            # Committed. Answers are read now; one that fails is that write's error
            # alone: the batch is in and must not run again.
            _answer(batch, committed=True)
            _resolve(batch)
        finally:
            self._busy = False
            self._flush()  # what queued up meanwhile

    def _spawn(self, work: Awaitable[None]) -> None:
        task = asyncio.ensure_future(work)
        self._running.add(task)
        task.add_done_callback(self._running.discard)

    async def _pooled(self, batch: list[_Write]) -> None:
        await self._off_loop(self._apply_pooled, batch)

    async def _off_loop(self, apply: Callable[[list[_Write]], None], batch: list[_Write]) -> None:
        try:
            await self._blocking(apply, batch)
        except Exception as exc:
            self._failed(batch, exc)
        else:
            _resolve(batch)

    def _apply_pooled(self, batch: list[_Write]) -> None:
        with self._db.transaction() as tx:
            _apply(tx, batch)
            _answer(batch)

    def _failed(self, batch: list[_Write], exc: Exception) -> None:
        """The batch was rolled back: a lone write fails; each of several runs again
        alone, on a pooled connection."""
        if len(batch) == 1:
            _settle_future(batch[0].future, error=exc)
            return
        log.warning("a batch of %d money writes failed (%s); retrying each alone", len(batch), exc)
        for write in batch:
            self._spawn(self._pooled([write]))


def _apply(tx: Tx | PgBatch, batch: list[_Write]) -> None:
    for write in batch:
        write.result, write.error = None, None
        try:
            write.result = write.fn(tx, *write.args, **write.kw)
        except ServelmError as exc:
            write.error = exc  # raised before anything was written: the batch goes on


def _answer(batch: list[_Write], *, committed: bool = False) -> None:
    """Turn each ``Later`` result into the write's result or error."""
    for write in batch:
        if isinstance(write.result, Later):
            later, write.result = write.result, None
            try:
                write.result = later()
            except ServelmError as exc:
                write.error = exc
            except Exception as exc:
                if not committed:
                    raise  # the transaction rolls back; ``_failed`` takes over
                write.error = exc


def _resolve(batch: list[_Write]) -> None:
    for write in batch:
        _settle_future(write.future, result=write.result, error=write.error)


def _settle_future(
    future: asyncio.Future[Any], *, result: Any = None, error: BaseException | None = None
) -> None:
    if future.done():
        return  # its caller was cancelled; the write is committed all the same
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)
