"""The console's public pages: model pages and their index, the playground, the
account dashboard (a user signed in with an API key), and the static assets.

Everything about money and keys goes through the same functions as the API and the
CLI (``servelm.billing``); this module only reads them and renders.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import FileResponse, JSONResponse, Response

from servelm.access import sessions as session
from servelm.access.keys import Authenticator, client_address
from servelm.access.limits.guesses import Guesses
from servelm.access.limits.policy import account_plan
from servelm.access.limits.records import get_plan
from servelm.api.console import account_keys, docs, web
from servelm.api.services import services
from servelm.billing import accounts, audit
from servelm.billing.money import format_credits
from servelm.catalog.specs import ModelSpec
from servelm.errors import AuthenticationError, NotFound, RateLimited
from servelm.jobs import store as jobs_store
from servelm.jobs import views as jobs_views

router = APIRouter(include_in_schema=False)

_STATIC_TYPES = {".css": "text/css", ".js": "text/javascript", ".txt": "text/plain"}


@router.get("/console/static/{name}")
async def static(name: str) -> Response:
    path = web.STATIC / name
    # Only files that sit directly in static/: no "..", no subdirectories.
    if "/" in name or name.startswith(".") or not path.is_file():
        raise NotFound(f"No console asset {name!r}.")
    return FileResponse(
        path,
        media_type=_STATIC_TYPES.get(path.suffix, "application/octet-stream"),
        headers={"cache-control": "public, max-age=300", "x-content-type-options": "nosniff"},
    )


# Swagger UI's files, from the installed fastapi-offline package (its static folder
# only): /docs works with no network but the gateway's.
_SWAGGER = {"swagger-ui.css": "text/css", "swagger-ui-bundle.js": "text/javascript"}


@router.get("/docs")
async def api_reference(request: Request) -> Response:
    return web.render(request, "docs.html")


@router.get("/docs/assets/{name}")
async def swagger_asset(name: str) -> Response:
    import fastapi_offline

    if name not in _SWAGGER:
        raise NotFound(f"No API reference asset {name!r}.")
    return FileResponse(
        Path(fastapi_offline.__file__).parent / "static" / name,
        media_type=_SWAGGER[name],
        headers={"cache-control": "public, max-age=86400", "x-content-type-options": "nosniff"},
    )


# -- models --------------------------------------------------------------------------


def model_state(request: Request, spec: ModelSpec) -> tuple[bool, str]:
    """(available, what to say about it)."""
    parts = services(request)
    if parts.models.servable(spec.slug):
        state = parts.models.state(spec.slug)
        if state == "loaded":
            return True, "Available: loaded"
        if state == "loading":
            return True, "Available: loading"
        # Serverless: it loads at its next request, which waits for it (a cold start).
        return True, f"Available: {state}, loads at its next request"
    return False, parts.chat.unavailable.get(spec.slug, "Not loaded.")


def _card(request: Request, spec: ModelSpec) -> dict[str, Any]:
    available, state = model_state(request, spec)
    return {"spec": spec, "available": available, "state": state}


@router.get("/")
async def index(request: Request) -> Response:
    cards = [_card(request, s) for s in services(request).catalog]
    return web.render(request, "index.html", models=cards)


@router.get("/models/{slug}")
async def model_page(request: Request, slug: str) -> Response:
    spec = services(request).catalog.get(slug)
    if spec is None:
        return web.render(request, "notfound.html", status_code=404, what=f"model {slug!r}")
    if spec.slug != slug:
        return web.redirect(f"/models/{spec.slug}")
    base = web.base_url(request)
    return web.render(
        request,
        "model.html",
        m=_card(request, spec),
        snippets=docs.snippets(spec, base),
        params=docs.parameters(),
        errors=docs.ERRORS,
        response_example=docs.response_example(spec),
        image_example=docs.IMAGE_EXAMPLE,
        placeholder=docs.KEY_PLACEHOLDER,
        # The try-it box runs only for a live session (not a signed-out cookie).
        signed_in=await web.current_principal(request) is not None,
    )


# -- the signed-in user ----------------------------------------------------------------


def _sign_in_page(request: Request, status_code: int = 200, error: str = "") -> Response:
    response = web.render(request, "signin.html", status_code=status_code, error=error)
    if request.cookies.get(session.SESSION_COOKIE):
        response.delete_cookie(session.SESSION_COOKIE, path="/")
    return response


@router.post("/account/signin")
async def sign_in(request: Request, fields: dict[str, str] = Depends(web.form)) -> Response:
    authenticator: Authenticator = services(request).authenticator
    guesses: Guesses = services(request).guesses
    address = client_address(request)
    try:
        await guesses.check(address, "sign-in")
    except RateLimited as exc:
        response = _sign_in_page(request, 429, exc.message)
        response.headers.update(exc.headers)
        return response
    try:
        principal = await authenticator.authenticate(fields.get("api_key", "").strip())
    except AuthenticationError as exc:
        await guesses.failed(address)
        return _sign_in_page(request, 401, exc.message)
    # A fresh CSRF nonce at sign-in: a nonce planted before cannot ride the session.
    nonce = session.new_nonce()
    ttl = services(request).settings.session_ttl_seconds
    response = web.redirect(_safe_next(fields.get("next", "")) or "/account")
    sid = await web.start_session(request, "key", principal.key_id, ttl)
    value = session.user_session(web.secret(request), sid, principal.key_id, nonce, ttl)
    web.set_cookie(request, response, session.SESSION_COOKIE, value, ttl)
    web.set_cookie(request, response, session.CSRF_COOKIE, nonce, ttl)
    return response


def _safe_next(target: str) -> str:
    return target if target in ("/playground", "/account") else ""


@router.post("/account/signout")
async def sign_out(request: Request, fields: dict[str, str] = Depends(web.form)) -> Response:
    # Ended on the server: a copy of the cookie (another tab, a stolen one) dies too.
    await web.end_session(request, web.session_payload(request))
    response = web.redirect("/account")
    response.delete_cookie(session.SESSION_COOKIE, path="/")
    return response


@router.get("/account")
async def account(request: Request) -> Response:
    principal = await web.current_principal(request)
    if principal is None:
        return _sign_in_page(request)
    db = services(request).db
    acct = await db.run(accounts.get_account, db, principal.account_id)
    rows = await db.run(audit.usage_summary, db, principal.account_id)
    recent = await db.run(audit.recent_requests, db, principal.account_id, 20)
    key_rows = await db.run(accounts.list_keys, db, principal.account_id)
    last_used = await db.run(audit.keys_last_used, db, principal.account_id)
    plan_name = await db.run(get_plan, db, principal.account_id)
    queued = await db.run(jobs_store.list_jobs, db, account_id=principal.account_id, limit=20)

    parts = services(request)
    grantable = [
        s.slug
        for s in parts.catalog
        if principal.allowed_models is None or s.slug in principal.allowed_models
    ]
    return web.render(
        request,
        "account.html",
        account=acct,
        principal=principal,
        chart=usage_chart(rows),
        by_model=usage_by_day_model(rows),
        recent=recent,
        jobs=[jobs_views.console_row(j) for j in queued],
        keys=key_rows,
        last_used=last_used,
        key_usage=account_keys.usage_per_key(rows),
        grantable=grantable,
        plan=account_plan(services(request).limiter.plans, plan_name),
        plan_name=plan_name or "default",
        new_key=request.cookies.get(account_keys.NEW_KEY_COOKIE, ""),
        message=request.query_params.get("msg", ""),
        error=request.query_params.get("err", ""),
    )


@router.get("/account/balance.json")
async def balance(request: Request) -> Response:
    """The signed-in account's balance, for the playground after a stopped reply."""
    principal = await web.current_principal(request)
    if principal is None:
        raise AuthenticationError("Not signed in.")
    micro = await services(request).billing.balance(principal.account_id)
    return JSONResponse({"credits": format_credits(micro)}, headers={"cache-control": "no-store"})


