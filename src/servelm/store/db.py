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
each ONE statement there (data-modifying CTEs, ``billing/holds.py``), and the writer
connection sends a whole group-commit batch in one psycopg pipeline (``Tx.submit``,
``WriterConnection.batch``): one round trip per batch, however many writes it holds.
"""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from sqlalchemy import Connection, create_engine, event
from sqlalchemy.engine import Dialect, Engine
from sqlalchemy.sql.expression import Executable

MIGRATIONS = Path(__file__).parent / "migrations"
# An arbitrary constant naming our advisory lock ("servelm" in ASCII, truncated).
_MIGRATION_LOCK = 0x7365_7276_656C


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
    """A write's result that needs its statement's answer, which in a pipeline arrives
    only once the whole batch has been sent (``GroupCommit`` calls it then; ``outcome``
    where there is no batch). It may read the database again on a rare path."""

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

    def __init__(self, cursor: Any, db: Database, *, batch_size: int | None = None) -> None:
        self._cursor = cursor
        self._db = db
        # A pipelined batch (``WriterConnection.batch``): BEGIN goes out before the
        # first statement that needs a transaction, COMMIT at ``end``.
        self._pipelined = batch_size is not None
        self._batch_size = batch_size or 0
        self._began = False

    @property
    def postgresql(self) -> bool:
        return not self._db.is_sqlite

    def submit(self, sql: str, values: Mapping[str, Any]) -> Callable[[], Row]:
        """Send a PostgreSQL statement (psycopg ``%(name)s`` parameters); the function
        returned gives its first row. In a pipeline the statement only joins the batch
        here, and its row is read once the batch's answers are in.

        Every commit waits for the WAL flush: a hold that a server crash could lose
        would leave its request served and never charged.
        """
        if not self._pipelined:
            self._cursor.execute(sql, values)
            row = self._cursor.fetchone()
            return lambda: tuple(row) if row is not None else None
        if not self._began and self._batch_size > 1:
            # A lone statement commits by itself; several share one transaction.
            self._cursor.execute("BEGIN")
            self._began = True
        # Its own cursor: each statement's answer stays there until it is read.
        cur = self._cursor.connection.cursor()
        cur.execute(sql, values)

        def first() -> Row:
            row = cur.fetchone()
            cur.close()
            return tuple(row) if row is not None else None

        return first

    def end(self) -> None:
        """A pipelined batch's COMMIT, if it opened a transaction (a lone statement
        commits by itself)."""
        if self._began:
            self._cursor.execute("COMMIT")

    def first(self, stmt: Executable, values: Mapping[str, Any]) -> tuple[Any, ...] | None:
        prepared = self._db.prepare(stmt)
        self._cursor.execute(prepared.sql, prepared.params(values))
        row = self._cursor.fetchone()
        return tuple(row) if row is not None else None

    def execute(self, stmt: Executable, values: Mapping[str, Any]) -> int:
        prepared = self._db.prepare(stmt)
        self._cursor.execute(prepared.sql, prepared.params(values))
        return int(self._cursor.rowcount)


class WriterConnection:
    """One dedicated connection for the request path's money writes (``GroupCommit``).

    Not the pool's: checking a connection out costs a liveness round trip on
    PostgreSQL (``pool_pre_ping``), twice per request. One batch at a time uses it.

    On SQLite it is used on the event loop itself: a hold or a
    settlement is tens of microseconds of SQLite work, where handing it to a thread
    costs more and, under load, queues for the GIL behind the busy loop. So it never
    waits: if another connection or process holds the write lock, ``transaction``
    raises ``Busy`` at once and the caller takes the blocking route. Nor does it
    checkpoint the WAL (that can take milliseconds): ``Database.checkpoint`` does, off
    the loop.
    """

    def __init__(self, db: Database) -> None:
        self._db = db
        raw = db.engine.raw_connection()
        raw.detach()  # ours for good
        self._raw = raw
        cur = raw.cursor()
        if db.is_sqlite:
            cur.execute("PRAGMA busy_timeout=0")
            cur.execute("PRAGMA wal_autocheckpoint=0")
        else:
            # Transactions are ours to open (``batch``): a lone write is one
            # statement, committed by itself, with no BEGIN before it.
            pg: Any = raw.dbapi_connection  # a psycopg.Connection
            pg.autocommit = True
            self._pg = pg
        self._cursor = cur
        self.broken = False

    @contextlib.contextmanager
    def transaction(self) -> Iterator[Tx]:
        if self._db.is_sqlite:
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
            try:
                self._raw.rollback()
            except Exception:
                # The connection itself is gone (server restart, network): the next
                # batch gets a new one.
                self.broken = True
            raise

    @contextlib.contextmanager
    def batch(self, size: int) -> Iterator[Tx]:
        """PostgreSQL: a batch of ``size`` writes in one pipeline, one round trip. A
        lone durable write is one autocommitted statement; several run between BEGIN
        and COMMIT, so they share one commit (and one WAL flush); see ``Tx.submit``
        for writes that need no flush. Read the ``Later``
        results after this block: the answers are in once it ends."""
        conn = self._pg
        try:
            with conn.pipeline():
                tx = Tx(self._cursor, self._db, batch_size=size)
                yield tx
                tx.end()
        except BaseException:
            # A failed statement aborts the rest of the pipeline (COMMIT included)
            # and leaves the transaction failed: roll it back, or give up on a
            # connection that is gone.
            try:
                if conn.broken or conn.closed:
                    self.broken = True
                else:
                    conn.rollback()
            except Exception:
                self.broken = True
            raise

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._raw.close()


class Database:
    def __init__(self, url: str, *, pool_size: int = 8) -> None:
        self.url = normalize_url(url)
        self.is_sqlite = self.url.startswith("sqlite")
        self._prepared: dict[int, Prepared] = {}
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
