"""What the walk passes around: the exchange the HTTP layer hands in, the replies it
gets back, one call's state from preparation to settlement, and the rules that read
that state (the output limit, what the call is charged, the money headers)."""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
import uuid
from collections.abc import AsyncGenerator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from servelm.billing.holds import Settlement
from servelm.billing.money import format_credits
from servelm.catalog.specs import ModelSpec
from servelm.chat.conversation import estimate_prompt_tokens, plain_text
from servelm.chat.protocol import ChatRequest
from servelm.engines.registry import is_local
from servelm.engines.wire import WHOLE_ANSWER
from servelm.errors import ContextWindowExceeded, InvalidRequest, ServelmError

if TYPE_CHECKING:
    from servelm.engines.base import Engine
    from servelm.engines.pool import Lease
    from servelm.ratelimit import Reservation

log = logging.getLogger(__name__)

# How long settlement waits for a prompt counted after a cut stream (``count_prompt_late``).
LATE_COUNT_SECONDS = 5.0
# Bytes per token of English text in the tokenizers servelm serves (about 4 to 4.5):
# how many tokens a whole answer that came in one piece is taken to hold, when its
# engine's count of it failed the checks of ``settle_usage``.
BYTES_PER_TOKEN = 4
# The most bytes one token is taken to decode to: a whole answer's count below its
# bytes over this is not a count of it.
MAX_TOKEN_BYTES = 32


@dataclass
class Relayed:
    """What the client was sent, and what the engine said of it as it went: the facts
    ``settle_usage`` checks the engine's counts against."""

    chunks: int = 0  # chunks with content or tool calls: one token each, as engines stream
    content_chunks: int = 0
    whole_bytes: int = 0  # text of whole answers (``WHOLE_ANSWER``), not one token a chunk
    # Bytes of everything sent (content, tool calls as JSON): no token decodes to
    # less than one byte, so with the ending token this bounds the completion.
    bytes: int = 0
    text: list[str] = field(default_factory=list)  # the content, in order
    tool_calls: bool = False
    # The engine's latest counts (any chunk's ``usage``) and how many chunks had been
    # relayed when they came: a stream cut after them pays those plus what followed.
    prompt: int | None = None
    completion: int | None = None
    chunks_at_report: int = 0
    settled: bool = False  # ``settle_usage`` ran


@dataclass(frozen=True)
class ChatExchange:
    """What the HTTP layer knows of a chat request before the walk starts."""

    request_id: str
    # Reads (and size-checks) the body; called after the key is checked, so an
    # unauthenticated client never gets a body read.
    read_body: Callable[[], Awaitable[bytes]]
    slug: str | None = None  # from the path, on the Segmind route
    api_key: str | None = None  # x-api-key
    authorization: str | None = None
    idempotency_key: str | None = None
    # A web console session's key id (signature, expiry and CSRF token checked by the
    # HTTP layer), used only when the request carries no key.
    # The playground's console session: (API key id, session id).
    session: tuple[str, str] | None = None
    # "responses": the body is a Responses API request, answered in its shapes.
    api: Literal["chat", "responses"] = "chat"


@dataclass(frozen=True)
class JsonReply:
    status: int
    body: dict[str, Any]
    headers: dict[str, str]


@dataclass
class StreamReply:
    """Headers to send now, then ``first`` and ``rest`` as SSE. The first chunk was
    already produced, so errors the engine reports up front were still a proper status.
    Whoever takes it must ``aclose()`` it, sent or not: that settles the request."""

    headers: dict[str, str]
    first: dict[str, Any]
    rest: AsyncGenerator[dict[str, Any]]
    # The generator ``rest`` reshapes (the Responses API's events), closed with it:
    # closing a generator that never started runs none of its code.
    inner: AsyncGenerator[dict[str, Any]] | None = None

    async def aclose(self) -> None:
        try:
            await self.rest.aclose()
        finally:
            if self.inner is not None:
                await self.inner.aclose()


