"""The model pool's races, made deterministic: local models of a test engine type
(this module: ``build`` and ``footprint``, registered as ``engine = "gated"``) whose
start and close wait on events the test sets, so each interleaving is chosen, not
hoped for. No real engine, no sleeps."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from servelm.catalog.specs import Catalog, ModelSpec
from servelm.config import Settings
from servelm.engines import registry
from servelm.engines.admission import PromptSize
from servelm.engines.base import Engine
from servelm.engines.pool import ModelPool
from servelm.errors import ModelUnavailable
from tests.conftest import make_settings

FOOTPRINT = 1000  # bytes each model takes, as the pool counts them
# Yields to the event loop that a chain of wake-ups may take before the test looks;
# the loop runs nothing else here, so reaching this many means the chain is stuck.
YIELDS = 200


@dataclass
class Gates:
    """A model's gates: its engine's start waits for ``start``, its close for
    ``close``; ``starting`` and ``closing`` say that they were reached."""

    start: asyncio.Event = field(default_factory=asyncio.Event)
    close: asyncio.Event = field(default_factory=asyncio.Event)
    starting: asyncio.Event = field(default_factory=asyncio.Event)
    closing: asyncio.Event = field(default_factory=asyncio.Event)


GATES: dict[str, Gates] = {}


class GatedEngine(Engine):
    async def start(self) -> None:
        GATES[self.spec.slug].starting.set()
        await GATES[self.spec.slug].start.wait()

    async def close(self) -> None:
        GATES[self.spec.slug].closing.set()
        await GATES[self.spec.slug].close.wait()

    async def count_prompt_tokens(self, body: dict[str, Any]) -> int | None:
        return 1

    async def stream(
        self,
        body: dict[str, Any],
        *,
        client_streams: bool = True,
        prompt: PromptSize | None = None,
    ) -> AsyncIterator[dict[str, Any]]:
        yield {"choices": []}


def build(spec: ModelSpec, settings: Settings) -> GatedEngine:
    """The registry's builder for ``engine = "gated"``."""
    return GatedEngine(spec)


def footprint(spec: ModelSpec, settings: Settings) -> int:
    """Its presence makes the type local: loaded on demand, counted, evictable."""
    return FOOTPRINT


@pytest.fixture(autouse=True)
def gated(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setitem(registry.ENGINE_TYPES, "gated", __name__)
    GATES.clear()
    yield
    GATES.clear()


@dataclass
class Rig:
    models: ModelPool
    specs: dict[str, ModelSpec]
    # The deadline of the next request, in loop time (None: none), as the test sets it.
    deadline: float | None = None

    async def close(self) -> None:
        for gates in GATES.values():
            gates.start.set()
            gates.close.set()
        await self.models.close()


async def rig(tmp_path: Path, slugs: str, **settings: object) -> Rig:
    """A started pool of gated models."""
    specs = {s: ModelSpec(slug=s, engine="gated", context_window=512) for s in slugs}
    for s in slugs:
        GATES[s] = Gates()
    cfg = make_settings(tmp_path, tmp_path / "models", **settings)
    out = Rig(ModelPool(Catalog(list(specs.values())), cfg), specs)
    out.models.deadline = lambda: out.deadline
    await out.models.start()
    return out


async def settle(done: Any) -> None:
    """Yield to the loop until ``done()``; fails if it never comes."""
    for _ in range(YIELDS):
        if done():
            return
        await asyncio.sleep(0)
    raise AssertionError("the pool's wake-ups stopped short")


async def test_a_load_whose_requests_all_gave_up_wakes_a_load_waiting_for_room(
    tmp_path: Path,
) -> None:
    """One model fits. ``a``'s load is slow and its only request gives up at its
    deadline; ``b`` is asked for and waits for room; ``a``'s load then completes with
    nobody waiting for it: it is idle, so ``b`` evicts it and loads (before 65ac72b
    nothing woke ``b``, and it waited until some other request ended)."""
    r = await rig(tmp_path, "ab", max_loaded_models=1)
    models = r.models
    GATES["b"].start.set()  # b loads at once when it has room
    GATES["a"].close.set()  # and a's eviction, when it comes, is quick

    r.deadline = asyncio.get_running_loop().time()  # passed already: a's request gives up
    with pytest.raises(ModelUnavailable, match="was still loading"):
        await models.acquire(r.specs["a"])
    r.deadline = None
    await GATES["a"].starting.wait()  # a's load goes on, for nobody
    assert models.describe("a")["state"] == "loading"
    assert models.describe("a")["in_flight"] == 0

    wants_b = asyncio.create_task(models.acquire(r.specs["b"]))
    await settle(lambda: models.describe("b").get("waiting_for_memory") is True)

    GATES["a"].start.set()  # a's load completes
    lease = await asyncio.wait_for(wants_b, timeout=30)  # the bound only ends a hang
    assert lease.engine is models.engines["b"] and lease.cold_start_ms is not None
    assert models.state("a") == "unloaded" and models.state("b") == "loaded"
    lease.release()
    await r.close()


async def test_loads_queued_behind_an_eviction_hold_no_memory(tmp_path: Path) -> None:
    """A budget of one model. ``b``'s load evicts the idle ``a``, whose close takes
    its time; ``c`` and ``d`` are asked for meanwhile and queue behind that eviction.
    What the pool counts in use stays within the budget: the queued loads hold
    nothing yet (they were counted as loading: two models' worth in a budget for
    one)."""
    r = await rig(tmp_path, "abcd", model_memory=str(FOOTPRINT))
    models = r.models
    for s in "abcd":
        GATES[s].start.set()
    (await models.acquire(r.specs["a"])).release()
    assert models.state("a") == "loaded" and models.memory_in_use() == FOOTPRINT

    wants = [asyncio.create_task(models.acquire(r.specs[s])) for s in "bcd"]
    await GATES["a"].closing.wait()  # b's load evicts a, and waits for its close
    await settle(lambda: all(models.state(s) == "loading" for s in "cd"))
    assert models.budget == FOOTPRINT
    assert models.memory_in_use() <= models.budget, models.usage()
    assert all(models.describe(s).get("waiting_for_memory") is True for s in "cd")

    GATES["a"].close.set()
    lease = await asyncio.wait_for(wants[0], timeout=30)  # the bound only ends a hang
    assert lease.engine is models.engines["b"]
    assert models.memory_in_use() == FOOTPRINT, models.usage()
    await r.close()  # c and d still wait for b's memory: their loads are cancelled
    for want in wants[1:]:
        with pytest.raises(asyncio.CancelledError):
            await want
