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
from starlette.routing import Match, Route
from starlette.types import ASGIApp, Receive, Scope, Send

from servelm import __version__
from servelm.access import limits
from servelm.access import sessions as console_session
from servelm.access.keys import Authenticator
from servelm.access.limits.guesses import Guesses
from servelm.api import account, admin, errors, health, metrics, models, openapi
from servelm.api import jobs as jobs_routes
from servelm.api.chat import ChatRoute, gated
from servelm.api.console import account_keys as console_account_keys
from servelm.api.console import operator as console_operator
from servelm.api.console import routes as console_routes
from servelm.api.middleware import RequestContextMiddleware
from servelm.api.paths import OPENAI_CHAT, OPENAI_RESPONSES, is_reserved
from servelm.api.services import (
    Front,
    Services,
    find_front,
    front,
    install_front,
    install_services,
    services,
)
from servelm.billing.service import Billing
from servelm.catalog.models_file import load_catalog
from servelm.catalog.specs import Catalog
from servelm.chat.media import ImageLoader, MediaLimits
from servelm.chat.serving import ChatService
from servelm.config import Settings
from servelm.engines.base import Engine
from servelm.engines.pool import ModelPool
from servelm.engines.registry import EngineFactory, build_engine
from servelm.jobs.runner import Runner
from servelm.jobs.service import Jobs
from servelm.jobs.webhooks import Sender
from servelm.processes.lifecycle import Lifecycle
from servelm.store.db import Database
from servelm.telemetry import tracing
from servelm.telemetry.metrics import Metrics

log = logging.getLogger(__name__)


class ServelmApp(FastAPI):
    """FastAPI, except that a POST to one of the two chat routes skips FastAPI's
    router and exception middleware (a tenth of the gateway's CPU per request in the
    profile, docs/benchmarks.md) and goes straight to the route, but through the same
    user middleware as every other request: ``add_middleware`` applies to chat too."""

    def __init__(self, **kw: Any) -> None:
        super().__init__(**kw)
        self.chat_routes = chat_routes()
        self._chat_stack: ASGIApp | None = None

    def build_middleware_stack(self) -> ASGIApp:
        stack: ASGIApp = _ChatDispatch(self.chat_routes)
        for cls, args, kwargs in reversed(self.user_middleware):
            stack = cls(stack, *args, **kwargs)
        self._chat_stack = stack
        return super().build_middleware_stack()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST":
            for route in self.chat_routes:
                match, child = route.matches(scope)
                if match is Match.FULL:
                    if self.middleware_stack is None:
                        self.middleware_stack = self.build_middleware_stack()
                    assert self._chat_stack is not None
                    scope["app"] = self
                    scope.update(child)
                    scope["servelm.chat_route"] = route
                    await self._chat_stack(scope, receive, send)
                    return
        await super().__call__(scope, receive, send)


class _ChatDispatch:
    """The innermost app of the chat stack: the matched chat route itself."""

    def __init__(self, routes: list[Route]) -> None:
        self.routes = routes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        route: Route = scope["servelm.chat_route"]
        await route.app(scope, receive, send)


class _SegmindRoute(Route):
    """``/v1/{model}``, except OpenAI's and our own paths there (``api.paths``): a POST
    to ``/v1/models`` is a 405, not a request for a model called "models"."""

    def matches(self, scope: Scope) -> tuple[Match, Scope]:
        match, child = super().matches(scope)
        if match is not Match.NONE and is_reserved(child["path_params"]["model"]):
            return Match.NONE, {}
        return match, child


def chat_routes() -> list[Route]:
    """The chat routes (OpenAI's also with a trailing slash: never a redirect), and
    the Responses API on the same walk."""
    # gated: admission's gate sheds chat requests while draining or over capacity.
    openai = gated(ChatRoute("openai"))
    responses = gated(ChatRoute("openai", api="responses"))
    return [
        Route(OPENAI_CHAT, openai, methods=["POST"]),
        Route(OPENAI_CHAT + "/", openai, methods=["POST"]),
        Route(OPENAI_RESPONSES, responses, methods=["POST"]),
        Route(OPENAI_RESPONSES + "/", responses, methods=["POST"]),
        _SegmindRoute("/v1/{model}", gated(ChatRoute("segmind")), methods=["POST"]),
    ]


def _public(facts: dict[str, Any]) -> dict[str, Any]:
    """What /health, open to anyone, may say of an engine: load, not addresses (the
    operator has those in GET /admin/models and `servelm models list`)."""
    out = {k: v for k, v in facts.items() if k != "upstream"}
    if "replicas" in out:
        hidden = ("url", "last_error")
        out["replicas"] = [{k: v for k, v in r.items() if k not in hidden} for r in out["replicas"]]
    return out


