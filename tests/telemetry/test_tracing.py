"""Traces and request ids across one hop, in process, with OpenTelemetry's in-memory
exporter: a gateway-side app (``RequestContextMiddleware`` as the gateway has it)
calls a worker-side app (as ``engine_front`` has it) with ``hop_headers()``, over
a real ASGI transport. The process-level run is tests/telemetry/test_across_processes.py."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import httpx
import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from servelm.api.middleware import RequestContextMiddleware
from servelm.api.paths import OPENAI_CHAT
from servelm.telemetry import logs, tracing


def worker_side() -> Starlette:
    async def chat(request: Request) -> JSONResponse:
        logs.annotate(model="m")
        return JSONResponse({"request_id": logs.request_id_var.get()})

    app = Starlette(routes=[Route(OPENAI_CHAT, chat, methods=["POST"])])
    app.add_middleware(RequestContextMiddleware, hop_ids=True)
    return app


def gateway_side(worker: Starlette, seen: dict[str, object]) -> Starlette:
    async def chat(request: Request) -> JSONResponse:
        hop = tracing.hop_headers()
        seen["hop"] = hop
        logs.annotate(replica=0)
        transport = httpx.ASGITransport(app=worker)
        async with httpx.AsyncClient(transport=transport, base_url="http://worker") as client:
            r = await client.post(OPENAI_CHAT, headers=hop)
        seen["worker_answer"] = r.json()
        seen["worker_header"] = r.headers["x-request-id"]
        return JSONResponse({})

    app = Starlette(routes=[Route(OPENAI_CHAT, chat, methods=["POST"])])
    app.add_middleware(RequestContextMiddleware)
    return app


async def call(app: Starlette, headers: dict[str, str] | None = None) -> httpx.Response:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://gw") as client:
        return await client.post(OPENAI_CHAT, headers=headers or {})


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    assert tracing.setup(None, "servelm-test", exporter=exporter)
    try:
        yield exporter
    finally:
        tracing.shutdown()


def test_the_worker_span_is_the_gateway_spans_child(spans: InMemorySpanExporter) -> None:
    seen: dict[str, object] = {}
    r = asyncio.run(call(gateway_side(worker_side(), seen)))
    rid = r.headers["x-request-id"]
    # The worker took the gateway's id as its own, and the hop carried a traceparent.
    assert seen["worker_answer"] == {"request_id": rid}
    assert seen["worker_header"] == rid
    hop = seen["hop"]
    assert isinstance(hop, dict) and hop["x-request-id"] == rid and "traceparent" in hop

    worker_span, gateway_span = spans.get_finished_spans()  # the inner one ends first
    assert gateway_span.parent is None
    assert worker_span.parent is not None
    assert worker_span.parent.span_id == gateway_span.context.span_id
    assert worker_span.context.trace_id == gateway_span.context.trace_id
    assert gateway_span.attributes is not None and worker_span.attributes is not None
    assert gateway_span.attributes["servelm.request_id"] == rid
    assert worker_span.attributes["servelm.request_id"] == rid
    assert gateway_span.attributes["servelm.replica"] == 0
    assert worker_span.attributes["servelm.model"] == "m"
    assert gateway_span.attributes["http.response.status_code"] == 200


def test_a_callers_traceparent_is_the_parent(spans: InMemorySpanExporter) -> None:
    parent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    asyncio.run(call(worker_side(), {"traceparent": parent}))
    (span,) = spans.get_finished_spans()
    assert span.parent is not None and f"{span.parent.span_id:016x}" == "b7ad6b7169203331"
    assert f"{span.context.trace_id:032x}" == "0af7651916cd43dd8448eb211c80319c"


def test_no_span_and_no_traceparent_when_off() -> None:
    tracing.shutdown()
    assert not tracing.enabled()
    seen: dict[str, object] = {}
    r = asyncio.run(call(gateway_side(worker_side(), seen)))
    # The request id still travels; nothing else does.
    assert seen["hop"] == {"x-request-id": r.headers["x-request-id"]}
    assert seen["worker_header"] == r.headers["x-request-id"]


@pytest.mark.parametrize(
    "given",
    ["", "a b", "x" * 129, "id;drop", "req_1,req_2"],
)
def test_a_worker_makes_its_own_id_for_an_unfit_one(given: str) -> None:
    r = asyncio.run(call(worker_side(), {"x-request-id": given}))
    assert r.headers["x-request-id"] != given
    assert r.headers["x-request-id"].startswith("req_")


def test_a_gateway_never_takes_a_callers_id() -> None:
    # Its ids key holds and usage: a caller cannot choose one.
    seen: dict[str, object] = {}
    r = asyncio.run(call(gateway_side(worker_side(), seen), {"x-request-id": "req_mine"}))
    assert r.headers["x-request-id"] != "req_mine"