def usage_by_day_model(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Usage rows (per key, model and day) summed per day and model, newest first."""
    out: dict[tuple[str, str], dict[str, Any]] = {}
    for r in rows:
        acc = out.setdefault(
            (r["day"], r["model"]),
            {"day": r["day"], "model": r["model"], "requests": 0, "tokens": 0, "cost": 0},
        )
        acc["requests"] += r["requests"]
        acc["tokens"] += r["prompt_tokens"] + r["completion_tokens"]
        acc["cost"] += r["cost"]
    return sorted(out.values(), key=lambda a: (a["day"], a["model"]), reverse=True)


CHART_DAYS = 14
CHART_H = 120


def usage_chart(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Bar geometry for the last days with usage: tokens and credits per day, drawn
    as server-side SVG (no script, no inline style)."""
    tokens: dict[str, int] = defaultdict(int)
    cost: dict[str, int] = defaultdict(int)
    for r in rows:
        tokens[r["day"]] += r["prompt_tokens"] + r["completion_tokens"]
        cost[r["day"]] += r["cost"]
    days = sorted(tokens)[-CHART_DAYS:]
    max_t = max((tokens[d] for d in days), default=0) or 1
    max_c = max((cost[d] for d in days), default=0) or 1
    bars = []
    for i, d in enumerate(days):
        th = round(CHART_H * tokens[d] / max_t)
        ch = round(CHART_H * cost[d] / max_c)
        bars.append(
            {
                "day": d,
                "label": d[5:],
                "x": 40 + i * 44,
                "tokens": tokens[d],
                "cost": format_credits(cost[d]),
                "th": th,
                "ch": ch,
            }
        )
    return {
        "bars": bars,
        "height": CHART_H,
        "width": 40 + max(len(days), 1) * 44,
        "max_tokens": max_t,
        "max_cost": format_credits(max_c),
    }


# -- the playground ----------------------------------------------------------------------


@router.get("/playground")
async def playground(request: Request) -> Response:
    principal = await web.current_principal(request)
    if principal is None:
        return _sign_in_page(request, error="Sign in with an API key to use the playground.")
    parts = services(request)
    models = [_card(request, s) for s in parts.catalog if parts.models.servable(s.slug)]
    if principal.allowed_models is not None:
        models = [m for m in models if m["spec"].slug in principal.allowed_models]
    micro = await services(request).billing.balance(principal.account_id)
    chosen = request.query_params.get("model", "")
    return web.render(
        request,
        "playground.html",
        models=models,
        chosen=chosen,
        credits=format_credits(micro),
        placeholder=docs.KEY_PLACEHOLDER,
    )
