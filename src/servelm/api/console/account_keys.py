"""Self-service keys on the account page (issue 29.5): a signed-in user creates keys
(name, models, expiry, rate limits within the account's plan), sees the secret once,
and revokes their own; the page shows usage per key.

The same functions as the CLI and ``/admin/`` make and revoke keys
(``billing.accounts``, ``access.key_grants``, ``access.limits.records``); what is added here
is what a user may do that an operator may not: nothing above the key they signed in
with (its models, its expiry) or above their plan.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response

from servelm.access.keys import Principal, key_grants
from servelm.access.limits import records as limits
from servelm.access.limits.policy import account_plan, check_within_plan
from servelm.api.console import web
from servelm.api.services import services
from servelm.billing import accounts
from servelm.errors import AuthenticationError, InvalidRequest, NotFound, ServelmError

router = APIRouter(prefix="/account", include_in_schema=False)

NEW_KEY_COOKIE = "servelm_account_new_key"
LIMITS = ("rpm", "tpm", "concurrency")


async def signed_in(request: Request) -> Principal:
    principal = await web.current_principal(request)
    if principal is None:
        raise AuthenticationError("Sign in to manage your keys.")
    return principal


def _back(message: str, error: bool = False) -> Response:
    return web.redirect(f"/account?{'err' if error else 'msg'}={quote(message)}#keys")


def _number(fields: dict[str, str], name: str) -> int | None:
    text = fields.get(name, "").strip()
    if not text:
        return None
    if not text.isdigit() or len(text) > 9:
        raise InvalidRequest(f"{name} must be a whole number.", param=name)
    return int(text)


def _expiry(text: str) -> datetime | None:
    if not text:
        return None
    try:
        return datetime.fromisoformat(text).replace(tzinfo=UTC)
    except ValueError:
        raise InvalidRequest(f"'{text}' is not a date (YYYY-MM-DD).", param="expires") from None


def grants_for(
    principal: Principal, models: list[str] | None, expires: datetime | None
) -> tuple[list[str] | None, datetime | None]:
    """What the signed-in key lets its holder give a new key: at most its own models
    and its own expiry (a key for one model cannot mint a key for all)."""
    if principal.allowed_models is not None:
        if models is None:
            models = list(principal.allowed_models)
        elif extra := [m for m in models if m not in principal.allowed_models]:
            raise InvalidRequest(
                f"The key you signed in with may not use {', '.join(extra)}, so neither "
                "may a key made with it.",
                param="allowed_models",
            )
    if principal.expires_at is not None and (expires is None or expires > principal.expires_at):
        expires = principal.expires_at
    return models, expires


@router.post("/keys")
async def create_key(
    request: Request,
    fields: dict[str, str] = Depends(web.form),
    principal: Principal = Depends(signed_in),
) -> Response:
    db = services(request).db
    parts = services(request)
    chosen = [name.removeprefix("model:") for name in fields if name.startswith("model:")]
    try:
        wanted = {name: _number(fields, name) for name in LIMITS}
        plan_name = await db.run(limits.get_plan, db, principal.account_id)
        check_within_plan(account_plan(services(request).limiter.plans, plan_name), wanted)
        models, expires = grants_for(
            principal, chosen or None, _expiry(fields.get("expires", "").strip())
        )
        models, expires = key_grants(models, expires, parts.catalog, datetime.now(UTC))
        name = fields.get("name", "").strip()[:200]
        record, plaintext = await db.run(
            accounts.create_key, db, principal.account_id, name, models, expires
        )
        given = {k: v for k, v in wanted.items() if v is not None}
        if given:
            await db.run(limits.set_key_limits, db, record.key_id, **given)
    except ServelmError as exc:
        return _back(exc.message, error=True)
    response = _back(f"Created key {record.key_id}; copy it now, it is not shown again.")
    return web.show_key_once(response, request, NEW_KEY_COOKIE, plaintext, "/account")


@router.post("/keys/{key_id}/revoke")
async def revoke_key(
    request: Request,
    key_id: str,
    fields: dict[str, str] = Depends(web.form),
    principal: Principal = Depends(signed_in),
) -> Response:
    db = services(request).db
    own = await db.run(accounts.list_keys, db, principal.account_id)
    if key_id not in {k.key_id for k in own}:
        # Another account's key looks exactly like one that does not exist.
        raise NotFound(f"No key {key_id!r} on your account.")
    await db.run(accounts.revoke_key, db, key_id)
    await services(request).invalidation.key_changed(key_id)
    if key_id == principal.key_id:
        return web.redirect("/account")  # the session's own key: the session ends too
    return _back(f"Revoked key {key_id}.")


@router.post("/new-key/seen")
async def forget_new_key(
    request: Request,
    fields: dict[str, str] = Depends(web.form),
    principal: Principal = Depends(signed_in),
) -> Response:
    response = web.redirect("/account#keys")
    response.delete_cookie(NEW_KEY_COOKIE, path="/account")
    return response


def usage_per_key(rows: list[dict[str, Any]]) -> dict[str, dict[str, int]]:
    """Usage rows (per key, model and day) summed per key."""
    out: dict[str, dict[str, int]] = {}
    for r in rows:
        acc = out.setdefault(str(r["key_id"]), {"requests": 0, "tokens": 0, "cost": 0})
        acc["requests"] += r["requests"]
        acc["tokens"] += r["prompt_tokens"] + r["completion_tokens"]
        acc["cost"] += r["cost"]
    return out
