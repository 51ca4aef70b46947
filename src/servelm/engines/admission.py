"""Admission: who gets in, and when. Every rule that admits, queues or sheds a chat
request lives here (issue 23), from the door to the engine:

- ``Gate``, in front of the chat routes: sheds a request while the process drains or
  past ``SERVELM_MAX_INFLIGHT``, and tracks the ones admitted for the drain and the
  deadline (``processes/lifecycle.py`` runs those).
- ``SlotShares``: one account holds at most its share of a model's slots.
- ``Admission``, per model: at most ``slots`` requests run, at most ``queue_size``
  more wait (503 past it), and, where the engine says how much KV cache it has, the
  requests running together fit in it (``kv_cells``).

The KV budget (issue 25.1): llama.cpp's slots share one KV cache of ``n_ctx`` cells
(``engines/llamacpp.py`` configures it unified), and a request fills as many as its
prompt plus what it generates. Four concurrent 7,532-token prompts on an
8,192-token model each fit alone, but not together: llama.cpp found the cache full
halfway through their prefills and failed all four with a 500. So each request
reserves its prompt (the count, or the walk's upper bound) plus its ``max_tokens``
before it runs; one that does not fit beside the running ones waits (within its
deadline, in the same bounded queue), and one that could never fit is a 400.

Waiting is FIFO, with one exception so that a short request is not stuck behind a
long one waiting for the cache: a later request that fits may pass a waiting one
that does not, but each waiting request is passed at most ``MAX_PASSES`` times;
after that the queue is strict until it gets in (no starvation).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from servelm.errors import ContextWindowExceeded, Overloaded, ServelmError
from servelm.processes.lifecycle import SLOW_CLIENT

if TYPE_CHECKING:
    from servelm.processes.lifecycle import Lifecycle

# How many later requests may pass one that waits for KV space (see the docstring).
MAX_PASSES = 8


@dataclass(frozen=True)
class PromptSize:
    """What the walk knows of a prompt's tokens when it hands it to the engine: the
    count, or an upper bound (``exact`` False: ``prompt_count`` bound or auto, images
    of a projector whose count varies)."""

    tokens: int
    exact: bool = True


class Counts(Protocol):
    """Where an engine shows its load (``engines.base.EngineStats``)."""

    running: int
    waiting: int


@dataclass
class _Waiter:
    kv: int
    granted: asyncio.Future[None]
    passes: int = 0


@dataclass
class Admission:
    """One model's admission: slots, a bounded queue, and the KV budget.

    Waiting happens here, in asyncio, rather than in the engine's own queue, so a
    client that gives up while queued costs nothing and leaves at once."""

    slots: int
    queue_size: int
    stats: Counts
    # KV cache cells the running requests share; None where the engine manages its own
    # memory (a remote server) or has none to speak of.
    kv_cells: int | None = None
    kv_used: int = 0
    _running: int = 0
    _waiters: deque[_Waiter] = field(default_factory=deque)

    # -- quick checks before the walk spends anything ----------------------------------

    def check(self) -> None:
        """Refuse (503) if a request arriving now would have to wait and the queue is
        full."""
        if self._running >= self.slots or self._waiters:
            self.check_queue()

    def check_queue(self) -> None:
        """Refuse (503) if the queue is full, whatever the slots."""
        if self.stats.waiting >= self.queue_size:
            raise Overloaded(
                "The model is at capacity and its queue is full; retry shortly.",
                retry_after=1,
            )

    def has_room(self) -> bool:
        """A request arriving now would run at once: a slot is free and nobody waits
        (queued work is claimed only then, so it never takes a live request's place)."""
        return self._running < self.slots and not self._waiters and self.stats.waiting == 0

    # -- the KV budget -----------------------------------------------------------------

    def kv_need(self, prompt: PromptSize, max_tokens: int) -> int:
        """The cells a request reserves: its prompt plus its output limit. One that can
        never fit is refused (400) before anything runs; a bound that may be far above
        the real count takes the whole cache at most (the engine then enforces the
        window itself, before any prefill)."""
        need = prompt.tokens + max_tokens
        if self.kv_cells is None or need <= self.kv_cells:
            return need
        if prompt.exact:
            raise ContextWindowExceeded(
                f"The prompt has {prompt.tokens} tokens and the output limit is "
                f"{max_tokens}: {need} tokens, more than the {self.kv_cells} tokens of "
                "KV cache this model has.",
                param="messages",
            )
        return self.kv_cells

    def kv_share(self) -> int | None:
        """The free cells per free slot: what a request may reserve on its prompt's
        upper bound without being counted (a bound is often several times the count,
        and one that takes more than its share could keep the slots left from being
        used)."""
        if self.kv_cells is None:
            return None
        return (self.kv_cells - self.kv_used) // max(1, self.slots - self._running)

    def kv_fits(self, need: int) -> bool:
        """Whether ``need`` cells are free now."""
        return self.kv_cells is None or self.kv_used + need <= self.kv_cells

    # -- admission ---------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def enter(self, kv: int = 0) -> AsyncIterator[None]:
        """Hold a slot (and ``kv`` cells of the KV cache) while the block runs."""
        if self.kv_cells is not None:
            kv = min(kv, self.kv_cells)
        if not self._waiters and self._can_run(kv):
            self._take(kv)
        else:
            await self._wait(kv)
        try:
            yield
        finally:
            self._running -= 1
            self.stats.running -= 1
            self.kv_used -= kv
            self._wake()

    async def _wait(self, kv: int) -> None:
        waiter = _Waiter(kv, asyncio.get_running_loop().create_future())
        self._waiters.append(waiter)
        self._wake()
        if waiter.granted.done():
            return  # it passed the ones waiting for KV space
        try:
            self.check_queue()
        except Overloaded:
            self._waiters.remove(waiter)
            raise
        self.stats.waiting += 1
        try:
            await waiter.granted
        except BaseException:
            if waiter in self._waiters:
                self._waiters.remove(waiter)
                self._wake()  # it may have blocked the ones behind it
            elif waiter.granted.done() and not waiter.granted.cancelled():
                # Granted, but cancelled before it could run: give it all back.
                self._running -= 1
                self.stats.running -= 1
                self.kv_used -= kv
                self._wake()
            raise
        finally:
            self.stats.waiting -= 1

    def _can_run(self, kv: int) -> bool:
        return self._running < self.slots and self.kv_fits(kv)

    def _take(self, kv: int) -> None:
        self._running += 1
        self.stats.running += 1
        self.kv_used += kv

    def _wake(self) -> None:
        """Let in, in order, every waiter that can run now; one blocked by the KV
        budget may be passed by those behind it, ``MAX_PASSES`` times at most."""
        blocked: list[_Waiter] = []
        for waiter in list(self._waiters):
            if self._running >= self.slots:
                return
            if not self.kv_fits(waiter.kv):
                if waiter.passes >= MAX_PASSES:
                    return
                blocked.append(waiter)
                continue
            self._waiters.remove(waiter)
            self._take(waiter.kv)
            waiter.granted.set_result(None)
            for passed in blocked:
                passed.passes += 1


class SlotShares:
    """One account holds at most its share of a model's slots; its requests past the
    share wait here, outside the engine's queue, so another account's request takes
    the next free slot instead of waiting behind them (issue 25: six long streams of
    one key held all four slots while another user waited 45 s). The share is all but
    one slot unless the account's plan says otherwise (``slots``)."""

    def __init__(self) -> None:
        # (account, model) -> [its semaphore, requests holding or waiting for it]
        self._shares: dict[tuple[int, str], list[Any]] = {}

    @staticmethod
    def share(slots: int, plan_slots: int | None) -> int | None:
        """The share of a model with ``slots``; None when it is all of them."""
        share = max(1, plan_slots if plan_slots is not None else slots - 1)
        return share if share < slots else None

    async def take(self, key: tuple[int, str], share: int, model: Admission | None) -> None:
        """Wait for a place in the share; the wait counts as the model's queue (bounded
        by ``SERVELM_QUEUE_SIZE``: 503 past it, as the engine's own queue)."""
        entry = self._shares.get(key)
        if entry is None:
            entry = self._shares[key] = [asyncio.Semaphore(share), 0]
        entry[1] += 1
        try:
            if entry[0].locked() and model is not None:
                model.check_queue()
                model.stats.waiting += 1
                try:
                    await entry[0].acquire()
                finally:
                    model.stats.waiting -= 1
            else:
                await entry[0].acquire()
        except BaseException:
            self._leave(key, entry)
            raise

    def give(self, key: tuple[int, str]) -> None:
        entry = self._shares[key]
        entry[0].release()
        self._leave(key, entry)

    def _leave(self, key: tuple[int, str], entry: list[Any]) -> None:
        entry[1] -= 1
        if entry[1] == 0:
            del self._shares[key]


# Sends ``exc`` as the response (the HTTP layer's renderer, handed in by ``api``, which
# this module sits below).
Refuse = Callable[[ServelmError, Scope, Send], Awaitable[None]]


class Gate:
    """Wraps a chat route: sheds a request quickly while draining or past
    ``SERVELM_MAX_INFLIGHT``, tracks the ones admitted (for the drain, the deadline and
    the send timeout), and answers for a request the lifecycle stopped before it
    could answer for itself. ``lifecycle_of`` finds the app's lifecycle (None on an app
    without one: nothing is gated); ``refuse`` renders an error response."""

    def __init__(
        self, app: ASGIApp, lifecycle_of: Callable[[Any], Lifecycle | None], refuse: Refuse
    ) -> None:
        self.app = app
        self._lifecycle_of = lifecycle_of
        self._refuse = refuse

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        life = self._lifecycle_of(scope["app"])
        if life is None:
            await self.app(scope, receive, send)
            return
        try:
            admit(life)
        except ServelmError as exc:
            await self._refuse(exc, scope, send)
            return
        loop = asyncio.get_running_loop()
        started = False
        with life.track(_asked_timeout(scope)) as flight:

            async def watched(message: Message) -> None:
                nonlocal started
                started = started or message["type"] == "http.response.start"
                flight.sending = loop.time()
                try:
                    await send(message)
                finally:
                    flight.sending = None

            try:
                await self.app(scope, receive, watched)
            except asyncio.CancelledError:
                reason = life.stopped_reason()
                if reason is None:
                    raise
                if not started and reason != SLOW_CLIENT:
                    await self._refuse(life.error_for(reason), scope, send)


def admit(life: Lifecycle) -> None:
    """Before a chat request starts: refuse it quickly while draining or full."""
    if life.draining:
        raise Overloaded("The server is shutting down; retry on another.", retry_after=1)
    if life.max_inflight is not None and len(life.inflight) >= life.max_inflight:
        raise Overloaded("The server is at capacity; retry shortly.", retry_after=1)


def _asked_timeout(scope: Scope) -> float | None:
    """A client may ask for a shorter deadline: ``x-request-timeout`` in seconds, or
    the timeout the openai SDKs announce in ``x-stainless-timeout``."""
    for name, value in scope["headers"]:
        if name in (b"x-request-timeout", b"x-stainless-timeout"):
            try:
                seconds = float(value)
            except ValueError:
                continue
            if seconds > 0:
                return seconds
    return None
