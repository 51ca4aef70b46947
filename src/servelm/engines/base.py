"""The engine interface.

An engine takes an OpenAI-shaped chat body (already validated and prepared by the
gateway) and yields OpenAI ``chat.completion.chunk`` dicts. That is the whole seam,
like httpx's one-method transport: the gateway owns keys, credits, dialects and
response shapes; an engine only generates.

Engines raise ``servelm.errors`` exceptions: ``InvalidRequest`` when the engine
rejects the input (e.g. the prompt does not fit), ``Overloaded`` when its queue is
full, ``EngineError`` / ``UpstreamError`` when it fails.
"""

from __future__ import annotations

import abc
import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from servelm.catalog.specs import ModelSpec
from servelm.errors import (
    ContextWindowExceeded,
    EngineError,
    InvalidRequest,
    ModelOutputError,
    Overloaded,
    ServelmError,
)


@dataclass
class EngineStats:
    running: int = 0
    waiting: int = 0
    requests_total: int = 0
    cancelled_total: int = 0
    # Chunks handed out by the engine, summed over requests; tests use it to show that a
    # cancelled request stops generating.
    chunks_total: int = 0


class Admission:
    """At most ``slots`` requests run; at most ``queue_size`` more wait; the rest get 503.

    Waiting happens here, in asyncio, rather than in the engine's own queue, so a client
    that gives up while queued costs nothing and leaves at once.
    """

    def __init__(self, slots: int, queue_size: int, stats: EngineStats) -> None:
        self._sem = asyncio.Semaphore(slots)
        self._queue_size = queue_size
        self._stats = stats

    def check(self) -> None:
        """Refuse (503) if a request arriving now would find every slot busy and the
        queue full."""
        if self._sem.locked():
            self.check_queue()

    def check_queue(self) -> None:
        """Refuse (503) if the queue is full, whatever the slots."""
        if self._stats.waiting >= self._queue_size:
            raise Overloaded(
                "The model is at capacity and its queue is full; retry shortly.",
                retry_after=1,
            )

    def has_room(self) -> bool:
        """A request arriving now would run at once: a slot is free and nobody waits."""
        return not self._sem.locked() and self._stats.waiting == 0

    async def __aenter__(self) -> None:
        if self._sem.locked():
            self.check()
            self._stats.waiting += 1
            try:
                await self._sem.acquire()
            finally:
                self._stats.waiting -= 1
        else:
            await self._sem.acquire()
        self._stats.running += 1

    async def __aexit__(self, *exc: object) -> None:
        self._stats.running -= 1
        self._sem.release()


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

    async def take(self, key: tuple[int, str], share: int, engine: Engine) -> None:
        """Wait for a place in the share; the wait counts as the model's queue (bounded
        by ``SERVELM_QUEUE_SIZE``: 503 past it, as the engine's own queue)."""
        entry = self._shares.get(key)
        if entry is None:
            entry = self._shares[key] = [asyncio.Semaphore(share), 0]
        entry[1] += 1
        try:
            if entry[0].locked() and engine._admission is not None:
                engine._admission.check_queue()
                engine.stats.waiting += 1
                try:
                    await entry[0].acquire()
                finally:
                    engine.stats.waiting -= 1
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


