"""What a chat request holds, what it costs, and what each ending pays: the money
rules of the walk, in one place. The arithmetic (micro-credits, prices per million,
rounding, affordable tokens) is ``billing/money.py``; holds and settlement in the
database are ``billing/holds.py``; prices are the catalog's (``catalog/builtins.py``,
the models file).

- Before costly preparation, ``precheck_floor``: what a balance must cover before
  images are fetched or a large prompt is tokenized.
- The hold, ``hold``: the worst case (prompt + output limit), or the prompt's upper
  bound where counting would decide nothing (``defer_count``), or, when the client set
  no ``max_tokens``, as many output tokens as the balance affords (``output_limit``).
- What was relayed and what the engine claims, ``tally`` and ``settle_usage``: the
  engine's counts are taken only within what was sent (a prompt never below one token
  per message nor above its bound; a completion between the chunks and the bytes
  relayed), otherwise what was delivered is billed.
- The charge on every ending, ``charge``: prompt plus delivered output, whether the
  answer completed, hit ``max_tokens``, or the client, a replica or a drain cut it
  (README, "What each ending pays"). A prompt cut before the engine's usage is
  counted late (``count_prompt_late``) or billed at its bound, never 0.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
from typing import Any

from servelm.access.keys import Principal
from servelm.billing.money import (
    MAX_ACCOUNT_MICRO,
    affordable_max_tokens,
    credits_number,
    format_credits,
)
from servelm.billing.service import Billing
from servelm.catalog.specs import ModelSpec
from servelm.chat.calls import Call
from servelm.chat.conversation import engine_body, estimate_prompt_tokens, plain_text
from servelm.chat.protocol import ChatRequest, usage_body
from servelm.engines.wire import WHOLE_ANSWER
from servelm.errors import ContextWindowExceeded, InvalidRequest, NotEnoughCredits, ServelmError

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

# A body this large costs real CPU to tokenize: check the balance first.
COSTLY_BODY_BYTES = 64 * 1024
# ``prompt_count = "auto"`` holds the prompt's upper bound only while the balance
# covers this many more such holds. A balance near its end is held exactly, so the
# larger hold can only matter to requests of the same account in flight with it.
BOUND_HOLD_ROOM = 16


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


def precheck_floor(request: ChatRequest, spec: ModelSpec, body_bytes: int) -> int | None:
    """What the balance must cover before costly preparation, or None where checking
    would cost more than it saves: for images (fetches, decoding) the hold they may
    need, the prompt's upper bound (each image at what large vision encoders spend on
    one) and one output token; for a large text prompt (tokenizing) a lower bound, one
    token per message and one output token. Small text requests skip it: a balance read
    would cost them more than counting their prompt, and the hold refuses them exactly
    anyway."""
    images = request.has_images()
    if body_bytes < COSTLY_BODY_BYTES and not images:
        return None
    if images:
        return spec.cost_micro(estimate_prompt_tokens(engine_body(request)), 1)
    return spec.cost_micro(len(request.messages), 1)


async def hold(billing: Billing, call: Call, principal: Principal) -> None:
    """Reserve the worst case, or, when the client set no limit, as many output tokens
    as the balance affords; raises NotEnoughCredits."""
    spec = call.spec
    if call.count_deferred:
        # The bound, while the balance has room for many such holds; near its end
        # the exact count, so the hold refuses or caps exactly what `exact` would.
        amount = spec.cost_micro(call.prompt_tokens, call.max_tokens)
        try:
            call.held_balance = await billing.hold(
                principal,
                call.request_id,
                spec.slug,
                amount,
                # No balance exceeds MAX_ACCOUNT_MICRO: past it, refused (BIGINT-safe).
                need=min(amount * (1 + BOUND_HOLD_ROOM), MAX_ACCOUNT_MICRO + 1),
                ttl=call.hold_ttl,
            )
            return
        except NotEnoughCredits:
            await count_prompt(call)
    try:
        amount = spec.cost_micro(call.prompt_tokens, call.max_tokens)
        call.held_balance = await billing.hold(
            principal, call.request_id, spec.slug, amount, ttl=call.hold_ttl
        )
    except NotEnoughCredits as exc:
        if call.request.requested_max_tokens is not None:
            raise
        affordable = affordable_max_tokens(
            exc.balance,
            call.prompt_tokens,
            spec.input_price_micro,
            spec.output_price_micro,
            call.max_tokens,
        )
        if affordable < 1:
            raise
        call.max_tokens = call.body["max_tokens"] = affordable
        amount = spec.cost_micro(call.prompt_tokens, affordable)
        call.held_balance = await billing.hold(
            principal, call.request_id, spec.slug, amount, ttl=call.hold_ttl
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


def usage_of(call: Call) -> dict[str, Any]:
    """The usage a client is told: the tokens billed and, where money moved, what it
    cost and what is left."""
    extra: dict[str, Any] = {}
    if call.settlement is not None:
        # JSON numbers, as clients that read OpenRouter's usage.cost expect;
        # the exact decimals are in x-cost / x-remaining-credits and the ledger.
        extra["cost"] = credits_number(call.settlement.charged)
        extra["remaining_credits"] = credits_number(call.settlement.balance)
    return usage_body(
        call.prompt_tokens,
        call.completion_tokens,
        prompt_tokens_details={"cached_tokens": cached_tokens(call.usage)},
        completion_tokens_details={
            "reasoning_tokens": 0,
            "audio_tokens": 0,
            "accepted_prediction_tokens": 0,
            "rejected_prediction_tokens": 0,
        },
        **extra,
    )


async def tell_balance(billing: Billing | None, exc: ServelmError, principal: Principal) -> None:
    """An error after authentication carries ``x-remaining-credits`` too."""
    if billing is None or "x-remaining-credits" in exc.headers or not principal.owns_account:
        return
    # A refused hold already knows the balance: no second query.
    balance = getattr(exc, "balance", None)
    if balance is None:
        try:
            balance = await billing.balance(principal.account_id)
        except Exception:
            # The error the client is owed matters more than the header.
            log.warning("could not read the balance for an error response", exc_info=True)
            return
    exc.headers["x-remaining-credits"] = format_credits(balance)
