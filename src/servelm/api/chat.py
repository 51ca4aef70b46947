"""Chat routes: ``POST /v1/chat/completions`` (OpenAI) and ``POST /v1/{model}`` (Segmind).

HTTP only: turn ASGI events into a ``ChatExchange``, hand it to ``ChatService.handle``
(the whole walk lives there), and write back JSON or SSE, or the error ``render``
gives. A client that hangs up cancels the walk and so the generation.

They are plain ASGI apps, not FastAPI endpoints: these two routes carry all the
traffic, and FastAPI's per-request machinery (dependency solving, the request object,
the response classes, the anyio task group a streaming response starts) was a fifth of
the gateway's CPU per request in the profile (docs/benchmarks.md). ``app.py`` still
lists them in the OpenAPI schema, and runs every request through the same middleware.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Iterator
from typing import Literal

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from servelm.access import sessions as console_session
from servelm.api.errors import INTERNAL, render
from servelm.api.paths import Dialect, dialect_for_path
from servelm.api.services import find_front, front
from servelm.chat.calls import ChatExchange, JsonReply, StreamReply
from servelm.chat.protocol import sse
from servelm.chat.responses_answers import sse_event
from servelm.chat.serving import ChatService
from servelm.engines.admission import Gate
from servelm.errors import InvalidRequest, PayloadTooLarge, RequestTimeout, ServelmError
from servelm.processes.lifecycle import Lifecycle

log = logging.getLogger(__name__)

# curl -d sends application/x-www-form-urlencoded; the acceptance example in our
# README uses it, so we parse such bodies as JSON. Types that announce some other
# format (multipart, xml, binary) are refused with a clear 400.
_JSONISH = ("application/json", "application/x-www-form-urlencoded", "text/plain")
_SSE_HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),
]
_READ = {
    b"x-api-key",
    b"authorization",
    b"content-type",
    b"content-length",
    b"idempotency-key",
    b"cookie",  # the web console's session, with its CSRF header
    b"x-csrf-token",
}
_DONE = b"data: [DONE]\n\n"


class ClientGone(Exception):
    """The client hung up before the answer was complete."""


def gated(route: ASGIApp) -> Gate:
    """A chat route behind admission's gate (``engines.admission.Gate``): shed while
    draining or over ``SERVELM_MAX_INFLIGHT``, tracked for the drain and deadline."""
    return Gate(route, _lifecycle_of, _refuse)


def _lifecycle_of(app: object) -> Lifecycle | None:
    parts = find_front(app)
    return None if parts is None else parts.lifecycle


async def _refuse(exc: ServelmError, scope: Scope, send: Send) -> None:
    r = render(exc, dialect_for_path(scope["path"]))
    await send({"type": "http.response.start", "status": r.status, "headers": r.headers})
    await send({"type": "http.response.body", "body": r.body})


class ChatRoute:
    """One dialect's chat route, as an ASGI app; ``api="responses"`` is OpenAI's
    Responses API on the same walk."""

    def __init__(self, dialect: Dialect, api: Literal["chat", "responses"] = "chat") -> None:
        self.dialect: Dialect = dialect
        self.api: Literal["chat", "responses"] = api

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await _Connection(scope, receive, send, self.dialect, self.api).serve()


class _Connection:
    """One chat request's HTTP side: its events in, its response out."""

    def __init__(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        dialect: Dialect,
        api: Literal["chat", "responses"] = "chat",
    ) -> None:
        self.scope, self.receive, self.send = scope, receive, send
        self.dialect: Dialect = dialect
        self.api: Literal["chat", "responses"] = api
        self.headers: dict[str, str] = {}
        for name, value in scope["headers"]:
            # Only the few we read; the first of each wins, as in Starlette.
            if name in _READ and (key := name.decode()) not in self.headers:
                self.headers[key] = value.decode("latin-1")
        self.started = False  # response headers sent
        self.finished = False  # the last byte sent (a hang-up after it changes nothing)
        self.events = 0  # stream events sent
        self._gone = False  # set by the watcher when the client hung up
        self._watcher: asyncio.Task[None] | None = None

    async def serve(self) -> None:
        service: ChatService = front(self.scope["app"]).walk
        exchange = ChatExchange(
            request_id=self.scope["state"]["request_id"],
            read_body=self._read_body,
            slug=self.scope["path_params"].get("model") if self.dialect == "segmind" else None,
            api_key=self.headers.get("x-api-key"),
            authorization=self.headers.get("authorization"),
            idempotency_key=self.headers.get("idempotency-key"),
            session=self._session(),
            api=self.api,
        )
        try:
            with self._cancel_on_disconnect():
                reply = await service.handle(exchange)
                if isinstance(reply, StreamReply):
                    await self._write_stream(reply)
                else:
                    await self._write_json(reply)
        except ClientGone:
            if not self.started:
                # Nobody hears it, but the access log and the metrics say what happened.
                await self._start(499, [])
                await self._body(b"", more=False)
        except ServelmError as exc:
            await self._write_error(exc)
        except Exception:
            log.exception("unhandled error on %s %s", self.scope["method"], self.scope["path"])
            await self._write_error(ServelmError(INTERNAL))

    def _session(self) -> tuple[str, str] | None:
        """The playground's session: looked at only when the request carries no key."""
        headers = self.headers
        if "cookie" not in headers or "x-api-key" in headers or "authorization" in headers:
            return None
        app = self.scope["app"]
        return console_session.session_key_id(
            headers, console_session.app_secret(app, front(app).settings)
        )

    async def _read_body(self) -> bytes:
        ctype = self.headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype and not (ctype in _JSONISH or ctype.endswith("+json")):
            raise InvalidRequest(f"Content-Type must be application/json, not '{ctype}'.")
        settings = front(self.scope["app"]).settings
        limit = settings.max_body_bytes
        too_large = f"The request body is larger than the limit of {limit} bytes."
        declared = self.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise PayloadTooLarge(too_large)
        chunks: list[bytes] = []
        size = 0
        seconds = settings.body_read_timeout_seconds
        try:
            # A client trickling its body must not hold memory and a task forever.
            async with asyncio.timeout(seconds):
                while True:
                    message = await self.receive()
                    if message["type"] == "http.disconnect":
                        raise ClientGone
                    chunk = message.get("body", b"")
                    size += len(chunk)
                    if size > limit:
                        raise PayloadTooLarge(too_large)
                    chunks.append(chunk)
                    if not message.get("more_body", False):
                        break
        except TimeoutError:
            raise RequestTimeout(
                f"The request body did not arrive within {seconds:g} seconds."
            ) from None
        if not size:
            raise InvalidRequest("The request body is empty; send a JSON object with 'messages'.")
        # The body is in, so the next ASGI message can only be the disconnect.
        self._watch()
        return b"".join(chunks)

    # -- writing -------------------------------------------------------------------------

    async def _write_json(self, reply: JsonReply) -> None:
        self.finished = True
        data = json.dumps(reply.body, ensure_ascii=False, separators=(",", ":")).encode()
        await self._start(
            reply.status,
            [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(data)).encode()),
                *((k.encode(), v.encode()) for k, v in reply.headers.items()),
            ],
        )
        await self._body(data, more=False)

    async def _write_stream(self, reply: StreamReply) -> None:
        try:
            headers = [*_SSE_HEADERS, *((k.encode(), v.encode()) for k, v in reply.headers.items())]
            await self._start(200, headers)
            # Responses events are named and end with response.completed, no [DONE].
            frame, done = (sse_event, b"") if self.api == "responses" else (sse, _DONE)
            # No generator around first + rest: each layer costs a resumption per chunk.
            await self._body(frame(reply.first))
            self.events = 1
            async for chunk in reply.rest:
                await self._body(frame(chunk))
                self.events += 1
            self.finished = True
            await self._body(done, more=False)
        finally:
            await reply.aclose()

    async def _write_error(self, exc: ServelmError) -> None:
        if self.finished:
            return
        self.finished = True
        rendered = render(
            exc,
            self.dialect,
            stream_started=self.started,
            # A Responses stream's error event takes the next sequence number.
            responses_event=self.events if self.api == "responses" else None,
        )
        if not self.started:
            await self._start(rendered.status, rendered.headers)
        await self._body(rendered.body, more=False)

    async def _start(self, status: int, headers: list[tuple[bytes, bytes]]) -> None:
        self.started = True
        await self.send({"type": "http.response.start", "status": status, "headers": headers})

    async def _body(self, data: bytes, more: bool = True) -> None:
        message: Message = {"type": "http.response.body", "body": data, "more_body": more}
        await self.send(message)

    # -- the client hanging up -------------------------------------------------------------

    @contextlib.contextmanager
    def _cancel_on_disconnect(self) -> Iterator[None]:
        """Inside, a client hang-up (noticed once the body is read) cancels this task,
        and so the generation; it leaves as ClientGone."""
        try:
            yield
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if not self._gone or task is None:
                # Stopped by the drain or the request's deadline: an error (an event on
                # a stream), not a dropped connection. Otherwise the server is exiting.
                front(self.scope["app"]).lifecycle.raise_if_stopped()
                raise
            task.uncancel()
            raise ClientGone from None
        finally:
            if self._watcher is not None:
                self._watcher.cancel()

    def _watch(self) -> None:
        task = asyncio.current_task()
        assert task is not None

        async def watch() -> None:
            while (await self.receive())["type"] != "http.disconnect":
                pass
            if not self.finished:
                self._gone = True
                task.cancel()

        self._watcher = asyncio.create_task(watch())
