"""The two stores decide alike: the exact sliding window, all-or-nothing admission
across scopes, refunds at settlement, requests in flight; and the limiter's answer
when Redis is gone (fail-open: this process decides; fail-closed: 503, quickly).

Redis tests use the real server at 127.0.0.1:6379 with a key prefix of their own.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest
import redis.asyncio as aioredis

from servelm.access.limits.limiter import Limiter, response_headers
from servelm.access.limits.memory import MemoryStore
from servelm.access.limits.policy import Policy, Scope
from servelm.access.limits.redis_store import RedisStore, connect
from servelm.access.limits.window import duration
from servelm.errors import Overloaded, RateLimited
from tests.conftest import free_port

REDIS = "redis://127.0.0.1:6379/0"


@pytest.fixture(params=["memory", "redis"])
async def store(request: pytest.FixtureRequest) -> AsyncIterator[MemoryStore | RedisStore]:
    if request.param == "memory":
        yield MemoryStore()
        return
    prefix = f"test-{uuid.uuid4().hex[:12]}"
    client = connect(REDIS, 0.5)
    yield RedisStore(client, prefix, 0.5)
    keys = [k async for k in client.scan_iter(f"{prefix}:*")]
    if keys:
        await client.delete(*keys)
    await client.aclose()


def scope(name: str = "k:1", *, rpm=None, tpm=None, conc=None, window_ms=60_000) -> Scope:  # type: ignore[no-untyped-def]
    return Scope(name, rpm, tpm, conc, window_ms)


async def test_requests_exactly_up_to_the_limit(store: MemoryStore | RedisStore) -> None:
    s = (scope(rpm=3),)
    decisions = [await store.acquire(f"r{i}", 1, s, 60_000) for i in range(5)]
    assert [d.allowed for d in decisions] == [True, True, True, False, False]
    assert [d.states[0].requests_left for d in decisions[:3]] == [2, 1, 0]
    refused = decisions[3]
    assert refused.reason == "requests" and refused.scope == "k:1"
    assert 59_000 <= refused.wait_ms <= 60_000


async def test_a_read_records_nothing(store: MemoryStore | RedisStore) -> None:
    s = (scope(rpm=2, tpm=100, conc=1),)
    assert (await store.acquire("a", 30, s, 60_000)).allowed
    for _ in range(3):
        read = await store.acquire("", 0, s, 0, record=False)
        # It says what a request now would meet ("a" is still in flight)...
        assert read.reason == "concurrency"
        assert (read.states[0].requests_left, read.states[0].tokens_left) == (1, 70)
    await store.settle("a", 10, s)
    # ...and added neither a request nor a lease: one more fits, then the rpm is full.
    assert (await store.acquire("b", 10, s, 60_000)).allowed
    assert not (await store.acquire("c", 10, s, 60_000)).allowed


async def test_window_slides(store: MemoryStore | RedisStore) -> None:
    s = (scope(rpm=2, window_ms=300),)
    assert (await store.acquire("a", 1, s, 60_000)).allowed
    assert (await store.acquire("b", 1, s, 60_000)).allowed
    refused = await store.acquire("c", 1, s, 60_000)
    assert not refused.allowed
    await asyncio.sleep(refused.wait_ms / 1000 + 0.05)
    assert (await store.acquire("d", 1, s, 60_000)).allowed


async def test_refused_in_one_scope_is_recorded_in_none(store: MemoryStore | RedisStore) -> None:
    key, account = scope("k:1", rpm=10), scope("a:1", rpm=1)
    assert (await store.acquire("a", 1, (key, account), 60_000)).allowed
    refused = await store.acquire("b", 1, (key, account), 60_000)
    assert (refused.allowed, refused.scope) == (False, "a:1")
    # The key's count did not move for the refused request.
    other_account = scope("a:2", rpm=5)
    d = await store.acquire("c", 1, (key, other_account), 60_000)
    assert d.states[0].requests_left == 8


async def test_tokens_reserved_then_refunded(store: MemoryStore | RedisStore) -> None:
    s = (scope(tpm=1000),)
    first = await store.acquire("a", 800, s, 60_000)
    assert first.allowed and first.states[0].tokens_left == 200
    refused = await store.acquire("b", 300, s, 60_000)
    assert (refused.allowed, refused.reason) == (False, "tokens")
    await store.settle("a", 50, s)  # the answer was short
    again = await store.acquire("b", 300, s, 60_000)
    assert again.allowed and again.states[0].tokens_left == 650
    too_large = await store.acquire("c", 1001, s, 60_000)
    assert (too_large.allowed, too_large.reason) == (False, "tokens_too_large")


async def test_requests_in_flight(store: MemoryStore | RedisStore) -> None:
    s = (scope(conc=2),)
    assert (await store.acquire("a", 1, s, 60_000)).allowed
    assert (await store.acquire("b", 1, s, 60_000)).allowed
    refused = await store.acquire("c", 1, s, 60_000)
    assert (refused.allowed, refused.reason) == (False, "concurrency")
    await store.settle("a", 1, s)
    assert (await store.acquire("c", 1, s, 60_000)).allowed
    # A lease that is never settled (its process died) ends on its own.
    short = (scope("k:2", conc=1),)
    assert (await store.acquire("x", 1, short, 200)).allowed
    assert not (await store.acquire("y", 1, short, 200)).allowed
    await asyncio.sleep(0.3)
    assert (await store.acquire("y", 1, short, 200)).allowed


def test_reset_durations_read_like_openai() -> None:
    assert [duration(ms) for ms in (20, 1000, 1500, 59_000, 360_000, 3_723_000)] == [
        "20ms",
        "1s",
        "1.5s",
        "59s",
        "6m0s",
        "1h2m3s",
    ]


# -- the limiter with Redis gone -------------------------------------------------------


@dataclass(frozen=True)
class Caller:
    key_pk: int = 1
    key_id: str = "abc"
    account_id: int = 1


class FixedPolicy(Limiter):
    async def policy(self, principal: object) -> Policy:
        return Policy((scope(rpm=2),))


async def dead_redis_limiter(fail: str) -> Limiter:
    port = free_port()  # nothing listens there
    store = RedisStore(connect(f"redis://127.0.0.1:{port}/0", 0.05), "x", 0.05)
    return FixedPolicy(None, {}, redis=store, fail=fail)  # type: ignore[arg-type]


async def test_fail_open_decides_in_this_process_and_counts_it() -> None:
    limiter = await dead_redis_limiter("open")
    first = await limiter.acquire(Caller(), 10)
    assert first.store == "memory"
    assert dict(response_headers())[b"x-ratelimit-remaining-requests"] == b"1"
    await limiter.acquire(Caller(), 10)
    with pytest.raises(RateLimited) as refused:
        await limiter.acquire(Caller(), 10)
    assert refused.value.headers["Retry-After"]
    await first.settle(3)  # recorded in memory, where it was admitted
    assert limiter.fallbacks.labels("acquire")._value.get() == 3
    await limiter.close()


async def test_fail_closed_answers_503_quickly() -> None:
    limiter = await dead_redis_limiter("closed")
    with pytest.raises(Overloaded) as refused:
        await asyncio.wait_for(limiter.acquire(Caller(), 10), 2)
    assert refused.value.status_code == 503
    assert refused.value.headers["Retry-After"] == "1"
    await limiter.close()


async def test_a_redis_that_hangs_costs_a_timeout_not_a_hang() -> None:
    # A listener that accepts and never answers: the worst kind of dead.
    server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    store = RedisStore(connect(f"redis://127.0.0.1:{port}/0", 0.05), "x", 0.05)
    limiter = FixedPolicy(None, {}, redis=store, fail="open")  # type: ignore[arg-type]
    reservation = await asyncio.wait_for(limiter.acquire(Caller(), 10), 2)
    assert reservation.store == "memory"
    server.close()
    await limiter.close()


async def test_redis_client_is_really_redis() -> None:
    client = aioredis.Redis.from_url(REDIS)
    assert await client.ping()
    await client.aclose()
