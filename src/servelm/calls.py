"""What the walk passes around: the exchange the HTTP layer hands in, the replies it
gets back, one call's state from preparation to settlement, and the rules that read
that state (the output limit, what the call is charged, the money headers)."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncGenerator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from servelm.api.paths import Dialect
from servelm.billing.holds import Settlement
from servelm.catalog import ModelSpec
from servelm.conversation import estimate_prompt_tokens, plain_text
from servelm.errors import ContextWindowExceeded, InvalidRequest, ServelmError
from servelm.money import format_credits
from servelm.protocol import ChatRequest

if TYPE_CHECKING:
    from servelm.engines.base import Engine
    from servelm.ratelimit import Reservation

log = logging.getLogger(__name__)

# How long settlement waits for a prompt counted after a cut stream (``count_prompt_late``).
LATE_COUNT_SECONDS = 5.0


@dataclass(frozen=True)
class ChatExchange:
    """What the HTTP layer knows of a chat request before the walk starts."""

    dialect: Dialect
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
    session_key_id: str | None = None


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

    async def aclose(self) -> None:
        await self.rest.aclose()


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
    # (account, model) while the request holds one of its account's share of the
    # model's slots (engines.base.SlotShares).
    share: tuple[int, str] | None = None
    share_size: int = 0
    status: str = "ok"
    completion_id: str = field(default_factory=lambda: f"chatcmpl-{uuid.uuid4().hex}")
    created: int = field(default_factory=lambda: int(time.time()))
    started: float = field(default_factory=time.perf_counter)
    # What actually happened, filled in while generating.
    completion_tokens: int = 0
    last_token: float | None = None  # when the last token arrived (perf_counter)
    finish_reason: str | None = None
    usage: dict[str, Any] | None = None


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
    (``prompt_count`` bound, or auto where it skipped the count), count it now.
    Bounded in time, since settlement waits for it: an engine that cannot answer
    within it (gone, or stalled) leaves the prompt unbilled, and a warning says so."""
    if call.prompt_exact or call.usage is not None or charge(call) == 0:
        return
    try:
        async with asyncio.timeout(LATE_COUNT_SECONDS):
            counted = await call.engine.count_prompt_after(call.body)
    except (ServelmError, TimeoutError) as exc:
        log.warning(
            "request %s: the prompt could not be counted after the stream was cut "
            "(%s); its prompt is not billed",
            call.request_id,
            exc,
        )
        return
    if counted is not None:
        call.prompt_tokens, call.prompt_exact = counted, True


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


def no_images_message(spec: ModelSpec) -> str:
    """The 400 for images sent to a text-only entry says what would make it see."""
    if spec.engine == "openai":
        how = "if its upstream model sees images, its operator sets `vision = true` on its entry"
    else:
        how = (
            "a llama.cpp model sees through a multimodal projector made for its weights: "
            f'its operator adds `mmproj = "/path/to/mmproj.gguf"` to [models."{spec.slug}"] '
            "in servelm.toml (Mixtral has no published projector; serve a vision model "
            "for images)"
        )
    return f"Model '{spec.slug}' does not accept images; send text only, or {how}."


def charge(call: Call) -> int:
    """What the user pays: the tokens generated and delivered. A request that failed
    or was abandoned before any output costs nothing, and so does a non-streaming one
    that failed or lost its client (no answer reached anyone); a stream cut short pays
    for what it sent. A prompt count that is only an upper bound (no usage received,
    no late count) is not billed."""
    if call.status != "ok" and (call.completion_tokens == 0 or not call.request.stream):
        return 0
    return call.spec.cost_micro(billed_prompt(call), call.completion_tokens)


def billed_prompt(call: Call) -> int:
    """The prompt tokens known exactly (counted, or the engine's usage), else 0."""
    return call.prompt_tokens if (call.prompt_exact or call.usage) else 0


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
