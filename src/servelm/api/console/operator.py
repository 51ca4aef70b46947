"""The operator console at ``/operator``, signed in with the admin token: accounts,
credits, keys, models, live figures and the ledger check.

The same store functions as ``/admin/`` and the CLI do the work (``servelm.billing``);
a user's session or key never opens these pages.
"""

from __future__ import annotations

import hmac
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response

from servelm.access import sessions as session
from servelm.access.keys import client_address
from servelm.access.limits import records as limit_records
from servelm.access.limits.guesses import Guesses
from servelm.access.limits.policy import check_plan
from servelm.api.console import web
from servelm.api.console.routes import model_state
from servelm.api.services import services
from servelm.billing import accounts, audit
from servelm.billing.money import format_credits, parse_credits
from servelm.errors import AuthenticationError, InvalidRequest, RateLimited, ServelmError

router = APIRouter(prefix="/operator", include_in_schema=False)
# A key the operator just made, shown once on the page the form lands on.
NEW_KEY_COOKIE = "servelm_new_key"


async def require_operator(request: Request) -> None:
    if await web.live(request, web.operator_payload(request)) is None:
        raise AuthenticationError("Sign in to the operator console first.")


def _enabled(request: Request) -> bool:
    return bool(services(request).settings.admin_token)


@router.get("")
async def console(request: Request) -> Response:
    if await web.live(request, web.operator_payload(request)) is None:
        return web.render(request, "operator_signin.html", enabled=_enabled(request))
    db = services(request).db
    rows = await db.run(accounts.list_accounts, db)
    key_rows = await db.run(accounts.list_keys, db, None)
    names = {a.id: a.name for a in rows}
    ledger = None
    if request.query_params.get("check") == "ledger":
        ledger = await db.run(audit.ledger_check, db)
    parts = services(request)
    models = []
    for spec in parts.catalog:
        available, state = model_state(request, spec)
        engine = parts.engines.get(spec.slug)
        models.append(
            {
                "spec": spec,
                "available": available,
                "state": state,
                # loaded / loading / unloaded / failed, the estimated bytes loaded and
                # the keep-alive (local models; a remote one has no memory here)
                "load": parts.models.describe(spec.slug),
                "running": engine.stats.running if engine else 0,
                "waiting": engine.stats.waiting if engine else 0,
                "slots": getattr(engine, "slots", None) or spec.slots or "",
            }
        )
    plans = services(request).limiter.plans
    return web.render(
        request,
        "operator.html",
        plans={name: plans[name] for name in sorted(plans)},
        account_plans=await db.run(limit_records.all_plans, db),
        accounts=rows,
        keys=key_rows,
        names=names,
        models=models,
        memory=parts.models.usage(),
        ledger=ledger,
        message=request.query_params.get("msg", ""),
        error=request.query_params.get("err", ""),
        new_key=request.cookies.get(NEW_KEY_COOKIE, ""),
    )


@router.post("/signin")
async def sign_in(request: Request, fields: dict[str, str] = Depends(web.form)) -> Response:
    token: str | None = services(request).settings.admin_token
    given = fields.get("admin_token", "")
    guesses: Guesses = services(request).guesses
    address = client_address(request)
    try:
        await guesses.check(address, "sign-in")
    except RateLimited as exc:
        refused = web.render(
            request,
            "operator_signin.html",
            status_code=429,
            enabled=_enabled(request),
            error=exc.message,
        )
        refused.headers.update(exc.headers)
        return refused
    if not token or not hmac.compare_digest(given.encode(), token.encode()):
        if token:
            await guesses.failed(address)
        return web.render(
            request,
            "operator_signin.html",
            status_code=401,
            enabled=_enabled(request),
            error="Invalid admin token." if token else "",
        )
    nonce = session.new_nonce()
    ttl = services(request).settings.session_ttl_seconds
    response = web.redirect("/operator")
    sid = await web.start_session(request, "admin", None, ttl)
    value = session.operator_session(web.secret(request), sid, token, nonce, ttl)
    web.set_cookie(request, response, session.OPERATOR_COOKIE, value, ttl)
    web.set_cookie(request, response, session.CSRF_COOKIE, nonce, ttl)
    return response


@router.post("/signout")
async def sign_out(request: Request, fields: dict[str, str] = Depends(web.form)) -> Response:
    await web.end_session(request, web.operator_payload(request))
    response = web.redirect("/operator")
    response.delete_cookie(session.OPERATOR_COOKIE, path="/")
    return response


_guarded = [Depends(require_operator)]


def _done(message: str, error: bool = False) -> Response:
    """Back to the console, which says what happened (as text, like everything)."""
    kind = "err" if error else "msg"
    return web.redirect(f"/operator?{kind}={quote(message)}")


