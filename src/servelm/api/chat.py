"""Chat routes: ``POST /v1/chat/completions`` (OpenAI) and ``POST /v1/{model}`` (Segmind).

Thin, like the other routers: read the body, hand it to ``ChatService``, shape the
HTTP response. Unlike them they are plain ASGI apps, not FastAPI endpoints: these two
routes carry all the traffic, and FastAPI's per-request machinery (dependency
solving, the request object, the response classes, the anyio task group a streaming
response starts) was a fifth of the gateway's CPU per request in the profile
(docs/benchmarks.md). Errors still become responses in ``servelm.api.errors``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
from collections.abc import Iterator
from typing import Any

from starlette.routing import Match, Route
from starlette.types import Message, Receive, Scope, Send

from servelm import keys
from servelm.api.errors import NOT_MODELS, error_response
from servelm.billing.service import Billing, Principal
from servelm.catalog import ModelSpec, format_credits
from servelm.engines.base import Engine
from servelm.errors import InvalidRequest, PayloadTooLarge, ServelmError
from servelm.protocol import ChatRequest
from servelm.serving import Call, ChatService, Dialect, error_event, sse

log = logging.getLogger(__name__)

# curl -d sends application/x-www-form-urlencoded; the acceptance example in our
# README uses it, so we parse such bodies as JSON. Types that announce some other
# format (multipart, xml, binary) are refused with a clear 400.
_JSONISH = ("application/json", "application/x-www-form-urlencoded", "text/plain")
_JSON_HEADERS = [(b"content-type", b"application/json")]
_SSE_HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),
]


def routes() -> list[Route]:
    """The two chat routes, for the app's router."""
    return [
        Route("/v1/chat/completions", ChatRoute("openai"), methods=["POST"]),
        _SegmindRoute("/v1/{model}", ChatRoute("segmind"), methods=["POST"]),
    ]


class _SegmindRoute(Route):
    """``/v1/{model}``, except our own paths there: a POST to ``/v1/models`` is a 405,
    not a request for a model called "models"."""

    def matches(self, scope: Scope) -> tuple[Match, Scope]:
        match, child = super().matches(scope)
        if match is not Match.NONE and child["path_params"]["model"] in NOT_MODELS:
            return Match.NONE, {}
        return match, child


class ClientGone(Exception):
    """The client hung up before the answer was complete."""


class ChatRoute:
    """One dialect's chat route, as an ASGI app."""

    def __init__(self, dialect: Dialect) -> None:
        self.dialect: Dialect = dialect

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await _Exchange(scope, receive, send, self.dialect).handle()