class Engine(abc.ABC):
    """One model, ready to generate."""

    # Set by engines that queue requests themselves (all of ours do).
    _admission: Admission | None = None
    # Token ids run 0..vocab_size-1; None where the engine cannot say (a remote one).
    vocab_size: int | None = None

    def __init__(self, spec: ModelSpec) -> None:
        self.spec = spec
        self.stats = EngineStats()

    def check_capacity(self) -> None:
        """Refuse at once (503) a request the engine's admission would refuse anyway,
        before the walk spends anything on it (a balance read, image fetches, the
        prompt count, a credit hold): under overload the refusal is then quick, and
        the counts it skips are work the saturated engine would have had to do."""
        if self._admission is not None:
            self._admission.check()

    def has_room(self) -> bool:
        """Whether a request arriving now would take a slot at once (queued work runs
        only then, so it never waits in the slots' queue ahead of a live request)."""
        return self._admission is None or self._admission.has_room()

    @abc.abstractmethod
    async def start(self) -> None:
        """Load the model / open connections. Raises ModelUnavailable on failure."""

    @abc.abstractmethod
    async def close(self) -> None: ...

    @abc.abstractmethod
    async def count_prompt_tokens(self, body: dict[str, Any]) -> int | None:
        """Prompt tokens for ``body``, or None when the engine cannot tell early."""

    def prompt_count_exact(self, body: dict[str, Any]) -> bool:
        """Whether ``count_prompt_tokens`` is exact for this body (not an upper bound)."""
        return True

    def counts_late(self, body: dict[str, Any]) -> bool:
        """Whether this body's prompt may go uncounted before admission and still be
        charged exactly: the engine reports the prompt in its usage and counts it on
        ``count_prompt_after`` when a stream is cut before that (``prompt_count =
        "auto"``, which defers only plain text: ``conversation.plain_text``)."""
        return False

    @abc.abstractmethod
    def stream(
        self, body: dict[str, Any], *, client_streams: bool = True
    ) -> AsyncIterator[dict[str, Any]]:
        """Generate; yields chunk dicts, the last one carrying ``usage``.

        ``client_streams`` False: the client wants one answer, not a stream, so an
        engine may deliver the completion in one chunk where that is cheaper. Closing the iterator
        (``aclose()``, or cancelling the task iterating it) must stop generation at
        once and free the engine's slot.
        """

    async def count_prompt_after(self, body: dict[str, Any]) -> int | None:
        """The exact prompt count, asked after generation when the engine's usage never
        came (a stream the client left): engines that skipped counting before admission
        (``prompt_count`` bound or auto) count now, so the charge is exact either way.
        None where the engine cannot count exactly (a remote engine)."""
        return None

    async def count_text_tokens(self, text: str) -> int | None:
        """Tokens of ``text`` as the model tokenizes output, or None when the engine
        cannot say; used to bill what a client received when the engine generated
        tokens whose text it did not send (see ``serving.ChatService.generate``)."""
        return None

    def usage_contradicted(self) -> None:
        """The engine's counts of one answer contradicted what it sent
        (``charging.settle_usage``): an engine that can deliver answers in a form whose
        tokens can be counted one by one (a stream) uses it from now on."""
        return None

    def describe(self) -> dict[str, Any]:
        """Facts for ``servelm models list`` and the metrics endpoint."""
        return {"running": self.stats.running, "waiting": self.stats.waiting}


# What llama.cpp says when it refuses the request itself (a schema or grammar it cannot
# compile, a number it cannot parse): the client's input, so a 400, never a 500.
_INPUT_REFUSALS = (
    "Unable to generate parser",
    "JSON schema error",
    "JSON schema conversion failed",
    "failed to parse grammar",
    "Failed to parse grammar",
    "json.exception.out_of_range",
    "json.exception.type_error",
    "json.exception.parse_error",
)


def map_engine_error(err: Any) -> ServelmError:
    """An OpenAI/llama.cpp-style error object from an engine, as our exception."""
    if not isinstance(err, dict):
        err = {"message": str(err)}
    message = str(err.get("message", "engine error"))
    if "grammar" in message:
        # The walk refuses the schemas it knows llama.cpp cannot compile
        # (input_limits); this is what slips past it, said in the caller's terms.
        return InvalidRequest(
            "The model's engine could not turn the request's JSON schema (response_format "
            "or a tool's parameters) into a grammar; simplify the schema "
            f"(engine: {message[:300]})."
        )
    if any(marker in message for marker in _INPUT_REFUSALS):
        return InvalidRequest(f"The model's engine refused the request: {message[:500]}")
    code = err.get("code")
    if err.get("type") == "exceed_context_size_error":
        return ContextWindowExceeded(
            f"The prompt has {err.get('n_prompt_tokens')} tokens, more than the model's "
            f"context window of {err.get('n_ctx')} tokens.",
            param="messages",
        )
    if code in (400, 501):
        return InvalidRequest(message)
    if "model produced output that does not match" in message:
        return ModelOutputError(
            f"The model's output did not parse as a tool call ({message}); retry the request."
        )
    return EngineError(message)
