"""Request context: an id on every response, and one access-log line per request."""

from __future__ import annotations

import logging
import os
import time

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from servelm.api.paths import route_family
from servelm.api.services import find_front
from servelm.ratelimit import response_headers
from servelm.telemetry.logs import request_fields, request_id_var

log = logging.getLogger("servelm.access")


def new_request_id() -> str:
    """``req_`` + 32 hex digits: milliseconds since the epoch, then 80 random bits (the
    layout of a UUIDv7). Time-ordered on purpose: the id keys the holds and usage
    indexes, and ids that grow append to one B-tree page where random ones touch a new
    page per request, which SQLite's WAL checkpoint must then copy (with uuid4 ids the
    checkpoints took enough CPU to triple p99 latency; docs/benchmarks.md)."""
    return f"req_{time.time_ns() // 1_000_000:012x}{os.urandom(10).hex()}"


class RequestContextMiddleware:
    """Pure ASGI (no BaseHTTPMiddleware): it sits on every request's hot path."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = new_request_id()
        scope.setdefault("state", {})["request_id"] = request_id
        token = request_id_var.set(request_id)
        fields: dict[str, object] = {}
        fields_token = request_fields.set(fields)
        started = time.perf_counter()
        status = 0
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
                metrics.observe_request(route_family(scope["path"]), status, elapsed)
            log.info(
                "%s %s %d",
                scope["method"],
                scope["path"],
                status,
                extra={"fields": {"status": status, "ms": round(elapsed * 1000, 2), **fields}},
            )
            request_fields.reset(fields_token)
            request_id_var.reset(token)
