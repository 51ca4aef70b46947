"""The database handle: one SQLAlchemy engine, SQLite or PostgreSQL, same code.

SQLite specifics, set on every connection: WAL (readers never block the writer), a
busy timeout (writers queue instead of failing), foreign keys, and ``BEGIN
IMMEDIATE`` for write transactions, so two writers never both hold a read lock and
deadlock on the upgrade to a write lock.

Two ways in. ``read()``/``write()`` give SQLAlchemy connections, for everything off
the request path. The request path's money statements (a hold and a settlement per
chat request) run through ``transaction()`` instead: the same Core statements,
compiled once for this database's dialect (``Prepared``) and executed on the raw
DBAPI cursor. SQLAlchemy's per-execution work cost five times what SQLite spent
running them (1.1 ms against 0.2 ms of CPU per hold + settlement; docs/benchmarks.md).

On PostgreSQL every statement is a network round trip, so a hold and a settlement are
each ONE statement there (data-modifying CTEs, ``billing/holds.py``). On the request
path they go out from the event loop itself, on one psycopg async connection
(``PgWriter``): a group-commit batch is queued (``PgBatch``) and sent at once, one
statement alone or several in one pipeline and one transaction, one round trip
either way. A thread hop each way had cost more gateway CPU than psycopg itself
(docs/benchmarks.md, "PostgreSQL on the event loop").
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import sqlite3
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from alembic import command
from alembic.config import Config
from sqlalchemy import Connection, create_engine, event
from sqlalchemy.engine import Dialect, Engine
from sqlalchemy.sql.expression import Executable

from servelm.store.pgloop import LoopConnection

MIGRATIONS = Path(__file__).parent / "migrations"
# An arbitrary constant naming our advisory lock ("servelm" in ASCII, truncated).
_MIGRATION_LOCK = 0x7365_7276_656C
T = TypeVar("T")


def normalize_url(url: str) -> str:
    """``postgresql://`` means psycopg 3 here (the driver we ship), not psycopg2."""
    if url.startswith("postgresql://") or url.startswith("postgres://"):
        return "postgresql+psycopg://" + url.split("://", 1)[1]
    return url


class Busy(Exception):
    """Another connection holds SQLite's write lock (raised only where we asked not to
    wait for it)."""


class Prepared:
    """A Core statement compiled once for one dialect: its SQL text and how to turn a
    dict of values into the DBAPI's parameters (bind processors applied, e.g. SQLite's
    datetime → text)."""

    def __init__(self, stmt: Executable, dialect: Dialect) -> None:
        compiled = stmt.compile(dialect=dialect)  # type: ignore[attr-defined]
        self.sql = compiled.string
        self._order: tuple[str, ...] | None = (
            tuple(compiled.positiontup) if compiled.positiontup is not None else None
        )
        self._processors = {
            name: proc
            for name, bind in compiled.binds.items()
            if (proc := bind.type.dialect_impl(dialect).bind_processor(dialect)) is not None
        }

    def params(self, values: Mapping[str, Any]) -> tuple[Any, ...] | dict[str, Any]:
        if self._processors:
            values = {
                k: (self._processors[k](v) if k in self._processors else v)
                for k, v in values.items()
            }
        if self._order is None:
            return dict(values)
        return tuple(values[name] for name in self._order)


class Later:
    """A write's result that needs its statement's answer, which in a queued batch
    (``PgBatch``) arrives only once the whole batch has been sent (``GroupCommit`` calls
    it then; ``outcome`` where there is no batch). It reads nothing itself: the
    statement's row carries every answer, the rare ones included."""

    __slots__ = ("_finish",)

    def __init__(self, finish: Callable[[], Any]) -> None:
        self._finish = finish

    def __call__(self) -> Any:
        return self._finish()


def outcome(result: Any) -> Any:
    """A write function's result, its ``Later`` answered."""
    return result() if isinstance(result, Later) else result


Row = tuple[Any, ...] | None


class Tx:
    """One write transaction on a raw DBAPI connection, running prepared statements."""

    def __init__(self, cursor: Any, db: Database) -> None:
        self._cursor = cursor
        self._db = db

    @property
    def postgresql(self) -> bool:
        return not self._db.is_sqlite

    def submit(self, sql: str, values: Mapping[str, Any]) -> Callable[[], Row]:
        """Run a PostgreSQL statement (psycopg ``%(name)s`` parameters); the function
        returned gives its first row (as ``PgBatch.submit``, which only queues it)."""
        self._cursor.execute(sql, values)
        row = self._cursor.fetchone()
        return lambda: tuple(row) if row is not None else None

    def first(self, stmt: Executable, values: Mapping[str, Any]) -> tuple[Any, ...] | None:
        prepared = self._db.prepare(stmt)
        self._cursor.execute(prepared.sql, prepared.params(values))
        row = self._cursor.fetchone()
        return tuple(row) if row is not None else None

    def execute(self, stmt: Executable, values: Mapping[str, Any]) -> int:
        prepared = self._db.prepare(stmt)
        self._cursor.execute(prepared.sql, prepared.params(values))
        return int(self._cursor.rowcount)


