"""The models a process serves, and when each is loaded: serverless local models.

A local model (an engine type with a ``footprint``, ``engines.registry``) loads at
its first request, unless pinned (``preload = true`` or ``keep_alive = "forever"``),
and unloads after ``keep_alive`` seconds with no request. Loads fit a memory budget
(``SERVELM_MODEL_MEMORY``) and a count (``SERVELM_MAX_LOADED_MODELS``): a load that
does not fit unloads the least recently used idle model first, and otherwise waits
for one to go idle. A model with requests in flight is never unloaded, so no stream
is ever cut to make room. Remote engines start with the process and stay.

The walk asks ``acquire`` for a model's engine and gets a ``Lease``: the request
counts in flight until the lease is released (its generation settled, or the walk
failed before it). Everything here runs on the event loop; loads and unloads are
the only awaits that take long (a llama.cpp model loads in a process of its own:
``engines.llamacpp``). A loaded model whose engine is no longer ``alive`` (its
process was killed) is unloaded at its next request, which loads it again.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

from servelm.engines import registry
from servelm.errors import ModelUnavailable

if TYPE_CHECKING:
    from servelm.catalog.specs import ModelSpec
    from servelm.config import Settings
    from servelm.engines.base import Engine
    from servelm.telemetry.metrics import Metrics

log = logging.getLogger(__name__)

State = Literal["unloaded", "loading", "loaded", "failed"]
# A failed load is not retried before this many seconds, doubled per failure in a
# row up to the cap: a model whose load breaks answers 503 quickly, not a hot loop.
RETRY_FIRST, RETRY_MAX = 5.0, 300.0
# Our own 503 comes this long before the request's deadline, so the waiting request
# says why it waited rather than the lifecycle's generic deadline error.
DEADLINE_MARGIN = 0.05
# Milliseconds a request waited for its model to load; absent when it was loaded.
COLD_START_HEADER = "x-servelm-cold-start-ms"


class ModelsConfigError(Exception):
    """A local model that can never fit the memory budget (said at start-up)."""


@dataclass
class _Model:
    spec: ModelSpec
    local: bool
    footprint: int = 0
    keep_alive: float | None = None  # None: never unloaded for being idle
    engine: Engine | None = None
    state: State = "unloaded"
    in_flight: int = 0
    last_used: float = 0.0
    load: asyncio.Task[Engine] | None = None
    waiting_for_room: bool = False
    failures: int = 0
    retry_at: float = 0.0
    error: str | None = None
    idle_timer: asyncio.TimerHandle | None = None
    loaded_at: float = 0.0


@dataclass
class Lease:
    """One request's hold on a loaded model: it is not unloaded until released."""

    engine: Engine
    cold_start_ms: int | None  # this request waited for the model to load
    _release: Callable[[], None] | None = field(default=None, repr=False)

    def release(self) -> None:
        """Idempotent: the walk may release on its error path and in settlement."""
        release, self._release = self._release, None
        if release is not None:
            release()


# The lease of the request this task serves. An engine that relays to another servelm
# process (the engine process of ``serve --workers``, a servelm upstream) reports a
# cold start paid there (``cold_start_behind``), so the client's header and the
# access line say it whichever process loaded the model.
_current: ContextVar[Lease | None] = ContextVar("servelm_lease", default=None)


def cold_start_behind(ms: int) -> None:
    """A cold start of ``ms`` paid behind the engine seam for the current request
    (added up: a prompt count and the generation may each have waited for a load)."""
    lease = _current.get()
    if lease is not None:
        lease.cold_start_ms = (lease.cold_start_ms or 0) + ms


