"""Admission's rules (``engines/admission.py``) on their own, in asyncio: slots, the
bounded queue, and the KV budget of issue 25.1 (requests that fit the window alone but
not together wait; one that can never fit is a 400). The real engine shows the same
rule end to end in ``tests/engines/test_kv_admission.py``."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import pytest

from servelm.engines.admission import MAX_PASSES, Admission, PromptSize
from servelm.engines.base import EngineStats, map_engine_error
from servelm.errors import ContextWindowExceeded, Overloaded


def model(slots: int = 4, kv_cells: int | None = 100, queue: int = 16) -> Admission:
    return Admission(slots, queue, EngineStats(), kv_cells=kv_cells)


class Runner:
    """Requests that enter ``admission`` and stay until released, in arrival order."""

    def __init__(self, admission: Admission) -> None:
        self.admission = admission
        self.inside: list[str] = []
        self._leave: dict[str, asyncio.Event] = {}
        self.tasks: dict[str, asyncio.Task[None]] = {}

    def start(self, name: str, kv: int) -> None:
        self._leave[name] = asyncio.Event()
        self.tasks[name] = asyncio.create_task(self._run(name, kv))

    async def _run(self, name: str, kv: int) -> None:
        async with self.admission.enter(kv):
            self.inside.append(name)
            await self._leave[name].wait()

    async def release(self, name: str) -> None:
        self._leave[name].set()
        await self.tasks[name]
        await settle()


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


@contextlib.asynccontextmanager
async def running(admission: Admission) -> AsyncIterator[Runner]:
    runner = Runner(admission)
    try:
        yield runner
    finally:
        for task in runner.tasks.values():
            task.cancel()
        await asyncio.gather(*runner.tasks.values(), return_exceptions=True)


async def test_requests_that_do_not_fit_together_wait_and_then_run() -> None:
    a = model(kv_cells=100)
    async with running(a) as r:
        for name in ("one", "two", "three"):
            r.start(name, 90)  # each fits alone, no two together
        await settle()
        assert r.inside == ["one"]
        assert (a.kv_used, a.stats.running, a.stats.waiting) == (90, 1, 2)
        await r.release("one")
        assert r.inside == ["one", "two"]
        await r.release("two")
        assert r.inside == ["one", "two", "three"]
        await r.release("three")
        assert (a.kv_used, a.stats.running, a.stats.waiting) == (0, 0, 0)


async def test_a_short_request_passes_one_waiting_for_kv_space() -> None:
    a = model(kv_cells=100)
    async with running(a) as r:
        r.start("long", 90)
        await settle()
        r.start("long2", 90)
        r.start("short", 10)
        await settle()
        assert r.inside == ["long", "short"]
        await r.release("short")
        await r.release("long")
        assert r.inside == ["long", "short", "long2"]


async def test_a_waiting_request_is_passed_at_most_max_passes_times() -> None:
    a = model(slots=MAX_PASSES + 4, kv_cells=100)
    async with running(a) as r:
        r.start("long", 60)
        await settle()
        r.start("waits", 60)
        for i in range(MAX_PASSES + 2):
            r.start(f"short{i}", 1)
        await settle()
        passed = [n for n in r.inside if n.startswith("short")]
        assert len(passed) == MAX_PASSES
        assert "waits" not in r.inside
        await r.release("long")
        # The one passed too often goes first, then the rest in order.
        rest = ["waits", f"short{MAX_PASSES}", f"short{MAX_PASSES + 1}"]
        assert r.inside[MAX_PASSES + 1 :] == rest


async def test_slots_bound_what_runs_whatever_the_kv_space() -> None:
    a = model(slots=2, kv_cells=None)
    async with running(a) as r:
        for name in ("a", "b", "c"):
            r.start(name, 10_000)
        await settle()
        assert r.inside == ["a", "b"]
        await r.release("a")
        assert r.inside == ["a", "b", "c"]


async def test_the_queue_is_bounded_and_a_refusal_is_a_503() -> None:
    a = model(kv_cells=100, queue=1)
    async with running(a) as r:
        r.start("one", 90)
        r.start("two", 90)
        await settle()
        assert a.stats.waiting == 1
        with pytest.raises(Overloaded):
            async with a.enter(90):
                pass
        with pytest.raises(Overloaded):
            a.check()
        # A request that fits now passes the one waiting for KV space, full queue or not.
        async with a.enter(5):
            assert a.kv_used == 95


async def test_a_request_cancelled_while_waiting_gives_its_place_back() -> None:
    a = model(kv_cells=100)
    async with running(a) as r:
        r.start("one", 60)
        r.start("big", 60)
        r.start("after", 40)
        await settle()
        # "after" (40) fits beside "one" (60) and passes "big".
        assert r.inside == ["one", "after"]
        r.tasks["big"].cancel()
        await settle()
        assert a.stats.waiting == 0
        await r.release("one")
        await r.release("after")
        assert (a.kv_used, a.stats.running) == (0, 0)


def test_a_request_that_can_never_fit_is_a_400_and_a_bound_takes_the_whole_cache() -> None:
    a = model(kv_cells=100)
    assert a.kv_need(PromptSize(60, exact=True), 40) == 100
    with pytest.raises(ContextWindowExceeded) as refused:
        a.kv_need(PromptSize(61, exact=True), 40)
    assert refused.value.status_code == 400
    # An upper bound may be far above the real count: the request runs alone at most.
    assert a.kv_need(PromptSize(500, exact=False), 40) == 100
    assert model(kv_cells=None).kv_need(PromptSize(500), 40) == 540


def test_llamacpps_full_kv_cache_is_a_503_not_a_500() -> None:
    err = map_engine_error(
        {"code": 500, "message": "Context size has been exceeded.", "type": "server_error"}
    )
    assert isinstance(err, Overloaded)
    assert err.status_code == 503
    assert err.headers["Retry-After"] == "2"


async def test_a_bound_may_take_the_free_cache_per_free_slot_uncounted() -> None:
    a = model(slots=4, kv_cells=100)
    assert a.kv_share() == 25
    async with running(a) as r:
        r.start("one", 40)
        await settle()
        assert a.kv_share() == 20  # 60 cells free, 3 slots free
    assert model(kv_cells=None).kv_share() is None
