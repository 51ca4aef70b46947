"""What a remote engine sends, checked before anything downstream trusts it (issue 17,
points 6 to 9).

An upstream is another server: it can be buggy, misconfigured or hostile. Its token
counts decide what a user pays, and its answers end up in our responses, so every
chunk, plain answer and ``usage`` object is validated here and normalised into the
shapes the rest of servelm assumes (``dict`` chunks, ``str`` content, ``int`` token
counts in range). Anything else is an ``UpstreamError`` (502, or an SSE error event
once a stream has started), never a traceback, and the charge is then computed from
what was relayed.

Rules for ``usage`` (the README's promise that an upper bound is never billed):

- counts must be integers, ``0 <= n <= MAX_TOKENS``; anything else (negative, 10^400,
  ``"abc"``, NaN, a float) is a lying upstream: 502;
- ``prompt_tokens`` missing: left out, and the prompt is billed as if no usage had
  come (``charging.settle_usage``: the upper bound from its bytes, never 0);
- ``completion_tokens`` missing: the usage is ignored and the tokens relayed are
  counted instead.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import AsyncIterator
from typing import Any

from servelm.engines import http1
from servelm.errors import StreamCut, UpstreamError

log = logging.getLogger(__name__)

# Also what the usage table's INTEGER columns hold (PostgreSQL int4).
MAX_TOKENS = 2**31 - 1
# A chunk that carries a whole answer (a plain upstream call, reshaped) says so with
# this key, so that ``charging.settle_usage`` does not take it for one token. Never
# taken from an upstream's own events.
WHOLE_ANSWER = "servelm_whole_answer"


def _bad(slug: str, what: str) -> UpstreamError:
    return UpstreamError(f"The engine for '{slug}' sent a malformed answer: {what}.")


def upstream_failure(message: str, detail: object) -> UpstreamError:
    """A 502 in the user's terms: ``message`` is what the client reads; what the
    upstream sent (bytes, its error text) goes to the log only, where the request id
    finds it. An upstream's text may be anything (another tenant's data, internal
    addresses, bytes crafted to confuse a client), so it is never relayed."""
    log.warning("%s upstream sent: %.2000r", message, detail)
    return UpstreamError(
        f"{message} The server's log has the details under this response's x-request-id."
    )


def _count(slug: str, usage: dict[str, Any], name: str) -> int | None:
    value = usage.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        shown = "NaN" if isinstance(value, float) and math.isnan(value) else repr(value)[:40]
        log.warning("model %s: usage.%s is %s", slug, name, shown)
        raise _bad(slug, f"usage.{name} is not an integer")
    if not 0 <= value <= MAX_TOKENS:
        log.warning("model %s: usage.%s is %.40s", slug, name, value)
        raise _bad(slug, f"usage.{name} is out of range")
    return value


def _cached(raw: dict[str, Any], prompt: int) -> dict[str, Any]:
    """``prompt_tokens_details.cached_tokens`` where the engine reports it and it is a
    count within the prompt (an optional fact: anything else is left out, not fatal).
    Kept so that whoever reads the usage downstream (a gateway in front of a worker,
    the routing benchmark) can tell prefix-cache hits."""
    details = raw.get("prompt_tokens_details")
    cached = details.get("cached_tokens") if isinstance(details, dict) else None
    if isinstance(cached, bool) or not isinstance(cached, int) or not 0 <= cached <= prompt:
        return {}
    return {"prompt_tokens_details": {"cached_tokens": cached}}


def usage(slug: str, raw: Any) -> dict[str, Any] | None:
    """A checked ``usage``: both counts as ints (and the cached share of the prompt
    where reported), or None when it cannot be used."""
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise _bad(slug, f"usage is a {type(raw).__name__}, not an object")
    prompt = _count(slug, raw, "prompt_tokens")
    completion = _count(slug, raw, "completion_tokens")
    if completion is None:
        return None
    if prompt is None:
        return {"completion_tokens": completion}
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        **_cached(raw, prompt),
    }


def timings_usage(slug: str, raw: Any) -> dict[str, Any] | None:
    """llama.cpp's per-token ``timings`` (``timings_per_token``) as a usage so far:
    the prompt is what it evaluated plus what it took from its cache. None where they
    are absent or not counts (they are optional facts; the final usage still comes)."""
    if not isinstance(raw, dict):
        return None
    try:
        evaluated = _count(slug, raw, "prompt_n")
        cached = _count(slug, raw, "cache_n")
        predicted = _count(slug, raw, "predicted_n")
    except UpstreamError:
        return None
    if evaluated is None or predicted is None:
        return None
    prompt = min(evaluated + (cached or 0), MAX_TOKENS)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": predicted,
        "total_tokens": prompt,
        "prompt_tokens_details": {"cached_tokens": min(cached or 0, prompt)},
    }


def _optional_str(slug: str, value: Any, where: str) -> None:
    if value is not None and not isinstance(value, str):
        raise _bad(slug, f"{where} is a {type(value).__name__}, not a string")


def _tool_calls(slug: str, calls: Any, where: str, *, streamed: bool) -> None:
    if calls is None:
        return
    if not isinstance(calls, list):
        raise _bad(slug, f"{where}.tool_calls is not an array")
    for i, call in enumerate(calls):
        at = f"{where}.tool_calls[{i}]"
        if not isinstance(call, dict):
            raise _bad(slug, f"{at} is not an object")
        if (
            streamed
            and "index" in call
            and (isinstance(call["index"], bool) or not isinstance(call["index"], int))
        ):
            raise _bad(slug, f"{at}.index is not an integer")
        _optional_str(slug, call.get("id"), f"{at}.id")
        fn = call.get("function")
        if fn is None and streamed:
            continue
        if not isinstance(fn, dict):
            raise _bad(slug, f"{at}.function is not an object")
        _optional_str(slug, fn.get("name"), f"{at}.function.name")
        _optional_str(slug, fn.get("arguments"), f"{at}.function.arguments")


def _choice_common(slug: str, choice: Any, where: str) -> dict[str, Any]:
    if not isinstance(choice, dict):
        raise _bad(slug, f"{where} is not an object")
    _optional_str(slug, choice.get("finish_reason"), f"{where}.finish_reason")
    lp = choice.get("logprobs")
    if lp is not None and not isinstance(lp, dict):
        raise _bad(slug, f"{where}.logprobs is not an object")
    if (
        isinstance(lp, dict)
        and lp.get("content") is not None
        and not isinstance(lp["content"], list)
    ):
        raise _bad(slug, f"{where}.logprobs.content is not an array")
    return choice


def chunk(slug: str, data: Any) -> dict[str, Any]:
    """A checked streamed ``chat.completion.chunk`` (or an error event, passed on as is
    for the caller to map). ``usage`` is replaced by its checked form."""
    if not isinstance(data, dict):
        raise _bad(slug, f"an event is a {type(data).__name__}, not an object")
    if "error" in data:
        out: dict[str, Any] = data
        return out
    raw: dict[str, Any] = data
    choices = data.get("choices", [])
    if not isinstance(choices, list):
        raise _bad(slug, "choices is not an array")
    for i, choice in enumerate(choices):
        _choice_common(slug, choice, f"choices[{i}]")
        delta = choice.get("delta")
        if delta is None:
            continue
        if not isinstance(delta, dict):
            raise _bad(slug, f"choices[{i}].delta is not an object")
        _optional_str(slug, delta.get("content"), f"choices[{i}].delta.content")
        _optional_str(slug, delta.get("role"), f"choices[{i}].delta.role")
        _tool_calls(slug, delta.get("tool_calls"), f"choices[{i}].delta", streamed=True)
    kept: dict[str, Any] = {
        k: v for k, v in raw.items() if k not in ("usage", "timings", WHOLE_ANSWER)
    }
    checked = usage(slug, raw["usage"]) if "usage" in raw else None
    if checked is None:
        # llama.cpp's counts so far, where asked for (``timings_per_token``).
        checked = timings_usage(slug, raw.get("timings"))
    if checked is not None:
        kept["usage"] = checked
    return kept


def plain_answer(slug: str, data: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """A checked plain ``chat.completion``: (its first choice, its message). Its
    ``usage`` is checked separately (``usage``)."""
    if not isinstance(data, dict):
        raise _bad(slug, f"the answer is a {type(data).__name__}, not an object")
    choices = data.get("choices")
    if not isinstance(choices, list) or not choices:
        raise _bad(slug, "choices is not a non-empty array")
    choice = _choice_common(slug, choices[0], "choices[0]")
    message = choice.get("message")
    if message is None:
        message = {}
    if not isinstance(message, dict):
        raise _bad(slug, "choices[0].message is not an object")
    _optional_str(slug, message.get("content"), "choices[0].message.content")
    _tool_calls(slug, message.get("tool_calls"), "choices[0].message", streamed=False)
    return choice, message


async def sse_json(
    resp: http1.Response, *, require_done: bool = False
) -> AsyncIterator[dict[str, Any]]:
    """The JSON events of an OpenAI-style SSE body, up to ``[DONE]``; with
    ``require_done``, a body that ends before it is a broken stream."""
    done = False
    # Read to the end of the body even after [DONE]: a response closed part-read
    # cannot go back to the pool, and every request would pay for a new connection.
    async for data in http1.sse_data(resp.iter_bytes()):
        if done:
            continue  # the tail after [DONE]
        if data == b"[DONE]":
            done = True
            continue
        try:
            yield json.loads(data)
        except ValueError as exc:
            raise upstream_failure(
                "The engine sent a malformed answer (an event that is not JSON).", data
            ) from exc
    if require_done and not done:
        raise StreamCut("The engine's stream ended before [DONE].")
