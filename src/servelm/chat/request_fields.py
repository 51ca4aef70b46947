"""What servelm does with each field an OpenAI chat request may carry: the
conformance table, in one place.

Every field of OpenAI's ``CreateChatCompletionRequest`` is one of three kinds here:

- honoured: ``ChatRequest`` (``servelm.chat.protocol``) validates it and the engine acts
  on it (or, for ``functions`` / ``function_call``, it is translated to ``tools`` /
  ``tool_choice`` first);
- accepted and ignored: it changes nothing a local server could do differently
  (bookkeeping for OpenAI's own platform), so sending it is harmless;
- refused: servelm cannot do what it asks, and silently dropping it would change
  the answer, so it is a 400 naming the field.

Fields nobody lists (a client's own extensions) are ignored, as OpenAI clients send
many. The README's conformance table is generated from this module
(``conformance_table``) and a test keeps the two in sync.
"""

from __future__ import annotations

from typing import Any

# field → what servelm does with it (the README's wording).
HONOURED: dict[str, str] = {
    "model": "the model (OpenAI route; the Segmind route takes it from the path)",
    "messages": "roles system, developer, user, assistant, tool, and the legacy function "
    "(rendered as a tool result); text and image_url parts",
    "max_tokens": "output limit (held in credits up front)",
    "max_completion_tokens": "the same as max_tokens",
    "temperature": "sampling",
    "top_p": "sampling",
    "n": "1 only (above: 400)",
    "stop": "a string or up to 4; empty strings are dropped (they would stop at once)",
    "seed": "sampling",
    "presence_penalty": "sampling",
    "frequency_penalty": "sampling",
    "logit_bias": "sampling",
    "logprobs": "one entry per output token; alternatives only with top_logprobs",
    "top_logprobs": "alternatives per token, 0 to 20",
    "response_format": "json_object, or json_schema enforced by the engine's grammar",
    "tools": "models with a tool template (others: 400)",
    "tool_choice": "none, auto, required or a named function (llama.cpp gets required "
    "with only that tool); 400 without tools or for a function not in tools",
    "parallel_tool_calls": "passed to the engine; 400 without tools",
    "functions": "legacy: translated to tools (400 together with tools); the answer "
    'carries message.function_call and finish_reason "function_call", as OpenAI\'s did',
    "function_call": "legacy: translated to tool_choice",
    "stream": "SSE on both routes",
    "stream_options": "include_usage: a final usage-only chunk",
}

# Harmless to accept: they ask for nothing a local server would do differently.
IGNORED: dict[str, str] = {
    "user": "an end-user id for OpenAI's abuse monitoring",
    "safety_identifier": "the same, newer name",
    "metadata": "tags for OpenAI's stored completions",
    "store": "OpenAI's stored completions; servelm stores no completions",
    "service_tier": "OpenAI's processing tiers; servelm has one",
    "prompt_cache_key": "OpenAI's cache routing; llama.cpp reuses its prompt cache "
    "by itself (usage.prompt_tokens_details.cached_tokens)",
}

# Asked for behaviour servelm cannot give: refusing says so instead of answering
# something else.
REFUSED: dict[str, str] = {
    "audio": "no audio output",
    "modalities": 'text output only (modalities other than ["text"])',
    "prediction": "no predicted outputs",
    "web_search_options": "no web search",
    "reasoning_effort": "the models served here do not reason in OpenAI's sense",
    "verbosity": "the models served here have no verbosity control",
}


def check_and_translate(data: Any) -> Any:
    """Run on the raw request object before validation: refuse what cannot be
    honoured, and turn legacy ``functions`` / ``function_call`` into ``tools`` /
    ``tool_choice``. Raises ``FieldRefused`` naming the field."""
    if not isinstance(data, dict):
        return data
    for name, why in REFUSED.items():
        value = data.get(name)
        if value is None:
            continue
        if name == "modalities" and value == ["text"]:
            continue
        raise FieldRefused(name, f"'{name}' is not supported by this server: {why}")
    if "functions" in data or "function_call" in data:
        data = _translate_functions(data)
    if isinstance(data.get("messages"), list):
        data = {**data, "messages": _translate_function_messages(data["messages"])}
    return data


