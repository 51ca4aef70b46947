"""Issue 29, points 4 and 6, in Chromium: a model page describes its model (display
name, Markdown description and features, from the built-ins and the models file, in
/v1/models too) and runs it inline through the playground's walk; at 390 px wide
nothing is cut off or wider than the screen."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from servelm.billing import accounts, audit
from servelm.billing.money import format_credits
from tests.conftest import LiveServer, provision
from tests.console.conftest import PACED, SCREENSHOTS

pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed")

PHONE = {"width": 390, "height": 844}


@pytest.fixture
def desktop(browser: Any) -> Iterator[Any]:
    ctx = browser.new_context(viewport={"width": 1280, "height": 1000})
    ctx.set_default_timeout(30_000)
    yield ctx
    ctx.close()


@pytest.fixture
def phone(browser: Any) -> Iterator[Any]:
    ctx = browser.new_context(viewport=PHONE, device_scale_factor=2, is_mobile=True)
    ctx.set_default_timeout(30_000)
    yield ctx
    ctx.close()


def sign_in(page: Any, live: LiveServer, key: str) -> None:
    page.goto(f"{live.base_url}/account")
    page.fill("#api_key", key)
    page.click("#signin")
    page.wait_for_url("**/account")


def test_a_builtin_model_page_describes_the_model(desktop: Any, console: LiveServer) -> None:
    page = desktop.new_page()
    page.goto(f"{console.base_url}/models/mixtral-8x7b-instruct")
    assert page.locator("#model-title").inner_text() == "Mixtral 8x7B Instruct"
    assert "(tokenizer v1)" not in page.content()
    description = page.locator("#model-description")
    assert description.locator("strong").inner_text() == "sparse mixture of experts"
    features = page.locator("#model-features li").all_inner_texts()
    assert "Open weights (Apache 2.0)" in features
    assert any("8 experts, 2 active per token" in f for f in features)
    assert any("French" in f for f in features)
    # Not installed: no try-it box that could only fail.
    assert page.locator("#try-it").count() == 0


def test_models_file_text_is_markdown_and_stays_text(desktop: Any, console: LiveServer) -> None:
    page = desktop.new_page()
    dialogs: list[str] = []

    def on_dialog(dialog: Any) -> None:
        dialogs.append(dialog.message)
        dialog.dismiss()

    page.on("dialog", on_dialog)
    page.goto(f"{console.base_url}/models/{PACED}")
    assert page.locator("#model-title").inner_text() == "Paced Test Model"
    items = page.locator("#model-features li")
    assert items.nth(0).locator("strong").inner_text() == "Deterministic"
    assert items.nth(1).inner_text() == "<img src=x onerror=alert(1)> is text"
    assert page.locator("#model-features img").count() == 0 and dialogs == []


def test_v1_models_carries_the_page_text(console: LiveServer) -> None:
    r = httpx.get(f"{console.v1}/models", headers=console.headers(), timeout=30)
    cards = {m["id"]: m for m in r.json()["data"]}
    mixtral = cards["mixtral-8x7b-instruct"]
    assert mixtral["display_name"] == "Mixtral 8x7B Instruct"
    assert "sparse mixture of experts" in mixtral["description"]
    assert "Open weights (Apache 2.0)" in mixtral["features"]
    assert cards[PACED]["display_name"] == "Paced Test Model"
    assert cards[PACED]["features"][0] == "**Deterministic** replies"  # Markdown, as written


def test_the_try_it_box_runs_the_model_through_the_playground_walk(
    desktop: Any, console: LiveServer
) -> None:
    key = provision(console.db, "try-it-user", 1)
    page = desktop.new_page()
    page.goto(f"{console.base_url}/models/{PACED}")
    assert page.locator("#tryit-signin").is_visible()  # signed out: says how to try
    sign_in(page, console, key)
    page.goto(f"{console.base_url}/models/{PACED}")
    page.fill("#tryit-prompt", "hello there")
    page.fill("#tryit-max", "3")
    page.click("#tryit-send")
    page.locator("#tryit-cost", has_text="credits left").wait_for()
    assert page.locator("#tryit-reply").inner_text().strip() == "word1 word2 word3"
    shown = page.locator("#tryit-cost").inner_text()
    record = accounts.find_key(console.db, key.split("_")[1])
    assert record is not None
    (row,) = audit.recent_requests(console.db, record.account_id, 5)
    assert row["model"] == PACED and row["completion_tokens"] == 3
    assert f"{format_credits(row['cost'])} credits" in shown  # charged as any call
    # The README's picture: the default model's page, its description and a reply.
    page.goto(f"{console.base_url}/models/smollm2-135m-instruct")
    page.fill("#tryit-max", "24")
    page.click("#tryit-send")
    page.locator("#tryit-cost", has_text="credits left").wait_for()
    page.screenshot(path=str(SCREENSHOTS / "model-page-tryit.png"), full_page=False)


# -- 6: a 390 px phone -------------------------------------------------------------------


def overflow(page: Any) -> int:
    return int(page.evaluate("document.documentElement.scrollWidth - window.innerWidth"))


def test_at_390_px_nothing_is_cut_off(phone: Any, console: LiveServer) -> None:
    key = provision(console.db, "phone-user", 1)
    page = phone.new_page()
    sign_in(page, console, key)
    for path in ("/", "/models/smollm2-135m-instruct", "/account", "/playground", "/docs"):
        page.goto(f"{console.base_url}{path}")
        assert overflow(page) <= 0, f"{path} is wider than the screen"
        for link in page.locator(".top nav a").all():
            box = link.bounding_box()
            assert box is not None and box["x"] >= 0 and box["x"] + box["width"] <= 390, (
                f"{path}: nav link {link.inner_text()!r} is cut off"
            )
    page.goto(f"{console.base_url}/models/smollm2-135m-instruct")
    endpoints = page.locator(".panel", has=page.locator("h2", has_text="Endpoints"))
    widths = endpoints.evaluate("e => [e.scrollWidth, e.clientWidth]")
    assert widths[0] <= widths[1], f"the Endpoints card overflows: {widths}"
    page.screenshot(path=str(SCREENSHOTS / "model-page-390.png"), full_page=False)
    # The footer sends a browser to a page, not to an API route's 401 JSON.
    for href in page.locator("footer a").evaluate_all("links => links.map(a => a.href)"):
        r = httpx.get(href, timeout=30)
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/html"), href
