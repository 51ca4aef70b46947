"""Overload: far more concurrent requests than slots + queue. The excess is refused
with 503 + Retry-After (and pays nothing), the admitted ones complete, and
``/healthz`` keeps answering while the engine is saturated.

Latencies are measured and printed (``-s``) for the record, not asserted: this
machine is shared, and a wall-clock assertion would test the neighbours.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import time
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path

import httpx
import pytest
from sqlalchemy import func, select

from servelm.billing import accounts
from servelm.billing.money import MICRO
from servelm.store.tables import usage
from tests.conftest import LiveServer, make_settings, provision, start_server

SLUG = "smollm2-135m-instruct"
SLOTS, QUEUE, SENT = 2, 2, 40
# The process-wide cap sheds most of the excess before anything is read; the engine's
# queue refuses the few that get past it.
MAX_INFLIGHT = 8
Result = tuple[int, float, str, dict[str, str]]


@pytest.fixture(scope="module")
def small(models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    tmp = tmp_path_factory.mktemp("overload")
    srv = start_server(
        make_settings(
            tmp,
            models_dir,
            slots=SLOTS,
            queue_size=QUEUE,
            max_inflight=MAX_INFLIGHT,
            # One crowd on one key: what is measured is the model's own slots and queue,
            # not one account's share of them (tests/access/test_leases.py).
            fair_slots=False,
        )
    )
    yield srv
    srv.stop()


async def _one(client: httpx.AsyncClient, url: str) -> Result:
    body = {
        "model": SLUG,
        "messages": [{"role": "user", "content": "Count to ten."}],
        "max_tokens": 24,
        "ignore_eos": True,
        "stream": True,
    }
    started = time.perf_counter()
    async with client.stream("POST", url, json=body) as r:
        status_at = time.perf_counter() - started
        text = (await r.aread()).decode()
        return r.status_code, status_at, text, dict(r.headers)


async def _probe(client: httpx.AsyncClient, url: str, stop: asyncio.Event) -> list[float]:
    seen: list[float] = []
    while not stop.is_set():
        started = time.perf_counter()
        r = await client.get(url)
        assert r.status_code == 200
        seen.append(time.perf_counter() - started)
        await asyncio.sleep(0.01)
    return seen


async def _load(srv: LiveServer, key: str) -> tuple[list[Result], list[float]]:
    limits = httpx.Limits(max_connections=SENT + 5)
    async with (
        httpx.AsyncClient(timeout=120, headers={"x-api-key": key}, limits=limits) as client,
        httpx.AsyncClient(timeout=10) as prober,
    ):
        stop = asyncio.Event()
        probe = asyncio.create_task(_probe(prober, f"{srv.base_url}/healthz", stop))
        url = f"{srv.v1}/chat/completions"
        results = await asyncio.gather(*(_one(client, url) for _ in range(SENT)))
        stop.set()
        return list(results), await probe


def test_excess_is_shed_with_503_and_pays_nothing(small: LiveServer) -> None:
    key = provision(small.db, "crowd", credits=1000)
    account = accounts.get_account(small.db, "crowd")
    results, health = asyncio.run(_load(small, key))

    ok = [r for r in results if r[0] == 200]
    shed = [r for r in results if r[0] == 503]
    assert len(ok) + len(shed) == SENT, sorted({r[0] for r in results})
    assert len(ok) >= SLOTS + QUEUE and shed
    for _, _, text, headers in shed:
        assert int(headers["retry-after"]) >= 1
        assert json.loads(text)["error"]["code"] == "overloaded"
    costs = []
    for _, _, text, _ in ok:
        events = [line.removeprefix("data: ") for line in text.splitlines() if line]
        assert events[-1] == "[DONE]"
        costs.append(json.loads(events[-2])["usage"]["cost"])
    # Only the answered requests were charged, each what its usage said.
    after = accounts.get_account(small.db, account.id)
    assert after.held == 0
    with small.db.read() as conn:
        charged = conn.execute(
            select(func.coalesce(func.sum(usage.c.cost), 0)).where(usage.c.account_id == account.id)
        ).scalar()
    assert charged == sum(int(Decimal(str(c)) * MICRO) for c in costs)
    assert account.balance - after.balance == charged

    gate_ms = sorted(r[1] * 1000 for r in shed if "at capacity;" in r[2])
    queue_ms = sorted(r[1] * 1000 for r in shed if "queue is full" in r[2])
    assert len(gate_ms) + len(queue_ms) == len(shed) and gate_ms
    health_ms = sorted(h * 1000 for h in health)
    p99 = health_ms[min(len(health_ms) - 1, int(len(health_ms) * 0.99))]
    print(
        f"\nsent {SENT}: {len(ok)} served, {len(shed)} shed; {len(gate_ms)} by the "
        f"in-flight cap after median {statistics.median(gate_ms):.1f} ms, max "
        f"{gate_ms[-1]:.1f} ms; {len(queue_ms)} by the model queue after max "
        f"{max(queue_ms, default=0):.1f} ms; "
        f"/healthz {len(health_ms)} probes, p50 {statistics.median(health_ms):.1f} ms, "
        f"p99 {p99:.1f} ms, max {health_ms[-1]:.1f} ms"
    )