@dataclass
class Call:
    """One chat request's state from preparation to settlement."""

    request_id: str
    spec: ModelSpec
    engine: Engine
    request: ChatRequest
    body: dict[str, Any]
    prompt_tokens: int
    max_tokens: int
    # False when prompt_tokens is only an upper bound: a remote engine's, or one whose
    # count was skipped (``prompt_count`` bound or auto); the engine's usage settles it.
    prompt_exact: bool = True
    # The bound stands in for a count the engine can still make (``prompt_count =
    # "auto"``): counted before the hold where the bound would decide something.
    count_deferred: bool = False
    # Balance right after the hold (what a stream's headers can say), and the
    # settlement once done.
    held_balance: int | None = None
    settlement: Settlement | None = None
    # The request's place in its rate-limit windows, settled with the credits.
    limit: Reservation | None = None
    # The model's hold (``engines.pool``): released after settlement, so a model is
    # never unloaded under a generation.
    lease: Lease | None = None
    status: str = "ok"
    completion_id: str = field(default_factory=lambda: f"chatcmpl-{uuid.uuid4().hex}")
    created: int = field(default_factory=lambda: int(time.time()))
    started: float = field(default_factory=time.perf_counter)
    # What actually happened, filled in while generating.
    completion_tokens: int = 0
    last_token: float | None = None  # when the last token arrived (perf_counter)
    finish_reason: str | None = None
    usage: dict[str, Any] | None = None
    relayed: Relayed = field(default_factory=Relayed)


def output_limit(
    request: ChatRequest, spec: ModelSpec, prompt_tokens: int, *, exact: bool = True
) -> int:
    """How many tokens the request may generate: what it asked for (within the model's
    output limit and context window), or the model's default."""
    asked = request.requested_max_tokens
    param = "max_completion_tokens" if request.max_completion_tokens else "max_tokens"
    if asked is not None and asked > spec.max_output_tokens:
        raise InvalidRequest(
            f"{param} is {asked}, above the maximum of {spec.max_output_tokens} "
            f"output tokens for model '{spec.slug}'.",
            param=param,
        )
    if not exact:
        return asked if asked is not None else spec.default_max_tokens
    room = spec.context_window - prompt_tokens
    if asked is None:
        # No explicit limit: generate up to the default, but never past the window.
        if room < 1:
            raise ContextWindowExceeded(
                f"The prompt has {prompt_tokens} tokens, which fills the context window "
                f"of {spec.context_window} tokens of model '{spec.slug}'.",
                param="messages",
            )
        return min(spec.default_max_tokens, room)
    if asked > room:
        raise ContextWindowExceeded(
            f"The prompt has {prompt_tokens} tokens and {param} is {asked}: "
            f"{prompt_tokens + asked} tokens, more than the context window of "
            f"{spec.context_window} tokens of model '{spec.slug}'.",
            param=param,
        )
    return asked


async def count_prompt(call: Call) -> None:
    """The prompt counted where the engine can, and the output limit that allows."""
    counted = await call.engine.count_prompt_tokens(call.body)
    # A remote engine cannot count before generating: bound the prompt from above
    # (for the credit hold) and let the upstream enforce its own window.
    call.prompt_tokens = counted if counted is not None else estimate_prompt_tokens(call.body)
    call.prompt_exact = counted is not None and call.engine.prompt_count_exact(call.body)
    call.count_deferred = False
    call.max_tokens = output_limit(
        call.request, call.spec, call.prompt_tokens, exact=call.prompt_exact
    )
    call.body["max_tokens"] = call.max_tokens


def defer_count(call: Call) -> bool:
    """``prompt_count = "auto"``: let the prompt's upper bound stand in for its count
    where the count would decide nothing now, and say whether it does.

    Counting costs two calls into llama.cpp before admission (a few ms on an idle CPU,
    tens on a busy one). Where the bound plus the output fits the window, the output
    limit comes out the same either way; the engine's usage then settles the charge
    (or ``count_prompt_after``, for a stream cut before it). The rate limit and the
    hold may still count (``ChatService.check_rate_limit``, ``ChatService._hold``)."""
    if not plain_text(call.body) or not call.engine.counts_late(call.body):
        return False
    bound = estimate_prompt_tokens(call.body)
    asked = call.request.requested_max_tokens
    output = call.spec.default_max_tokens if asked is None else asked
    if bound + output > call.spec.context_window:
        return False
    call.prompt_tokens, call.prompt_exact, call.count_deferred = bound, False, True
    call.max_tokens = output_limit(call.request, call.spec, bound, exact=False)
    call.body["max_tokens"] = call.max_tokens
    return True


