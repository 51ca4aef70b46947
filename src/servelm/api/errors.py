"""Errors become responses here, and only here, in the dialect of the route.

``render`` is the one renderer: the FastAPI handlers below, the chat routes' fast
path and a stream's closing error event all call it. The Segmind route answers
``{"error": "message"}``; everything else OpenAI's
``{"error": {"message", "type", "param", "code"}}``. Once a stream's headers are out
the error travels as an SSE event in the same envelope, and no ``[DONE]`` follows, so
no client mistakes a failed stream for a finished one.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from starlette.applications import Starlette
from starlette.exceptions import HTTPException as StarletteHTTPException

from servelm.api.deps import balance_if_known
from servelm.api.paths import Dialect, dialect_for_path, unsupported_openai
from servelm.chat.protocol import sse
from servelm.chat.responses_answers import sse_event
from servelm.errors import (
    CsrfFailed,
    InvalidRequest,
    MethodNotAllowed,
    NotFound,
    ServelmError,
)

log = logging.getLogger(__name__)

INTERNAL = "The server had an internal error processing the request."


@dataclass(frozen=True)
class Rendered:
    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes


def render(
    exc: ServelmError,
    dialect: Dialect,
    *,
    stream_started: bool = False,
    headers: Mapping[str, str] | None = None,
    responses_event: int | None = None,
) -> Rendered:
    """``exc`` as the route's dialect has it: a JSON response, or, when a stream's
    headers are already out, the SSE event that ends the stream. A Responses API
    stream (``responses_event``: the sequence number the event takes) ends with its
    own ``error`` event, as OpenAI's does."""
    body = exc.segmind_body() if dialect == "segmind" else exc.openai_body()
    if stream_started and responses_event is not None:
        event = {
            "type": "error",
            "code": exc.code,
            "message": exc.message,
            "param": exc.param,
            "sequence_number": responses_event,
        }
        return Rendered(200, [], sse_event(event))
    if stream_started:
        return Rendered(200, [], sse(body))
    data = json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode()
    merged = {**exc.headers, **(headers or {})}
    return Rendered(
        exc.status_for(dialect),
        [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(data)).encode()),
            *((k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in merged.items()),
        ],
        data,
    )


def _response(r: Rendered) -> Response:
    response = Response(r.body, status_code=r.status)
    response.raw_headers = r.headers
    return response


def _dialect(request: Request) -> Dialect:
    return dialect_for_path(request.url.path)


def install(app: Starlette) -> None:
    """The handlers of every app that serves requests: a gateway's, and those of the
    processes without accounts (``servelm.processes.worker.engine_front``)."""

    async def _servelm(request: Request, exc: ServelmError) -> Response:
        # Authenticated callers learn their balance on errors too.
        balance_headers = getattr(request.state, "balance_headers", None)
        extra = await balance_headers(exc) if balance_headers is not None else {}
        return _response(render(exc, _dialect(request), headers=extra))

    async def _csrf(request: Request, exc: CsrfFailed) -> Response:
        from servelm.api.console import web  # the console's page; the API has no templates

        if web.wants_html(request):
            return web.csrf_page(request)
        return await _servelm(request, exc)

    async def _validation(request: Request, exc: RequestValidationError) -> Response:
        # FastAPI's own validation (admin bodies, path and query params) answers 422;
        # we promise 400 naming the field.
        err = exc.errors()[0]
        loc = [str(p) for p in err.get("loc", ()) if p not in ("body", "query", "path")]
        param = ".".join(loc) or None
        wrapped = InvalidRequest(
            f"Invalid value for '{param}': {err.get('msg')}." if param else str(err.get("msg")),
            param=param,
        )
        return await _servelm(request, wrapped)

    async def _routing(request: Request, exc: StarletteHTTPException) -> Response:
        path = request.url.path
        # A caller with a valid key learns the balance here too, as on every answer.
        balance = await balance_if_known(request)
        if unsupported_openai(path):
            err: ServelmError = NotFound(
                f"The endpoint {request.method} {path} is not supported by this server; "
                "it serves chat completions (POST /v1/chat/completions), responses "
                "(POST /v1/responses) and models.",
                code="unsupported_endpoint",
            )
            return _response(render(err, "openai", headers=balance))
        if exc.status_code == 405:
            err = MethodNotAllowed(f"Method {request.method} is not allowed on {path}.")
        elif exc.status_code == 404:
            err = NotFound(f"No route for {request.method} {path}.")
        else:
            err = ServelmError(str(exc.detail))
            err.status_code = exc.status_code
        return _response(render(err, _dialect(request), headers={**(exc.headers or {}), **balance}))

    async def _unexpected(request: Request, exc: Exception) -> Response:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        # This handler runs outside the request-id middleware, so add the header here.
        rid = getattr(request.state, "request_id", None)
        return _response(
            render(
                ServelmError(INTERNAL),
                _dialect(request),
                headers={"x-request-id": rid} if rid else None,
            )
        )

    app.add_exception_handler(ServelmError, _servelm)  # type: ignore[arg-type]
    app.add_exception_handler(CsrfFailed, _csrf)  # type: ignore[arg-type]
    app.add_exception_handler(RequestValidationError, _validation)  # type: ignore[arg-type]
    app.add_exception_handler(StarletteHTTPException, _routing)  # type: ignore[arg-type]
    app.add_exception_handler(Exception, _unexpected)
