"""Issue 29, points 5 and 7, in Chromium: a signed-in user makes their own keys
(name, models, expiry, limits within the plan), sees the secret once, revokes them and
sees usage per key; the operator puts accounts on plans from the console."""

from __future__ import annotations

import html
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from servelm.access.limits.records import get_key_limits, get_plan
from tests.conftest import ADMIN_TOKEN, LiveServer, provision
from tests.console.conftest import (
    PACED,
    SCREENSHOTS,
    csrf_from,
    operator_client,
    signed_in_client,
)

pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed")
BODY = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


@pytest.fixture
def page(browser: Any) -> Iterator[Any]:
    ctx = browser.new_context(viewport={"width": 1280, "height": 1000})
    ctx.set_default_timeout(30_000)
    yield ctx.new_page()
    ctx.close()


def call(live: LiveServer, key: str, model: str) -> httpx.Response:
    return httpx.post(f"{live.v1}/{model}", json=BODY, headers={"x-api-key": key}, timeout=60)


def test_a_user_makes_uses_and_revokes_a_key_of_their_own(page: Any, console: LiveServer) -> None:
    key = provision(console.db, "self-service", 1)
    page.goto(f"{console.base_url}/account")
    page.fill("#api_key", key)
    page.click("#signin")
    page.wait_for_url("**/account")
    assert "New keys and credits come from your operator" not in page.content()

    page.fill("#new-key-name", "ci pipeline")
    page.check(f"input[name='model:{PACED}']")
    page.fill("#new-key-rpm", "7")
    page.fill("#new-key-expires", "2099-01-31")
    page.click("#new-key-create")
    page.wait_for_url("**/account*")
    secret = page.locator("#new-key").inner_text().strip()
    assert secret.startswith("slm_")
    key_id = secret.split("_")[1]
    assert page.locator("#copy-new-key").is_visible()
    page.screenshot(path=str(SCREENSHOTS / "self-service-key.png"), full_page=False)
    # Shown once: gone after "Done" and on any later visit.
    page.click("#new-key-done")
    page.wait_for_url("**/account*")
    assert page.locator("#new-key").count() == 0 and secret not in page.content()

    row = page.locator(f"tr[data-key='{key_id}']")
    assert "ci pipeline" in row.inner_text() and PACED in row.inner_text()
    assert "2099-01-31" in row.inner_text()
    assert get_key_limits(console.db, key_id).as_dict()["rpm"] == 7

    # The key works for what it was given, and only that.
    assert call(console, secret, PACED).status_code == 200
    assert call(console, secret, "smollm2-135m-instruct").status_code == 403
    page.reload()
    assert row.locator(".key-requests").inner_text() == "1"  # usage per key
    assert row.locator(".key-cost").inner_text() != "0.000000"

    row.locator("button.revoke").click()
    page.wait_for_url("**/account*")
    assert "revoked" in page.locator(f"tr[data-key='{key_id}']").inner_text()
    deadline = time.monotonic() + 10  # the key cache here trusts a lookup for 1 s
    while call(console, secret, PACED).status_code != 401:
        assert time.monotonic() < deadline, "the revoked key still works"
        time.sleep(0.1)
    assert page.locator("#account-name").is_visible()  # the session's own key lives on


def test_a_user_cannot_give_a_key_more_than_they_have(console: LiveServer) -> None:
    key = provision(console.db, "narrow-user", 1, allowed_models=[PACED])
    client = signed_in_client(console, key)
    token = csrf_from(client.get("/account").text)
    cases = [
        ({"model:smollm2-135m-instruct": "on"}, "may not use smollm2-135m-instruct"),
        ({"rpm": "5000"}, "rpm 5000 is above your plan's 1000"),
        ({"concurrency": "51"}, "above your plan's 50"),
        ({"rpm": "-3"}, "whole number"),
    ]
    for extra, says in cases:
        r = client.post("/account/keys", data={"csrf_token": token, "name": "x", **extra})
        assert r.status_code == 303
        shown = html.unescape(client.get(r.headers["location"]).text)
        assert says in shown, (extra, shown.split('id="keys-error">')[-1][:200])
    # With no models ticked, the new key gets the session key's models, not all.
    r = client.post("/account/keys", data={"csrf_token": token, "name": "same"})
    new = client.get(r.headers["location"])
    secret = new.text.split('id="new-key"><code>')[1].split("<")[0]
    assert call(console, secret, "smollm2-135m-instruct").status_code == 403
    # Another account's key cannot be revoked from here.
    other = provision(console.db, "someone-else", 1).split("_")[1]
    r = client.post(f"/account/keys/{other}/revoke", data={"csrf_token": token})
    assert r.status_code == 404


def test_the_operator_puts_an_account_on_a_plan(page: Any, console: LiveServer) -> None:
    provision(console.db, "planned-account", 1)
    page.goto(f"{console.base_url}/operator")
    page.fill("#admin_token", ADMIN_TOKEN)
    page.click("#operator-signin")
    page.wait_for_url("**/operator")
    assert "1000" in page.locator("#plans").inner_text()  # what each plan allows
    row = page.locator("tr[data-account]", has_text="planned-account")
    account_id = int(row.get_attribute("data-account") or 0)
    assert row.locator("select[name=plan]").input_value() == ""  # the default plan
    row.locator("select[name=plan]").select_option("default")
    row.locator("button.set-plan").click()
    page.wait_for_url("**/operator*")
    assert "plan default" in page.locator("#message").inner_text()
    assert get_plan(console.db, account_id) == "default"
    row = page.locator("tr[data-account]", has_text="planned-account")
    assert row.locator("select[name=plan]").input_value() == "default"
    page.screenshot(path=str(SCREENSHOTS / "operator-plans.png"), full_page=False)
    # A plan the models file lacks is refused, as in the CLI and the admin API.
    op = operator_client(console)
    token = csrf_from(op.get("/operator").text)
    r = op.post(f"/operator/accounts/{account_id}/plan",
                data={"csrf_token": token, "plan": "nosuchplan"})  # fmt: skip
    assert r.status_code == 303 and "err=" in r.headers["location"]
    assert "No plan" in op.get(r.headers["location"]).text
    op.close()
    assert get_plan(console.db, account_id) == "default"