async def count_prompt_late(call: Call) -> None:
    """A stream cut short pays its prompt, and the engine's usage, which has the
    exact count, never came: where the prompt was only bounded before admission
    (``prompt_count`` bound or auto, or a remote engine), the engine counts it now if
    it can. Bounded in time, since settlement waits for it: an engine that cannot
    answer within it (gone, or stalled) leaves the prompt billed at its upper bound
    from its bytes, never at 0, and a warning says so."""
    if call.prompt_exact or charge(call) == 0:
        return
    try:
        async with asyncio.timeout(LATE_COUNT_SECONDS):
            counted = await call.engine.count_prompt_after(call.body)
    except (ServelmError, TimeoutError) as exc:
        log.warning(
            "request %s: the prompt could not be counted after the stream was cut "
            "(%s); it is billed at its upper bound of %d tokens",
            call.request_id,
            exc,
            call.prompt_tokens,
        )
        return
    if counted is not None:
        call.prompt_tokens, call.prompt_exact = counted, True


def tally(call: Call, raw: dict[str, Any]) -> bool:
    """One engine chunk on its way to the client, counted; True when it carried
    output (a token, or a whole answer)."""
    r = call.relayed
    whole = bool(raw.get(WHOLE_ANSWER))
    output = False
    for choice in raw.get("choices") or ():
        if choice.get("finish_reason"):
            call.finish_reason = choice["finish_reason"]
        delta = choice.get("delta") or {}
        content = delta.get("content")
        reasoning = delta.get("reasoning_content")
        if content:
            r.text.append(content)
            size = len(content.encode())
            r.content_chunks += not whole
        elif isinstance(reasoning, str) and reasoning:
            size = len(reasoning.encode())
        elif delta.get("tool_calls"):
            r.tool_calls = True
            size = len(json.dumps(delta["tool_calls"]).encode())
        else:
            continue
        r.bytes += size
        if whole:
            r.whole_bytes += size
        else:
            r.chunks += 1
        output = True
    usage = raw.get("usage")
    if usage:
        # After the chunk's own content: a count that comes with a token includes it
        # (vLLM's continuous usage, llama.cpp's timings).
        call.usage = usage
        r.completion = int(usage.get("completion_tokens", 0))
        prompt = usage.get("prompt_tokens")
        r.prompt = int(prompt) if prompt is not None else None
        r.chunks_at_report = r.chunks
    return output


def settle_usage(call: Call) -> list[tuple[str, str]]:
    """The tokens the call is charged, from the engine's counts checked against what
    was relayed (README, "Credits"); returns the counts corrected, as (``prompt`` or
    ``completion``, ``high`` or ``low``), each also logged.

    Completion: the engine's latest count plus the chunks relayed after it, accepted
    between the content chunks relayed (one token or more each) and the bytes relayed
    plus the ending token (no token decodes to less than a byte), and never above
    ``max_tokens``. Outside that, or with no count at all: what was delivered, one
    token a chunk (a whole answer: its bytes over ``BYTES_PER_TOKEN``).

    Prompt: the engine's count, accepted between one token a message and the upper
    bound from the prompt's bytes (``estimate_prompt_tokens``, what the hold used);
    outside that, or with no count: our own count where we made one, else that bound.
    So a prefilled prompt is never billed 0 and never above its bound."""
    r = call.relayed
    if r.settled:
        return []
    r.settled = True
    fixes: list[tuple[str, str]] = []
    delivered = r.chunks + math.ceil(r.whole_bytes / BYTES_PER_TOKEN)
    completion = min(delivered, call.max_tokens)
    if r.completion is not None:
        claimed = r.completion + r.chunks - r.chunks_at_report
        low = r.content_chunks + math.ceil(r.whole_bytes / MAX_TOKEN_BYTES)
        high = min(call.max_tokens, r.bytes + 1)
        if low <= claimed <= high:
            completion = claimed
        else:
            fixes.append(("completion", "high" if claimed > high else "low"))
            log.warning(
                "request %s: engine of %s counted %d completion tokens for %d chunks "
                "(%d bytes) relayed; billing %d",
                call.request_id,
                call.spec.slug,
                claimed,
                r.chunks,
                r.bytes,
                completion,
            )
    call.completion_tokens = completion
    if r.prompt is not None:
        floor = len(call.body["messages"])
        bound = max(call.prompt_tokens, estimate_prompt_tokens(call.body))
        if floor <= r.prompt <= bound:
            call.prompt_tokens, call.prompt_exact = r.prompt, True
        else:
            fixes.append(("prompt", "high" if r.prompt > bound else "low"))
            log.warning(
                "request %s: engine of %s counted %d prompt tokens, outside %d..%d; billing %d",
                call.request_id,
                call.spec.slug,
                r.prompt,
                floor,
                bound,
                call.prompt_tokens,
            )
    return fixes


