"""``GET /metrics``: Prometheus text from the app's own registry, behind
``SERVELM_METRICS_TOKEN`` when set (it shows traffic and the fleet's state)."""

from __future__ import annotations

import hmac

from fastapi import APIRouter, Request
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST

from servelm.api.services import services
from servelm.errors import AuthenticationError

router = APIRouter()


@router.get("/metrics", include_in_schema=False)
async def metrics(request: Request) -> Response:
    token: str | None = services(request).settings.metrics_token
    if token:
        scheme, _, given = request.headers.get("authorization", "").strip().partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(
            given.strip().encode(), token.encode()
        ):
            raise AuthenticationError(
                "GET /metrics needs the metrics token: Authorization: Bearer <token>."
            )
    return Response(services(request).metrics.exposition(), media_type=CONTENT_TYPE_LATEST)
