"""Wire models: the chat request both dialects accept, and the response shapes.

Requests are validated with pydantic straight from the raw body bytes (strict JSON
types: ``"temperature": "hot"`` is a 400, not a coercion). Responses are plain dicts
built by the functions at the bottom: they are on the hot path and their shape is
fixed by OpenAI's spec, so a model class per chunk would only cost time.
"""

from __future__ import annotations

import json
import time
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    ValidatorFunctionWrapHandler,
    field_validator,
    model_validator,
)

from servelm.chat.request_fields import FieldRefused, check_and_translate, check_tool_choice
from servelm.errors import InvalidRequest

# Fields nobody lists are ignored: clients send extensions of their own. OpenAI's
# fields servelm cannot honour are refused and the harmless ones listed, in
# servelm.chat.request_fields (the README's conformance table).
_WIRE = ConfigDict(extra="ignore", strict=True, frozen=True)


class TextPart(BaseModel):
    model_config = _WIRE
    type: Literal["text"]
    text: str


class ImageURL(BaseModel):
    model_config = _WIRE
    url: Annotated[str, Field(min_length=1)]
    detail: Literal["auto", "low", "high"] = "auto"


class ImagePart(BaseModel):
    model_config = _WIRE
    type: Literal["image_url"]
    image_url: ImageURL


ContentPart = Annotated[TextPart | ImagePart, Field(discriminator="type")]


class FunctionCall(BaseModel):
    model_config = _WIRE
    name: str
    arguments: str


class ToolCall(BaseModel):
    model_config = _WIRE
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class Message(BaseModel):
    model_config = _WIRE
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None

    @model_validator(mode="after")
    def _check_role_rules(self) -> Message:
        if self.role == "assistant":
            if self.content is None and not self.tool_calls:
                raise ValueError("an assistant message needs content or tool_calls")
        elif self.content is None:
            raise ValueError(f"a {self.role} message needs content")
        if self.role == "tool" and not self.tool_call_id:
            raise ValueError("a tool message needs tool_call_id")
        if isinstance(self.content, list):
            if not self.content:
                raise ValueError("content must not be an empty array")
            if self.role != "user" and any(p.type != "text" for p in self.content):
                raise ValueError(f"a {self.role} message may only contain text parts")
        return self

    def text(self) -> str:
        """The text of the message, image parts left out."""
        if isinstance(self.content, str):
            return self.content
        if self.content is None:
            return ""
        return "".join(p.text for p in self.content if isinstance(p, TextPart))

    def images(self) -> list[ImagePart]:
        if isinstance(self.content, list):
            return [p for p in self.content if isinstance(p, ImagePart)]
        return []


