"""The chat routes in ``/openapi.json`` and ``/docs``.

The two chat routes are plain ASGI (``servelm.api.chat``), invisible to FastAPI's
schema generator. Here they are declared once more as FastAPI routes for the schema
alone: the request body is the real wire model (``protocol.ChatRequest``) and the
answers are described by the models below, which a test checks real answers against,
so the documentation cannot drift from what is served. These routes never match a
request.
"""

from __future__ import annotations

from typing import Any, Literal

from fastapi import FastAPI
from fastapi.routing import APIRoute
from pydantic import BaseModel
from starlette.routing import Match
from starlette.types import Scope

from servelm.chat.protocol import ChatRequest
from servelm.chat.responses import ResponsesRequest


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    # Credits as JSON numbers (the nearest double; exact decimals in x-cost and
    # x-remaining-credits).
    cost: float | None = None
    remaining_credits: float | None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"]
    content: str | None
    refusal: None = None
    tool_calls: list[dict[str, Any]] | None = None
    # Answers to requests in the legacy ``functions`` form.
    function_call: dict[str, Any] | None = None


class Choice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: dict[str, Any] | None
    finish_reason: Literal["stop", "length", "tool_calls", "content_filter", "function_call"]


class ChatCompletion(BaseModel):
    """The answer on both routes; a stream sends ``chat.completion.chunk`` events of
    the same shape with ``delta`` for ``message``, then ``data: [DONE]``."""

    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[Choice]
    usage: Usage


class OpenAIErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class OpenAIError(BaseModel):
    error: OpenAIErrorDetail


class SegmindError(BaseModel):
    error: str


_STATUSES = {
    400: "Invalid request: the field is named (`param`).",
    401: "Missing, malformed, revoked or expired API key.",
    403: "The key may not use this model.",
    404: "No such model, or one listed but not installed here (model_not_installed).",
    413: "Body or image too large.",
    429: "Rate limited; see Retry-After.",
    502: "The model's engine failed or answered malformed data.",
    503: "Model at capacity, or every replica down; see Retry-After.",
    504: "The model's engine timed out.",
}


def _responses(error: type[BaseModel], credits_status: int) -> dict[int | str, Any]:
    out: dict[int | str, Any] = {
        status: {"model": error, "description": text} for status, text in _STATUSES.items()
    }
    out[credits_status] = {"model": error, "description": "Not enough credits."}
    out[200] = {
        "description": "The completion (JSON), or with `stream: true` server-sent events.",
        "content": {"text/event-stream": {}},
    }
    return out


class _SchemaOnly(APIRoute):
    """In the schema, never in routing: the real route is ``servelm.api.chat``'s."""

    def matches(self, scope: Scope) -> tuple[Match, Scope]:
        return Match.NONE, {}


def document_chat_routes(app: FastAPI) -> None:
    async def never_reached(body: ChatRequest) -> ChatCompletion:
        raise RuntimeError("served by servelm.api.chat")  # pragma: no cover

    app.router.add_api_route(
        "/v1/chat/completions",
        never_reached,
        methods=["POST"],
        response_model=ChatCompletion,
        responses=_responses(OpenAIError, 402),
        summary="Create a chat completion (OpenAI dialect)",
        description="The model is named in the body. Send the key as "
        "`Authorization: Bearer KEY` or `x-api-key: KEY`.",
        tags=["chat"],
        operation_id="create_chat_completion",
        route_class_override=_SchemaOnly,
    )

    async def never_reached_segmind(model: str, body: ChatRequest) -> ChatCompletion:
        raise RuntimeError("served by servelm.api.chat")  # pragma: no cover

    app.router.add_api_route(
        "/v1/{model}",
        never_reached_segmind,
        methods=["POST"],
        response_model=ChatCompletion,
        responses=_responses(SegmindError, 406),
        summary="Chat with a model (Segmind dialect)",
        description='The model slug is in the path; errors are `{"error": "message"}` '
        "and 406 means the credits ran out.",
        tags=["chat"],
        operation_id="segmind_chat",
        route_class_override=_SchemaOnly,
    )

    async def never_reached_responses(body: ResponsesRequest) -> dict[str, Any]:
        raise RuntimeError("served by servelm.api.chat")  # pragma: no cover

    app.router.add_api_route(
        "/v1/responses",
        never_reached_responses,
        methods=["POST"],
        responses=_responses(OpenAIError, 402),
        summary="Create a response (OpenAI's Responses API, stateless)",
        description="The same models, walk and money rules as chat completions; "
        "nothing is stored (`previous_response_id` is a 400). `usage` has `cost` and "
        "`remaining_credits`; streams send the Responses event types.",
        tags=["chat"],
        operation_id="create_response",
        route_class_override=_SchemaOnly,
    )
