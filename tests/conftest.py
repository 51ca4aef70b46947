"""Shared fixtures: a real server (uvicorn on loopback) running the real engine."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import uvicorn
from fastapi import FastAPI

from servelm.api import conn_guard
from servelm.api.app import create_app
from servelm.api.services import services
from servelm.billing import accounts
from servelm.billing.money import MICRO
from servelm.catalog.specs import Catalog
from servelm.catalog.weights import default_model
from servelm.config import Settings, default_data_dir
from servelm.engines.base import Engine
from servelm.engines.registry import EngineFactory, build_engine
from servelm.store.db import Database
from tests.servers import serve_in_thread


@pytest.fixture(scope="session")
def models_dir() -> Path:
    """The shared models directory; the default model is fetched once per machine."""
    path = default_data_dir() / "models"
    default_model.ensure_default_model(path)
    return path


def free_port() -> int:
    """A port that was free a moment ago, for a server in another process; that
    process may lose it to someone else (``tests.procs`` retries when it does)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class LiveServer:
    app: FastAPI
    base_url: str
    thread: threading.Thread
    server: uvicorn.Server
    settings: Settings
    api_key: str = ""

    @property
    def v1(self) -> str:
        return f"{self.base_url}/v1"

    @property
    def db(self) -> Database:
        db: Database = services(self.app).db
        return db

    def headers(self) -> dict[str, str]:
        return {"x-api-key": self.api_key}

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


def start_server(
    settings: Settings,
    catalog: Catalog | None = None,
    credits: int = 1000,
    engine_factory: EngineFactory = build_engine,
) -> LiveServer:
    """Start uvicorn in a thread with its own event loop; return once it accepts requests.

    The server's database gets an account with ``credits`` and a key (``api_key``).
    """
    app = create_app(settings, catalog, engine_factory=engine_factory)
    srv = serve_in_thread(
        app,
        lifespan="on",
        # The connection guards `servelm serve` runs with.
        http=conn_guard.protocol_for(conn_guard.ConnLimits.from_settings(settings)),
        **conn_guard.uvicorn_options(settings),
    )
    live = LiveServer(app, srv.base_url, srv.thread, srv.server, settings)
    live.api_key = provision(live.db, "tests", credits)
    return live


def engine_of(srv: LiveServer, slug: str) -> Engine:
    """The model's engine, loaded. A model loads at its first request and unloads
    after ``keep_alive`` idle (5 minutes), which a session-wide server's model passes
    between two modules: a one-token request brings it back first."""
    if slug not in services(srv.app).engines:
        body = {"model": slug, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1}
        r = httpx.post(f"{srv.v1}/chat/completions", json=body, headers=srv.headers(), timeout=120)
        assert r.status_code == 200, r.text
    return services(srv.app).engines[slug]


def provision(db: Database, name: str, credits: int, **key_kw: object) -> str:
    """An account with ``credits`` credits and one key; returns the key."""
    account = accounts.create_account(db, name)
    if credits:
        accounts.grant(db, account.id, credits * MICRO, note="test grant")
    _, key = accounts.create_key(db, account.id, name, **key_kw)  # type: ignore[arg-type]
    return key


def make_settings(tmp: Path, models_dir: Path, **kw: object) -> Settings:
    base: dict[str, object] = {
        "data_dir": tmp,
        "models_dir": models_dir,
        "threads": 1,
        "slots": 4,
    }
    base.update(kw)
    return Settings(**base)  # type: ignore[arg-type]


ADMIN_TOKEN = "test-admin-token-0123456789"


