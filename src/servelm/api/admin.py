"""The operator's HTTP API under ``/admin/``: accounts, keys, credits, usage, audit.

Authenticated by the admin token (``SERVELM_ADMIN_TOKEN``), never by a user key.
Without a token configured the admin API is off.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, ConfigDict, Field

from servelm.access.keys import check_admin_token, client_address, key_grants
from servelm.access.limits import records as limits
from servelm.access.limits.guesses import Guesses
from servelm.access.limits.policy import check_plan
from servelm.api.services import services
from servelm.billing import accounts, audit
from servelm.billing.accounts import Account, KeyRecord
from servelm.billing.money import format_credits, parse_credits
from servelm.errors import AuthenticationError
from servelm.store.db import Database


async def require_admin(request: Request) -> None:
    # Wrong tokens slow down per address (access.limits.guesses): a weak token cannot be
    # guessed at line rate.
    guesses: Guesses = services(request).guesses
    address = client_address(request)
    await guesses.check(address, "admin token")
    try:
        check_admin_token(
            request.headers.get("authorization"), services(request).settings.admin_token
        )
    except AuthenticationError:
        await guesses.failed(address)
        raise


router = APIRouter(prefix="/admin", tags=["admin"], dependencies=[Depends(require_admin)])


def _db(request: Request) -> Database:
    db: Database = services(request).db
    return db


async def _run(request: Request, fn: Any, *args: Any, **kw: Any) -> Any:
    return await services(request).db.run(fn, *args, **kw)


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
    plan: str | None = None  # rate-limit plan ([plans.<name>] of the models file)


class KeyLimits(BaseModel):
    """A key's own rate limits; a field left out stays, ``null`` removes it."""

    model_config = ConfigDict(extra="forbid")
    rpm: int | None = Field(default=None, ge=0)
    tpm: int | None = Field(default=None, ge=0)
    concurrency: int | None = Field(default=None, ge=0)


class NewKey(KeyLimits):
    name: str = ""
    allowed_models: list[str] | None = None
    expires_at: datetime | None = None


class PlanChange(BaseModel):
    model_config = ConfigDict(extra="forbid")
    plan: str | None = None


class Grant(BaseModel):
    model_config = ConfigDict(extra="forbid")
    # A JSON number is read as a decimal from its text (0.1 stays exactly 0.1).
    credits: Decimal | str = Field(description="A number or decimal string, e.g. 10 or '0.25'.")
    note: str = ""


def _check_plan(request: Request, plan: str | None) -> None:
    """The plans this server loaded from its models file; any other is refused."""
    check_plan(plan, services(request).limiter.plans)


@router.post("/accounts", status_code=201)
async def create_account(request: Request, body: NewAccount) -> dict[str, Any]:
    _check_plan(request, body.plan)  # before the account exists: a refusal leaves none
    account = await _run(request, accounts.create_account, _db(request), body.name)
    if body.plan is not None:
        await _run(request, limits.set_plan, _db(request), account.id, body.plan)
    return {**account_out(account), "plan": body.plan}


@router.put("/accounts/{account_id}/plan")
async def set_plan(request: Request, account_id: int, body: PlanChange) -> dict[str, Any]:
    _check_plan(request, body.plan)
    await _run(request, limits.set_plan, _db(request), account_id, body.plan)
    await services(request).invalidation.account_changed(account_id)
    return {"account_id": account_id, "plan": body.plan}


@router.get("/accounts")
async def list_accounts(request: Request) -> dict[str, Any]:
    rows = await _run(request, accounts.list_accounts, _db(request))
    return {"object": "list", "data": [account_out(a) for a in rows]}


async def _account_id(request: Request, ref: str) -> int:
    """An account path names it by id or by name, as the CLI does."""
    key: int | str = int(ref) if ref.isdigit() else ref
    account: Account = await _run(request, accounts.get_account, _db(request), key)
    return account.id


@router.get("/accounts/{account}")
async def get_account(request: Request, account: str) -> dict[str, Any]:
    account_id = await _account_id(request, account)
    found = await _run(request, accounts.get_account, _db(request), account_id)
    plan = await _run(request, limits.get_plan, _db(request), account_id)
    return {**account_out(found), "plan": plan}


