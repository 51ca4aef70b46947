"""``GET /v1/models`` and ``GET /v1/models/{id}`` in OpenAI's list format."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request

from servelm.api.deps import caller
from servelm.api.services import services
from servelm.catalog.specs import ModelSpec
from servelm.chat.protocol import model_card
from servelm.errors import ModelNotFound

router = APIRouter(tags=["models"], dependencies=[Depends(caller)])


def _card(request: Request, spec: ModelSpec) -> dict[str, Any]:
    models = services(request).models
    card = model_card(
        spec.slug,
        spec.owned_by,
        services(request).started_at,
        aliases=list(spec.aliases),
        context_window=spec.context_window,
        max_output_tokens=spec.max_output_tokens,
        vision=spec.vision,
        capabilities=spec.capabilities(),
        available=models.servable(spec.slug),
        # Serverless local models: "unloaded" ones load at their first request
        # (engines.pool), which then waits for the load (x-servelm-cold-start-ms).
        state=models.state(spec.slug),
        engine=spec.engine,
        pricing={
            "input_per_million": str(spec.input_price),
            "output_per_million": str(spec.output_price),
        },
    )
    # What the model page shows (issue 29.4): Markdown text, as the catalog has it.
    card.update(display_name=spec.title, description=spec.description, features=list(spec.features))
    return card


@router.get("/v1/models")
async def list_models(request: Request) -> dict[str, Any]:
    catalog = services(request).catalog
    return {"object": "list", "data": [_card(request, s) for s in catalog]}


@router.get("/v1/models/{model_id:path}")
async def get_model(request: Request, model_id: str) -> dict[str, Any]:
    spec = services(request).catalog.get(model_id)
    if spec is None:
        raise ModelNotFound(f"The model '{model_id}' does not exist.", param="model")
    return _card(request, spec)
