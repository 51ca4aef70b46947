"""Chat routes: thin. Read the body, hand it to ChatService, shape the HTTP response."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from servelm.api.auth import authenticate, credit_headers
from servelm.billing.service import Billing
from servelm.catalog import ModelSpec, format_credits
from servelm.engines.base import Engine
from servelm.errors import InvalidRequest, PayloadTooLarge, ServelmError
from servelm.protocol import ChatRequest
from servelm.serving import Call, ChatService, Dialect, error_event, sse

router = APIRouter()

# curl -d sends application/x-www-form-urlencoded; the acceptance example in our
# README uses it, so we parse such bodies as JSON. Types that announce some other
# format (multipart, xml, binary) are refused with a clear 400.
_JSONISH = ("application/json", "application/x-www-form-urlencoded", "text/plain")


async def read_body(request: Request) -> bytes:
    limit: int = request.app.state.settings.max_body_bytes
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype and not (ctype in _JSONISH or ctype.endswith("+json")):
        raise InvalidRequest(f"Content-Type must be application/json, not '{ctype}'.")
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"The request body is larger than the limit of {limit} bytes.")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"The request body is larger than the limit of {limit} bytes.")
        chunks.append(chunk)
    if not size:
        raise InvalidRequest("The request body is empty; send a JSON object with 'messages'.")
    return b"".join(chunks)


@router.post("/v1/chat/completions")
async def openai_chat(request: Request) -> Response:
    return await _chat(request, "openai", None)


@router.post("/v1/{model}")
async def segmind_chat(request: Request, model: str) -> Response:
    return await _chat(request, "segmind", model)


async def _chat(request: Request, dialect: Dialect, slug: str | None) -> Response:
    request.state.dialect = dialect
    service: ChatService = request.app.state.chat
    raw = await read_body(request)
    principal = await authenticate(request)
    req = service.parse(raw, dialect)
    spec, engine = service.resolve(req, slug)
    Billing.check_model(principal, spec.slug)

    idem_key = request.headers.get("idempotency-key")
    if idem_key is not None:
        return await _idempotent(request, service, idem_key, raw, req, spec, engine)

    call = await service.prepare(request.state.request_id, dialect, req, spec, engine, principal)
    if req.stream:
        return await _streaming_response(service, call)
    result = await _until_disconnect(request, service.complete(call))
    if result is None:
        # Nobody is listening; 499 is what the access log should say.
        return Response(status_code=499)
    return JSONResponse(result, headers=_money_headers(call))


def _money_headers(call: Call) -> dict[str, str]:
    assert call.settlement is not None
    return {
        "x-remaining-credits": format_credits(call.settlement.balance),
        "x-cost": format_credits(call.settlement.charged),
    }


async def _idempotent(
    request: Request,
    service: ChatService,
    key: str,
    raw: bytes,
    req: ChatRequest,
    spec: ModelSpec,
    engine: Engine,
) -> Response:
    """A retried request with the same Idempotency-Key and body is charged once and
    answered with the same completion."""
    if not 1 <= len(key) <= 255:
        raise InvalidRequest("Idempotency-Key must be 1 to 255 characters.")
    if req.stream:
        raise InvalidRequest(
            "Idempotency-Key is supported for non-streaming requests only.", param="stream"
        )
    principal = request.state.principal
    billing: Billing = request.app.state.billing
    replay = await billing.idempotency_begin(
        principal.account_id, key, hashlib.sha256(raw).hexdigest()
    )
    if replay is not None:
        headers = await credit_headers(request)
        headers["x-cost"] = "0.000000"  # this answer is not charged again
        headers["idempotent-replayed"] = "true"
        return JSONResponse(replay.body, status_code=replay.status_code, headers=headers)
    try:
        call = await service.prepare(
            request.state.request_id, request.state.dialect, req, spec, engine, principal
        )
        result = await _until_disconnect(request, service.complete(call))
    except BaseException:
        await billing.idempotency_abort(principal.account_id, key)
        raise
    if result is None:
        await billing.idempotency_abort(principal.account_id, key)
        return Response(status_code=499)
    assert call.settlement is not None
    await billing.idempotency_finish(
        principal.account_id, key, 200, result, call.settlement.charged
    )
    return JSONResponse(result, headers=_money_headers(call))


async def _until_disconnect(request: Request, work: Any) -> Any:
    """Run ``work``; if the client hangs up first, cancel it (and so the generation).

    Returns None when the client went away.
    """
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_wait_disconnect(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
    if task.cancelled():
        return None
    return task.result()


async def _wait_disconnect(request: Request) -> None:
    # The body is already read, so the next ASGI message can only be the disconnect.
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def _streaming_response(service: ChatService, call: Call) -> Response:
    chunks = service.stream_chunks(call)
    # Pull the first chunk before sending headers: errors the engine reports up front
    # (queue full, prompt too long) still become a proper HTTP status, not an SSE event.
    try:
        first = await anext(chunks)
    except StopAsyncIteration:
        first = None
    except BaseException:
        await chunks.aclose()
        raise
    headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    if call.held_balance is not None:
        # Headers leave before generation: they can only say the balance after the hold.
        # The final chunk's usage carries the exact cost and remaining credits.
        headers["x-remaining-credits"] = format_credits(call.held_balance)
    return StreamingResponse(
        _sse_frames(first, chunks, call.dialect),
        media_type="text/event-stream",
        headers=headers,
    )


async def _sse_frames(
    first: dict[str, Any] | None, chunks: AsyncIterator[dict[str, Any]], dialect: Dialect
) -> AsyncIterator[bytes]:
    try:
        if first is not None:
            yield sse(first)
        async for chunk in chunks:
            yield sse(chunk)
    except ServelmError as exc:
        # Headers are gone: the error travels as an event, and no [DONE] follows,
        # so no client mistakes a failed stream for a finished one.
        yield error_event(exc, dialect)
        return
    finally:
        await chunks.aclose()  # type: ignore[attr-defined]
    yield b"data: [DONE]\n\n"
