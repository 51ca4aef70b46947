"""Authentication for user routes: ``x-api-key`` or ``Authorization: Bearer``."""

from __future__ import annotations

from fastapi import Request

from servelm import keys
from servelm.billing.service import Billing, Principal
from servelm.catalog import format_credits


async def authenticate(request: Request) -> Principal:
    """Step 2. Remembers the principal on the request so every later response, errors
    included, can carry ``x-remaining-credits``."""
    billing: Billing = request.app.state.billing
    raw = keys.from_headers(request.headers.get("x-api-key"), request.headers.get("authorization"))
    principal = await billing.authenticate(raw)
    request.state.principal = principal
    return principal


async def credit_headers(request: Request, balance: int | None = None) -> dict[str, str]:
    """``x-remaining-credits`` for an authenticated request (fetched if not given)."""
    principal: Principal | None = getattr(request.state, "principal", None)
    if principal is None:
        return {}
    if balance is None:
        balance = await request.app.state.billing.balance(principal.account_id)
    return {"x-remaining-credits": format_credits(balance)}
