"""The caller of a user route (``/v1/models``, ``/v1/credits``, ...), as a FastAPI
dependency: authenticated by the same ``Authenticator`` as the chat walk, and told
their balance in ``x-remaining-credits`` on the answer, errors included."""

from __future__ import annotations

from fastapi import Request, Response

from servelm.access.keys import Principal, key_from_headers
from servelm.api.services import find_services, services
from servelm.billing.money import format_credits
from servelm.errors import ServelmError


async def caller(request: Request, response: Response) -> Principal:
    parts = services(request)
    principal: Principal = await parts.authenticator.authenticate(
        key_from_headers(request.headers.get("x-api-key"), request.headers.get("authorization"))
    )
    balance: int = await parts.billing.balance(principal.account_id)
    request.state.balance = balance
    response.headers["x-remaining-credits"] = format_credits(balance)

    async def balance_headers(exc: ServelmError) -> dict[str, str]:
        # Errors raised after this point are rendered by api.errors, which asks here.
        return {"x-remaining-credits": format_credits(balance)}

    request.state.balance_headers = balance_headers
    return principal


async def balance_if_known(request: Request) -> dict[str, str]:
    """``x-remaining-credits`` for a request no route took (a 405, an OpenAI endpoint
    this server lacks) that carries a valid key; nothing otherwise. The request still
    fails as it would: a wrong path is not made a 401 by a bad key."""
    parts = find_services(request)
    if not request.url.path.startswith("/v1/") or parts is None:
        # No services: a process without accounts (the engine process, a worker) has
        # no balance to tell, and its WorkerKey does not authenticate account keys.
        return {}
    headers = request.headers
    if not headers.get("x-api-key") and not headers.get("authorization"):
        return {}
    try:
        raw = key_from_headers(headers.get("x-api-key"), headers.get("authorization"))
        principal = await parts.authenticator.authenticate(raw)
    except ServelmError:
        return {}  # no key or a bad one: the routing error alone says enough
    balance: int = await parts.billing.balance(principal.account_id)
    return {"x-remaining-credits": format_credits(balance)}
