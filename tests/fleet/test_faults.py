"""Upstreams that fail on purpose, as a real process behind a real gateway process:
the right status or SSE error event, failover while nothing was sent, and the right
charge (nothing, or the prompt's bound and exactly the tokens the client received)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import select

from servelm.billing import accounts
from servelm.billing.money import MICRO
from servelm.chat.conversation import estimate_prompt_tokens
from servelm.engines.fleet.replicas import RUN
from servelm.store.db import Database
from servelm.store.tables import usage
from tests import procs
from tests.conftest import provision
from tests.fleet import fleetprocs
from tests.fleet.fleetprocs import StreamResult, stream_chat

# model → the fault upstream's modes, one replica each, tried in this order.
MODELS = {
    "only-500": ["status500"],
    "only-hang": ["hang"],
    "stall": ["stall"],
    "close": ["close"],
    "close-plain": ["close"],
    "garbage": ["garbage"],
    "500-then-ok": ["status500", "ok"],
    "hang-then-ok": ["hang", "ok"],
    "garbage-first-then-ok": ["garbage_first", "ok"],
    "close-then-ok": ["close", "ok"],
    "twins": ["ok/a", "ok/b"],
}
# 1 credit per prompt token, 1 credit per completion token: charges read as counts.
OUTPUT = 1


@dataclass
class Rig:
    gw: procs.Gateway
    upstream: fleetprocs.Proc
    db: Database
    key: str


@pytest.fixture(scope="module")
def rig(models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rig]:
    tmp = tmp_path_factory.mktemp("faults")
    upstream = fleetprocs.fault_upstream(tmp).start().wait_ready()
    toml = ""
    for model, modes in MODELS.items():
        replicas = ", ".join(f'"{upstream.url}/{m}/v1"' for m in modes)
        # round_robin's first request starts at the first replica: the faulty one.
        toml += (
            f'[models.{model}]\nengine = "openai"\nreplicas = [{replicas}]\n'
            'routing = "round_robin"\ntimeout = 1\nhealth_interval = 30\n'
            "input_price = 1000000\noutput_price = 1000000\n\n"
        )
    try:
        gw = fleetprocs.gateway(tmp, models_dir, toml)
        db = Database(f"sqlite:///{tmp / 'gateway-data' / 'servelm.db'}")
        yield Rig(gw, upstream, db, provision(db, "faults", 1_000_000))
        db.dispose()
        gw.stop()
    finally:
        upstream.kill()  # holds hung requests open on purpose: a SIGTERM would wait them out


def streamed(rig: Rig, model: str) -> StreamResult:
    async def go() -> StreamResult:
        async with httpx.AsyncClient(timeout=60) as client:
            return await stream_chat(
                client,
                f"{rig.gw.base_url}/v1/chat/completions",
                {
                    "model": model,
                    "messages": [{"role": "user", "content": "hi"}],
                    "max_tokens": 16,
                    "stream": True,
                },
                rig.key,
            )

    return asyncio.run(go())


def plain(rig: Rig, model: str) -> httpx.Response:
    return httpx.post(
        f"{rig.gw.base_url}/v1/{model}",
        json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 16},
        headers={"x-api-key": rig.key},
        timeout=60,
    )


# A stream cut before any usage pays its prompt's upper bound (README, "What each
# ending pays"): these upstreams report none before the end.
BOUND = estimate_prompt_tokens({"messages": [{"role": "user", "content": "hi"}]})


def charged(rig: Rig, request_id: str) -> tuple[str, int, int]:
    """(status, completion tokens, cost in credits) of one request's usage row."""
    with rig.db.read() as conn:
        row = conn.execute(select(usage).where(usage.c.request_id == request_id)).one()
    assert row.cost % MICRO == 0
    return row.status, row.completion_tokens, row.cost // MICRO


def upstream_seen(rig: Rig) -> dict[str, int]:
    return dict(httpx.get(f"{rig.upstream.url}/stats", timeout=10).json())


def balance(rig: Rig) -> tuple[int, int]:
    account = accounts.get_account(rig.db, "faults")
    return account.balance, account.held


def replica(rig: Rig, model: str, index: int) -> dict[str, Any]:
    return fleetprocs.replicas_state(rig.gw, model)[index]


def test_a_500_with_no_other_replica_is_502_and_free_and_only_a_run_ejects(rig: Rig) -> None:
    before = balance(rig)
    r = plain(rig, "only-500")
    assert r.status_code == 502, r.text
    assert "HTTP 500" in r.json()["error"]
    assert balance(rig) == before
    # One 500 may be the request's doing: the model's only replica stays in rotation.
    assert replica(rig, "only-500", 0)["state"] == "healthy"
    # A run of them (five in a row) says the replica is sick.
    for _ in range(RUN - 1):
        assert plain(rig, "only-500").status_code == 502
    assert replica(rig, "only-500", 0)["state"] == "ejected"
    # With its only replica out, the next request is told to come back: 503 + Retry-After.
    again = plain(rig, "only-500")
    assert again.status_code == 503 and int(again.headers["retry-after"]) >= 1
    assert balance(rig) == before


def test_a_hang_past_the_timeout_is_504_and_free(rig: Rig) -> None:
    before = balance(rig)
    r = streamed(rig, "only-hang")
    assert r.status == 504, r
    assert "did not answer in time" in r.error["error"]["message"]
    assert balance(rig) == before


