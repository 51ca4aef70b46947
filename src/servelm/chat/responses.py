"""OpenAI's Responses API (``POST /v1/responses``) as a translation of chat.

A Responses request becomes the ``ChatRequest`` it means (``parse_responses``), goes
the same walk with the same money rules (``serving.ChatService``), and the chat
answer is reshaped by ``servelm.chat.responses_answers``. Stateless: nothing is stored, so what
needs stored state (``previous_response_id``, ``conversation``, ``background``) is
a 400 saying so, and every response says ``store: false``.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from servelm.chat.protocol import ChatRequest, parse_chat_request
from servelm.errors import InvalidRequest

_WIRE = ConfigDict(extra="ignore", strict=True, frozen=True)


class InputText(BaseModel):
    model_config = _WIRE
    type: Literal["input_text", "output_text", "text"]
    text: str


class InputImage(BaseModel):
    model_config = _WIRE
    type: Literal["input_image"]
    image_url: Annotated[str, Field(min_length=1)] | None = None
    file_id: str | None = None
    detail: Literal["auto", "low", "high"] = "auto"


class Refusal(BaseModel):
    model_config = _WIRE
    type: Literal["refusal"]
    refusal: str


InputPart = Annotated[InputText | InputImage | Refusal, Field(discriminator="type")]


class MessageItem(BaseModel):
    model_config = _WIRE
    type: Literal["message"] = "message"
    role: Literal["user", "assistant", "system", "developer"]
    content: str | list[InputPart]


class FunctionCallItem(BaseModel):
    model_config = _WIRE
    type: Literal["function_call"]
    call_id: Annotated[str, Field(min_length=1)]
    name: str
    arguments: str


class FunctionCallOutputItem(BaseModel):
    model_config = _WIRE
    type: Literal["function_call_output"]
    call_id: Annotated[str, Field(min_length=1)]
    output: str | list[InputText]


class FunctionTool(BaseModel):
    model_config = _WIRE
    type: Literal["function"]
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class TextFormat(BaseModel):
    model_config = _WIRE
    type: Literal["text", "json_object", "json_schema"]
    name: str | None = None
    description: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class TextOptions(BaseModel):
    model_config = _WIRE
    format: TextFormat | None = None


class ResponsesRequest(BaseModel):
    """The body of ``POST /v1/responses``: the fields servelm honours."""

    model_config = _WIRE

    model: Annotated[str, Field(min_length=1)]
    input: str | list[dict[str, Any]]
    instructions: str | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: Literal["none", "auto", "required"] | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    text: TextOptions | None = None
    max_output_tokens: Annotated[int, Field(ge=1)] | None = None
    temperature: float | None = None
    top_p: float | None = None
    stream: bool = False
    store: bool | None = None
    metadata: dict[str, str] | None = None
    # Extensions, as on the chat route (not OpenAI's Responses fields): sampling
    # controls for reproducible answers and tests.
    seed: int | None = None
    logit_bias: dict[str, float] | None = None


# Fields that ask for state or features a stateless server does not have: a 400 that
# says so, instead of an answer that silently ignores them.
_REFUSED: dict[str, str] = {
    "previous_response_id": "this server stores no responses; send the whole "
    "conversation in `input` (store: false semantics)",
    "conversation": "this server stores no conversations; send the whole conversation in `input`",
    "background": "background responses need stored state, which this server does not keep",
    "prompt": "stored prompt templates are not supported",
}


def parse_responses(raw: bytes) -> tuple[ResponsesRequest, ChatRequest]:
    """The Responses request and the chat request it means; failures are a 400
    naming the Responses field."""
    try:
        data = json.loads(raw)
    except ValueError as exc:
        raise InvalidRequest(f"The request body is not valid JSON: {exc}.") from None
    if not isinstance(data, dict):
        raise InvalidRequest("The request body must be a JSON object.")
    for name, why in _REFUSED.items():
        if data.get(name) not in (None, False):
            raise InvalidRequest(f"'{name}' is not supported: {why}.", param=name)
    reasoning = data.get("reasoning")
    if isinstance(reasoning, dict) and any(v is not None for v in reasoning.values()):
        raise InvalidRequest(
            "'reasoning' is not supported: the models served here do not reason in OpenAI's sense.",
            param="reasoning",
        )
    try:
        request = ResponsesRequest.model_validate(data)
    except ValidationError as exc:
        err = exc.errors(include_url=False)[0]
        param = ".".join(str(p) for p in err["loc"]) or None
        raise InvalidRequest(f"Invalid value for '{param}': {err['msg']}.", param=param) from None
    chat = _chat_body(request)
    with responses_params():
        return request, parse_chat_request(json.dumps(chat).encode())


@contextlib.contextmanager
def responses_params() -> Iterator[None]:
    """A 400 from the walk's later steps (images a model cannot see, an output limit
    past the model's) names the field as the Responses request calls it."""
    try:
        yield
    except InvalidRequest as exc:
        exc.param = _responses_param(exc.param)
        raise


