"""The caller of a user route (``/v1/models``, ``/v1/credits``, ...), as a FastAPI
dependency: authenticated by the same ``Authenticator`` as the chat walk, and told
their balance in ``x-remaining-credits`` on the answer, errors included."""

from __future__ import annotations

from fastapi import Request, Response

from servelm.auth.keys import Principal, key_from_headers
from servelm.billing.money import format_credits
from servelm.errors import ServelmError


async def caller(request: Request, response: Response) -> Principal:
    chat = request.app.state.chat
    principal: Principal = await chat.authenticator.authenticate(
        key_from_headers(request.headers.get("x-api-key"), request.headers.get("authorization"))
    )
    billing = request.app.state.billing
    balance: int = await billing.balance(principal.account_id)
    request.state.balance = balance
    response.headers["x-remaining-credits"] = format_credits(balance)

    async def balance_headers(exc: ServelmError) -> dict[str, str]:
        # Errors raised after this point are rendered by api.errors, which asks here.
        return {"x-remaining-credits": format_credits(balance)}

    request.state.balance_headers = balance_headers
    return principal
