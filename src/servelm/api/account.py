"""What a key's owner may see of their own account: balance and usage."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request

from servelm.access.keys import Principal
from servelm.api.deps import caller
from servelm.api.services import services
from servelm.billing.money import MICRO, format_credits

router = APIRouter(tags=["account"])


@router.get("/v1/credits")
async def credits(request: Request, principal: Principal = Depends(caller)) -> dict[str, Any]:
    balance: int = request.state.balance
    return {"object": "credits", "credits": format_credits(balance), "micro_credits": balance}


@router.get("/v1/get-user-credits")
async def segmind_credits(
    request: Request, principal: Principal = Depends(caller)
) -> dict[str, Any]:
    """Segmind's shape: ``{"credits": <number>}``. A JSON number, as their clients
    expect; /v1/credits gives the exact decimal string."""
    balance: int = request.state.balance
    return {"credits": balance / MICRO, "free-credits": 0}


@router.get("/v1/usage")
async def usage(request: Request, principal: Principal = Depends(caller)) -> dict[str, Any]:
    rows = await services(request).billing.usage(principal.account_id)
    return {
        "object": "list",
        "data": [{**r, "cost": format_credits(r["cost"])} for r in rows],
    }
