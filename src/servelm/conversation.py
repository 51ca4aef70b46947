"""Making a conversation fit a model's chat format before its template renders it.

Mixtral Instruct has no system role and demands strict user/assistant alternation
(its original template raises otherwise). Rather than reject what OpenAI clients
routinely send, we do what Mistral's own tokenizer library does: system text joins
the first user turn (tokenizer v1, Mixtral 8x7B) or the last one (v3, Mixtral 8x22B),
and consecutive turns of one role become one turn. Only a conversation that cannot be
made valid is a 400.
"""

from __future__ import annotations

from typing import Any

from servelm.catalog import ModelSpec
from servelm.errors import InvalidRequest

Message = dict[str, Any]


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