def build_jobs(
    app: FastAPI, settings: Settings, billing: Billing, chat: ChatService
) -> tuple[Jobs, Runner, ImageLoader]:
    """The job queue's runner and its two doors (servelm.jobs), on the app's walk."""
    # Webhook URLs pass the image fetcher's address checks, with their own allow-list.
    loader = ImageLoader(MediaLimits(allow_hosts=settings.webhook_allow_hosts))
    server_secret = console_session.app_secret(app, settings)
    sender = Sender(
        loader, server_secret, settings.webhook_retry_seconds, settings.webhook_max_attempts
    )
    retention = timedelta(hours=settings.jobs_retention_hours)
    parts = front(app)
    runner = Runner(
        chat,
        billing,
        sender,
        concurrency=settings.jobs_concurrency or max(1, settings.slots // 2),
        lease=timedelta(seconds=settings.jobs_lease_seconds),
        poll=settings.jobs_poll_seconds,
        retention=retention,
        metrics=parts.metrics,
        # Draining: live requests finish, and no new queued line starts.
        draining=lambda: bool(parts.lifecycle.draining),
    )
    jobs = Jobs(chat, billing, runner, loader, server_secret, retention)
    return jobs, runner, loader


def _engines(app: FastAPI) -> dict[str, Engine]:
    """The engines, once started (the metrics ask from the start: none yet then)."""
    parts = find_front(app)
    return parts.chat.engines if parts is not None and parts.chat is not None else {}


def create_app(
    settings: Settings,
    catalog: Catalog | None = None,
    *,
    engine_factory: EngineFactory = build_engine,
) -> FastAPI:
    """Build the app. Without an explicit catalog, the built-in entries plus the models
    file (raises ``ConfigError`` when that file is bad, before anything starts).
    ``engine_factory`` is the engine seam: tests plug a scripted engine in here."""
    if catalog is None:
        catalog = load_catalog(settings.model_dir, settings.models_file)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        db = Database(settings.db_url)
        await asyncio.to_thread(db.upgrade)
        billing = Billing(db, hold_ttl=timedelta(seconds=settings.hold_ttl_seconds))
        await billing.start()
        authenticator = Authenticator(billing.find_key, cache_seconds=settings.key_cache_seconds)
        # Rate limits, and the channel that tells every gateway about revoked keys.
        limiter, invalidation = limits.build(
            settings,
            db,
            app_metrics.registry,
            db.run,
            plans=catalog.plans,
            forget=authenticator.forget,
            forget_account=authenticator.forget_account,
            forget_all=authenticator.forget_all,
        )
        invalidation.start()
        guesses = Guesses(
            limiter.redis,
            allowed=settings.secret_failures_allowed,
            window_seconds=settings.secret_failure_window_seconds,
        )
        # Remote engines and pinned local models start now; the others at their first
        # request (engines.pool), within that request's deadline.
        models = ModelPool(
            catalog,
            settings,
            engine_factory,
            metrics=app_metrics,
            deadline=lifecycle.current_deadline,
        )
        await models.start()
        media = ImageLoader(settings.media_limits())
        chat = ChatService(
            catalog,
            models,
            billing=billing,
            authenticator=authenticator,
            media=media,
            metrics=app_metrics,
            limiter=limiter,
            prompt_count=settings.prompt_count,
            fair_slots=settings.fair_slots,
        )
        install_front(app, front(app).serving(chat))
        jobs, runner, webhook_loader = build_jobs(app, settings, billing, chat)
        install_services(
            app,
            Services(
                settings=settings,
                catalog=catalog,
                engines=chat.engines,
                models=models,
                chat=chat,
                billing=billing,
                db=db,
                authenticator=authenticator,
                limiter=limiter,
                invalidation=invalidation,
                guesses=guesses,
                metrics=app_metrics,
                lifecycle=lifecycle,
                media=media,
                jobs=jobs,
                # Engines belong to this loop; tools that reach in from other threads
                # need it.
                loop=asyncio.get_running_loop(),
                started_at=started_at,
            ),
        )
        runner.start()
        app_metrics.start()
        lifecycle.install_signal_handlers()
        lifecycle.ready = True
        # Everything built so far (modules, the app, the engines) lives as long as the
        # process: out of the collector's reach, a full collection no longer walks
        # those hundreds of thousands of objects in the middle of someone's request.
        gc.collect()
        gc.freeze()
        try:
            yield
        finally:
            lifecycle.ready = False
            await lifecycle.close()
            await app_metrics.close()
            tracing.flush()
            await runner.close()
            await webhook_loader.aclose()
            await invalidation.close()
            await limiter.close()
            await media.aclose()
            await models.close()
            await billing.close()
            db.dispose()

    app = ServelmApp(
        title="servelm",
        version=__version__,
        lifespan=lifespan,
        # /docs is the console's (console.routes): Swagger UI from the installed
        # package, under the console's CSP, never from a CDN.
        docs_url=None,
        redoc_url=None,
    )
    app_metrics = Metrics(lambda: _engines(app))
    started_at = int(time.time())
    lifecycle = Lifecycle(
        settings.drain_seconds,
        settings.max_inflight,
        settings.request_timeout,
        settings.send_timeout,
    )
    # What exists before start-up; the lifespan adds the walk, then the services.
    install_front(app, Front(settings, lifecycle, metrics=app_metrics))
    app.router.redirect_slashes = False  # a redirect would turn a POST into a GET
    errors.install(app)
    app.include_router(metrics.router)
    app.include_router(health.router)
    app.include_router(admin.router)
    app.include_router(account.router)
    app.include_router(models.router)
    app.include_router(jobs_routes.router)
    app.include_router(console_routes.router)  # the web console's pages
    app.include_router(console_account_keys.router)  # its self-service keys
    app.include_router(console_operator.router)  # and its operator pages
    # In the router too, where the fast path does not take a request: a GET there is
    # a 405. No other route fully matches a POST to /v1/<one segment>, so their place
    # changes no routing decision. The schema-only twins go behind them.
    app.router.routes[0:0] = app.chat_routes
    openapi.document_chat_routes(app)
    app.add_middleware(RequestContextMiddleware)

    @app.get("/health", include_in_schema=False)
    async def health_models() -> dict[str, object]:
        engines = services(app).engines
        return {"status": "ok", "models": {s: _public(e.describe()) for s, e in engines.items()}}

    return app
