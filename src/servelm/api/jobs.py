"""Routes of work without a connection: Segmind's async API (``/v2``) and OpenAI's
Files and Batches (``/v1/files``, ``/v1/batches``). HTTP only: the logic is
``servelm.jobs.service.Jobs`` (``services(request).jobs``)."""

from __future__ import annotations

import json
from typing import Annotated, Any

from fastapi import APIRouter, Depends, File, Form, Query, Request, UploadFile
from fastapi.responses import JSONResponse, Response

from servelm.access.keys import Principal
from servelm.api.deps import caller
from servelm.api.services import services
from servelm.billing.money import format_credits
from servelm.chat.calls import ChatExchange
from servelm.errors import InvalidRequest, PayloadTooLarge
from servelm.jobs.service import MAX_FILE_BYTES, Jobs

router = APIRouter()


def _jobs(request: Request) -> Jobs:
    jobs = services(request).jobs
    return jobs


async def _body(request: Request, limit: int) -> bytes:
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


def _base_url(request: Request) -> str:
    return str(request.base_url).rstrip("/")


# -- Segmind async ------------------------------------------------------------------------


@router.get("/v2/webhook-secret", tags=["async"])
async def webhook_secret(
    request: Request, principal: Principal = Depends(caller)
) -> dict[str, Any]:
    """The secret that signs this account's webhooks (Standard Webhooks' whsec_ form)."""
    return {"object": "webhook_secret", "secret": _jobs(request).webhook_secret(principal)}


@router.get("/v2/requests/{request_id}/status", tags=["async"])
async def request_status(
    request_id: str, request: Request, principal: Principal = Depends(caller)
) -> dict[str, Any]:
    return await _jobs(request).request_status(principal, request_id)


@router.post("/v2/requests/{request_id}/cancel", tags=["async"])
async def cancel_request(
    request_id: str, request: Request, principal: Principal = Depends(caller)
) -> dict[str, Any]:
    """Cancel an async request that has not started: its status becomes CANCELLED and
    its hold is released in full; 409 once it is PROCESSING or finished."""
    return await _jobs(request).cancel_request(principal, request_id)


@router.get("/v2/requests/{request_id}", tags=["async"])
async def request_result(
    request_id: str, request: Request, principal: Principal = Depends(caller)
) -> JSONResponse:
    """The answer, as ``POST /v1/{slug}`` gives it, once COMPLETED; 202 and the status
    before; a FAILED request's error in Segmind's envelope with its status code."""
    status, body, state = await _jobs(request).request_result(principal, request_id)
    # A returned response does not get the headers ``caller`` set: say them here.
    headers = {"x-remaining-credits": format_credits(request.state.balance)}
    if body is None:
        return JSONResponse(state, status_code=status, headers=headers)
    if status != 200:
        err = body.get("error")
        message = err.get("message") if isinstance(err, dict) else str(err)
        return JSONResponse({"error": message}, status_code=status, headers=headers)
    return JSONResponse(body, headers=headers)


@router.post("/v2/{model}", tags=["async"])
async def submit(model: str, request: Request) -> JSONResponse:
    """Segmind's async inference: the body of ``POST /v1/{model}`` (and an optional
    ``webhook_url``); answered at once with the request's id and where to poll."""
    settings = services(request).settings
    headers = request.headers

    async def read_body() -> bytes:
        return await _body(request, settings.max_body_bytes)

    exchange = ChatExchange(
        request_id=request.state.request_id,
        read_body=read_body,
        slug=model,
        api_key=headers.get("x-api-key"),
        authorization=headers.get("authorization"),
    )
    return JSONResponse(await _jobs(request).submit(exchange, _base_url(request)))


# -- OpenAI files and batches ---------------------------------------------------------------


@router.post("/v1/files", tags=["batches"])
async def upload_file(
    request: Request,
    file: Annotated[UploadFile, File()],
    purpose: Annotated[str, Form()],
    principal: Principal = Depends(caller),
) -> dict[str, Any]:
    content = await file.read(MAX_FILE_BYTES + 1)
    return await _jobs(request).upload(principal, file.filename or "", purpose, content)


@router.get("/v1/files/{file_id}", tags=["batches"])
async def get_file(
    file_id: str, request: Request, principal: Principal = Depends(caller)
) -> dict[str, Any]:
    return await _jobs(request).file(principal, file_id)


@router.get("/v1/files/{file_id}/content", tags=["batches"])
async def file_content(
    file_id: str, request: Request, principal: Principal = Depends(caller)
) -> Response:
    content = await _jobs(request).file_content(principal, file_id)
    return Response(content, media_type="application/octet-stream")


@router.post("/v1/batches", tags=["batches"])
async def create_batch(request: Request, principal: Principal = Depends(caller)) -> dict[str, Any]:
    raw = await _body(request, services(request).settings.max_body_bytes)
    try:
        data = json.loads(raw)
    except ValueError:
        raise InvalidRequest("The request body is not valid JSON.") from None
    return await _jobs(request).create_batch(principal, data)


@router.get("/v1/batches", tags=["batches"])
async def list_batches(
    request: Request,
    after: str | None = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    principal: Principal = Depends(caller),
) -> dict[str, Any]:
    return await _jobs(request).batches(principal, after, limit)


@router.get("/v1/batches/{batch_id}", tags=["batches"])
async def get_batch(
    batch_id: str, request: Request, principal: Principal = Depends(caller)
) -> dict[str, Any]:
    return await _jobs(request).batch(principal, batch_id)


@router.post("/v1/batches/{batch_id}/cancel", tags=["batches"])
async def cancel_batch(
    batch_id: str, request: Request, principal: Principal = Depends(caller)
) -> dict[str, Any]:
    return await _jobs(request).cancel(principal, batch_id)
