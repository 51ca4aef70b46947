"""Queued work takes the chat walk (``serving.ChatService``), split in two halves.

``submit`` is the walk up to the hold, run while the client waits: key, body, model,
rights, preparation (the prompt counted exactly), and the hold of the worst case,
which outlives the process (it expires with the job, not with a keep-alive), so a
refusal is a 406/402 at submission, never a job that fails later for money.

``run`` is the rest, run by the queue's runner: the same preparation again, the hold
(made here for a batch line, when it starts; kept from submission for an async
request), generation and settlement. Settlement carries the line's output row
(``Call.record``), so the charge and the output commit in one transaction.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import timedelta
from typing import Any

from servelm.access.keys import Principal, check_model_rights
from servelm.billing.holds import Settlement
from servelm.chat.answers import Completion
from servelm.chat.calls import Call, ChatExchange
from servelm.chat.charging import count_prompt, tell_balance, usage_of
from servelm.chat.protocol import ChatRequest
from servelm.chat.serving import ChatService
from servelm.errors import InvalidRequest, ServelmError
from servelm.store.db import Tx

log = logging.getLogger(__name__)

# Writes the line's ending in the settlement's transaction: (tx, call, body).
LineRecord = Callable[[Tx, Call, dict[str, Any]], None]


def _no_stream(request: ChatRequest) -> None:
    if request.stream:
        raise InvalidRequest(
            "stream is not supported for queued requests; the answer is fetched later.",
            param="stream",
        )


async def submit(
    chat: ChatService, ex: ChatExchange, hold_ttl: timedelta
) -> tuple[Principal, Call, bytes]:
    """Authenticate, validate, count and hold; the request's raw body for the queue."""
    principal = await chat.authenticate(ex)
    try:
        raw = await ex.read_body()
        request = chat.parse(raw)
        _no_stream(request)
        spec = chat.resolve(request, ex.slug)
        check_model_rights(principal, spec.slug)
        await chat.precheck_credits(request, spec, principal, len(raw))
        # The model counts the prompt now; it runs the request later, under a lease of
        # its own (``run``), so this one ends here.
        lease = await chat.models.acquire(spec)
        try:
            call = await chat.prepare(ex.request_id, request, spec, lease.engine)
            if call.count_deferred:
                await count_prompt(call)
        finally:
            lease.release()
        call.hold_ttl = hold_ttl
        await chat.hold_credits(call, principal)
        return principal, call, raw
    except ServelmError as exc:
        await tell_balance(chat.billing, exc, principal)
        raise


async def run(
    chat: ChatService,
    principal: Principal,
    raw: bytes,
    hold_id: str,
    *,
    slug: str | None,
    batch: bool,
    held_max_tokens: int | None,
    record: LineRecord,
) -> Call:
    """One queued request, start to settlement; errors before the hold are raised
    (nothing was held), errors after it are recorded with the settlement."""
    request = chat.parse(raw)
    _no_stream(request)
    spec = chat.resolve(request, slug)
    check_model_rights(principal, spec.slug)
    # The model stays loaded until this line settles (settlement ends the lease).
    lease = await chat.models.acquire(spec)
    try:
        priced = spec.batch_priced() if batch else spec
        call = await chat.prepare(hold_id, request, priced, lease.engine)
        if call.count_deferred:
            await count_prompt(call)
        if held_max_tokens is not None:
            # Held at submission for exactly this output limit.
            call.max_tokens = call.body["max_tokens"] = held_max_tokens
            call.held_balance = 0
        # The line stays claimed (its lease renewed) while it waits for batch_tpm.
        await chat.queued_rate_limit(call, principal)
        if held_max_tokens is None:
            await chat.hold_credits(call, principal)
    except BaseException:
        lease.release()
        raise
    call.lease = lease
    completion = Completion(call)

    def settled(tx: Tx, settlement: Settlement) -> None:
        call.settlement = settlement
        record(tx, call, completion.body(usage_of(call)))

    call.record = settled
    try:
        async for chunk in chat.generate(call):
            completion.add(chunk)
    except ServelmError as exc:
        # Already settled, and recorded with the settlement (call.status, call.error).
        log.info("queued request %s failed while generating: %s", hold_id, exc.message)
    return call
