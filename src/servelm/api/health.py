"""Operator probes: ``/healthz`` (the process is alive and its loop turns) and
``/readyz`` (database reachable, a model able to serve, not draining). The gate in
front of the chat routes is admission's (``engines/admission.py``)."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from sqlalchemy import text

from servelm.api.services import front, services
from servelm.engines.base import Engine
from servelm.engines.upstream import OpenAIUpstreamEngine
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
