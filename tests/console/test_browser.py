"""The console in a real browser: headless Chromium driven by Playwright.

Signing in, a streamed playground reply, the cost and balance it shows against the
API's own figures, stopping a reply, the operator granting and revoking, and hostile
text (a model reply, an account name) that must stay text. The run also writes the
README's screenshots.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import httpx
import pytest

from servelm.api.services import services
from servelm.billing import accounts, audit
from servelm.billing.money import MICRO, format_credits
from servelm.chat.conversation import estimate_prompt_tokens
from tests.conftest import ADMIN_TOKEN, LiveServer, provision
from tests.console.conftest import PACED, SCREENSHOTS, XSS_REPLY

expect = pytest.importorskip(
    "playwright.sync_api", reason="the playwright package is not installed"
).expect
SMOL = "smollm2-135m-instruct"


class Watch:
    """What a page did that it never should: dialogs opened, scripts that ran."""

    def __init__(self, page: Any) -> None:
        self.dialogs: list[str] = []
        page.on("dialog", self._dialog)

    def _dialog(self, dialog: Any) -> None:
        self.dialogs.append(dialog.message)
        dialog.dismiss()


@pytest.fixture
def page(browser: Any) -> Iterator[Any]:
    context = browser.new_context(viewport={"width": 1280, "height": 860})
    tab = context.new_page()
    tab.set_default_timeout(30_000)
    yield tab
    context.close()


def sign_in(page: Any, live: LiveServer, key: str, then: str = "/account") -> None:
    page.goto(f"{live.base_url}{then}")
    page.fill("#api_key", key)
    page.click("#signin")
    page.wait_for_url(f"**{then}")


def send(page: Any, model: str, text: str, max_tokens: int) -> Any:
    """Send one message in the playground; returns the reply's box."""
    page.select_option("#model", model)
    page.fill("#max_tokens", str(max_tokens))
    page.fill("#prompt", text)
    page.click("#send")
    return page.locator(".msg.assistant").last


def account_of(live: LiveServer, key: str) -> int:
    record = accounts.find_key(live.db, key.split("_")[1])
    assert record is not None
    return record.account_id


def settled(live: LiveServer, account_id: int, count: int) -> list[dict[str, Any]]:
    """The account's requests once ``count`` of them are settled (newest first)."""
    deadline = time.monotonic() + 30
    while True:
        rows = audit.recent_requests(live.db, account_id, 50)
        if len(rows) >= count:
            return rows
        assert time.monotonic() < deadline, "request not settled"
        time.sleep(0.05)


def test_playground_reply_shows_the_exact_cost_and_balance(page: Any, console: LiveServer) -> None:
    key = console.api_key  # the first-start key, 10 starter credits
    watch = Watch(page)
    page.goto(f"{console.base_url}/models/{SMOL}")
    page.screenshot(path=str(SCREENSHOTS / "model-page.png"), full_page=False)

    sign_in(page, console, key, then="/playground")
    with page.expect_response(f"{console.base_url}/v1/chat/completions") as seen:
        reply = send(page, SMOL, "Tell me a short story about a cat.", 16)
    # The real model, on a CPU shared with other work: generous.
    page.wait_for_selector('.msg.assistant[data-state="done"]', timeout=120_000)
    response = seen.value
    assert response.status == 200
    # The final chunk's usage, as the API sent it.
    events = [line[6:] for line in response.text().splitlines() if line.startswith("data: {")]
    usage = json.loads(events[-1])["usage"]
    shown_cost = page.inner_text("#cost")
    shown_balance = page.inner_text("#remaining")
    assert shown_cost == f"{usage['cost']:.6f}"
    assert shown_balance == f"{usage['remaining_credits']:.6f}"
    assert reply.locator(".text").inner_text().strip()
    # ... and against the ledger and the API's x-remaining-credits.
    account_id = account_of(console, key)
    (row,) = settled(console, account_id, 1)
    assert format_credits(row["cost"]) == shown_cost
    spec = services(console.app).catalog.resolve(SMOL)
    assert row["cost"] == spec.cost_micro(row["prompt_tokens"], row["completion_tokens"])
    api = httpx.post(
        f"{console.v1}/{SMOL}",
        headers={"x-api-key": key},
        json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1},
        timeout=60,
    )
    after = Decimal(api.headers["x-remaining-credits"]) + Decimal(api.headers["x-cost"])
    assert after == Decimal(shown_balance)
    assert Decimal(shown_balance) == Decimal(10) - Decimal(shown_cost)
    page.screenshot(path=str(SCREENSHOTS / "playground.png"), full_page=False)
    # "Copy as code": the exact request, with a placeholder where the key goes.
    page.click("#copy-code")
    code = page.inner_text("#code-out")
    assert code.startswith(f"curl -X POST {console.base_url}/v1/chat/completions")
    sent = json.loads(code.split("-d '", 1)[1].rstrip("'"))
    assert sent["model"] == SMOL and sent["max_tokens"] == 16 and sent["stream"] is True
    assert "YOUR_API_KEY" in code and key not in code
    page.goto(f"{console.base_url}/account")
    assert page.inner_text("#balance") == format_credits(
        10 * MICRO - sum(r["cost"] for r in settled(console, account_id, 2))
    )
    assert page.locator("#recent tbody tr").count() == 2
    page.screenshot(path=str(SCREENSHOTS / "dashboard.png"), full_page=False)
    assert not watch.dialogs


