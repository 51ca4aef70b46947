"""Rendering and request plumbing shared by the console's pages: templates, the
security headers every page carries, form bodies and their CSRF check."""

from __future__ import annotations

from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

from fastapi import Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from jinja2 import Environment, FileSystemLoader, select_autoescape
from markdown_it import MarkdownIt
from markupsafe import Markup

from servelm.access import sessions as session
from servelm.access.keys import Authenticator, Principal
from servelm.api.services import services
from servelm.billing.money import format_credits
from servelm.errors import AuthenticationError, CsrfFailed, InvalidRequest, PayloadTooLarge

HERE = Path(__file__).parent
STATIC = HERE / "static"

_env = Environment(
    loader=FileSystemLoader(HERE / "templates"),
    autoescape=select_autoescape(default=True, default_for_string=True),
    trim_blocks=True,
    lstrip_blocks=True,
)
_env.filters["credits"] = format_credits
# CommonMark with raw HTML off: a description's "<script>" is text, and link targets
# other than http(s), mailto and relative ones are refused by markdown-it itself.
_markdown = MarkdownIt("commonmark", {"html": False})
_env.filters["markdown"] = lambda text: Markup(_markdown.render(text or ""))
_env.filters["markdown_inline"] = lambda text: Markup(_markdown.renderInline(text or ""))

# Scripts and styles only from our own origin: no inline script can run, whatever
# text a model or an account name smuggles into a page.
CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
    "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; "
    "frame-ancestors 'none'"
)
SECURITY_HEADERS = {
    "content-security-policy": CSP,
    "x-content-type-options": "nosniff",
    "x-frame-options": "DENY",
    "referrer-policy": "same-origin",
    "cache-control": "no-store",
}


def secret(request: Request) -> bytes:
    return session.app_secret(request.app, services(request).settings)


def secure_cookies(request: Request) -> bool:
    """``Secure`` on the console's cookies: as ``SERVELM_COOKIE_SECURE`` says, else when
    the request came over TLS (``https``, or a trusted proxy's ``X-Forwarded-Proto``:
    uvicorn's ``FORWARDED_ALLOW_IPS``, 127.0.0.1 by default)."""
    forced: bool | None = services(request).settings.cookie_secure
    return forced if forced is not None else request.url.scheme == "https"


def show_key_once(
    response: Response, request: Request, cookie: str, plaintext: str, path: str
) -> Response:
    """A new key's plaintext for the page this redirect lands on, from a short-lived
    HttpOnly cookie rather than the URL (which history and logs keep)."""
    response.set_cookie(
        cookie,
        plaintext,
        max_age=60,
        httponly=True,
        samesite="strict",
        secure=secure_cookies(request),
        path=path,
    )
    return response


def csrf_nonce(request: Request) -> tuple[str, bool]:
    """This browser's CSRF nonce, and whether it is new (to be set as a cookie)."""
    nonce = request.cookies.get(session.CSRF_COOKIE)
    if nonce and 16 <= len(nonce) <= 64:
        return nonce, False
    return session.new_nonce(), True


def set_cookie(request: Request, response: Response, name: str, value: str, ttl: int) -> None:
    response.set_cookie(
        name,
        value,
        max_age=ttl,
        httponly=True,
        samesite="strict",
        secure=secure_cookies(request),
        path="/",
    )


def render(request: Request, template: str, status_code: int = 200, **context: Any) -> HTMLResponse:
    nonce, fresh = csrf_nonce(request)
    context.setdefault("signed_in", session_payload(request) is not None)
    html = _env.get_template(template).render(
        request=request,
        csrf_token=session.csrf_token(secret(request), nonce),
        base_url=base_url(request),
        **context,
    )
    response = HTMLResponse(html, status_code=status_code, headers=SECURITY_HEADERS)
    if fresh:
        set_cookie(request, response, session.CSRF_COOKIE, nonce, 30 * 24 * 3600)
    return response


def redirect(url: str) -> RedirectResponse:
    return RedirectResponse(url, status_code=303, headers=SECURITY_HEADERS)


def base_url(request: Request) -> str:
    return str(request.base_url).rstrip("/")


async def form(request: Request) -> dict[str, str]:
    """A urlencoded form body, once its CSRF token checks out (a dependency of every
    form route: a post without the token does nothing and gets 403)."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype != "application/x-www-form-urlencoded":
        raise InvalidRequest("Expected a form post (application/x-www-form-urlencoded).")
    raw = await request.body()
    if len(raw) > 64 * 1024:
        raise PayloadTooLarge("The form is larger than 64 KiB.")
    fields = {k: v[0] for k, v in parse_qs(raw.decode("utf-8", "replace")).items()}
    nonce = request.cookies.get(session.CSRF_COOKIE)
    if not session.csrf_ok(secret(request), nonce, fields.get(session.CSRF_FIELD)):
        raise CsrfFailed("Missing or invalid CSRF token; reload the page and retry.")
    return fields


async def live(request: Request, payload: dict[str, Any] | None) -> dict[str, Any] | None:
    """The payload if its session is still live on the server (not signed out, not
    ended by the operator); a valid signature alone opens nothing."""
    if payload is None or not isinstance(payload.get("sid"), str):
        return None
    db = services(request).db
    if not await db.run(session.session_live, db, payload["sid"]):
        return None
    return payload


async def start_session(request: Request, kind: str, key_id: str | None, ttl: int) -> str:
    db = services(request).db
    sid: str = await db.run(session.start_session, db, kind, key_id, ttl)
    return sid


async def end_session(request: Request, payload: dict[str, Any] | None) -> None:
    if payload is not None and isinstance(payload.get("sid"), str):
        db = services(request).db
        await db.run(session.end_session, db, payload["sid"])


def wants_html(request: Request) -> bool:
    """A browser navigating (a form post, a link), not a script asking for JSON."""
    return "text/html" in request.headers.get("accept", "")


def csrf_page(request: Request) -> Response:
    """What a browser gets for a form whose page went stale: what happened and a way
    back to the page it came from (same origin only), not raw JSON."""
    back = "/"
    referer = request.headers.get("referer", "")
    origin = base_url(request)
    if referer.startswith(origin + "/"):
        back = referer[len(origin) :]
    return render(request, "csrf.html", status_code=403, back=back)


def session_payload(request: Request) -> dict[str, Any] | None:
    payload = session.unsign(secret(request), request.cookies.get(session.SESSION_COOKIE))
    if payload is None or payload.get("sub") != "key":
        return None
    return payload


def operator_payload(request: Request) -> dict[str, Any] | None:
    token: str | None = services(request).settings.admin_token
    if not token:
        return None
    payload = session.unsign(secret(request), request.cookies.get(session.OPERATOR_COOKIE))
    if payload is None or payload.get("sub") != "admin":
        return None
    if payload.get("tf") != session.admin_fingerprint(token):
        return None
    return payload


async def current_principal(request: Request) -> Principal | None:
    """The session's key, checked like the key itself (revoked or expired: None)."""
    payload = await live(request, session_payload(request))
    if payload is None:
        return None
    authenticator: Authenticator = services(request).authenticator
    try:
        return await authenticator.authenticate_key_id(str(payload["kid"]))
    except AuthenticationError:
        return None