@router.post("/accounts/{account}/credits")
async def grant(request: Request, account: str, body: Grant) -> dict[str, Any]:
    account_id = await _account_id(request, account)
    micro = parse_credits(str(body.credits))
    balance = await _run(request, accounts.grant, _db(request), account_id, micro, body.note)
    return {"account_id": account_id, "credits": format_credits(balance)}


@router.post("/accounts/{account}/keys", status_code=201)
async def create_key(request: Request, account: str, body: NewKey) -> dict[str, Any]:
    account_id = await _account_id(request, account)
    catalog = services(request).catalog
    models, expires = key_grants(body.allowed_models, body.expires_at, catalog, datetime.now(UTC))
    record, plaintext = await _run(
        request, accounts.create_key, _db(request), account_id, body.name, models, expires
    )
    out = {**key_out(record), "key": plaintext}  # the only time the plaintext is shown
    given = body.model_dump(include=body.model_fields_set & {"rpm", "tpm", "concurrency"})
    if given:
        over = await _run(request, limits.set_key_limits, _db(request), record.key_id, **given)
        out["limits"] = over.as_dict()
    return out


@router.get("/keys/{key_id}/limits")
async def get_key_limits(request: Request, key_id: str) -> dict[str, Any]:
    over = await _run(request, limits.get_key_limits, _db(request), key_id)
    return {"key_id": key_id, **over.as_dict()}


@router.put("/keys/{key_id}/limits")
async def set_key_limits(request: Request, key_id: str, body: KeyLimits) -> dict[str, Any]:
    given = body.model_dump(include=body.model_fields_set)
    over = await _run(request, limits.set_key_limits, _db(request), key_id, **given)
    await services(request).invalidation.key_changed(key_id)
    return {"key_id": key_id, **over.as_dict()}


@router.get("/keys")
async def list_keys(request: Request, account_id: int | None = None) -> dict[str, Any]:
    rows = await _run(request, accounts.list_keys, _db(request), account_id)
    return {"object": "list", "data": [key_out(k) for k in rows]}


@router.post("/keys/{key_id}/revoke")
async def revoke_key(request: Request, key_id: str) -> dict[str, Any]:
    # The id as the CLI prints it (slm_<id>_***) or bare.
    key_id = key_id.removeprefix("slm_").split("_")[0]
    record = await _run(request, accounts.revoke_key, _db(request), key_id)
    # Every gateway sharing Redis drops the key from its cache now, not in 5 s.
    await services(request).invalidation.key_changed(key_id)
    return key_out(record)


@router.get("/models")
async def list_models(request: Request) -> dict[str, Any]:
    """Every catalog entry, loaded or not, and for the others why: what API users are
    not told (file paths, load errors, upstream addresses)."""
    parts = services(request)
    data = []
    for spec in parts.catalog:
        engine = parts.engines.get(spec.slug)
        data.append(
            {
                "id": spec.slug,
                "engine": spec.engine,
                "state": "unavailable"
                if not parts.models.servable(spec.slug)
                else parts.models.state(spec.slug),
                "pool": parts.models.describe(spec.slug),
                "reason": parts.chat.unavailable.get(spec.slug),
                "weights": str(spec.path) if spec.path is not None else None,
                "mmproj": str(spec.mmproj) if spec.mmproj is not None else None,
                "upstream": spec.base_url,
                **({"engine_state": engine.describe()} if engine is not None else {}),
            }
        )
    return {"object": "list", "data": data}


@router.get("/usage")
async def usage(request: Request, account_id: int | None = None) -> dict[str, Any]:
    rows = await _run(request, audit.usage_summary, _db(request), account_id)
    return {"object": "list", "data": [{**r, "cost": format_credits(r["cost"])} for r in rows]}


@router.get("/ledger/check")
async def ledger_check(request: Request) -> dict[str, Any]:
    ttl = timedelta(seconds=services(request).settings.hold_ttl_seconds)
    problems = await _run(request, audit.ledger_check, _db(request), ttl)
    return {"ok": not problems, "problems": [p.__dict__ for p in problems]}