def test_reply_streams_and_stop_charges_only_what_was_shown(page: Any, console: LiveServer) -> None:
    key = provision(console.db, "stopper", 5)
    sign_in(page, console, key, then="/playground")
    reply = send(page, PACED, "count for me", 400)
    text = reply.locator(".text")
    # The text grows while the reply streams: several distinct, growing observations.
    seen: list[int] = []
    deadline = time.monotonic() + 30
    while len(seen) < 3:
        assert time.monotonic() < deadline, f"reply did not grow: {seen}"
        size = len(text.inner_text())
        if size and (not seen or size > seen[-1]):
            seen.append(size)
        time.sleep(0.05)
    assert seen == sorted(seen) and seen[0] < seen[-1]
    page.click("#stop")
    page.wait_for_selector('.msg.assistant[data-state="stopped"]')
    shown_chunks = int(reply.get_attribute("data-chunks"))
    shown_text = text.inner_text()
    assert shown_text.split() == [f"word{i}" for i in range(1, shown_chunks + 1)]
    (row,) = settled(console, account_of(console, key), 1)
    assert row["status"] == "cancelled"
    # Charged for what was sent: what the page shows, plus at most the chunk or two
    # in flight when the browser hung up; far from the 400 asked for.
    assert shown_chunks <= row["completion_tokens"] <= shown_chunks + 2
    spec = services(console.app).catalog.resolve(PACED)
    # The paced upstream sends its usage only at the end: the prompt pays its upper
    # bound from its bytes (README, "What each ending pays"), never 0.
    assert row["prompt_tokens"] >= estimate_prompt_tokens(
        {"messages": [{"role": "user", "content": "count for me"}]}
    )
    assert row["cost"] == spec.cost_micro(row["prompt_tokens"], row["completion_tokens"])
    # The page then shows the balance after that charge.
    balance = format_credits(5 * MICRO - row["cost"])
    expect(page.locator("#remaining")).to_have_text(balance, timeout=10_000)


def test_operator_grants_and_revokes_and_the_user_sees_it(
    browser: Any, console: LiveServer
) -> None:
    key = provision(console.db, "granted-user", 2)
    account_id = account_of(console, key)
    user = browser.new_context(viewport={"width": 1280, "height": 860})
    operator = browser.new_context(viewport={"width": 1280, "height": 860})
    try:
        me = user.new_page()
        sign_in(me, console, key)
        assert me.inner_text("#balance") == "2.000000"

        op = operator.new_page()
        op.goto(f"{console.base_url}/operator")
        op.fill("#admin_token", ADMIN_TOKEN)
        op.click("#operator-signin")
        op.wait_for_selector("#accounts")
        row = op.locator(f'tr[data-account="{account_id}"]')
        row.locator('input[name="credits"]').fill("2.5")
        row.locator('input[name="note"]').fill("invoice 7")
        row.locator("form.grant button").click()
        op.wait_for_selector("#message")
        assert "4.500000" in op.inner_text("#message")

        me.reload()
        assert me.inner_text("#balance") == "4.500000"

        key_id = key.split("_")[1]
        op.locator(f'tr[data-key="{key_id}"] button.danger').click()
        op.wait_for_selector(f'tr[data-key="{key_id}"] .badge.off')
        deadline = time.monotonic() + 10  # the key cache trusts a lookup for 1 s here
        status = 0
        while time.monotonic() < deadline:
            status = httpx.get(f"{console.v1}/credits", headers={"x-api-key": key}).status_code
            if status == 401:
                break
            time.sleep(0.2)
        assert status == 401
        me.reload()
        assert me.locator("#api_key").count() == 1  # the session went with the key
    finally:
        user.close()
        operator.close()


def test_the_account_page_lists_async_requests_and_batches(page: Any, console: LiveServer) -> None:
    key = provision(console.db, "queued-user", 5)
    api = httpx.Client(base_url=console.base_url, headers={"x-api-key": key}, timeout=60)
    ask = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
    sub = api.post(f"/v2/{PACED}", json=ask).json()
    lines = [
        {
            "custom_id": "ok",
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": {"model": PACED, **ask},
        },
        {
            "custom_id": "bad",
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": {"model": PACED, "messages": [{"role": "wizard", "content": "x"}]},
        },
    ]
    data = "".join(json.dumps(line) + "\n" for line in lines)
    f = api.post("/v1/files", data={"purpose": "batch"}, files={"file": ("b.jsonl", data)})
    batch = api.post(
        "/v1/batches",
        json={
            "input_file_id": f.json()["id"],
            "endpoint": "/v1/chat/completions",
            "completion_window": "24h",
        },
    ).json()
    deadline = time.monotonic() + 60
    while True:
        status = api.get(sub["status_url"]).json()
        done = api.get(f"/v1/batches/{batch['id']}").json()
        if status["status"] == "COMPLETED" and done["status"] == "completed":
            break
        assert time.monotonic() < deadline, (status, done)
        time.sleep(0.1)
    sign_in(page, console, key)
    rows = page.locator("#jobs tbody tr")
    expect(rows).to_have_count(2)
    req = page.locator(f'#jobs tr[data-job-id="{sub["request_id"]}"]')
    assert req.locator(".status").inner_text() == "COMPLETED"
    assert req.locator(".cost").inner_text() == status["cost"]
    assert Decimal(status["cost"]) > 0
    row = page.locator(f'#jobs tr[data-job-id="{batch["id"]}"]')
    assert row.locator(".status").inner_text() == "completed"
    counts = [row.locator(c).inner_text() for c in (".done", ".failed", ".total")]
    assert counts == ["1", "1", "2"]
    assert row.locator(".cost").inner_text() == done["cost"]
    assert Decimal(done["cost"]) > 0
    # What the page says is what the account paid: its grant less its balance.
    paid = Decimal(5) - Decimal(api.get("/v1/credits").json()["credits"])
    assert paid == Decimal(status["cost"]) + Decimal(done["cost"])


