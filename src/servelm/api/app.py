"""The application factory: settings in, ASGI app out. No module-level state."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import time
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any

from fastapi import FastAPI
from starlette.routing import Match
from starlette.types import Receive, Scope, Send

from servelm import __version__
from servelm.api import account, admin, chat, errors, metrics, models
from servelm.api.middleware import RequestContextMiddleware
from servelm.billing.service import Billing
from servelm.catalog import Catalog, ModelSpec
from servelm.config import Settings
from servelm.engines.base import Engine
from servelm.engines.llamacpp import LlamaCppEngine
from servelm.engines.upstream import OpenAIUpstreamEngine
from servelm.errors import ModelUnavailable
from servelm.media import ImageLoader
from servelm.metrics import Metrics
from servelm.models_file import load_catalog
from servelm.serving import ChatService
from servelm.store.db import Database

log = logging.getLogger(__name__)


def build_engine(spec: ModelSpec, settings: Settings) -> Engine:
    if spec.engine == "openai":
        return OpenAIUpstreamEngine(spec, queue_size=settings.queue_size)
    return LlamaCppEngine(
        spec,
        threads=settings.threads,
        slots=settings.slots,
        queue_size=settings.queue_size,
        verbose=settings.log_level == "debug",
        prompt_cache_mib=settings.prompt_cache_mib,
    )


async def start_engines(
    catalog: Catalog, settings: Settings
) -> tuple[dict[str, Engine], dict[str, str]]:
    """Load every model that can be loaded; one that cannot is reported, not fatal.

    Returns the engines and, for each model left out, the reason (said in its 503).
    """
    engines: dict[str, Engine] = {}
    unavailable: dict[str, str] = {}
    for spec in catalog:
        if spec.engine == "llama.cpp" and (spec.path is None or not spec.path.is_file()):
            how = (
                f"run `servelm models pull {spec.slug}`"
                if spec.hf_repo
                else "set its path in the models file"
            )
            unavailable[spec.slug] = f"its weights are not installed at {spec.path}; {how}."
            log.info("model %s not served: no weights at %s", spec.slug, spec.path)
            continue
        engine = build_engine(spec, settings)
        try:
            await engine.start()
        except ModelUnavailable as exc:
            log.warning("model %s unavailable: %s", spec.slug, exc.message)
            unavailable[spec.slug] = exc.message
            continue
        engines[spec.slug] = engine
    return engines, unavailable


class ServelmApp(FastAPI):
    """FastAPI, except that a POST to one of the two chat routes skips FastAPI's
    middleware stack and router (seven layers, a tenth of the gateway's CPU per
    request in the profile, docs/benchmarks.md) and goes straight to the route, inside
    the same request-context middleware as every other request."""

    def __init__(self, **kw: Any) -> None:
        super().__init__(**kw)
        self.chat_routes = chat.routes()
        self._chat_fast = [
            (route, RequestContextMiddleware(route.app)) for route in self.chat_routes
        ]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST":
            for route, endpoint in self._chat_fast:
                match, child = route.matches(scope)
                if match is Match.FULL:
                    scope["app"] = self
                    scope.update(child)
                    await endpoint(scope, receive, send)
                    return
        await super().__call__(scope, receive, send)


def create_app(settings: Settings, catalog: Catalog | None = None) -> FastAPI:
    """Build the app. Without an explicit catalog, the built-in entries plus the models
    file (raises ``ConfigError`` when that file is bad, before anything starts)."""
    if catalog is None:
        catalog = load_catalog(settings.model_dir, settings.models_file)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        db = Database(settings.db_url)
        await asyncio.to_thread(db.upgrade)
        billing = Billing(
            db,
            key_cache_seconds=settings.key_cache_seconds,
            hold_ttl=timedelta(seconds=settings.hold_ttl_seconds),
        )
        await billing.start()
        app.state.billing = billing
        engines, unavailable = await start_engines(catalog, settings)
        media = ImageLoader(settings.media_limits())
        app.state.chat = ChatService(
            catalog, engines, unavailable, app.state.metrics, billing, media
        )
        # Engines belong to this loop; tools that reach in from other threads need it.
        app.state.loop = asyncio.get_running_loop()
        # Everything built so far (modules, the app, the engines) lives as long as the
        # process: out of the collector's reach, a full collection no longer walks
        # those hundreds of thousands of objects in the middle of someone's request.
        gc.collect()
        gc.freeze()
        try:
            yield
        finally:
            await media.aclose()
            for engine in engines.values():
                await engine.close()
            await billing.close()
            db.dispose()

    app = ServelmApp(
        title="servelm",
        version=__version__,
        lifespan=lifespan,
        docs_url="/docs",
        redoc_url=None,
    )
    app.state.settings = settings
    app.state.metrics = Metrics(
        lambda: app.state.chat.engines if hasattr(app.state, "chat") else {}
    )
    app.state.started_at = int(time.time())
    errors.install(app)
    app.include_router(metrics.router)
    app.include_router(admin.router)
    app.include_router(account.router)
    app.include_router(models.router)
    # In the router too, where the fast path does not take a request: a GET there is
    # a 405, a trailing slash a redirect. No other route fully matches a POST to
    # /v1/<one segment>, so their place changes no routing decision.
    app.router.routes[0:0] = app.chat_routes
    app.add_middleware(RequestContextMiddleware)

    @app.get("/health", include_in_schema=False)
    async def health() -> dict[str, object]:
        engines = app.state.chat.engines
        return {"status": "ok", "models": {slug: e.describe() for slug, e in engines.items()}}

    return app