class _Queued:
    __slots__ = ("row", "sent", "sql", "values")

    def __init__(self, sql: str, values: Mapping[str, Any]) -> None:
        self.sql = sql
        self.values = values
        self.row: Row = None
        self.sent = False

    def first(self) -> Row:
        if not self.sent:
            raise RuntimeError("a queued statement's row is read before its batch was sent")
        return self.row


class PgBatch:
    """A group-commit batch on PostgreSQL: the write functions' statements, queued, to
    be sent together by ``PgWriter.send``. Only ``submit`` is offered: a write here is
    one statement whose answer it reads once the batch is in (a ``Later``)."""

    postgresql = True

    def __init__(self) -> None:
        self.statements: list[_Queued] = []

    def submit(self, sql: str, values: Mapping[str, Any]) -> Callable[[], Row]:
        queued = _Queued(sql, values)
        self.statements.append(queued)
        return queued.first


class PgWriter:
    """PostgreSQL: the request path's own connection for money writes, used on the
    event loop (psycopg's async connection), one batch at a time (``GroupCommit``).

    A lone statement is sent in autocommit: it commits by itself, one round trip. Several
    go out in one pipeline between BEGIN and COMMIT: one round trip and one commit (one
    WAL flush) for the batch. Every commit waits for the WAL flush: a hold that a server
    crash could lose would leave its request served and never charged.
    """

    def __init__(self, url: str) -> None:
        self._url = url
        self._conn: LoopConnection | None = None

    async def send(self, batch: PgBatch) -> None:
        """Send the batch and fill in each statement's row. On an error nothing of it
        is committed, except that a lone statement whose connection broke mid-flight
        may or may not have been (as with any database call that loses its server)."""
        if self._conn is None or self._conn.closed or self._conn.broken:
            self._conn = await LoopConnection.connect(self._url, autocommit=True)
        conn = self._conn
        statements = batch.statements
        try:
            if len(statements) == 1:
                cur = conn.cursor()
                await cur.execute(statements[0].sql, statements[0].values)
                rows = [await cur.fetchone()]
            else:
                cursors = []
                async with conn.pipeline(), conn.transaction():
                    for queued in statements:
                        # Its own cursor: each statement's answer stays there until read.
                        cur = conn.cursor()
                        await cur.execute(queued.sql, queued.values)
                        cursors.append(cur)
                rows = [await cur.fetchone() for cur in cursors]
        except BaseException as exc:
            if conn.broken or conn.closed or not isinstance(exc, Exception):
                # Gone, or left mid-statement (cancelled): the next batch connects again.
                self._conn = None
                if not conn.closed:
                    await asyncio.shield(conn.close())
            raise
        for queued, row in zip(statements, rows, strict=True):
            queued.row = tuple(row) if row is not None else None
            queued.sent = True

    async def close(self) -> None:
        if self._conn is not None:
            await self._conn.close()
            self._conn = None


class WriterConnection:
    """SQLite: one dedicated connection for the request path's money writes
    (``GroupCommit``), used on the event loop itself: a hold or a settlement is tens of
    microseconds of SQLite work, where handing it to a thread costs more and, under
    load, queues for the GIL behind the busy loop. So it never waits: if another
    connection or process holds the write lock, ``transaction`` raises ``Busy`` at once
    and the caller takes the blocking route. Nor does it checkpoint the WAL (that can
    take milliseconds): ``Database.checkpoint`` does, off the loop.
    """

    def __init__(self, db: Database) -> None:
        if not db.is_sqlite:
            raise ValueError("PostgreSQL's request-path writer is PgWriter")
        self._db = db
        raw = db.engine.raw_connection()
        raw.detach()  # ours for good
        self._raw = raw
        cur = raw.cursor()
        cur.execute("PRAGMA busy_timeout=0")
        cur.execute("PRAGMA wal_autocheckpoint=0")
        self._cursor = cur

    @contextlib.contextmanager
    def transaction(self) -> Iterator[Tx]:
        try:
            self._cursor.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as exc:
            if exc.sqlite_errorcode in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED):
                raise Busy(str(exc)) from exc
            raise
        try:
            yield Tx(self._cursor, self._db)
            self._raw.commit()
        except BaseException:
            self._raw.rollback()
            raise

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._raw.close()


