"""Errors become responses here, and only here, in the dialect of the route.

The Segmind route (``POST /v1/{model}``) answers ``{"error": "message"}``; everything
else answers OpenAI's ``{"error": {"message", "type", "param", "code"}}``.
"""

from __future__ import annotations

import logging
import re
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from servelm.errors import (
    MethodNotAllowed,
    NotFound,
    ServelmError,
)

log = logging.getLogger(__name__)

# /v1/<one segment> is a Segmind model route, unless it is one of our OpenAI-style
# or account paths.
_OPENAI_SINGLE = {"models", "credits", "usage", "get-user-credits"}
_SEGMIND_PATH = re.compile(r"^/v1/([^/]+)/?$")


def dialect_for_path(path: str) -> str:
    m = _SEGMIND_PATH.match(path)
    if m and m.group(1) not in _OPENAI_SINGLE:
        return "segmind"
    return "openai"


def error_response(
    exc: ServelmError, dialect: str, headers: dict[str, str] | None = None
) -> JSONResponse:
    body: dict[str, Any] = exc.segmind_body() if dialect == "segmind" else exc.openai_body()
    return JSONResponse(
        body, status_code=exc.status_for(dialect), headers={**exc.headers, **(headers or {})}
    )


def _dialect(request: Request) -> str:
    return getattr(request.state, "dialect", None) or dialect_for_path(request.url.path)


def install(app: FastAPI) -> None:
    @app.exception_handler(ServelmError)
    async def _servelm(request: Request, exc: ServelmError) -> JSONResponse:
        extra = getattr(request.state, "extra_headers", None)
        return error_response(exc, _dialect(request), extra)

    @app.exception_handler(StarletteHTTPException)
    async def _routing(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 405:
            err: ServelmError = MethodNotAllowed(
                f"Method {request.method} is not allowed on {request.url.path}."
            )
        elif exc.status_code == 404:
            err = NotFound(f"No route for {request.method} {request.url.path}.")
        else:
            err = ServelmError(str(exc.detail))
            err.status_code = exc.status_code
        return error_response(err, _dialect(request), dict(exc.headers or {}))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        # This handler runs outside the request-id middleware, so add the header here.
        rid = getattr(request.state, "request_id", None)
        return error_response(
            ServelmError("The server had an internal error processing the request."),
            _dialect(request),
            {"x-request-id": rid} if rid else None,
        )
