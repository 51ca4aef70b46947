"""``servelm worker``: one catalog model as a bare OpenAI-compatible engine.

What a gateway puts behind ``replicas``: ``POST /v1/chat/completions`` (streaming or
not), ``GET /v1/models``, ``GET /health`` (slots busy and queue depth, which the
gateway's probes read for load-aware routing) and ``GET /metrics``. No accounts and
no credits: the gateway owns those. With an API key set (``--api-key`` or
``SERVELM_WORKER_KEY``) the chat and models routes demand it, as ``Authorization:
Bearer`` or ``x-api-key``; /health and /metrics stay open for probes.

Chat goes through the gateway's own front end (``engine_front``: the route in
``api.chat``, the walk in ``ChatService``, the drain and deadlines of ``Lifecycle``),
with a caller that owns no account, so every rule but the money is the gateway's:
body limits, input limits, deadlines, error envelopes, hang-up cancellation. A
SIGTERM drains: /health answers 503 at once (the gateways' probes take the worker out
of rotation), new chats get 503 (they fail over), running ones finish.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import BaseRoute, Route

from servelm.access.keys import WorkerKey
from servelm.api import errors
from servelm.api.chat import ChatRoute, gated
from servelm.api.middleware import RequestContextMiddleware
from servelm.api.paths import OPENAI_CHAT
from servelm.api.services import Front, front, install_front
from servelm.catalog.specs import Catalog, ModelSpec
from servelm.chat.media import ImageLoader
from servelm.chat.protocol import model_card
from servelm.chat.serving import ChatService
from servelm.config import Settings
from servelm.engines.base import Engine
from servelm.processes.lifecycle import Lifecycle

log = logging.getLogger(__name__)

Lifespan = Callable[[Starlette], contextlib.AbstractAsyncContextManager[None]]


def engine_front(
    settings: Settings, routes: list[BaseRoute], lifespan: Lifespan, lifecycle: Lifecycle
) -> Starlette:
    """The app of a process that serves chat without accounts: OpenAI's chat route,
    exactly as the gateway's (``api.chat.ChatRoute`` behind the drain gate), plus
    ``routes``. ``lifespan`` puts the ``ChatService`` (with a ``WorkerKey``) in its
    ``Front`` (``api.services``) before the first request."""
    chat = gated(ChatRoute("openai"))
    app = Starlette(
        routes=[
            Route(OPENAI_CHAT, chat, methods=["POST"]),
            Route(OPENAI_CHAT + "/", chat, methods=["POST"]),
            *routes,
        ],
        lifespan=lifespan,
    )
    install_front(app, Front(settings, lifecycle))
    errors.install(app)
    # Its callers are gateways: their request id is this request's too.
    app.add_middleware(RequestContextMiddleware, hop_ids=True)
    return app


def worker_app(
    spec: ModelSpec, engine: Engine, settings: Settings, *, api_key: str | None = None
) -> Starlette:
    """``servelm worker``'s ASGI app: one engine, no money."""
    key = WorkerKey(api_key)
    lifecycle = Lifecycle(
        settings.drain_seconds,
        settings.max_inflight,
        settings.request_timeout,
        settings.send_timeout,
    )
    started_at = int(time.time())

    async def health_route(request: Request) -> Response:
        # A worker whose model's process has died (the OOM killer, an abort in
        # llama.cpp) serves nothing more: unhealthy, so that gateways route around it
        # and its supervisor's probe restarts it.
        stopped = lifecycle.ready and not engine.alive()
        ready = lifecycle.ready and not lifecycle.draining and not stopped
        status = "ok" if ready else "draining" if lifecycle.draining else "loading"
        if stopped:
            status = "engine stopped"
        return JSONResponse({"status": status, **load(spec, engine)}, 200 if ready else 503)

    async def metrics_route(request: Request) -> Response:
        return PlainTextResponse(metrics_text(spec, engine), media_type="text/plain; version=0.0.4")

    async def models_route(request: Request) -> Response:
        key.check(request.headers.get("x-api-key"), request.headers.get("authorization"))
        card = model_card(spec.slug, spec.owned_by, started_at, context_window=spec.context_window)
        return JSONResponse({"object": "list", "data": [card]})

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await engine.start()  # a ServelmError here fails the start-up, with its message
        media = ImageLoader(settings.media_limits())
        chat = ChatService(
            Catalog([spec]),
            {spec.slug: engine},
            authenticator=key,
            media=media,
            # Counted before generating, always: a gateway bills the prompt by this
            # count, sent with the first chunk, should the stream be cut before the end.
            prompt_count="exact",
        )
        install_front(app, front(app).serving(chat))
        lifecycle.install_signal_handlers()
        lifecycle.ready = True
        log.info("worker serves %s", spec.slug)
        try:
            yield
        finally:
            lifecycle.ready = False
            await lifecycle.close()
            await media.aclose()
            # Quick even after a drain that cut requests mid-prefill: the model's
            # process exits at once, without finishing a prompt for nobody.
            await engine.close()

    return engine_front(
        settings,
        [
            Route("/health", health_route, methods=["GET"]),
            Route("/metrics", metrics_route, methods=["GET"]),
            Route("/v1/models", models_route, methods=["GET"]),
        ],
        lifespan,
        lifecycle,
    )


def load(spec: ModelSpec, engine: Engine) -> dict[str, Any]:
    stats = engine.stats
    return {
        "model": spec.slug,
        "slots": getattr(engine, "slots", None),
        "slots_busy": stats.running,
        "queue_depth": stats.waiting,
    }


def metrics_text(spec: ModelSpec, engine: Engine) -> str:
    stats, slug = engine.stats, spec.slug
    rows = [
        ("servelm_worker_slots", "gauge", getattr(engine, "slots", 0)),
        ("servelm_worker_slots_busy", "gauge", stats.running),
        ("servelm_worker_queue_depth", "gauge", stats.waiting),
        ("servelm_worker_requests_total", "counter", stats.requests_total),
        ("servelm_worker_cancelled_total", "counter", stats.cancelled_total),
    ]
    return "".join(
        f'# TYPE {name} {kind}\n{name}{{model="{slug}"}} {value}\n' for name, kind, value in rows
    )