def test_a_stall_mid_stream_is_an_error_event_and_pays_what_arrived(rig: Rig) -> None:
    r = streamed(rig, "stall")
    assert r.status == 200 and not r.done
    assert r.content == ["one", " two"]
    assert "did not answer in time" in r.error["message"]
    assert charged(rig, r.request_id) == ("error", 2, BOUND + 2 * OUTPUT)


def test_a_connection_closed_mid_stream_pays_what_arrived(rig: Rig) -> None:
    r = streamed(rig, "close")
    assert r.status == 200 and not r.done and r.content == ["one", " two"]
    assert "unreachable" in r.error["message"]
    assert charged(rig, r.request_id) == ("error", 2, BOUND + 2 * OUTPUT)
    # A dropped connection says the replica is sick, but one failure never takes a
    # model's only replica out: that would be a 503 for everyone.
    assert replica(rig, "close", 0)["state"] == "healthy"
    assert replica(rig, "close", 0)["failures"] == 1


def test_a_connection_closed_before_a_plain_answer_is_502_and_free(rig: Rig) -> None:
    before = balance(rig)
    # The first answer is streamed upstream (no usage seen yet): cut, for a plain client.
    r = plain(rig, "close-plain")
    assert r.status_code == 502
    assert balance(rig) == before


def test_malformed_sse_mid_stream_is_an_error_event_and_pays_what_arrived(rig: Rig) -> None:
    r = streamed(rig, "garbage")
    assert r.status == 200 and not r.done and r.content == ["one"]
    assert "malformed" in r.error["message"]
    assert charged(rig, r.request_id) == ("error", 1, BOUND + 1 * OUTPUT)


@pytest.mark.parametrize(
    ("model", "fault"),
    [
        ("500-then-ok", "status500"),
        ("hang-then-ok", "hang"),
        ("garbage-first-then-ok", "garbage_first"),
        ("close-then-ok", None),  # fails after bytes: no failover (test below)
    ],
)
def test_failover_before_the_first_byte(rig: Rig, model: str, fault: str | None) -> None:
    if fault is None:
        r = streamed(rig, model)
        assert r.error is not None and r.content == ["one", " two"]
        return
    seen = upstream_seen(rig)
    r = streamed(rig, model)
    assert r.status == 200 and r.done, r
    assert r.content == ["one", " two", " three"]
    after = upstream_seen(rig)
    assert after[fault] == seen.get(fault, 0) + 1  # the faulty replica was tried first
    assert after["ok"] == seen.get("ok", 0) + 1
    # Charged by the answering replica's usage (prompt 7, completion 3), once.
    assert charged(rig, r.request_id) == ("ok", 3, 7 + 3 * OUTPUT)
    # A refusal or a timeout ejects the replica; a 500 is tried elsewhere and counts
    # against the replica that gave it (another served the same request), but one
    # alone ejects nothing; a malformed answer is tried elsewhere and counts for
    # nothing (the server answered).
    expected = "ejected" if fault == "hang" else "healthy"
    assert replica(rig, model, 0)["state"] == expected
    assert replica(rig, model, 0)["failures"] == (0 if fault == "garbage_first" else 1)
    assert replica(rig, model, 1)["state"] == "healthy"


def test_a_request_that_makes_replicas_fail_ejects_none(rig: Rig) -> None:
    """20 requests whose content makes the engine answer 500, among 20 ordinary ones in
    flight with them: each poisoned one is tried on two replicas (not on every one),
    is a 502 and free, ejects nothing; every other request succeeds."""
    before_seen, before_money = upstream_seen(rig), balance(rig)
    poison = {"messages": [{"role": "user", "content": "POISON, please"}], "max_tokens": 16}

    async def go() -> list[tuple[bool, int]]:
        async with httpx.AsyncClient(timeout=60) as client:

            async def one(i: int) -> tuple[bool, int]:
                bad = i % 2 == 0
                body = {**(poison if bad else {"messages": [{"role": "user", "content": "hi"}],
                                               "max_tokens": 16}), "model": "twins"}  # fmt: skip
                if i % 4 < 2:
                    r = await client.post(f"{rig.gw.base_url}/v1/chat/completions", json=body,
                                          headers={"x-api-key": rig.key})  # fmt: skip
                    return bad, r.status_code
                result = await stream_chat(client, f"{rig.gw.base_url}/v1/chat/completions",
                                           {**body, "stream": True}, rig.key)  # fmt: skip
                # A stream that started and then failed would be a 200 without [DONE].
                return bad, result.status if result.status != 200 or result.done else 0

            return await asyncio.gather(*(one(i) for i in range(40)))

    results = asyncio.run(go())
    assert sorted(status for bad, status in results if bad) == [502] * 20
    assert sorted(status for bad, status in results if not bad) == [200] * 20
    assert [replica(rig, "twins", i)["state"] for i in (0, 1)] == ["healthy", "healthy"]
    seen = upstream_seen(rig)
    assert seen["poison"] - before_seen.get("poison", 0) == 2 * 20  # two tries each, no more
    # 20 good ones charged their usage (prompt 7, completion 3), the poisoned ones nothing.
    assert balance(rig)[0] == before_money[0] - 20 * (7 + 3 * OUTPUT) * MICRO


def test_the_ledger_adds_up(rig: Rig) -> None:
    check = procs.cli(rig.gw.env, "ledger", "check")
    assert check.returncode == 0, check.stdout + check.stderr
    assert balance(rig)[1] == 0  # no hold left open