async def bill_what_was_sent(call: Call, text: str, ending: int) -> None:
    """llama.cpp streams one chunk per token, except where it keeps text back: a
    stop string's start, trailing whitespace its output parser trims at the end
    (a json_object answer cut by max_tokens), bytes of an unfinished character.
    Fewer chunks than tokens is the sign; the client is then billed for the
    tokens of the text it received (and the ending token), never more than the
    engine generated."""
    counted = await call.engine.count_text_tokens(text)
    if counted is not None:
        counted += ending
    if counted is not None and counted < call.completion_tokens:
        log.info(
            "request %s: engine generated %d tokens, sent text of %d; billing %d",
            call.request_id,
            call.completion_tokens,
            counted,
            counted,
        )
        call.completion_tokens = counted


def no_images_message(spec: ModelSpec, seeing: list[str]) -> str:
    """The 400 for images sent to a text-only entry: what the API user can do about
    it (send text, or use a model here that sees). How the operator would make this
    one see is not theirs to act on: that goes to the log (``no_images_hint``)."""
    others = (
        f"models on this server that take images: {', '.join(seeing)}"
        if seeing
        else "no model on this server takes images"
    )
    return f"Model '{spec.slug}' takes no images, only text; send text only ({others})."


def no_images_hint(spec: ModelSpec) -> str:
    """For the operator's log: what would let this entry see images."""
    if not is_local(spec):
        return "if its upstream model sees images, set `vision = true` on its entry"
    return (
        "a llama.cpp model sees through a multimodal projector made for its weights: "
        f'add `mmproj = "/path/to/mmproj.gguf"` to [models."{spec.slug}"] in the models '
        "file (Mixtral has no published projector; serve a vision model for images)"
    )


def charge(call: Call) -> int:
    """What the user pays: the prompt and the tokens generated and delivered. A
    request that failed or was abandoned before any output costs nothing, and so does
    a non-streaming one that failed or lost its client (no answer reached anyone); a
    stream cut short pays its prompt and what it sent. The counts are
    ``settle_usage``'s: the engine's where they agree with what was relayed, else
    what was delivered and the prompt's count or upper bound."""
    if call.status != "ok" and (call.completion_tokens == 0 or not call.request.stream):
        return 0
    return call.spec.cost_micro(billed_prompt(call), call.completion_tokens)


def billed_prompt(call: Call) -> int:
    """The prompt tokens billed: counted, the engine's checked count, or the upper
    bound from the prompt's bytes; never 0 for a prompt that was prefilled."""
    return call.prompt_tokens


def cached_tokens(usage: dict[str, Any] | None) -> int:
    """Prompt tokens the engine took from its prompt cache (llama.cpp and vLLM report
    them as OpenAI does), 0 when it does not say."""
    details = (usage or {}).get("prompt_tokens_details") or {}
    value = details.get("cached_tokens") if isinstance(details, dict) else None
    return value if isinstance(value, int) and value >= 0 else 0


def money_headers(call: Call) -> dict[str, str]:
    assert call.settlement is not None
    return {
        "x-remaining-credits": format_credits(call.settlement.balance),
        "x-cost": format_credits(call.settlement.charged),
    }