class JSONSchemaFormat(BaseModel):
    model_config = _WIRE
    name: Annotated[str, Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")]
    description: str | None = None
    # "schema" shadows a BaseModel attribute, hence the alias.
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    model_config = _WIRE
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_present(self) -> ResponseFormat:
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("response_format of type json_schema needs a json_schema object")
        return self


class FunctionDef(BaseModel):
    model_config = _WIRE
    name: Annotated[str, Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")]
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(BaseModel):
    model_config = _WIRE
    type: Literal["function"]
    function: FunctionDef


class StreamOptions(BaseModel):
    model_config = _WIRE
    include_usage: bool = False


Probability = Annotated[float, Field(ge=0.0, le=1.0)]
Penalty = Annotated[float, Field(ge=-2.0, le=2.0)]


class ChatRequest(BaseModel):
    """The body of ``POST /v1/chat/completions`` and ``POST /v1/{model}``."""

    model_config = _WIRE

    model: str | None = None
    messages: Annotated[list[Message], Field(min_length=1)]
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    temperature: Annotated[float, Field(ge=0.0, le=2.0)] | None = None
    top_p: Probability | None = None
    n: Annotated[int, Field(ge=1, le=128)] | None = None
    stop: str | Annotated[list[str], Field(min_length=1, max_length=4)] | None = None
    seed: int | None = None
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    logit_bias: dict[str, Annotated[float, Field(ge=-100, le=100)]] | None = None
    logprobs: bool | None = None
    top_logprobs: Annotated[int, Field(ge=0, le=20)] | None = None
    response_format: ResponseFormat | None = None
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    # llama.cpp / vLLM extensions, used by benchmarks to make every contender emit the
    # same number of tokens.
    ignore_eos: bool | None = None
    min_tokens: Annotated[int, Field(ge=0)] | None = None

    # The request used the legacy ``functions``: its answer carries ``function_call``.
    _legacy_functions: bool = PrivateAttr(default=False)

    @model_validator(mode="wrap")
    @classmethod
    def _fields_rules(cls, data: Any, handler: ValidatorFunctionWrapHandler) -> ChatRequest:
        # Hook (request_fields): refused fields are a 400, legacy functions become tools.
        request: ChatRequest = handler(check_and_translate(data))
        if isinstance(data, dict) and data.get("functions") is not None:
            request._legacy_functions = True
        return request

    @field_validator("n")
    @classmethod
    def _only_one_choice(cls, v: int | None) -> int | None:
        if v is not None and v > 1:
            raise ValueError("only n=1 is supported")
        return v

    @model_validator(mode="after")
    def _cross_field_rules(self) -> ChatRequest:
        if self.top_logprobs is not None and not self.logprobs:
            raise _FieldError("top_logprobs", "top_logprobs requires logprobs to be true")
        if self.stream_options is not None and not self.stream:
            raise _FieldError(
                "stream_options", "stream_options is only allowed when stream is true"
            )
        if (
            self.max_tokens is not None
            and self.max_completion_tokens is not None
            and self.max_tokens != self.max_completion_tokens
        ):
            raise _FieldError(
                "max_completion_tokens",
                "max_tokens and max_completion_tokens disagree; send one of them",
            )
        # Hook (request_fields): tool_choice needs tools and names one of them.
        check_tool_choice(
            self.tool_choice,
            [t.function.name for t in self.tools or ()],
            self.parallel_tool_calls,
        )
        return self

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    @property
    def legacy_functions(self) -> bool:
        return self._legacy_functions

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def has_images(self) -> bool:
        return any(m.images() for m in self.messages)


class _FieldError(ValueError):
    """A cross-field rule failure that knows which field to blame."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param


def parse_chat_request(body: bytes) -> ChatRequest:
    """Validate a raw body; every failure is an InvalidRequest naming the field."""
    try:
        request = ChatRequest.model_validate_json(body)
    except ValidationError as exc:
        raise _to_invalid_request(exc, body) from None
    return request


def _to_invalid_request(exc: ValidationError, body: bytes = b"") -> InvalidRequest:
    errors = exc.errors(include_url=False)
    first = errors[0]
    if first["type"] == "json_invalid":
        return lone_surrogate(body) or InvalidRequest(
            f"The request body is not valid JSON: {first['msg']}."
        )
    if first["type"] == "model_type" and not first["loc"]:
        return InvalidRequest("The request body must be a JSON object.")
    # A value that fails every branch of a union yields one error per branch; the
    # deepest one is the most specific (e.g. an unknown content block type rather
    # than "content should be a string").
    # On a tie, a range or length error says more than "wrong type".
    err = max(errors, key=lambda e: (len(e["loc"]), not e["type"].endswith("_type")))
    ctx = err.get("ctx") or {}
    origin = ctx.get("error")
    param = (
        origin.param
        if isinstance(origin, _FieldError | FieldRefused)
        else _param_from_loc(err["loc"])
    )
    msg = str(origin) if isinstance(origin, ValueError) else err["msg"]
    msg = msg.removeprefix("Value error, ")
    siblings = [e for e in errors if _param_from_loc(e["loc"]) == param]
    if len(siblings) > 1 and all(e["type"].endswith("_type") for e in siblings):
        wanted = " or ".join(sorted({e["type"].removesuffix("_type") for e in siblings}))
        msg = f"expected a value of type {wanted}"
    if err["type"] == "missing":
        return InvalidRequest(f"Missing required parameter: '{param}'.", param=param)
    if param:
        return InvalidRequest(f"Invalid value for '{param}': {msg}.", param=param)
    return InvalidRequest(f"Invalid request: {msg}.")


def lone_surrogate(body: bytes) -> InvalidRequest | None:
    """A string escaping half a UTF-16 pair (``"\\ud83d"`` alone) is JSON no strict
    parser takes, and pydantic says only "unexpected end of hex escape". Python's own
    parser takes it: find the field that holds it and say what is wrong there."""
    try:
        data = json.loads(body)
    except ValueError:
        return None
    stack: list[tuple[str, Any]] = [("", data)]
    while stack:
        path, value = stack.pop()
        if isinstance(value, dict):
            for key, item in reversed(list(value.items())):
                stack.append((f"{path}.{key}" if path else str(key), item))
        elif isinstance(value, list):
            for i, item in reversed(list(enumerate(value))):
                stack.append((f"{path}[{i}]", item))
        elif isinstance(value, str):
            half = next((c for c in value if "\ud800" <= c <= "\udfff"), None)
            if half is not None:
                return InvalidRequest(
                    f"Invalid value for '{path or 'body'}': the text holds \\u{ord(half):04x}, "
                    "half of a UTF-16 surrogate pair with no other half; escape both halves "
                    "of the pair (e.g. \\ud83d\\ude00) or send the character itself.",
                    param=path or None,
                )
    return None


# Pydantic puts union branches into error locations (``('stop', 'str')``,
# ``('content', 'list[...]', 0, 'text', 'text')``); they are not part of the field path.
_BRANCH_NAMES = {"str", "int", "float", "bool", "dict", "list", "none"}


def _param_from_loc(loc: tuple[str | int, ...]) -> str | None:
    out = ""
    last: str | int | None = None
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif "[" in part or part in _BRANCH_NAMES or part == last:
            continue
        else:
            out += f".{part}" if out else part
        last = part
    return out or None


# ---------------------------------------------------------------------------------
# Responses
# ---------------------------------------------------------------------------------


def completion_body(
    *,
    completion_id: str,
    model: str,
    created: int,
    message: dict[str, Any],
    finish_reason: str,
    usage: dict[str, Any],
    logprobs: dict[str, Any] | None = None,
) -> dict[str, Any]:
    return {
        "id": completion_id,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": message,
                "logprobs": logprobs,
                "finish_reason": finish_reason,
            }
        ],
        "usage": usage,
    }


def chunk_body(
    *,
    completion_id: str,
    model: str,
    created: int,
    delta: dict[str, Any] | None = None,
    finish_reason: str | None = None,
    logprobs: dict[str, Any] | None = None,
    usage: dict[str, Any] | None = None,
    usage_only: bool = False,
) -> dict[str, Any]:
    choices: list[dict[str, Any]] = []
    if not usage_only:
        choice: dict[str, Any] = {"index": 0, "delta": delta or {}, "finish_reason": finish_reason}
        if logprobs is not None:
            choice["logprobs"] = logprobs
        choices.append(choice)
    return {
        "id": completion_id,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": choices,
        "usage": usage,
    }


def usage_body(prompt_tokens: int, completion_tokens: int, **extra: Any) -> dict[str, Any]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        **extra,
    }


def model_card(slug: str, owned_by: str, created: int, **extra: Any) -> dict[str, Any]:
    return {"id": slug, "object": "model", "created": created, "owned_by": owned_by, **extra}


def now() -> int:
    return int(time.time())


def sse(data: dict[str, Any] | str) -> bytes:
    """One server-sent event carrying ``data`` (a JSON object, or ``[DONE]``)."""
    payload = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    return f"data: {payload}\n\n".encode()
