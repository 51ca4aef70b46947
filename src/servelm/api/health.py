"""Operator probes: ``/healthz`` (the process is alive and its loop turns) and
``/readyz`` (database reachable, a model able to serve, not draining), plus the gate
in front of the chat routes that sheds requests while draining or over capacity."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from sqlalchemy import text
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from servelm.api.errors import render
from servelm.api.paths import dialect_for_path
from servelm.api.services import find_front, front, services
from servelm.engines.base import Engine
from servelm.engines.upstream import OpenAIUpstreamEngine
from servelm.errors import ServelmError
from servelm.processes.lifecycle import SLOW_CLIENT
from servelm.store.db import Database

router = APIRouter()


@router.get("/healthz", include_in_schema=False)
async def healthz() -> dict[str, str]:
    # Nothing to wait on: answered by the loop alone, so it stays fast while engines
    # and the database are busy.
    return {"status": "alive"}


def can_serve(engine: Engine) -> bool:
    """A local engine serves once loaded; a remote model while one of its replicas is
    in rotation (the health checker readmits them, so this comes back by itself)."""
    if isinstance(engine, OpenAIUpstreamEngine):
        return any(r.healthy for r in engine.replicas.all)
    return True


def _ping(db: Database) -> None:
    with db.read() as conn:
        conn.execute(text("SELECT 1"))


@router.get("/readyz", include_in_schema=False)
async def readyz(request: Request) -> JSONResponse:
    parts = front(request)
    life = parts.lifecycle
    problems: list[str] = []
    if life.draining:
        problems.append("draining")
    elif not life.ready:
        problems.append("starting")
    else:
        gateway = services(request)
        servable = [s.slug for s in gateway.catalog if gateway.models.servable(s.slug)]
        if not servable:
            problems.append("no model can be served")
        # A local model not loaded yet loads at its first request; a loaded engine
        # whose every replica is ejected serves nothing until a probe readmits one.
        elif not any(
            slug not in gateway.engines or can_serve(gateway.engines[slug]) for slug in servable
        ):
            problems.append("no model can serve: every replica is ejected")
        try:
            db = gateway.db
            await asyncio.wait_for(db.run(_ping, db), 1.0)
        except Exception as exc:
            problems.append(f"database: {type(exc).__name__}")
    if problems:
        return JSONResponse({"status": "unavailable", "problems": problems}, status_code=503)
    return JSONResponse({"status": "ready"})


class Gate:
    """Wraps a chat route: sheds a request quickly while draining or past
    ``SERVELM_MAX_INFLIGHT``, tracks the ones admitted (for the drain, the deadline and
    the send timeout), and answers for a request the lifecycle stopped before it
    could answer for itself."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        parts = find_front(scope["app"])
        if parts is None:
            await self.app(scope, receive, send)
            return
        life = parts.lifecycle
        try:
            life.admit()
        except ServelmError as exc:
            await self._error(exc, scope, receive, send)
            return
        loop = asyncio.get_running_loop()
        started = False
        with life.track(_asked_timeout(scope)) as flight:

            async def watched(message: Message) -> None:
                nonlocal started
                started = started or message["type"] == "http.response.start"
                flight.sending = loop.time()
                try:
                    await send(message)
                finally:
                    flight.sending = None

            try:
                await self.app(scope, receive, watched)
            except asyncio.CancelledError:
                reason = life.stopped_reason()
                if reason is None:
                    raise
                if not started and reason != SLOW_CLIENT:
                    await self._error(life.error_for(reason), scope, receive, send)

    @staticmethod
    async def _error(exc: ServelmError, scope: Scope, receive: Receive, send: Send) -> None:
        r = render(exc, dialect_for_path(scope["path"]))
        await send({"type": "http.response.start", "status": r.status, "headers": r.headers})
        await send({"type": "http.response.body", "body": r.body})


def _asked_timeout(scope: Scope) -> float | None:
    """A client may ask for a shorter deadline: ``x-request-timeout`` in seconds, or
    the timeout the openai SDKs announce in ``x-stainless-timeout``."""
    for name, value in scope["headers"]:
        if name in (b"x-request-timeout", b"x-stainless-timeout"):
            try:
                seconds = float(value)
            except ValueError:
                continue
            if seconds > 0:
                return seconds
    return None