class _Exchange:
    """One chat request and its response."""

    def __init__(self, scope: Scope, receive: Receive, send: Send, dialect: Dialect) -> None:
        self.scope = scope
        self.receive = receive
        self.send = send
        self.dialect: Dialect = dialect
        state = scope["app"].state
        self.service: ChatService = state.chat
        self.billing: Billing = state.billing
        self.max_body: int = state.settings.max_body_bytes
        self.request_id: str = scope["state"]["request_id"]
        self.headers: dict[str, str] = {}
        for name, value in scope["headers"]:
            # Only the few we read; the first of each wins, as in Starlette.
            if name in _READ and (key := name.decode()) not in self.headers:
                self.headers[key] = value.decode("latin-1")
        self.principal: Principal | None = None
        self.started = False  # response headers sent
        self._watcher: asyncio.Task[None] | None = None
        self._gone = False  # set by the watcher when the client hung up
        self._finished = False

    async def handle(self) -> None:
        try:
            await self.run()
        except ClientGone:
            if not self.started:
                # Nobody hears it (the server drops it), but the access log and the
                # metrics say what happened.
                await self._start(499, [])
                await self._body(b"", more=False)
        except ServelmError as exc:
            await self.fail(exc)
        except Exception:
            log.exception("unhandled error on %s %s", self.scope["method"], self.scope["path"])
            await self.fail(
                ServelmError("The server had an internal error processing the request.")
            )

    # -- the walk ----------------------------------------------------------------------

    async def run(self) -> None:
        service = self.service
        raw = await self._read_body()
        self.principal = principal = await self.billing.authenticate(
            keys.from_headers(self.headers.get("x-api-key"), self.headers.get("authorization"))
        )
        req = service.parse(raw, self.dialect)
        slug = self.scope["path_params"].get("model") if self.dialect == "segmind" else None
        spec, engine = service.resolve(req, slug)
        Billing.check_model(principal, spec.slug)

        idem_key = self.headers.get("idempotency-key")
        if idem_key is not None:
            await self._idempotent(idem_key, raw, req, spec, engine)
            return
        call = await service.prepare(self.request_id, self.dialect, req, spec, engine, principal)
        if req.stream:
            await self._stream(call)
            return
        result = await self._until_disconnect(service.complete(call))
        await self._json(200, result, _money_headers(call))

    async def _read_body(self) -> bytes:
        ctype = self.headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype and not (ctype in _JSONISH or ctype.endswith("+json")):
            raise InvalidRequest(f"Content-Type must be application/json, not '{ctype}'.")
        limit = self.max_body
        declared = self.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise PayloadTooLarge(f"The request body is larger than the limit of {limit} bytes.")
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await self.receive()
            if message["type"] == "http.disconnect":
                raise ClientGone
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise PayloadTooLarge(
                    f"The request body is larger than the limit of {limit} bytes."
                )
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        if not size:
            raise InvalidRequest("The request body is empty; send a JSON object with 'messages'.")
        return b"".join(chunks)

    async def _idempotent(
        self, key: str, raw: bytes, req: ChatRequest, spec: ModelSpec, engine: Engine
    ) -> None:
        """A retried request with the same Idempotency-Key and body is charged once and
        answered with the same completion."""
        if not 1 <= len(key) <= 255:
            raise InvalidRequest("Idempotency-Key must be 1 to 255 characters.")
        if req.stream:
            raise InvalidRequest(
                "Idempotency-Key is supported for non-streaming requests only.", param="stream"
            )
        principal = self.principal
        assert principal is not None
        billing = self.billing
        replay = await billing.idempotency_begin(
            principal.account_id, key, hashlib.sha256(raw).hexdigest()
        )
        if replay is not None:
            balance = await billing.balance(principal.account_id)
            headers = {
                "x-remaining-credits": format_credits(balance),
                "x-cost": "0.000000",  # this answer is not charged again
                "idempotent-replayed": "true",
            }
            await self._json(replay.status_code, replay.body, headers)
            return
        try:
            call = await self.service.prepare(
                self.request_id, self.dialect, req, spec, engine, principal
            )
            result = await self._until_disconnect(self.service.complete(call))
        except BaseException:
            await billing.idempotency_abort(principal.account_id, key)
            raise
        assert call.settlement is not None
        await billing.idempotency_finish(
            principal.account_id, key, 200, result, call.settlement.charged
        )
        await self._json(200, result, _money_headers(call))

    async def _stream(self, call: Call) -> None:
        chunks = self.service.stream_chunks(call)
        try:
            with self._cancel_on_disconnect():
                # The first chunk before the headers: errors the engine reports up front
                # (queue full, prompt too long) still become a proper HTTP status.
                try:
                    first: dict[str, Any] | None = await anext(chunks)
                except StopAsyncIteration:
                    first = None
                headers = list(_SSE_HEADERS)
                if call.held_balance is not None:
                    # Headers leave before generation: they can only say the balance
                    # after the hold. The final chunk's usage has the exact cost.
                    balance = format_credits(call.held_balance).encode()
                    headers.append((b"x-remaining-credits", balance))
                await self._start(200, headers)
                try:
                    if first is not None:
                        await self._body(sse(first))
                    async for chunk in chunks:
                        await self._body(sse(chunk))
                except ServelmError as exc:
                    # Headers are gone: the error travels as an event, and no [DONE]
                    # follows, so no client mistakes a failed stream for a finished one.
                    self._finished = True
                    await self._body(error_event(exc, self.dialect), more=False)
                    return
                self._finished = True
                await self._body(b"data: [DONE]\n\n", more=False)
        finally:
            await chunks.aclose()

    # -- the client hanging up ---------------------------------------------------------

    async def _until_disconnect(self, work: Any) -> Any:
        """Await ``work``; if the client hangs up first, cancel it (and so the
        generation) and raise ClientGone."""
        with self._cancel_on_disconnect():
            return await work

    @contextlib.contextmanager
    def _cancel_on_disconnect(self) -> Iterator[None]:
        """Inside, a client hang-up cancels this task (and so the generation); it
        leaves as ClientGone."""
        self._watch()
        try:
            yield
        except asyncio.CancelledError:
            if not self._cancelled_by_watcher():
                # Hook (issue 13): stopped by the drain or the deadline → an error
                # (an event on a stream), not a dropped connection.
                self.scope["app"].state.lifecycle.raise_if_stopped()
                raise  # server shutdown
            raise ClientGone from None
        finally:
            self._unwatch()

    def _watch(self) -> None:
        # The body is read, so the next ASGI message can only be the disconnect: one
        # task waits for it and cancels this one, which stops the generation.
        task = asyncio.current_task()
        assert task is not None

        async def watch() -> None:
            while (await self.receive())["type"] != "http.disconnect":
                pass
            if not self._finished:
                self._gone = True
                task.cancel()

        self._gone = False
        self._watcher = asyncio.create_task(watch())

    def _unwatch(self) -> None:
        if self._watcher is not None:
            self._watcher.cancel()
            self._watcher = None

    def _cancelled_by_watcher(self) -> bool:
        """Whether our watcher cancelled this task; if so the cancellation ends here."""
        task = asyncio.current_task()
        if not self._gone or task is None:
            return False
        task.uncancel()
        return True

    # -- sending -----------------------------------------------------------------------

    async def _start(self, status: int, headers: list[tuple[bytes, bytes]]) -> None:
        self.started = True
        await self.send({"type": "http.response.start", "status": status, "headers": headers})

    async def _body(self, data: bytes, more: bool = True) -> None:
        message: Message = {"type": "http.response.body", "body": data, "more_body": more}
        await self.send(message)

    async def _json(self, status: int, body: Any, headers: dict[str, str]) -> None:
        self._finished = True
        data = json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode()
        await self._start(
            status,
            [
                *_JSON_HEADERS,
                (b"content-length", str(len(data)).encode()),
                *((k.encode(), v.encode()) for k, v in headers.items()),
            ],
        )
        await self._body(data, more=False)

    async def fail(self, exc: ServelmError) -> None:
        """The error as a response in the route's dialect (with the caller's balance,
        once known), or as an SSE event when the stream's headers are already out."""
        if self.started:
            # Only a stream gets here with its headers out: end it with the error.
            if not self._finished:
                self._finished = True
                await self._body(error_event(exc, self.dialect), more=False)
            return
        extra: dict[str, str] = {}
        if self.principal is not None:
            # A refused hold already knows the balance: no second query.
            balance = getattr(exc, "balance", None)
            if balance is None:
                balance = await self.billing.balance(self.principal.account_id)
            extra["x-remaining-credits"] = format_credits(balance)
        response = error_response(exc, self.dialect, extra)
        await response(self.scope, self.receive, self.send)


_READ = {
    b"x-api-key",
    b"authorization",
    b"content-type",
    b"content-length",
    b"idempotency-key",
}


def _money_headers(call: Call) -> dict[str, str]:
    assert call.settlement is not None
    return {
        "x-remaining-credits": format_credits(call.settlement.balance),
        "x-cost": format_credits(call.settlement.charged),
    }