def test_operator_sees_each_models_state_memory_and_the_budget(
    page: Any, console: LiveServer
) -> None:
    """Serverless models on the operator's page (issue 27): a local model's state and
    estimated memory, a remote one's none, and what the loaded ones take of the
    budget; after a request the default model shows loaded and counted."""
    served = httpx.post(
        f"{console.v1}/chat/completions",
        headers={"x-api-key": console.api_key},
        json={"model": SMOL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
        timeout=120,
    )
    assert served.status_code == 200, served.text
    footprint = services(console.app).models.describe(SMOL)["memory_bytes"]
    assert isinstance(footprint, int) and footprint > 0
    mib = f"{footprint / (1 << 20):,.1f} MiB"
    page.goto(f"{console.base_url}/operator")
    page.fill("#admin_token", ADMIN_TOKEN)
    page.click("#operator-signin")
    page.wait_for_selector("#models")
    row = page.locator(f'tr[data-model="{SMOL}"]')
    expect(row).to_have_attribute("data-state", "loaded")
    expect(row.locator(".load-state")).to_have_text("loaded")
    expect(row.locator(".memory")).to_have_text(mib)
    remote = page.locator(f'tr[data-model="{PACED}"]')
    expect(remote.locator(".load-state")).to_have_text("remote")
    expect(page.locator("#memory-in-use")).to_have_text(mib)
    expect(page.locator("#memory-budget-bytes")).to_have_text("2,048.0 MiB")
    expect(page.locator("#memory-loaded")).to_have_text("1")
    page.goto(f"{console.base_url}/models/{SMOL}")
    expect(page.locator("#model-state")).to_have_text("Available: loaded")


def test_hostile_text_stays_text(page: Any, browser: Any, console: LiveServer) -> None:
    # An account name with markup, created through the operator console itself.
    name = '<img src=x id="name-xss" onerror="alert(3)">'
    op_context = browser.new_context()
    try:
        op = op_context.new_page()
        op_watch = Watch(op)
        op.goto(f"{console.base_url}/operator")
        op.fill("#admin_token", ADMIN_TOKEN)
        op.click("#operator-signin")
        op.fill('#new-account input[name="name"]', name)
        op.click("#new-account button")
        op.wait_for_selector("#message")
        assert name in op.locator("#accounts").inner_text()
        assert op.locator("#name-xss").count() == 0
        assert not op_watch.dialogs
    finally:
        op_context.close()
    acct = accounts.get_account(console.db, name)
    accounts.grant(console.db, acct.id, 5 * MICRO, "test")
    _, key = accounts.create_key(console.db, acct.id, "xss")

    watch = Watch(page)
    sign_in(page, console, key, then="/playground")
    reply = send(page, PACED, "xss please", 16)
    page.wait_for_selector('.msg.assistant[data-state="done"]')
    assert reply.locator(".text").inner_text() == XSS_REPLY
    assert page.locator("#conversation img, #conversation script, #injected").count() == 0
    page.goto(f"{console.base_url}/account")
    assert page.inner_text("#account-name") == name
    assert page.locator("#name-xss").count() == 0
    time.sleep(0.3)  # an onerror handler would have fired by now
    assert not watch.dialogs


def test_an_image_attached_in_the_playground_reaches_a_vision_model(
    page: Any, console: LiveServer, tmp_path: Any
) -> None:
    from PIL import Image

    image = tmp_path / "cat.png"
    Image.new("RGB", (32, 24), (200, 120, 40)).save(image)
    key = provision(console.db, "seer", 1)
    sign_in(page, console, key, then="/playground")
    page.select_option("#model", SMOL)
    assert not page.is_visible("#image")  # a text-only model takes no images
    page.select_option("#model", PACED)
    page.set_input_files("#image", str(image))
    reply = send(page, PACED, "what is this?", 8)
    page.wait_for_selector('.msg.assistant[data-state="done"]')
    assert reply.locator(".text").inner_text() == "saw 1 image"
    assert "[image: cat.png]" in page.locator(".msg.user").last.inner_text()
