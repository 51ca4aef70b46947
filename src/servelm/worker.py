"""``servelm worker``: one catalog model as a bare OpenAI-compatible engine.

What a gateway puts behind ``replicas``: ``POST /v1/chat/completions`` (streaming or
not), ``GET /v1/models``, ``GET /health`` (slots busy and queue depth, which the
gateway's probes read for load-aware routing) and ``GET /metrics``. No accounts and
no credits: the gateway owns those. With an API key set (``--api-key`` or
``SERVELM_WORKER_KEY``) the chat and models routes demand it, as ``Authorization:
Bearer`` or ``x-api-key``; /health and /metrics stay open for probes.

The walk is the gateway's own (``ChatService``: validation, the chat template's
prompt count and window checks, generation, the response shapes) without the
billing step. A client that hangs up cancels its generation at once.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
import uuid
from typing import Any

from servelm import auth
from servelm.api.errors import render
from servelm.calls import StreamReply
from servelm.catalog import Catalog, ModelSpec
from servelm.engines.base import Engine
from servelm.errors import (
    AuthenticationError,
    MethodNotAllowed,
    NotFound,
    ServelmError,
)
from servelm.protocol import model_card, sse, usage_body
from servelm.serving import ChatService

log = logging.getLogger(__name__)

Scope = dict[str, Any]
Receive = Any
Send = Any

_JSON = [(b"content-type", b"application/json")]
_SSE = [(b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache")]


class Worker:
    """The worker's ASGI app: one engine, no money."""

    def __init__(self, spec: ModelSpec, engine: Engine, *, api_key: str | None = None) -> None:
        self.spec = spec
        self.engine = engine
        self.api_key = api_key
        # The gateway's walk without its money: no billing, no authenticator.
        self.service = ChatService(Catalog([spec]), {spec.slug: engine})
        self.started_at = int(time.time())
        self.ready = False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        try:
            await self._route(scope, receive, send)
        except ServelmError as exc:
            r = render(exc, "openai")
            await _send(send, r.status, r.headers, r.body)

    async def _route(self, scope: Scope, receive: Receive, send: Send) -> None:
        path, method = scope["path"].rstrip("/") or "/", scope["method"]
        if path == "/health":
            status = 200 if self.ready else 503
            await _send_json(send, status, {"status": "ok" if self.ready else "loading",
                                            **self.load()})  # fmt: skip
            return
        if path == "/metrics":
            await _send(send, 200, [(b"content-type", b"text/plain; version=0.0.4")],
                        self.metrics_text().encode())  # fmt: skip
            return
        if path not in ("/v1/models", "/v1/chat/completions"):
            raise NotFound(f"No route for {method} {scope['path']}.")
        self._authenticate(scope)
        if path == "/v1/models":
            if method != "GET":
                raise MethodNotAllowed(f"Method {method} is not allowed on {path}.")
            card = model_card(self.spec.slug, self.spec.owned_by, self.started_at,
                              context_window=self.spec.context_window)  # fmt: skip
            await _send_json(send, 200, {"object": "list", "data": [card]})
            return
        if method != "POST":
            raise MethodNotAllowed(f"Method {method} is not allowed on {path}.")
        await self._chat(scope, receive, send)

    def _authenticate(self, scope: Scope) -> None:
        if not self.api_key:
            return
        headers = dict(scope["headers"])
        given = auth.key_from_headers(
            (headers.get(b"x-api-key") or b"").decode("latin-1") or None,
            (headers.get(b"authorization") or b"").decode("latin-1") or None,
        )
        if not given or not hmac.compare_digest(given.encode(), self.api_key.encode()):
            raise AuthenticationError("Invalid or missing worker key.")

    async def _chat(self, scope: Scope, receive: Receive, send: Send) -> None:
        raw = b""
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            raw += message.get("body", b"")
            if not message.get("more_body"):
                break
        service = self.service
        request = service.parse(raw)
        spec, engine = service.resolve(request, request.model or self.spec.slug)
        call = await service.prepare(uuid.uuid4().hex, request, spec, engine)
        # The body is read: the next message can only be the client leaving, which
        # cancels the generation (the engine frees its slot at once).
        task = asyncio.current_task()
        assert task is not None
        gone = False

        async def watch() -> None:
            nonlocal gone
            while (await receive())["type"] != "http.disconnect":
                pass
            gone = True
            task.cancel()

        watcher = asyncio.create_task(watch())
        try:
            if request.stream:
                reply = await service.stream_reply(call)
                if request.include_usage and call.prompt_exact:
                    # The prompt's count with the first chunk: a gateway whose stream
                    # is cut before the last chunk bills it (calls.settle_usage).
                    reply.first = {**reply.first, "usage": usage_body(call.prompt_tokens, 0)}
                await self._stream(send, reply)
            else:
                await _send_json(send, 200, (await service.json_reply(call)).body)
        except asyncio.CancelledError:
            if not gone:
                raise
            task.uncancel()
        finally:
            watcher.cancel()

    async def _stream(self, send: Send, reply: StreamReply) -> None:
        # The first chunk came before the headers: errors up front (queue full, prompt
        # too long) were still a proper HTTP status for the gateway.
        try:
            await send({"type": "http.response.start", "status": 200, "headers": _SSE})
            try:
                await _body(send, sse(reply.first))
                async for chunk in reply.rest:
                    await _body(send, sse(chunk))
            except ServelmError as exc:
                await _body(send, render(exc, "openai", stream_started=True).body, more=False)
                return
            await _body(send, b"data: [DONE]\n\n", more=False)
        finally:
            await reply.aclose()

    def load(self) -> dict[str, Any]:
        stats = self.engine.stats
        return {
            "model": self.spec.slug,
            "slots": getattr(self.engine, "slots", None),
            "slots_busy": stats.running,
            "queue_depth": stats.waiting,
        }

    def metrics_text(self) -> str:
        stats, slug = self.engine.stats, self.spec.slug
        rows = [
            ("servelm_worker_slots", "gauge", getattr(self.engine, "slots", 0)),
            ("servelm_worker_slots_busy", "gauge", stats.running),
            ("servelm_worker_queue_depth", "gauge", stats.waiting),
            ("servelm_worker_requests_total", "counter", stats.requests_total),
            ("servelm_worker_cancelled_total", "counter", stats.cancelled_total),
        ]
        return "".join(
            f'# TYPE {name} {kind}\n{name}{{model="{slug}"}} {value}\n'
            for name, kind, value in rows
        )

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            kind = (await receive())["type"].removeprefix("lifespan.")
            if kind == "startup":
                try:
                    await self.engine.start()
                except ServelmError as exc:
                    await send({"type": "lifespan.startup.failed", "message": exc.message})
                    return
                self.ready = True
                log.info("worker serves %s", self.spec.slug)
            else:
                self.ready = False
                await self.engine.close()
            await send({"type": f"lifespan.{kind}.complete"})
            if kind == "shutdown":
                return


async def _send_json(send: Send, status: int, body: Any) -> None:
    await _send(send, status, _JSON, json.dumps(body, separators=(",", ":")).encode())


async def _send(send: Send, status: int, headers: list[tuple[bytes, bytes]], body: bytes) -> None:
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def _body(send: Send, data: bytes, more: bool = True) -> None:
    await send({"type": "http.response.body", "body": data, "more_body": more})
