"""The operator's HTTP API under ``/admin/``: accounts, keys, credits, usage, audit.

Authenticated by the admin token (``SERVELM_ADMIN_TOKEN``), never by a user key.
Without a token configured the admin API is off.
"""

from __future__ import annotations

import hmac
from datetime import datetime
from decimal import Decimal, InvalidOperation
from typing import Any

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, ConfigDict, Field

from servelm.billing import accounts, audit
from servelm.billing.accounts import Account, KeyRecord
from servelm.catalog import MICRO, format_credits
from servelm.errors import AuthenticationError, InvalidRequest, PermissionDenied
from servelm.store.db import Database


async def require_admin(request: Request) -> None:
    token: str | None = request.app.state.settings.admin_token
    if not token:
        raise PermissionDenied(
            "The admin API is disabled: start servelm with SERVELM_ADMIN_TOKEN set."
        )
    given = request.headers.get("authorization", "")
    scheme, _, value = given.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(value.strip(), token):
        raise AuthenticationError("Invalid or missing admin token.")


router = APIRouter(prefix="/admin", dependencies=[Depends(require_admin)])


def _db(request: Request) -> Database:
    return request.app.state.billing.db


async def _run(request: Request, fn: Any, *args: Any, **kw: Any) -> Any:
    return await request.app.state.billing.run(fn, *args, **kw)


def credits_to_micro(value: str) -> int:
    """'12.5' credits → 12500000 micro-credits; exact, refusing sub-micro amounts."""
    try:
        amount = Decimal(value) * MICRO
    except InvalidOperation:
        raise InvalidRequest(f"'{value}' is not a number of credits.", param="credits") from None
    if amount != amount.to_integral_value():
        raise InvalidRequest("Credits have at most 6 decimal places.", param="credits")
    return int(amount)


def account_out(a: Account) -> dict[str, Any]:
    return {
        "id": a.id,
        "name": a.name,
        "credits": format_credits(a.balance),
        "held": format_credits(a.held),
        "created_at": a.created_at.isoformat(),
    }


def key_out(k: KeyRecord) -> dict[str, Any]:
    return {
        "key_id": k.key_id,
        "key": k.redacted,
        "account_id": k.account_id,
        "name": k.name,
        "allowed_models": k.allowed_models,
        "expires_at": k.expires_at.isoformat() if k.expires_at else None,
        "revoked": k.revoked_at is not None,
        "created_at": k.created_at.isoformat(),
    }


class NewAccount(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1, max_length=200)


class NewKey(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = ""
    allowed_models: list[str] | None = None
    expires_at: datetime | None = None


class Grant(BaseModel):
    model_config = ConfigDict(extra="forbid")
    credits: str = Field(description="Decimal string, e.g. '10' or '0.25'.")
    note: str = ""


@router.post("/accounts", status_code=201)
async def create_account(request: Request, body: NewAccount) -> dict[str, Any]:
    return account_out(await _run(request, accounts.create_account, _db(request), body.name))


@router.get("/accounts")
async def list_accounts(request: Request) -> dict[str, Any]:
    rows = await _run(request, accounts.list_accounts, _db(request))
    return {"object": "list", "data": [account_out(a) for a in rows]}


@router.get("/accounts/{account_id}")
async def get_account(request: Request, account_id: int) -> dict[str, Any]:
    return account_out(await _run(request, accounts.get_account, _db(request), account_id))


@router.post("/accounts/{account_id}/credits")
async def grant(request: Request, account_id: int, body: Grant) -> dict[str, Any]:
    micro = credits_to_micro(body.credits)
    balance = await _run(request, accounts.grant, _db(request), account_id, micro, body.note)
    return {"account_id": account_id, "credits": format_credits(balance)}


@router.post("/accounts/{account_id}/keys", status_code=201)
async def create_key(request: Request, account_id: int, body: NewKey) -> dict[str, Any]:
    record, plaintext = await _run(
        request,
        accounts.create_key,
        _db(request),
        account_id,
        body.name,
        body.allowed_models,
        body.expires_at,
    )
    # The only time the plaintext exists outside the caller's hands.
    return {**key_out(record), "key": plaintext}


@router.get("/keys")
async def list_keys(request: Request, account_id: int | None = None) -> dict[str, Any]:
    rows = await _run(request, accounts.list_keys, _db(request), account_id)
    return {"object": "list", "data": [key_out(k) for k in rows]}


@router.post("/keys/{key_id}/revoke")
async def revoke_key(request: Request, key_id: str) -> dict[str, Any]:
    return key_out(await _run(request, accounts.revoke_key, _db(request), key_id))


@router.get("/usage")
async def usage(request: Request, account_id: int | None = None) -> dict[str, Any]:
    rows = await _run(request, audit.usage_summary, _db(request), account_id)
    return {"object": "list", "data": [{**r, "cost": format_credits(r["cost"])} for r in rows]}


@router.get("/ledger/check")
async def ledger_check(request: Request) -> dict[str, Any]:
    problems = await _run(request, audit.ledger_check, _db(request))
    return {"ok": not problems, "problems": [p.__dict__ for p in problems]}


@router.get("/models")
async def models_state(request: Request) -> dict[str, Any]:
    """Every loaded model's engine state; remote ones with each replica's health,
    requests in flight and reported queue (servelm.fleet)."""
    engines = request.app.state.chat.engines
    return {"models": {slug: engine.describe() for slug, engine in engines.items()}}
