"""``GET /v1/models`` and ``GET /v1/models/{id}`` in OpenAI's list format."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request

from servelm.api.auth import authenticate
from servelm.catalog import ModelSpec
from servelm.errors import MethodNotAllowed, ModelNotFound
from servelm.protocol import model_card

router = APIRouter()


def _card(request: Request, spec: ModelSpec) -> dict[str, Any]:
    engines = request.app.state.chat.engines
    return model_card(
        spec.slug,
        spec.owned_by,
        request.app.state.started_at,
        aliases=list(spec.aliases),
        context_window=spec.context_window,
        max_output_tokens=spec.max_output_tokens,
        vision=spec.vision,
        available=spec.slug in engines,
        engine=spec.engine,
        pricing={
            "input_per_million": str(spec.input_price),
            "output_per_million": str(spec.output_price),
        },
    )


@router.get("/v1/models")
async def list_models(request: Request) -> dict[str, Any]:
    await authenticate(request)
    catalog = request.app.state.chat.catalog
    return {"object": "list", "data": [_card(request, s) for s in catalog]}


@router.get("/v1/models/{model_id:path}")
async def get_model(request: Request, model_id: str) -> dict[str, Any]:
    await authenticate(request)
    spec = request.app.state.chat.catalog.get(model_id)
    if spec is None:
        raise ModelNotFound(f"The model '{model_id}' does not exist.", param="model")
    return _card(request, spec)


# POST /v1/models would otherwise be taken for a Segmind call to a model named
# "models"; it is this path with the wrong method.
@router.api_route("/v1/models", methods=["POST", "PUT", "PATCH", "DELETE"], include_in_schema=False)
async def models_wrong_method(request: Request) -> None:
    raise MethodNotAllowed(f"Method {request.method} is not allowed on /v1/models.")