def _translate_function_messages(messages: list[Any]) -> list[Any]:
    """The legacy conversation as tools: an assistant's ``function_call`` becomes a
    one-call ``tool_calls``, and a ``role: "function"`` result a tool message answering
    the latest call of that name (legacy calls have no ids; these are made up)."""
    if not any(
        isinstance(m, dict) and (m.get("role") == "function" or "function_call" in m)
        for m in messages
    ):
        return messages
    out: list[Any] = []
    ids: dict[str, str] = {}  # function name → id of its latest call
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            out.append(m)
            continue
        m = dict(m)
        call = m.pop("function_call", None)
        if call is not None and m.get("role") == "assistant" and not m.get("tool_calls"):
            call_id = f"call_legacy_{i}"
            m["tool_calls"] = [{"id": call_id, "type": "function", "function": call}]
            if isinstance(call, dict) and isinstance(call.get("name"), str):
                ids[call["name"]] = call_id
        elif call is not None:
            raise FieldRefused(
                f"messages[{i}].function_call",
                "function_call is only allowed on an assistant message without tool_calls",
            )
        if m.get("role") == "function":
            name = m.get("name")
            if not isinstance(name, str) or not name:
                raise FieldRefused(f"messages[{i}].name", "a function message needs its name")
            m["role"] = "tool"
            m["tool_call_id"] = ids.get(name, f"call_legacy_{i}")
        out.append(m)
    return out


def _translate_functions(data: dict[str, Any]) -> dict[str, Any]:
    out = dict(data)
    functions = out.pop("functions", None)
    call = out.pop("function_call", None)
    if functions is not None:
        if out.get("tools") is not None:
            raise FieldRefused("functions", "send either tools or the legacy functions, not both")
        if not isinstance(functions, list):
            raise FieldRefused("functions", "functions must be an array of function objects")
        out["tools"] = [{"type": "function", "function": f} for f in functions]
    if call is not None:
        if out.get("tool_choice") is not None:
            raise FieldRefused(
                "function_call", "send either tool_choice or the legacy function_call, not both"
            )
        if isinstance(call, dict):
            out["tool_choice"] = {"type": "function", "function": call}
        else:
            out["tool_choice"] = call
    return out


def check_tool_choice(
    tool_choice: Any, tool_names: list[str] | None, parallel_tool_calls: bool | None = None
) -> None:
    """OpenAI's rules: a tool_choice other than "none" (and parallel_tool_calls) needs
    tools, and a named function must be one of them."""
    if parallel_tool_calls is not None and not tool_names:
        raise FieldRefused(
            "parallel_tool_calls", "parallel_tool_calls is only allowed when tools are given"
        )
    if tool_choice is None:
        return
    if not tool_names:
        if tool_choice == "none":
            return
        raise FieldRefused("tool_choice", "tool_choice is only allowed when tools are given")
    if isinstance(tool_choice, dict):
        fn = tool_choice.get("function")
        name = fn.get("name") if isinstance(fn, dict) else None
        if tool_choice.get("type") != "function" or not isinstance(name, str):
            raise FieldRefused(
                "tool_choice",
                'a named tool_choice is {"type": "function", "function": {"name": ...}}',
            )
        if name not in tool_names:
            raise FieldRefused(
                "tool_choice", f"tool_choice names function '{name}', which is not in tools"
            )


class FieldRefused(ValueError):
    """A field servelm will not take; knows the field to blame (see protocol's
    error mapping)."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param


def conformance_table() -> str:
    """The README's table, one row per field."""
    rows = ["| field | servelm |", "|---|---|"]
    rows += [f"| `{k}` | honoured: {v} |" for k, v in HONOURED.items()]
    rows += [f"| `{k}` | accepted and ignored: {v} |" for k, v in IGNORED.items()]
    rows += [f"| `{k}` | 400: {v} |" for k, v in REFUSED.items()]
    return "\n".join(rows)