@pytest.fixture(scope="session")
def live(models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    """One server for the whole session: the default model, 4 slots."""
    settings = make_settings(
        tmp_path_factory.mktemp("live"),
        models_dir,
        key_cache_seconds=1.0,
        admin_token=ADMIN_TOKEN,
    )
    srv = start_server(settings)
    yield srv
    srv.stop()


@pytest.fixture
def http(live: LiveServer) -> Iterator[httpx.Client]:
    """An httpx client that sends the test account's key."""
    with httpx.Client(base_url=live.base_url, timeout=60, headers=live.headers()) as client:
        yield client


PG_ADMIN_URL = "postgresql://postgres@127.0.0.1:5432/postgres"


def new_pg_database() -> str:
    """A fresh, empty PostgreSQL database on the local server; returns its URL. Skips
    the test, saying why, when no server answers."""
    import uuid

    import psycopg

    name = f"servelm_test_{uuid.uuid4().hex[:12]}"
    try:
        with psycopg.connect(PG_ADMIN_URL, autocommit=True, connect_timeout=3) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
    except psycopg.OperationalError as exc:
        pytest.skip(f"PostgreSQL is not reachable at 127.0.0.1:5432: {exc}".splitlines()[0])
    return f"postgresql://postgres@127.0.0.1:5432/{name}"


def drop_pg_database(url: str) -> None:
    import psycopg

    name = url.rsplit("/", 1)[1]
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


BACKENDS = ["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)]


@pytest.fixture(params=BACKENDS)
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """An empty database of each kind we support: a SQLite file, and PostgreSQL."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'servelm.db'}"
        return
    url = new_pg_database()
    yield url
    drop_pg_database(url)


@pytest.fixture
def db(db_url: str) -> Iterator[Database]:
    database = Database(db_url)
    database.upgrade()
    yield database
    database.dispose()


@pytest.fixture(scope="session")
def seed_models(models_dir: Path) -> dict[str, Path]:
    """Seed slug → tiny random-weight GGUF of that architecture (generated once)."""
    from tests.support import ggufgen

    return ggufgen.ensure_models(
        default_data_dir() / "testmodels", default_model.default_model_path(models_dir)
    )


def seed_models_file(
    directory: Path, seed_models: dict[str, Path], extra: str = "", each: str = ""
) -> Path:
    """A servelm.toml that maps each seed slug to its tiny model; ``each`` is added to
    every entry, ``extra`` after the last."""
    entries = [f'[models.{slug}]\npath = "{path}"\n{each}' for slug, path in seed_models.items()]
    path = directory / "servelm.toml"
    path.write_text("\n".join(entries) + extra)
    return path


@pytest.fixture(scope="session")
def seed_live(
    models_dir: Path, seed_models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LiveServer]:
    """A server with the three seed slugs served by their tiny models, 2 slots each.
    A request without ``max_tokens`` gets 64 (the catalog's 1,024 made each of the
    pages' snippets, which set none, a ~30 s answer of random tokens on a loaded
    machine)."""
    from servelm.catalog.models_file import load_catalog

    tmp = tmp_path_factory.mktemp("seeds")
    models_file = seed_models_file(tmp, seed_models, each="default_max_tokens = 64\n")
    settings = make_settings(tmp, models_dir, slots=2, models_file=models_file)
    srv = start_server(settings, load_catalog(models_dir, models_file))
    yield srv
    srv.stop()


# The fast lane (`make test-fast`): what needs no real engine and starts no process of
# its own — the walk's rules on the scripted engine (tests/fast/, the malformed-request
# catalogue), money (holds, group commit, batches), limits, routing, the queue, parsing
# and the HTTP client. A test in these modules that does start a process is marked slow
# and stays out.
FAST_MODULES = frozenset(
    {
        "tests/api/test_malformed.py",
        "tests/billing/test_cli.py",
        "tests/billing/test_groupcommit.py",
        "tests/billing/test_pg_batches.py",
        "tests/billing/test_store.py",
        "tests/catalog/test_models_file.py",
        "tests/chat/test_conversation.py",
        "tests/chat/test_media.py",
        "tests/engines/test_http1.py",
        "tests/engines/test_pool_races.py",
        "tests/fleet/test_capacity.py",
        "tests/fleet/test_deploy.py",
        "tests/fleet/test_passive_health.py",
        "tests/fleet/test_routing.py",
        "tests/hostile/test_media_hostile.py",
        "tests/jobs/test_queue.py",
        "tests/access/test_store.py",
        "tests/telemetry/test_tracing.py",
    }
)


# The files that took longest in full runs (`--durations`, 2026-12-06), longest first.
# `make test` hands files to its processes in collection order
# (`--no-loadscope-reorder`), so these start first and the quick files fill the gaps
# at the end; xdist's own order (most tests first) left a minute-long file or three
# for last, running alone. A stale list costs time, never a result.
LONGEST_FIRST = (
    "tests/engines/test_prompt_charge.py",
    "tests/fleet/test_rolling.py",
    "tests/telemetry/test_across_processes.py",
    "tests/billing/test_workers.py",
    "tests/fleet/test_discovery.py",
    "tests/engines/test_kv_admission.py",
    "tests/fleet/test_fleet.py",
    "tests/engines/test_llamacpp.py",
    "tests/billing/test_concurrency.py",
    "tests/fleet/test_matrix.py",
    "tests/hostile/test_fuzz.py",
    "tests/access/test_lifecycle.py",
    "tests/clients/test_instructor.py",
    "tests/seeds/test_snippets.py",
    "tests/jobs/test_batches.py",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    in_fast_lane: dict[str, bool] = {}
    for item in items:
        path = item.nodeid.split("::")[0]
        in_lane = path.startswith("tests/fast/") or path in FAST_MODULES
        in_fast_lane[path] = in_lane
        if (
            in_lane
            and item.get_closest_marker("slow") is None
            and "live" not in getattr(item, "fixturenames", ())
        ):
            item.add_marker(pytest.mark.fast)

    def rank(item: pytest.Item) -> tuple[int, int]:
        path = item.nodeid.split("::")[0]
        if path in LONGEST_FIRST:
            return 0, LONGEST_FIRST.index(path)
        return (2 if in_fast_lane[path] else 1), 0

    items.sort(key=rank)  # stable: a file's tests keep their order


# The combination matrix's table (tests/fleet/conftest.py), printed at the end of the
# run by whichever process writes the summary.
_matrix_lines: list[str] = []


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    for name, value in report.user_properties:
        if name == "servelm_matrix_table":
            _matrix_lines.extend(str(value).split("\n"))


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    for line in _matrix_lines:
        terminalreporter.write_line(line)
