"""The fast lane: the walk's rules against a scripted engine (``tests.support.
scripted_engine``) plugged in through the real engine seam, on a real server on
loopback with a real SQLite file. No model is loaded, so the lane runs in seconds
(``make test-fast``)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import pytest

from servelm.api.services import services
from servelm.billing import accounts
from servelm.catalog.models_file import load_plans
from servelm.catalog.specs import Catalog, ModelSpec
from servelm.store.db import Database
from servelm.store.tables import holds, usage
from tests.conftest import ADMIN_TOKEN, LiveServer, make_settings, provision, start_server
from tests.support.scripted_engine import ScriptedEngine, scripted_factory

SLUG = "scripted"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "tests/fast/" in str(item.fspath):
            item.add_marker(pytest.mark.fast)


# Prices chosen so every rounding shows: 2 micro-credits per prompt token, 3 per
# output token; a tiny window so context checks need few words.
SPEC = ModelSpec(
    slug=SLUG,
    aliases=("s",),
    engine="openai",
    base_url="http://scripted.invalid/v1",
    context_window=64,
    default_max_tokens=16,
    max_output_tokens=32,
    input_price=Decimal("2"),
    output_price=Decimal("3"),
)


PLANS = "[plans.pro]\nrpm = 6000\n\n[plans.free]\nrpm = 600\n"


@pytest.fixture(scope="package")
def fast(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    tmp = tmp_path_factory.mktemp("fast")
    # Plans only (the catalog is SPEC): the admin API takes these names and no other.
    models_file = tmp / "servelm.toml"
    models_file.write_text(PLANS)
    settings = make_settings(
        tmp,
        tmp / "models",
        models_file=models_file,
        slots=2,
        queue_size=1,
        key_cache_seconds=0.0,
        admin_token=ADMIN_TOKEN,
    )
    catalog = Catalog([SPEC], load_plans(models_file))
    srv = start_server(settings, catalog, credits=10, engine_factory=scripted_factory)
    yield srv
    srv.stop()


@pytest.fixture
def engine(fast: LiveServer) -> Iterator[ScriptedEngine]:
    eng = services(fast.app).engines[SLUG]
    assert isinstance(eng, ScriptedEngine)
    yield eng
    eng.clear()  # nothing left over for the next test


def new_key(db: Database, micro: int, name: str = "t") -> tuple[str, int]:
    """A fresh account holding exactly ``micro`` micro-credits, and its key."""
    key = provision(db, f"{name}-{uuid.uuid4().hex[:8]}", 0)
    account = accounts.find_key(db, key.split("_")[1])
    assert account is not None
    if micro:
        accounts.grant(db, account.account_id, micro, note="test")
    return key, account.account_id


def balance(db: Database, account_id: int) -> tuple[int, int]:
    a = accounts.get_account(db, account_id)
    return a.balance, a.held


def usage_row(db: Database, request_id: str) -> dict[str, Any] | None:
    with db.read() as conn:
        row = conn.execute(usage.select().where(usage.c.request_id == request_id)).first()
    return dict(row._mapping) if row is not None else None


def hold_row(db: Database, request_id: str) -> dict[str, Any] | None:
    with db.read() as conn:
        row = conn.execute(holds.select().where(holds.c.request_id == request_id)).first()
    return dict(row._mapping) if row is not None else None
