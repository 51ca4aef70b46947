"""Fixtures of the job queue's tests: a server whose model has a batch price, and a
webhook receiver on loopback that checks nothing itself (the tests do)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from decimal import Decimal
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from openai.types import Batch, BatchRequestCounts

from servelm.catalog.builtins import default_spec
from servelm.catalog.specs import Catalog
from tests.conftest import BACKENDS, LiveServer, drop_pg_database, make_settings, new_pg_database
from tests.conftest import start_server as start_live

SLUG = "smollm2-135m-instruct"
# Prices high enough that a few tokens cost whole micro-credits at half price.
PRICES = {"input_price": Decimal("10"), "output_price": Decimal("20")}


def jobs_catalog(models_dir: Path) -> Catalog:
    spec = default_spec(models_dir).model_copy(update={**PRICES, "batch_discount": Decimal("0.5")})
    return Catalog([spec])


def jobs_server(tmp: Path, models_dir: Path, **kw: Any) -> LiveServer:
    settings = make_settings(
        tmp,
        models_dir,
        jobs_poll_seconds=0.05,
        webhook_retry_seconds=0.05,
        webhook_allow_hosts=("127.0.0.1:*",),
        **kw,
    )
    return start_live(settings, jobs_catalog(models_dir), credits=100)


@pytest.fixture(scope="module", params=BACKENDS)
def jobs_live(
    request: pytest.FixtureRequest, models_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LiveServer]:
    """One server per module and database kind (SQLite, PostgreSQL)."""
    tmp = tmp_path_factory.mktemp("jobs")
    url = new_pg_database() if request.param == "postgresql" else None
    srv = jobs_server(tmp, models_dir, **({"database_url": url} if url else {}))
    yield srv
    srv.stop()
    if url:
        srv.db.dispose()
        drop_pg_database(url)


@dataclass
class Call:
    path: str
    headers: dict[str, str]
    body: bytes


@dataclass
class Receiver:
    """Answers 500 to the first ``fail`` calls of each path (``/fail2`` fails twice)."""

    url: str
    calls: list[Call] = field(default_factory=list)

    def wait_for(self, check: Callable[[list[Call]], bool], timeout: float = 60) -> list[Call]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if check(self.calls):
                return self.calls
            time.sleep(0.02)
        raise AssertionError(f"the receiver did not get the calls expected: {self.calls}")


@pytest.fixture(scope="module")
def receiver() -> Iterator[Receiver]:
    calls: list[Call] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("content-length", "0")))
            calls.append(Call(self.path, {k.lower(): v for k, v in self.headers.items()}, body))
            fails = int(self.path.rsplit("fail", 1)[1]) if "fail" in self.path else 0
            seen = sum(1 for c in calls if c.path == self.path)
            self.send_response(500 if seen <= fails else 200)
            self.send_header("content-length", "0")
            self.end_headers()

        def log_message(self, *args: object) -> None:
            return  # quiet

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield Receiver(f"http://127.0.0.1:{server.server_address[1]}", calls)
    server.shutdown()


def poll(client: httpx.Client, url: str, done: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
    """GET ``url`` until ``done`` says so (a timeout, never a timing assertion)."""
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        body: dict[str, Any] = client.get(url).json()
        if done(body):
            return body
        time.sleep(0.05)
    raise AssertionError(f"{url} never finished: {body}")


def credits(live: LiveServer) -> int:
    """The test account's balance, in micro-credits, as its key reads it."""
    r = httpx.get(f"{live.v1}/credits", headers=live.headers())
    return int(r.json()["micro_credits"])


def ledger_clean(live: LiveServer) -> bool:
    from datetime import timedelta

    from servelm.billing import audit

    ttl = timedelta(seconds=live.settings.hold_ttl_seconds)
    return audit.ledger_check(live.db, ttl) == []


def open_holds(live: LiveServer, batch_id: str) -> int:
    from sqlalchemy import func, select

    from servelm.store.tables import holds

    with live.db.read() as conn:
        return int(
            conn.execute(
                select(func.count()).where(
                    holds.c.request_id.like(f"{batch_id}:%"), holds.c.settled_at.is_(None)
                )
            ).scalar_one()
        )


def counts(batch: Batch) -> BatchRequestCounts:
    """A batch's request counts, which the SDK types as optional (servelm always sends them)."""
    assert batch.request_counts is not None
    return batch.request_counts