def _responses_param(param: str | None) -> str | None:
    """A chat field's name as the Responses request calls it."""
    if param is None:
        return None
    for chat, responses in (
        ("messages", "input"),
        ("max_completion_tokens", "max_output_tokens"),
        ("max_tokens", "max_output_tokens"),
        ("response_format.json_schema", "text.format"),
        ("response_format", "text.format"),
    ):
        if param.startswith(chat):
            return responses if chat == "messages" else responses + param[len(chat) :]
    return param.replace(".function.", ".")


def _chat_body(r: ResponsesRequest) -> dict[str, Any]:
    body: dict[str, Any] = {"model": r.model, "messages": _messages(r), "stream": r.stream}
    if r.max_output_tokens is not None:
        body["max_completion_tokens"] = r.max_output_tokens
    for field in ("temperature", "top_p", "parallel_tool_calls", "seed", "logit_bias"):
        if getattr(r, field) is not None:
            body[field] = getattr(r, field)
    if r.tools:
        body["tools"] = [_tool(t, i) for i, t in enumerate(r.tools)]
    if isinstance(r.tool_choice, dict):
        name = r.tool_choice.get("name")
        if r.tool_choice.get("type") != "function" or not isinstance(name, str):
            raise InvalidRequest(
                'a named tool_choice is {"type": "function", "name": ...}', param="tool_choice"
            )
        body["tool_choice"] = {"type": "function", "function": {"name": name}}
    elif r.tool_choice is not None:
        body["tool_choice"] = r.tool_choice
    fmt = r.text.format if r.text is not None else None
    if fmt is not None and fmt.type == "json_schema":
        schema: dict[str, Any] = {"name": fmt.name or "response", "schema": fmt.schema_ or {}}
        if fmt.strict is not None:
            schema["strict"] = fmt.strict
        if fmt.description is not None:
            schema["description"] = fmt.description
        body["response_format"] = {"type": "json_schema", "json_schema": schema}
    elif fmt is not None:
        body["response_format"] = {"type": fmt.type}
    return body


def _tool(tool: dict[str, Any], i: int) -> dict[str, Any]:
    if tool.get("type") != "function":
        raise InvalidRequest(
            f"Tools of type '{tool.get('type')}' are not supported; only function tools.",
            param=f"tools[{i}].type",
        )
    try:
        t = FunctionTool.model_validate(tool)
    except ValidationError as exc:
        err = exc.errors(include_url=False)[0]
        where = ".".join(str(p) for p in err["loc"])
        raise InvalidRequest(f"Invalid tool: {where}: {err['msg']}.", param=f"tools[{i}]") from None
    fn = t.model_dump(exclude={"type"}, exclude_none=True)
    return {"type": "function", "function": fn}


def _messages(r: ResponsesRequest) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    if r.instructions:
        out.append({"role": "system", "content": r.instructions})
    if isinstance(r.input, str):
        out.append({"role": "user", "content": r.input})
        return out
    for i, raw in enumerate(r.input):
        kind = raw.get("type", "message") if isinstance(raw, dict) else None
        try:
            if kind == "message":
                out.append(_message(MessageItem.model_validate(raw), i))
            elif kind == "function_call":
                call = FunctionCallItem.model_validate(raw)
                tool_call = {
                    "id": call.call_id,
                    "type": "function",
                    "function": {"name": call.name, "arguments": call.arguments},
                }
                last = out[-1] if out else None
                if last is not None and last["role"] == "assistant" and "tool_calls" in last:
                    last["tool_calls"].append(tool_call)
                else:
                    out.append({"role": "assistant", "content": None, "tool_calls": [tool_call]})
            elif kind == "function_call_output":
                result = FunctionCallOutputItem.model_validate(raw)
                text = (
                    result.output
                    if isinstance(result.output, str)
                    else "".join(p.text for p in result.output)
                )
                out.append({"role": "tool", "tool_call_id": result.call_id, "content": text})
            elif kind in ("item_reference", "reasoning"):
                raise InvalidRequest(
                    f"Input items of type '{kind}' refer to stored state, which this "
                    "server does not keep; send the conversation itself.",
                    param=f"input[{i}]",
                )
            else:
                raise InvalidRequest(
                    f"Input items of type '{kind}' are not supported.", param=f"input[{i}].type"
                )
        except ValidationError as exc:
            err = exc.errors(include_url=False)[0]
            where = ".".join(str(p) for p in (i, *err["loc"]))
            raise InvalidRequest(
                f"Invalid value for 'input[{where}]': {err['msg']}.", param=f"input[{i}]"
            ) from None
    return out


def _message(m: MessageItem, i: int) -> dict[str, Any]:
    if isinstance(m.content, str):
        return {"role": m.role, "content": m.content}
    parts: list[dict[str, Any]] = []
    for j, p in enumerate(m.content):
        if isinstance(p, InputText):
            parts.append({"type": "text", "text": p.text})
        elif isinstance(p, Refusal):
            parts.append({"type": "text", "text": p.refusal})
        elif p.image_url is None:
            raise InvalidRequest(
                "Images by file_id need stored files, which this server does not keep; "
                "send image_url (a data: URI or an http(s) URL).",
                param=f"input[{i}].content[{j}]",
            )
        else:
            image = {"url": p.image_url, "detail": p.detail}
            parts.append({"type": "image_url", "image_url": image})
    return {"role": m.role, "content": parts}
