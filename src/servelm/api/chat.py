"""Chat routes: thin. Read the body, hand it to ChatService, shape the HTTP response."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from servelm.errors import InvalidRequest, PayloadTooLarge, ServelmError
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
    req = service.parse(raw, dialect)
    spec, engine = service.resolve(req, slug)
    call = await service.prepare(request.state.request_id, dialect, req, spec, engine)
    if req.stream:
        return await _streaming_response(service, call)
    result = await _until_disconnect(request, service.complete(call))
    if result is None:
        # Nobody is listening; 499 is what the access log should say.
        return Response(status_code=499)
    return JSONResponse(result)


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
    return StreamingResponse(
        _sse_frames(first, chunks, call.dialect),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
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
