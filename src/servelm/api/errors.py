"""Errors become responses here, and only here, in the dialect of the route.

The Segmind route (``POST /v1/{model}``) answers ``{"error": "message"}``; everything
else answers OpenAI's ``{"error": {"message", "type", "param", "code"}}``.
"""

from __future__ import annotations

import logging
import re
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from servelm.api.auth import credit_headers
from servelm.errors import (
    InvalidRequest,
    MethodNotAllowed,
    NotFound,
    ServelmError,
)

log = logging.getLogger(__name__)

# /v1/<one segment> is a Segmind model route, unless it is one of our OpenAI-style
# or account paths.
NOT_MODELS = frozenset({"models", "credits", "usage", "get-user-credits"})
_SEGMIND_PATH = re.compile(r"^/v1/([^/]+)/?$")


def dialect_for_path(path: str) -> str:
    m = _SEGMIND_PATH.match(path)
    if m and m.group(1) not in NOT_MODELS:
        return "segmind"
    return "openai"


def error_response(
    exc: ServelmError, dialect: str, headers: dict[str, str] | None = None
) -> JSONResponse:
    body: dict[str, Any] = exc.segmind_body() if dialect == "segmind" else exc.openai_body()
    return JSONResponse(
        body, status_code=exc.status_for(dialect), headers={**exc.headers, **(headers or {})}
    )


def _authenticated(request: Request) -> bool:
    return getattr(request.state, "principal", None) is not None


def _dialect(request: Request) -> str:
    return getattr(request.state, "dialect", None) or dialect_for_path(request.url.path)


def install(app: FastAPI) -> None:
    @app.exception_handler(ServelmError)
    async def _servelm(request: Request, exc: ServelmError) -> JSONResponse:
        # Authenticated callers learn their balance on errors too; a refused hold
        # already knows it, so no second query.
        known = getattr(exc, "balance", None)
        extra = await credit_headers(request, known) if _authenticated(request) else {}
        return error_response(exc, _dialect(request), extra)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
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
