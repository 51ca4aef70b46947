"""The conversation an engine receives: the client's request as an OpenAI-shaped body
(``engine_body``), an upper bound on its tokens, and fitting it to a model's chat
format before its template renders it (``fit_conversation``).

Mixtral Instruct has no system role and demands strict user/assistant alternation
(its original template raises otherwise). Rather than reject what OpenAI clients
routinely send, we do what Mistral's own tokenizer library does: system text joins
the first user turn (tokenizer v1, Mixtral 8x7B) or the last one (v3, Mixtral 8x22B),
and consecutive turns of one role become one turn. Only a conversation that cannot be
made valid is a 400.
"""

from __future__ import annotations

import json
from typing import Any

from servelm.catalog.specs import ModelSpec
from servelm.chat.protocol import ChatRequest
from servelm.errors import InvalidRequest

Message = dict[str, Any]

# Sent to the engine only when the client set them.
_PASSTHROUGH = (
    "temperature",
    "top_p",
    "seed",
    "presence_penalty",
    "frequency_penalty",
    "logit_bias",
    "tool_choice",
    "parallel_tool_calls",
    "ignore_eos",
    "min_tokens",
)


def engine_body(request: ChatRequest) -> dict[str, Any]:
    """The OpenAI-shaped body an engine receives: only what the client set."""
    body: dict[str, Any] = {"messages": [_engine_message(m) for m in request.messages]}
    for name in _PASSTHROUGH:
        value = getattr(request, name)
        if value is not None:
            body[name] = value
    stop = _stop_words(request.stop)
    if stop:
        body["stop"] = stop
    if request.logprobs:
        # llama.cpp reads logprobs alone as 20 alternatives per token and
        # top_logprobs 0 as no entries at all; OpenAI means one entry per token with
        # top_logprobs alternatives (none by default). Ask for at least one and let
        # the answer shaping cut the alternatives to what was asked.
        body["logprobs"] = True
        body["top_logprobs"] = max(request.top_logprobs or 0, 1)
    if request.response_format is not None and request.response_format.type != "text":
        body["response_format"] = request.response_format.model_dump(
            by_alias=True, exclude_none=True
        )
    if request.tools:
        body["tools"] = [t.model_dump(exclude_none=True) for t in request.tools]
        if request.legacy_functions:
            # A legacy answer carries one function_call.
            body["parallel_tool_calls"] = False
    return body


def _stop_words(stop: str | list[str] | None) -> list[str]:
    """Stop strings without empty ones: llama.cpp finds "" at the start of the first
    token, ends there and returns nothing while charging that token; OpenAI's
    answer to "" is the text as if no stop were given."""
    if stop is None:
        return []
    words = [stop] if isinstance(stop, str) else stop
    return [w for w in words if w]


# Byte-level BPE never spends less than one byte of text per token, so bytes bound the
# text's tokens; the per-message and fixed allowances cover template tokens, and each
# image is budgeted at what large vision encoders spend on one.
_PER_MESSAGE_TOKENS = 16
_TEMPLATE_TOKENS = 256
_PER_IMAGE_TOKENS = 4096


def plain_text(body: dict[str, Any]) -> bool:
    """Whether ``estimate_prompt_tokens`` bounds this body's prompt from above for any
    template: text messages and nothing else. Templates render tools, tool calls and
    tool results through JSON (``tojson`` writes a control byte as six characters)
    and may print names and call ids the bound does not count."""
    if body.get("tools"):
        return False
    return all(
        m.keys() <= {"role", "content"}
        and m.get("role") in ("system", "user", "assistant")
        and isinstance(m.get("content"), str)
        for m in body["messages"]
    )


