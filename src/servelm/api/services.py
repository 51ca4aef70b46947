"""What the routes and the console reach: one typed object per app, never ``app.state``.

``Front`` is what every process kind that serves chat has (the gateway, ``servelm
worker``, ``serve --workers``' engine host): its settings, its lifecycle, and, once
the lifespan has started the engines, the walk. ``api/chat.py`` and ``api/health.py``
read only this, so they run unchanged in all of them.

``Services`` is the gateway's whole set, built once by ``api/app.py``'s lifespan:
accounts, money, the database, rate limits. Routes and the console read it through
``services(request)``.

These accessors and the two ``install_*`` functions are the only code that touches
the app's ``state``.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from starlette.requests import HTTPConnection

# Types only: this module sits below everything it names (the walk itself imports the
# console's session code, which asks for the front here).
if TYPE_CHECKING:
    from servelm.access.keys import Authenticator
    from servelm.access.limits import Invalidation, Limiter
    from servelm.access.limits.guesses import Guesses
    from servelm.billing.service import Billing
    from servelm.catalog.specs import Catalog
    from servelm.chat.media import ImageLoader
    from servelm.chat.serving import ChatService
    from servelm.config import Settings
    from servelm.engines.base import Engine
    from servelm.engines.pool import ModelPool
    from servelm.jobs.service import Jobs
    from servelm.processes.lifecycle import Lifecycle
    from servelm.store.db import Database
    from servelm.telemetry.metrics import Metrics


@dataclass(frozen=True)
class Front:
    """A chat front end's parts. ``chat`` is None only before the lifespan has started
    the engines (no request is served then); ``metrics`` only where the process keeps
    none (a worker answers /metrics from its engine)."""

    settings: Settings
    lifecycle: Lifecycle
    chat: ChatService | None = None
    metrics: Metrics | None = None

    def serving(self, chat: ChatService) -> Front:
        """This front once the lifespan has started the walk."""
        return replace(self, chat=chat)

    @property
    def walk(self) -> ChatService:
        """The walk; only asked for while serving, so after the lifespan set it."""
        if self.chat is None:
            raise RuntimeError("the chat service is not started yet")
        return self.chat


@dataclass(frozen=True)
class Services:
    """The gateway's parts, built once at start-up (``api.app.create_app``)."""

    settings: Settings
    catalog: Catalog
    engines: dict[str, Engine]  # loaded now (models.engines, kept current by the pool)
    models: ModelPool  # every model's state: loaded, loading, unloaded (engines.pool)
    chat: ChatService  # the walk
    billing: Billing
    db: Database
    authenticator: Authenticator
    limiter: Limiter
    invalidation: Invalidation  # tells every gateway about revoked keys
    guesses: Guesses  # failed secret guesses per address (admin token, sign-in)
    metrics: Metrics
    lifecycle: Lifecycle
    media: ImageLoader
    jobs: Jobs
    loop: asyncio.AbstractEventLoop  # the engines' loop, for tools on other threads
    started_at: int


def _app(x: HTTPConnection | Any) -> Any:
    return x.app if isinstance(x, HTTPConnection) else x


def install_front(app: Any, front: Front) -> None:
    app.state.front = front


def install_services(app: Any, services: Services) -> None:
    app.state.services = services


def find_front(x: HTTPConnection | Any) -> Front | None:
    """The front, or None on an app that has none (one a test built by hand)."""
    found: Front | None = getattr(_app(x).state, "front", None)
    return found


def front(x: HTTPConnection | Any) -> Front:
    """The chat front end of ``x`` (a request, a connection, or the app itself)."""
    found = find_front(x)
    if found is None:
        raise RuntimeError("this app has no chat front end")
    return found


def find_services(x: HTTPConnection | Any) -> Services | None:
    """The gateway's services, or None: before start-up, or in a process without
    accounts."""
    found: Services | None = getattr(_app(x).state, "services", None)
    return found


def services(x: HTTPConnection | Any) -> Services:
    """The gateway's services for ``x`` (a request, a connection, or the app itself);
    there once the lifespan has started."""
    found = find_services(x)
    if found is None:
        raise RuntimeError("the gateway's services are not started")
    return found