class ModelPool:
    def __init__(
        self,
        catalog: Iterable[ModelSpec],
        settings: Settings | None,
        factory: registry.EngineFactory = registry.build_engine,
        *,
        metrics: Metrics | None = None,
        deadline: Callable[[], float | None] = lambda: None,
        on_demand: bool = True,
    ) -> None:
        """``deadline``: the current request's, in loop time (the lifecycle's).
        ``on_demand`` False loads every model at start-up (an engine host)."""
        self.catalog = catalog
        self.settings = settings
        self.factory = factory
        self.metrics = metrics
        self.deadline = deadline
        self.on_demand = on_demand
        self.budget = settings.model_memory_bytes() if settings else None
        self.max_loaded = settings.max_loaded_models if settings else None
        # slug → engine, loaded ones only: health, metrics and the console read it.
        self.engines: dict[str, Engine] = {}
        # slug → why it is not served (missing weights, failed load), said in the 503.
        self.unavailable: dict[str, str] = {}
        self._models: dict[str, _Model] = {}
        self._room = asyncio.Condition()
        self._closed = False

    @property
    def _cfg(self) -> Settings:
        assert self.settings is not None, "a pool of given engines (``of``) starts nothing"
        return self.settings

    # -- start and stop ----------------------------------------------------------------

    async def start(self) -> None:
        """Start remote engines and pinned local models; check that every local model
        fits the budget alone. Raises ``ModelsConfigError`` for one that never can."""
        for spec in self.catalog:
            local = self.factory is registry.build_engine and registry.is_local(spec)
            model = self._models[spec.slug] = _Model(spec, local)
            if not local:
                await self._start_now(model)
                continue
            try:
                self.factory(spec, self._cfg)  # cheap: checks the weights are here
            except ModelUnavailable as exc:
                log.warning("model %s unavailable: %s", spec.slug, exc.message)
                self.unavailable[spec.slug] = exc.message
                continue
            model.footprint = registry.footprint(spec, self._cfg) or 0
            if self.budget is not None and model.footprint > self.budget:
                raise ModelsConfigError(
                    f"model {spec.slug} needs about {model.footprint:,} bytes loaded (weights, "
                    f"KV cache for {spec.context_window} tokens, its engine's process), more than "
                    f"SERVELM_MODEL_MEMORY allows ({self.budget:,} bytes): raise the "
                    "budget, shrink its context_window, or disable it (enabled = false)"
                )
            keep = spec.keep_alive if spec.keep_alive is not None else self._cfg.keep_alive
            model.keep_alive = None if keep == "forever" or not self.on_demand else float(keep)
        for model in self._models.values():
            if model.local and (model.spec.pinned or not self.on_demand):
                if model.spec.slug in self.unavailable:
                    continue
                try:
                    await self._ensure_loaded(model, None)
                except ModelUnavailable:
                    continue  # in the log and in ``unavailable``; not fatal

    async def _start_now(self, model: _Model) -> None:
        spec = model.spec
        try:
            engine = self.factory(spec, self._cfg)
            await engine.start()
        except ModelUnavailable as exc:
            log.warning("model %s unavailable: %s", spec.slug, exc.message)
            self.unavailable[spec.slug] = exc.message
            model.state = "failed"
            return
        model.engine = engine
        model.state = "loaded"
        self.engines[spec.slug] = engine

    async def close(self) -> None:
        self._closed = True
        for model in self._models.values():
            if model.load is not None and not model.load.done():
                model.load.cancel()
        for model in self._models.values():
            if model.engine is not None:
                await self._unload(model, "shutdown")

    # -- what the walk calls -------------------------------------------------------------

    def state(self, slug: str) -> State:
        model = self._models.get(slug)
        return "failed" if model is None else model.state

    def servable(self, slug: str) -> bool:
        """Whether a request for the model can be served (now or after a load)."""
        if slug in self.engines:
            return True
        model = self._models.get(slug)
        return model is not None and model.local and slug not in self.unavailable

    @classmethod
    def of(cls, engines: dict[str, Engine], unavailable: dict[str, str] | None = None) -> ModelPool:
        """A pool of engines someone else started and closes (a ``servelm worker``'s
        one model, tests): nothing loads or unloads."""
        pool = cls([], None)
        pool.engines = engines
        pool.unavailable = unavailable if unavailable is not None else {}
        return pool

    async def acquire(self, spec: ModelSpec) -> Lease:
        """The model's engine, loaded if it was not (within the request's deadline),
        held until the lease is released. KeyError: the pool does not serve it."""
        model = self._models.get(spec.slug)
        if model is None:
            lease = Lease(self.engines[spec.slug], None)
            _current.set(lease)
            return lease
        model.in_flight += 1
        self._cancel_idle(model)
        started = time.perf_counter()
        try:
            if model.engine is not None and not model.engine.alive():
                await self._lost(model)
            cold = model.engine is None
            if model.engine is None:
                await self._ensure_loaded(model, self.deadline())
        except BaseException:
            self._release(model)
            raise
        assert model.engine is not None
        cold_ms = int((time.perf_counter() - started) * 1000) if cold else None
        lease = Lease(model.engine, cold_ms, lambda: self._release(model))
        _current.set(lease)  # acquire is awaited, not a task: the walk's context
        return lease

    def memory_in_use(self) -> int:
        """Estimated bytes of the local models loaded or loading (what the budget
        counts)."""
        return sum(
            m.footprint
            for m in list(self._models.values())
            if m.local
            and (m.engine is not None or (m.state == "loading" and not m.waiting_for_room))
        )

    def usage(self) -> dict[str, int | None]:
        """The budget and what uses it, for the operator's console and ``/admin``."""
        loaded = sum(1 for m in list(self._models.values()) if m.local and m.engine is not None)
        return {
            "memory_in_use_bytes": self.memory_in_use(),
            "memory_budget_bytes": self.budget,
            "loaded": loaded,
            "max_loaded": self.max_loaded,
        }

    def describe(self, slug: str) -> dict[str, object]:
        """State and memory, for ``/v1/models``, the console and ``servelm models list``."""
        model = self._models.get(slug)
        if model is None:
            return {"state": "unloaded"}
        out: dict[str, object] = {"state": model.state, "in_flight": model.in_flight}
        if model.local:
            out["memory_bytes"] = model.footprint
            out["keep_alive"] = model.keep_alive if model.keep_alive is not None else "forever"
        if model.waiting_for_room:
            out["waiting_for_memory"] = True  # a load held back by models in use
        if model.error is not None:
            out["last_error"] = model.error
        return out

    # -- loading -------------------------------------------------------------------------

    async def _ensure_loaded(self, model: _Model, deadline: float | None) -> None:
        slug = model.spec.slug
        if slug in self.unavailable and model.local:
            raise ModelUnavailable(f"Model '{slug}' is not available: {self.unavailable[slug]}")
        loop = asyncio.get_running_loop()
        if model.load is None or model.load.done():
            now = loop.time()
            if model.retry_at > now:
                raise ModelUnavailable(
                    f"Model '{slug}' failed to load and is not retried for "
                    f"{model.retry_at - now:.0f} s; its operator has the cause in the log.",
                    retry_after=max(1, int(model.retry_at - now + 0.999)),
                )
            model.load = loop.create_task(self._load(model), name=f"load {slug}")
            # Its failure is every waiter's answer; with none left it is in the log.
            model.load.add_done_callback(lambda t: t.cancelled() or t.exception())
        task = model.load
        try:
            if deadline is None:
                await asyncio.shield(task)
            else:
                async with asyncio.timeout_at(deadline - DEADLINE_MARGIN):
                    await asyncio.shield(task)
        except TimeoutError:
            why = (
                "was waiting for memory held by models with requests in flight"
                if model.waiting_for_room
                else "was still loading"
            )
            if model.in_flight <= 1 and model.waiting_for_room:
                task.cancel()  # nobody else waits for it: do not load it for no one
            raise ModelUnavailable(
                f"Model '{slug}' {why} when this request's deadline passed; retry shortly.",
                code="model_loading",
                retry_after=1,
            ) from None

    async def _load(self, model: _Model) -> Engine:
        spec = model.spec
        model.state = "loading"
        try:
            await self._make_room(model)
            started = time.perf_counter()
            try:
                engine = self.factory(spec, self._cfg)
                await engine.start()
            except BaseException as exc:
                async with self._room:
                    self._room.notify_all()  # its reserved room is free again
                if not isinstance(exc, Exception):
                    raise
                self._failed(model, exc)
                raise ModelUnavailable(
                    f"Model '{spec.slug}' could not be loaded; retry later.", retry_after=5
                ) from exc
        except BaseException:
            if model.state == "loading":
                model.state = "unloaded"
            raise
        finally:
            model.waiting_for_room = False
        seconds = time.perf_counter() - started
        model.engine = engine
        model.state = "loaded"
        model.failures = 0
        model.error = None
        model.loaded_at = model.last_used = time.monotonic()
        self.engines[spec.slug] = engine
        if self.metrics is not None:
            self.metrics.model_loads.labels(spec.slug, "ok").inc()
            self.metrics.model_load_seconds.labels(spec.slug).observe(seconds)
        log.info("model %s loaded in %.2f s (about %d bytes)", spec.slug, seconds, model.footprint)
        if model.in_flight == 0:
            # Every request for it gave up while it loaded: it is idle, so evictable,
            # the moment it is loaded, and a load waiting for room must hear so (its
            # requests' releases came while it was loading, when it could not be
            # evicted). Without this wake-up such a load waited until some other
            # request ended: 300 s once in the suite.
            self._arm_idle(model)
            async with self._room:
                self._room.notify_all()
        return engine

    def _failed(self, model: _Model, exc: BaseException) -> None:
        model.failures += 1
        wait = min(RETRY_MAX, RETRY_FIRST * 2 ** (model.failures - 1))
        model.retry_at = asyncio.get_running_loop().time() + wait
        model.error = str(exc)
        model.state = "failed"
        log.error(
            "model %s failed to load (%d in a row; next try in %.0f s): %s",
            model.spec.slug,
            model.failures,
            wait,
            exc,
        )
        if self.metrics is not None:
            self.metrics.model_loads.labels(model.spec.slug, "failed").inc()

    def _loaded_bytes(self, besides: _Model) -> tuple[int, int]:
        """Memory and count of local models loaded or loading, ``besides`` excluded."""
        taken = [
            m
            for m in self._models.values()
            if m.local and m is not besides and (m.engine is not None or m.state == "loading")
        ]
        # A load still waiting for room holds none yet.
        taken = [m for m in taken if not m.waiting_for_room]
        return sum(m.footprint for m in taken), len(taken)

    def _fits(self, model: _Model) -> bool:
        used, count = self._loaded_bytes(model)
        if self.max_loaded is not None and count + 1 > self.max_loaded:
            return False
        return self.budget is None or used + model.footprint <= self.budget

    async def _make_room(self, model: _Model) -> None:
        """Unload least recently used idle models until ``model`` fits; while none is
        idle, wait for one to be (a request released, a load ended)."""
        # Waiting from before the lock: a load queued behind another's eviction holds
        # no memory yet, and ``memory_in_use`` must not count it (it did, for as long
        # as that eviction took: three models' worth in a budget for two).
        model.waiting_for_room = True
        async with self._room:
            while not self._fits(model):
                idle = [
                    m
                    for m in self._models.values()
                    if m.engine is not None and m.local and m.in_flight == 0 and m is not model
                ]
                if idle:
                    victim = min(idle, key=lambda m: m.last_used)
                    await self._unload(victim, "evicted")
                    continue
                await self._room.wait()
            model.waiting_for_room = False

    # -- unloading -----------------------------------------------------------------------

    def _release(self, model: _Model) -> None:
        model.in_flight -= 1
        model.last_used = time.monotonic()
        if model.in_flight == 0 and not self._closed:
            self._arm_idle(model)
            # A load waiting for room may now unload this one.
            asyncio.get_running_loop().create_task(self._notify())

    async def _notify(self) -> None:
        async with self._room:
            self._room.notify_all()

    def _arm_idle(self, model: _Model) -> None:
        self._cancel_idle(model)
        if model.keep_alive is None or model.engine is None or not model.local:
            return
        loop = asyncio.get_running_loop()
        model.idle_timer = loop.call_later(
            model.keep_alive, lambda: loop.create_task(self._idle_unload(model))
        )

    def _cancel_idle(self, model: _Model) -> None:
        if model.idle_timer is not None:
            model.idle_timer.cancel()
            model.idle_timer = None

    async def _idle_unload(self, model: _Model) -> None:
        model.idle_timer = None
        async with self._room:
            if model.in_flight == 0 and model.engine is not None:
                await self._unload(model, "idle")
                self._room.notify_all()

    async def _unload(self, model: _Model, reason: str) -> None:
        """Close the engine (a llama.cpp model's process ends, and its memory is
        back); only ever with nothing in flight, at shutdown, or when it died."""
        engine, model.engine = model.engine, None
        self._cancel_idle(model)
        self.engines.pop(model.spec.slug, None)
        if model.state == "loaded":
            model.state = "unloaded"
        if engine is None:
            return
        await engine.close()
        if self.metrics is not None:
            self.metrics.model_unloads.labels(model.spec.slug, reason).inc()
        log.info("model %s unloaded (%s)", model.spec.slug, reason)

    async def _lost(self, model: _Model) -> None:
        """A loaded model whose engine died (its process killed: the OOM killer, an
        abort in llama.cpp): unloaded, so that the request that noticed loads it
        again. Requests still in flight on it have failed or fail with it."""
        log.warning(
            "model %s: its engine stopped while loaded (%d other requests on it); "
            "unloaded, it loads again",
            model.spec.slug,
            model.in_flight - 1,
        )
        await self._unload(model, "died")
        await self._notify()  # its memory is free: loads waiting for room may go
