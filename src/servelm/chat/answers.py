"""Shaping the engine's chunks into what the client gets: one ``chat.completion``
for a plain request, or ``chat.completion.chunk`` events in OpenAI's order for a
stream. Both routes answer in these OpenAI shapes; only errors differ by dialect."""

from __future__ import annotations

import functools
import hashlib
from collections.abc import AsyncGenerator, Callable
from typing import TYPE_CHECKING, Any

from servelm import __version__
from servelm.chat.protocol import chunk_body, completion_body

if TYPE_CHECKING:
    from servelm.catalog.specs import ModelSpec
    from servelm.chat.calls import Call

UsageOf = Callable[["Call"], dict[str, Any]]


class Completion:
    """One ``chat.completion`` built from the engine's chunks as they pass."""

    def __init__(self, call: Call) -> None:
        self.call = call
        self.content: list[str] = []
        self.tool_calls: dict[int, dict[str, Any]] = {}
        self.logprobs: list[Any] = []

    def add(self, chunk: dict[str, Any]) -> None:
        for choice in chunk.get("choices") or ():
            delta = choice.get("delta") or {}
            if delta.get("content"):
                self.content.append(delta["content"])
            for tc in delta.get("tool_calls") or ():
                _merge_tool_call(self.tool_calls, tc)
            lp = shape_logprobs(self.call, choice.get("logprobs"))
            if lp and lp.get("content"):
                self.logprobs.extend(lp["content"])

    def body(self, usage: dict[str, Any]) -> dict[str, Any]:
        call, tool_calls = self.call, self.tool_calls
        message: dict[str, Any] = {
            "role": "assistant",
            "content": "".join(self.content) if self.content or not tool_calls else None,
            "refusal": None,
        }
        finish_reason = call.finish_reason or "stop"
        if tool_calls and call.request.legacy_functions:
            # The legacy ``functions`` answer: one function_call, no ids.
            message["function_call"] = tool_calls[min(tool_calls)]["function"]
            finish_reason = _legacy_finish(finish_reason)
        elif tool_calls:
            message["tool_calls"] = [tool_calls[i] for i in sorted(tool_calls)]
        body = completion_body(
            completion_id=call.completion_id,
            model=call.spec.slug,
            created=call.created,
            message=message,
            finish_reason=finish_reason,
            usage=usage,
            logprobs=(
                {"content": self.logprobs, "refusal": None} if call.request.logprobs else None
            ),
        )
        body["system_fingerprint"] = system_fingerprint(call.spec)
        return body


async def assemble_completion(
    call: Call, chunks: AsyncGenerator[dict[str, Any]], usage: UsageOf
) -> dict[str, Any]:
    """Run to the end and assemble one ``chat.completion``; ``usage`` is read after
    the chunks are exhausted, i.e. after settlement."""
    completion = Completion(call)
    try:
        async for chunk in chunks:
            completion.add(chunk)
    finally:
        # Settlement runs in the generator's own finally: close it now, not at GC.
        await chunks.aclose()
    return completion.body(usage(call))


async def reorder_stream(
    call: Call, chunks: AsyncGenerator[dict[str, Any]], usage: UsageOf
) -> AsyncGenerator[dict[str, Any]]:
    """``chat.completion.chunk`` dicts in OpenAI's order: role first, content, the
    finish chunk, then (with ``include_usage``) a usage-only chunk.

    The finish chunk is held back until the engine is done and the request is
    settled, so the last chunk the client sees carries the exact usage, cost and
    remaining credits either way.
    """
    include_usage = call.request.include_usage
    fingerprint = system_fingerprint(call.spec)
    legacy = call.request.legacy_functions

    def chunk(**kw: Any) -> dict[str, Any]:
        body = chunk_body(
            completion_id=call.completion_id, model=call.spec.slug, created=call.created, **kw
        )
        if not include_usage:
            body.pop("usage")
        body["system_fingerprint"] = fingerprint
        return body

    sent_role = False
    finish: dict[str, Any] | None = None
    try:
        async for raw in chunks:
            for choice in raw.get("choices") or ():
                delta = dict(choice.get("delta") or {})
                delta.pop("role", None)
                if legacy and "tool_calls" in delta:
                    delta = _legacy_delta(delta)
                if not sent_role:
                    if delta.get("content") is None:
                        delta.pop("content", None)
                    yield chunk(delta={"role": "assistant", "content": "", **delta})
                    sent_role = True
                    continue
                reason = choice.get("finish_reason")
                if reason is not None and legacy:
                    reason = _legacy_finish(reason)
                if reason is not None:
                    lp = shape_logprobs(call, choice.get("logprobs"))
                    finish = chunk(delta=delta, finish_reason=reason, logprobs=lp)
                elif delta:
                    yield chunk(delta=delta, logprobs=shape_logprobs(call, choice.get("logprobs")))
    finally:
        # Settlement runs in the generator's own finally: close it now, not at GC.
        await chunks.aclose()
    if finish is None:
        reason = call.finish_reason or "stop"
        finish = chunk(delta={}, finish_reason=_legacy_finish(reason) if legacy else reason)
    if include_usage:
        yield finish
        yield {**chunk(usage_only=True), "usage": usage(call)}
    else:
        yield {**finish, "usage": usage(call)}


def shape_logprobs(call: Call, lp: dict[str, Any] | None) -> dict[str, Any] | None:
    """The engine was asked for at least one alternative per token (see
    ``conversation.engine_body``); the client gets as many as it asked for, none
    without ``top_logprobs``."""
    if not lp or not lp.get("content"):
        return lp
    keep = call.request.top_logprobs or 0
    content = [{**e, "top_logprobs": (e.get("top_logprobs") or [])[:keep]} for e in lp["content"]]
    return {**lp, "content": content}


@functools.lru_cache(maxsize=256)
def system_fingerprint(spec: ModelSpec) -> str:
    """OpenAI's backend-configuration fingerprint: it changes when servelm's version or
    anything in the model's entry (weights, template, window) changes, so a client
    can tell that the same seed may no longer give the same answer."""
    config = spec.model_dump_json(exclude={"api_key", "description"})
    return "fp_" + hashlib.sha256(f"{__version__}|{config}".encode()).hexdigest()[:10]


def _legacy_finish(reason: str) -> str:
    return "function_call" if reason == "tool_calls" else reason


def _legacy_delta(delta: dict[str, Any]) -> dict[str, Any]:
    """A streamed tool call as the legacy ``function_call`` delta (the first call
    only: legacy answers carry one)."""
    out = {k: v for k, v in delta.items() if k != "tool_calls"}
    for tc in delta["tool_calls"] or ():
        if int(tc.get("index", 0)) == 0:
            fn = tc.get("function") or {}
            out["function_call"] = {k: fn[k] for k in ("name", "arguments") if k in fn}
    return out


def _merge_tool_call(acc: dict[int, dict[str, Any]], delta: dict[str, Any]) -> None:
    slot = acc.setdefault(
        int(delta.get("index", 0)),
        {"id": "", "type": "function", "function": {"name": "", "arguments": ""}},
    )
    if delta.get("id"):
        slot["id"] = delta["id"]
    fn = delta.get("function") or {}
    if fn.get("name"):
        slot["function"]["name"] += fn["name"]
    if fn.get("arguments"):
        slot["function"]["arguments"] += fn["arguments"]
