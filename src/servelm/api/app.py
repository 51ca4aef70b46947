"""The application factory: settings in, ASGI app out. No module-level state."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator

from fastapi import FastAPI

from servelm import __version__
from servelm.api import chat, errors, models
from servelm.api.middleware import RequestContextMiddleware
from servelm.catalog import Catalog, default_spec
from servelm.config import Settings
from servelm.engines.base import Engine
from servelm.engines.llamacpp import LlamaCppEngine
from servelm.errors import ModelUnavailable
from servelm.serving import ChatService

log = logging.getLogger(__name__)


def build_engine(spec, settings: Settings) -> Engine:  # type: ignore[no-untyped-def]
    return LlamaCppEngine(
        spec,
        threads=settings.threads,
        slots=settings.slots,
        queue_size=settings.queue_size,
        verbose=settings.log_level == "debug",
    )


async def start_engines(catalog: Catalog, settings: Settings) -> dict[str, Engine]:
    """Load every model that can be loaded; a model that cannot is reported, not fatal."""
    engines: dict[str, Engine] = {}
    for spec in catalog:
        engine = build_engine(spec, settings)
        try:
            await engine.start()
        except ModelUnavailable as exc:
            log.warning("model %s unavailable: %s", spec.slug, exc.message)
            continue
        engines[spec.slug] = engine
    return engines


def create_app(settings: Settings, catalog: Catalog | None = None) -> FastAPI:
    catalog = catalog or Catalog([default_spec(settings.model_dir)])

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engines = await start_engines(catalog, settings)
        app.state.chat = ChatService(catalog, engines)
        # Engines belong to this loop; tools that reach in from other threads need it.
        app.state.loop = asyncio.get_running_loop()
        try:
            yield
        finally:
            for engine in engines.values():
                await engine.close()

    app = FastAPI(
        title="servelm",
        version=__version__,
        lifespan=lifespan,
        docs_url="/docs",
        redoc_url=None,
    )
    app.state.settings = settings
    app.state.started_at = int(time.time())
    errors.install(app)
    app.include_router(models.router)
    app.include_router(chat.router)
    app.add_middleware(RequestContextMiddleware)

    @app.get("/health", include_in_schema=False)
    async def health() -> dict[str, object]:
        engines = app.state.chat.engines
        return {"status": "ok", "models": {slug: e.describe() for slug, e in engines.items()}}

    return app