def estimate_prompt_tokens(body: dict[str, Any]) -> int:
    """An upper bound on the prompt's tokens, for engines that cannot count early.

    Templates may render a tool result, tool calls and tools through JSON: those are
    sized as JSON with every non-ASCII character escaped (the longest form of each)
    and, for tools, indented as Llama 3.1's template prints them. Names and call ids
    count too."""
    total = _TEMPLATE_TOKENS
    for m in body["messages"]:
        total += _PER_MESSAGE_TOKENS
        content = m.get("content")
        if isinstance(content, str):
            total += len(json.dumps(content)) if m.get("role") == "tool" else len(content.encode())
        elif isinstance(content, list):
            for part in content:
                if part.get("type") == "text":
                    total += len(json.dumps(part["text"]))
                else:
                    total += _PER_IMAGE_TOKENS
        for field in ("name", "tool_call_id"):
            if isinstance(m.get(field), str):
                total += len(m[field].encode())
        if m.get("tool_calls"):
            total += len(json.dumps(m["tool_calls"], indent=4))
    if body.get("tools"):
        total += len(json.dumps(body["tools"], indent=4))
    return total


def _engine_message(m: Any) -> dict[str, Any]:
    # Chat templates know "system", not OpenAI's newer "developer" role.
    out: dict[str, Any] = {"role": "system" if m.role == "developer" else m.role}
    if isinstance(m.content, list) and not m.images():
        # Many templates only render string content; a text-only array is one string.
        out["content"] = m.text()
    elif isinstance(m.content, list):
        out["content"] = [p.model_dump(exclude_none=True) for p in m.content]
    elif m.content is not None:
        out["content"] = m.content
    for name in ("name", "tool_call_id"):
        if getattr(m, name) is not None:
            out[name] = getattr(m, name)
    if m.tool_calls:
        out["tool_calls"] = [tc.model_dump() for tc in m.tool_calls]
    return out


def fit_conversation(messages: list[Message], spec: ModelSpec) -> list[Message]:
    out = [dict(m) for m in messages]
    if not spec.tools and any(m["role"] == "tool" for m in out):
        raise InvalidRequest(
            f"Model '{spec.slug}' does not support tools, so it cannot take tool messages.",
            param="messages",
        )
    if spec.system_role != "native":
        out = _merge_system(out, spec)
    if spec.merge_consecutive:
        out = _merge_consecutive(out)
        if out and out[0]["role"] != "user":
            raise InvalidRequest(
                f"Model '{spec.slug}' needs the conversation to start with a user message.",
                param="messages",
            )
    return out


def _merge_system(messages: list[Message], spec: ModelSpec) -> list[Message]:
    system = [m for m in messages if m["role"] == "system"]
    rest = [m for m in messages if m["role"] != "system"]
    if not system:
        return rest
    users = [i for i, m in enumerate(rest) if m["role"] == "user"]
    if not users:
        raise InvalidRequest(
            f"Model '{spec.slug}' has no system role, so a system message needs a user "
            "message to join; add one.",
            param="messages",
        )
    target = users[0] if spec.system_role == "first_user" else users[-1]
    text = "\n\n".join(_text(m) for m in system)
    rest[target] = {**rest[target], "content": _prepend(text, rest[target]["content"])}
    return rest


def _merge_consecutive(messages: list[Message]) -> list[Message]:
    out: list[Message] = []
    for m in messages:
        if out and out[-1]["role"] == m["role"] and m["role"] in ("user", "assistant"):
            prev = out[-1]
            out[-1] = {**prev, "content": _join(prev.get("content"), m.get("content"))}
        else:
            out.append(m)
    return out


def _text(m: Message) -> str:
    content = m.get("content")
    if isinstance(content, str):
        return content
    return "".join(p.get("text", "") for p in content or () if p.get("type") == "text")


def _prepend(text: str, content: Any) -> Any:
    if isinstance(content, list):
        return [{"type": "text", "text": text + "\n\n"}, *content]
    return f"{text}\n\n{content}"


def _join(a: Any, b: Any) -> Any:
    if isinstance(a, list) or isinstance(b, list):
        parts_a = a if isinstance(a, list) else [{"type": "text", "text": a or ""}]
        parts_b = b if isinstance(b, list) else [{"type": "text", "text": b or ""}]
        return [*parts_a, {"type": "text", "text": "\n\n"}, *parts_b]
    return f"{a or ''}\n\n{b or ''}"
