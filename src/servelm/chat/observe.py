"""What a generation tells the operator as it goes: time between tokens, and at its
end the tokens, outcome, duration and charge, in metrics and in the access line."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from servelm.billing.money import format_credits
from servelm.chat.calls import Call
from servelm.chat.charging import billed_prompt
from servelm.telemetry import logs

if TYPE_CHECKING:
    from servelm.telemetry.metrics import Metrics


def token_seen(metrics: Metrics | None, call: Call) -> None:
    now = time.perf_counter()
    if metrics is not None:
        last = call.last_token
        metrics.observe_token(call.spec.slug, now - (last or call.started), last is None)
    call.last_token = now


def observe_end(metrics: Metrics | None, call: Call) -> None:
    """Metrics and the access-log fields of a generation that ended."""
    charged = call.settlement.charged if call.settlement is not None else 0
    if metrics is not None:
        metrics.observe_tokens(call.spec.slug, billed_prompt(call), call.completion_tokens)
        seconds = time.perf_counter() - call.started
        metrics.observe_generation(call.spec.slug, call.status, seconds, charged)
    logs.annotate(
        model=call.spec.slug,
        prompt_tokens=billed_prompt(call),
        completion_tokens=call.completion_tokens,
        cost=format_credits(charged),
        outcome=call.status,
    )
