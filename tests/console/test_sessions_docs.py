"""Issue 29, points 1 to 3, in Chromium: sessions end on the server (a copied cookie
dies at sign-out; the operator signs everyone out), a stale form gets a page that
says so, and the API reference renders with every non-local request blocked."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest

from servelm.access import sessions as session
from servelm.api.services import services
from tests.conftest import ADMIN_TOKEN, LiveServer, provision
from tests.console.conftest import SCREENSHOTS

pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed")


@pytest.fixture
def context(browser: Any) -> Iterator[Any]:
    ctx = browser.new_context(viewport={"width": 1280, "height": 860})
    ctx.set_default_timeout(30_000)
    yield ctx
    ctx.close()


def sign_in(page: Any, live: LiveServer, key: str) -> None:
    page.goto(f"{live.base_url}/account")
    page.fill("#api_key", key)
    page.click("#signin")
    page.wait_for_url("**/account")
    assert page.locator("#account-name").is_visible()


def copy_cookies(source: Any, target: Any) -> None:
    """What a thief (or a second device) holding a copy of the cookie has."""
    target.add_cookies(source.cookies())


def test_a_copied_cookie_dies_when_its_owner_signs_out(browser: Any, console: LiveServer) -> None:
    key = provision(console.db, "cookie-owner", 1)
    owner = browser.new_context()
    thief = browser.new_context()
    try:
        mine = owner.new_page()
        sign_in(mine, console, key)
        copy_cookies(owner, thief)
        stolen = {c["name"]: c["value"] for c in thief.cookies()}
        theirs = thief.new_page()
        theirs.goto(f"{console.base_url}/account")
        assert theirs.locator("#account-name").inner_text() == "cookie-owner"

        mine.click("#signout")
        mine.wait_for_url("**/account")
        assert mine.locator("#api_key").is_visible()
        # The copy was never told anything, and still its session is over.
        theirs.reload()
        assert theirs.locator("#api_key").is_visible()
        assert theirs.locator("#account-name").count() == 0
        # Nor does it open the playground's chat (the session's other door).
        secret = session.app_secret(console.app, services(console.app).settings)
        token = session.csrf_token(secret, stolen[session.CSRF_COOKIE])
        r = httpx.post(
            f"{console.v1}/chat/completions",
            json={"model": "paced", "messages": [{"role": "user", "content": "hi"}]},
            headers={"x-csrf-token": token},
            cookies=stolen,
            timeout=30,
        )
        assert r.status_code == 401 and "session has ended" in r.json()["error"]["message"]
    finally:
        owner.close()
        thief.close()


def test_the_operator_signs_everyone_out(browser: Any, console: LiveServer) -> None:
    key = provision(console.db, "signed-out-by-operator", 1)
    user = browser.new_context()
    operator = browser.new_context()
    try:
        page = user.new_page()
        sign_in(page, console, key)
        op = operator.new_page()
        op.goto(f"{console.base_url}/operator")
        op.fill("#admin_token", ADMIN_TOKEN)
        op.click("#operator-signin")
        op.wait_for_url("**/operator")
        op.click("#signout-everywhere")
        op.wait_for_url("**/operator")
        assert op.locator("#admin_token").is_visible()  # the operator's own session too
        page.reload()
        assert page.locator("#api_key").is_visible()
        # Signing in again works: only the sessions that were live ended.
        sign_in(page, console, key)
    finally:
        user.close()
        operator.close()


def test_a_stale_form_gets_a_page_saying_so_and_api_clients_json(
    context: Any, console: LiveServer
) -> None:
    key = provision(console.db, "stale-form", 1)
    page = context.new_page()
    sign_in(page, console, key)
    # The page goes stale: its token no longer matches (as after a sign-in elsewhere).
    page.evaluate("document.querySelector('#signout').form.csrf_token.value = 'stale'")
    with page.expect_response(lambda r: r.url.endswith("/account/signout")) as answer:
        page.click("#signout")
    assert answer.value.status == 403
    assert page.locator("#csrf-failed h1").inner_text() == "This page expired"
    assert "nothing changed" in page.locator("#csrf-failed").inner_text()
    page.click("#csrf-back")
    page.wait_for_url("**/account")
    assert page.locator("#account-name").is_visible()  # indeed still signed in

    r = httpx.post(
        f"{console.base_url}/account/signin",
        data={"api_key": key},
        headers={"accept": "application/json"},
        timeout=30,
    )
    assert r.status_code == 403
    assert r.json()["error"]["code"] == "csrf_failed"
    assert r.json()["error"]["type"] == "permission_error"


def test_the_api_reference_renders_with_the_network_cut_off(
    context: Any, console: LiveServer
) -> None:
    local = urlsplit(console.base_url).netloc
    blocked: list[str] = []
    problems: list[str] = []

    def only_local(route: Any) -> None:
        if urlsplit(route.request.url).netloc == local:
            route.continue_()
        else:
            blocked.append(route.request.url)
            route.abort()

    context.route("**/*", only_local)
    page = context.new_page()
    page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: problems.append(str(e)))
    page.goto(f"{console.base_url}/docs")
    page.wait_for_load_state("networkidle")
    assert not problems, problems
    page.wait_for_selector(".swagger-ui .info .title")
    assert "servelm" in page.locator(".swagger-ui .info .title").inner_text()
    assert page.locator(".opblock-summary-path", has_text="/v1/chat/completions").count() >= 1
    assert blocked == []  # nothing wanted a CDN
    assert not [p for p in problems if "Content Security Policy" in p], problems
    page.screenshot(path=str(SCREENSHOTS / "api-reference.png"), full_page=False)