@router.post("/accounts", dependencies=_guarded)
async def create_account(request: Request, fields: dict[str, str] = Depends(web.form)) -> Response:
    db = services(request).db
    try:
        acct = await db.run(accounts.create_account, db, fields.get("name", "").strip())
    except ServelmError as exc:
        return _done(exc.message, error=True)
    return _done(f"Created account {acct.name} (id {acct.id}).")


@router.post("/accounts/{account_id}/credits", dependencies=_guarded)
async def grant(
    request: Request, account_id: int, fields: dict[str, str] = Depends(web.form)
) -> Response:
    db = services(request).db
    note = fields.get("note", "").strip() or "granted in the operator console"
    try:
        micro = parse_credits(fields.get("credits", "").strip())
        balance = await db.run(accounts.grant, db, account_id, micro, note)
    except ServelmError as exc:
        return _done(exc.message, error=True)
    return _done(f"Granted; account {account_id} now has {format_credits(balance)} credits.")


@router.post("/accounts/{account_id}/plan", dependencies=_guarded)
async def set_plan(
    request: Request, account_id: int, fields: dict[str, str] = Depends(web.form)
) -> Response:
    """The same check and change as ``PUT /admin/accounts/{id}/plan``."""
    db = services(request).db
    plan = fields.get("plan", "").strip() or None
    try:
        check_plan(plan, services(request).limiter.plans)
        await db.run(limit_records.set_plan, db, account_id, plan)
    except ServelmError as exc:
        return _done(exc.message, error=True)
    # Every gateway re-reads the account's limits at its next request.
    await services(request).invalidation.account_changed(account_id)
    return _done(f"Account {account_id} is on plan {plan or 'default'}.")


@router.post("/accounts/{account_id}/keys", dependencies=_guarded)
async def create_key(
    request: Request, account_id: int, fields: dict[str, str] = Depends(web.form)
) -> Response:
    db = services(request).db
    models = [m.strip() for m in fields.get("models", "").split(",") if m.strip()] or None
    name = fields.get("name", "").strip()
    try:
        expires = _date(fields.get("expires", "").strip())
        record, plaintext = await db.run(accounts.create_key, db, account_id, name, models, expires)
    except ServelmError as exc:
        return _done(exc.message, error=True)
    response = _done(f"Created key {record.key_id}; copy it now, it is not shown again.")
    return web.show_key_once(response, request, NEW_KEY_COOKIE, plaintext, "/operator")


def _date(value: str) -> datetime | None:
    if not value:
        return None
    try:
        return datetime.fromisoformat(value).replace(tzinfo=UTC)
    except ValueError:
        raise InvalidRequest(f"'{value}' is not a date (YYYY-MM-DD).", param="expires") from None


@router.post("/keys/{key_id}/revoke", dependencies=_guarded)
async def revoke(
    request: Request, key_id: str, fields: dict[str, str] = Depends(web.form)
) -> Response:
    db = services(request).db
    await db.run(accounts.revoke_key, db, key_id)
    return _done(f"Revoked key {key_id}.")


@router.post("/sessions/end-all", dependencies=_guarded)
async def sign_out_everywhere(
    request: Request, fields: dict[str, str] = Depends(web.form)
) -> Response:
    """Every console session ends, users' and operators' (this one too)."""
    db = services(request).db
    await db.run(session.end_all_sessions, db)
    response = web.redirect("/operator")
    response.delete_cookie(session.OPERATOR_COOKIE, path="/")
    return response


@router.post("/new-key/seen", dependencies=_guarded)
async def forget_new_key(request: Request, fields: dict[str, str] = Depends(web.form)) -> Response:
    response = web.redirect("/operator")
    response.delete_cookie(NEW_KEY_COOKIE, path="/operator")
    return response


@router.get("/live.json", dependencies=_guarded)
async def live(request: Request) -> Response:
    """Counters for the page's live figures; the page turns them into rates."""
    metrics = services(request).metrics
    # Chat requests only: the console's own polling is not traffic.
    requests = sum(
        s.value
        for m in metrics.requests.collect()
        for s in m.samples
        if s.name.endswith("_total") and s.labels.get("route", "").endswith("_chat")
    )
    tokens = sum(
        s.value for m in metrics.tokens.collect() for s in m.samples if s.name.endswith("_total")
    )
    engines = services(request).engines.values()
    body: dict[str, Any] = {
        "requests": requests,
        "tokens": tokens,
        "busy": sum(e.stats.running for e in engines),
        "queue": sum(e.stats.waiting for e in engines),
    }
    return JSONResponse(body, headers={"cache-control": "no-store"})
