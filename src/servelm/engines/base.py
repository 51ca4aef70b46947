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
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from servelm.catalog.specs import ModelSpec
from servelm.engines.admission import Admission, PromptSize
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


class Engine(abc.ABC):
    """One model, ready to generate."""

    # Set by engines that queue requests themselves (all of ours do).
    _admission: Admission | None = None
    # Token ids run 0..vocab_size-1; None where the engine cannot say (a remote one).
    vocab_size: int | None = None

    def __init__(self, spec: ModelSpec) -> None:
        self.spec = spec
        self.stats = EngineStats()

    @property
    def admission(self) -> Admission | None:
        """The model's slots, queue and KV budget (``engines.admission``)."""
        return self._admission

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

    def alive(self) -> bool:
        """Whether a started engine can still serve: False once the process holding
        its model has ended (``engines.llamacpp``), and the model pool then loads it
        again."""
        return True

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
        self,
        body: dict[str, Any],
        *,
        client_streams: bool = True,
        prompt: PromptSize | None = None,
    ) -> AsyncIterator[dict[str, Any]]:
        """Generate; yields chunk dicts, the last one carrying ``usage``.

        ``prompt``: the walk's count (or bound) of the prompt's tokens; with the body's
        ``max_tokens`` it is the KV space the request reserves in admission
        (``engines.admission``). None: the engine finds out itself if it needs to.

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


# What llama.cpp says when its KV cache is full while prefilling (a 500 "server_error").
_KV_FULL = "Context size has been exceeded"


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
    if _KV_FULL in message:
        # The request fit the window, but the KV cache its slots share filled up with
        # other requests mid-prefill (admission reserves KV space so this should not
        # happen; a model whose cache is smaller than it said would still get here).
        # Not the client's fault, and gone once the others finish: retry.
        return Overloaded(
            "The model's KV cache was full with other requests while this prompt was "
            "read; retry shortly.",
            retry_after=2,
            code="kv_cache_full",
        )
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
