"""Request context: an id on every response, one access-log line per request, and a
trace span per chat request when tracing is on (``telemetry.tracing``)."""

from __future__ import annotations

import logging
import os
import time

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from servelm.access.limits import response_headers
from servelm.api.paths import route_family
from servelm.api.services import find_front
from servelm.telemetry import tracing
from servelm.telemetry.logs import request_fields, request_id_var

log = logging.getLogger("servelm.access")


def new_request_id() -> str:
    """``req_`` + 32 hex digits: milliseconds since the epoch, then 80 random bits (the
    layout of a UUIDv7). Time-ordered on purpose: the id keys the holds and usage
    indexes, and ids that grow append to one B-tree page where random ones touch a new
    page per request, which SQLite's WAL checkpoint must then copy (with uuid4 ids the
    checkpoints took enough CPU to triple p99 latency; docs/benchmarks.md)."""
    return f"req_{time.time_ns() // 1_000_000:012x}{os.urandom(10).hex()}"


# The routes a span is opened for: the chat requests, wherever they are served.
_TRACED = frozenset({"openai_chat", "openai_responses", "segmind_chat"})


def _hop_request_id(scope: Scope) -> str | None:
    for name, value in scope["headers"]:
        if name == b"x-request-id":
            text = value.decode("latin-1")
            return text if tracing.REQUEST_ID.fullmatch(text) else None
    return None


class RequestContextMiddleware:
    """Pure ASGI (no BaseHTTPMiddleware): it sits on every request's hot path.

    ``hop_ids``: take the caller's ``x-request-id`` as this request's id (a worker or
    the engine process, whose caller is a gateway: one id in both access lines). A
    gateway makes its own: its ids key holds and usage, and must be unique."""

    def __init__(self, app: ASGIApp, hop_ids: bool = False) -> None:
        self.app = app
        self.hop_ids = hop_ids

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = (self.hop_ids and _hop_request_id(scope)) or new_request_id()
        scope.setdefault("state", {})["request_id"] = request_id
        token = request_id_var.set(request_id)
        fields: dict[str, object] = {}
        fields_token = request_fields.set(fields)
        started = time.perf_counter()
        status = 0
        family = route_family(scope["path"])
        span = (
            tracing.start_server_span(f"{scope['method']} {family}", scope["headers"])
            if family in _TRACED and scope["method"] == "POST" and tracing.enabled()
            else None
        )
        span_token = None if span is None else tracing.activate(span)
        header = (b"x-request-id", request_id.encode())

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                # response_headers (issue 13): the request's x-ratelimit-* and
                # RateLimit fields, once the limiter has counted it.
                message["headers"] = [*message.get("headers", []), header, *response_headers()]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            elapsed = time.perf_counter() - started
            parts = find_front(scope["app"]) if "app" in scope else None
            metrics = parts.metrics if parts is not None else None
            if metrics is not None:
                metrics.observe_request(family, status, elapsed)
            if span is not None:
                tracing.end_span(span, status, fields)
                tracing.deactivate(span_token)
            log.info(
                "%s %s %d",
                scope["method"],
                scope["path"],
                status,
                extra={"fields": {"status": status, "ms": round(elapsed * 1000, 2), **fields}},
            )
            request_fields.reset(fields_token)
            request_id_var.reset(token)