class Database:
    def __init__(self, url: str, *, pool_size: int = 8, workers: int = 4) -> None:
        self.url = normalize_url(url)
        self.is_sqlite = self.url.startswith("sqlite")
        self._prepared: dict[int, Prepared] = {}
        self._workers = workers
        # Made on the first run(): the CLI's one-shot uses of a Database never need it.
        self._pool: ThreadPoolExecutor | None = None
        if self.is_sqlite:
            path = self.url.split("///", 1)[-1]
            if path and path != ":memory:":
                Path(path).parent.mkdir(parents=True, exist_ok=True)
            self.engine: Engine = create_engine(
                self.url, pool_size=pool_size, max_overflow=pool_size
            )
            _sqlite_setup(self.engine)
        else:
            self.engine = create_engine(
                self.url, pool_size=pool_size, max_overflow=pool_size, pool_pre_ping=True
            )

    async def run(self, fn: Callable[..., T], *args: Any, **kw: Any) -> T:
        """Run a synchronous store function on this database's small thread pool, so
        the loop never waits on a lock or a network."""
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=self._workers, thread_name_prefix="db")
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, functools.partial(fn, *args, **kw))

    @contextlib.contextmanager
    def write(self) -> Iterator[Connection]:
        """A write transaction (``BEGIN IMMEDIATE`` on SQLite); commits on success."""
        with self.engine.begin() as conn:
            yield conn

    def prepare(self, stmt: Executable) -> Prepared:
        # Keyed by identity: the prepared statements are module constants.
        prepared = self._prepared.get(id(stmt))
        if prepared is None:
            prepared = self._prepared[id(stmt)] = Prepared(stmt, self.engine.dialect)
        return prepared

    @contextlib.contextmanager
    def transaction(self) -> Iterator[Tx]:
        """A write transaction on a pooled raw connection; commits on success."""
        raw = self.engine.raw_connection()
        try:
            cur = raw.cursor()
            if self.is_sqlite:
                cur.execute("BEGIN IMMEDIATE")
            try:
                yield Tx(cur, self)
            except BaseException:
                raw.rollback()
                raise
            raw.commit()
        finally:
            raw.close()  # back to the pool

    def writer_connection(self) -> WriterConnection:
        return WriterConnection(self)

    def pg_writer(self) -> PgWriter:
        # libpq's own URL: SQLAlchemy's names its driver (``postgresql+psycopg``).
        url = self.engine.url.set(drivername="postgresql")
        return PgWriter(url.render_as_string(hide_password=False))

    def checkpoint(self, max_wal_frames: int = 16384) -> None:
        """Move SQLite's write-ahead log into the database file.

        PASSIVE first: it never holds writers up. But under steady writes it never
        catches up (writers append while it syncs), so SQLite never restarts the log:
        it grows for ever and each checkpoint is slower than the last (measured: 80,000
        frames and 35 ms per checkpoint after a minute at 600 requests/s). Past
        ``max_wal_frames`` (64 MiB of 4 KiB pages) a RESTART checkpoint holds writers
        for the moment it needs to finish, and the log starts again from its top. (Not
        TRUNCATE: writing into a file that must grow again cost every commit more.)
        """
        if not self.is_sqlite:
            return
        raw = self.engine.raw_connection()
        try:
            cur = raw.cursor()
            _, frames, _ = cur.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
            if frames > max_wal_frames:
                cur.execute("PRAGMA wal_checkpoint(RESTART)").fetchone()
        finally:
            raw.close()

    @contextlib.contextmanager
    def read(self) -> Iterator[Connection]:
        with self.engine.connect().execution_options(servelm_readonly=True) as conn:
            yield conn
            conn.rollback()

    def upgrade(self) -> None:
        """Bring the schema to the newest migration."""
        cfg = Config()
        cfg.set_main_option("script_location", str(MIGRATIONS))
        with self.engine.begin() as conn:
            if not self.is_sqlite:
                # Gateway replicas start together; one migrates, the others wait and
                # then find the schema at head. (SQLite's BEGIN IMMEDIATE already
                # serialises this.)
                conn.exec_driver_sql(f"SELECT pg_advisory_xact_lock({_MIGRATION_LOCK})")
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, "head")

    def dispose(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        self.engine.dispose()


def _sqlite_setup(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        # Take transaction control away from the sqlite3 module so we can say
        # BEGIN IMMEDIATE ourselves.
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA busy_timeout=30000")
        cur.execute("PRAGMA foreign_keys=ON")
        # WAL + NORMAL: a commit survives a process crash; only an OS crash can lose
        # the last transactions, never corrupt the file.
        cur.execute("PRAGMA synchronous=NORMAL")
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        readonly = conn.get_execution_options().get("servelm_readonly", False)
        conn.exec_driver_sql("BEGIN" if readonly else "BEGIN IMMEDIATE")
