"""The console over plain HTTP: headers, CSRF, sessions, operator access, and the
model pages' own snippets run against the server they describe."""

from __future__ import annotations

import html
import re
import subprocess
import sys
import time
from decimal import Decimal
from pathlib import Path

import httpx
import pytest

from servelm.access import sessions as session
from servelm.api.console import docs
from servelm.api.services import services
from servelm.billing import accounts
from servelm.chat.protocol import ChatRequest
from tests.conftest import LiveServer, provision
from tests.console.conftest import PACED, csrf_from, operator_client, signed_in_client

SEEDS = ["llama-v3p1-8b-instruct", "mixtral-8x7b-instruct", "mixtral-8x22b-instruct"]
CHAT = {"model": PACED, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


def test_every_page_has_a_csp_without_inline_scripts(console: LiveServer) -> None:
    client = signed_in_client(console, provision(console.db, "csp-user", 1))
    for path in ["/", f"/models/{PACED}", "/playground", "/account", "/operator"]:
        r = client.get(path)
        assert r.status_code == 200, path
        csp = r.headers["content-security-policy"]
        assert "script-src 'self'" in csp and "unsafe-inline" not in csp, path
        assert r.headers["x-frame-options"] == "DENY"
        # No inline script at all: every <script> has a src.
        assert not re.search(r"<script(?![^>]*\bsrc=)[^>]*>", r.text), path


def test_model_page_documents_the_model(console: LiveServer) -> None:
    spec = services(console.app).catalog.resolve("smollm2-135m-instruct")
    page = httpx.get(f"{console.base_url}/models/{spec.slug}").text
    assert f"{console.base_url}/v1/{spec.slug}" in page
    assert f"{console.base_url}/v1/chat/completions" in page
    assert "8,192 tokens" in page and str(spec.input_price) in page and "Available" in page
    for field in ("messages", "max_tokens", "temperature", "stream", "response_format"):
        assert f"<code>{field}</code>" in page
        assert field in ChatRequest.model_fields
    for code in ("400", "401", "403", "404", "405", "406", "429", "500", "502", "504"):
        assert f"<code>{code}" in page, code
    for snippet in ("python-segmind", "js-segmind", "curl-segmind", "openai-openai"):
        assert f'data-snippet="{snippet}"' in page
    assert "Image input" not in page
    vision_page = httpx.get(f"{console.base_url}/models/{PACED}").text
    assert "Image input" in vision_page and "data:image/png;base64" in vision_page
    # An alias leads to the slug's page; an unknown name is a 404 page.
    r = httpx.get(f"{console.base_url}/models/smollm2")
    assert r.status_code == 303 and r.headers["location"] == f"/models/{spec.slug}"
    assert httpx.get(f"{console.base_url}/models/no-such").status_code == 404


def test_form_posts_without_the_csrf_token_are_refused(console: LiveServer) -> None:
    key = provision(console.db, "csrf-user", 1)
    anon = httpx.Client(base_url=console.base_url)
    anon.get("/account")  # has its CSRF cookie, but sends no token
    r = anon.post("/account/signin", data={"api_key": key})
    assert r.status_code == 403 and "CSRF" in r.text
    assert session.SESSION_COOKIE not in anon.cookies
    op = operator_client(console)
    before = len(accounts.list_accounts(console.db))
    r = op.post("/operator/accounts", data={"name": "no-token"})
    assert r.status_code == 403
    r = op.post("/operator/accounts", data={"name": "wrong-token", "csrf_token": "x" * 43})
    assert r.status_code == 403
    assert len(accounts.list_accounts(console.db)) == before
    # With the token the same post works.
    token = csrf_from(op.get("/operator").text)
    r = op.post("/operator/accounts", data={"name": "with-token", "csrf_token": token})
    assert r.status_code == 303
    assert len(accounts.list_accounts(console.db)) == before + 1


def test_session_cookie_is_signed_httponly_strict_and_holds_no_key(console: LiveServer) -> None:
    key = provision(console.db, "cookie-user", 1)
    client = httpx.Client(base_url=console.base_url)
    token = csrf_from(client.get("/account").text)
    r = client.post("/account/signin", data={"csrf_token": token, "api_key": key})
    cookie = next(
        h for h in r.headers.get_list("set-cookie") if h.startswith(session.SESSION_COOKIE)
    )
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie
    secret_part = key.rsplit("_", 1)[1]
    assert secret_part not in cookie
    # A tampered cookie is no session.
    value = client.cookies[session.SESSION_COOKIE]
    client.cookies.delete(session.SESSION_COOKIE)
    client.cookies.set(session.SESSION_COOKIE, value[:-2] + ("A" if value[-1] != "A" else "B"))
    assert 'id="api_key"' in client.get("/account").text


def test_playground_chat_needs_the_session_and_its_csrf_header(console: LiveServer) -> None:
    key = provision(console.db, "hook-user", 1)
    client = signed_in_client(console, key)
    token = csrf_from(client.get("/playground").text)
    assert client.post("/v1/chat/completions", json=CHAT).status_code == 401
    bad = client.post("/v1/chat/completions", json=CHAT, headers={"x-csrf-token": "nope"})
    assert bad.status_code == 401
    r = client.post("/v1/chat/completions", json=CHAT, headers={"x-csrf-token": token})
    assert r.status_code == 200, r.text
    assert Decimal(str(r.json()["usage"]["cost"])) == Decimal(r.headers["x-cost"])
    # An expired session is no session, even with the right token.
    secret = session.app_secret(console.app, services(console.app).settings)
    nonce = client.cookies[session.CSRF_COOKIE]
    live_payload = session.unsign(secret, client.cookies[session.SESSION_COOKIE])
    assert live_payload is not None
    expired = session.user_session(secret, live_payload["sid"], key.split("_")[1], nonce, ttl=-1)
    client.cookies.delete(session.SESSION_COOKIE)
    client.cookies.set(session.SESSION_COOKIE, expired)
    r = client.post("/v1/chat/completions", json=CHAT, headers={"x-csrf-token": token})
    assert r.status_code == 401


def test_a_revoked_key_ends_its_sessions(console: LiveServer) -> None:
    key = provision(console.db, "revoked-user", 1)
    client = signed_in_client(console, key)
    token = csrf_from(client.get("/playground").text)
    accounts.revoke_key(console.db, key.split("_")[1])
    end = time.monotonic() + 10  # the key cache trusts a lookup for 1 s here
    status = 200
    while time.monotonic() < end:
        r = client.post("/v1/chat/completions", json=CHAT, headers={"x-csrf-token": token})
        status = r.status_code
        if status == 401:
            break
        time.sleep(0.2)
    assert status == 401 and "revoked" in r.text
    assert 'id="api_key"' in client.get("/account").text


def test_operator_pages_are_closed_to_user_keys_and_sessions(console: LiveServer) -> None:
    key = provision(console.db, "nosy-user", 1)
    page = httpx.get(f"{console.base_url}/operator", headers={"x-api-key": key}).text
    assert 'id="admin_token"' in page and 'id="accounts"' not in page
    client = signed_in_client(console, key)
    assert 'id="accounts"' not in client.get("/operator").text
    token = csrf_from(client.get("/account").text)
    r = client.post("/operator/accounts", data={"name": "by-user", "csrf_token": token})
    assert r.status_code == 401
    r = client.get("/operator/live.json")
    assert r.status_code == 401
    # A wrong admin token does not sign in.
    anon = httpx.Client(base_url=console.base_url)
    token = csrf_from(anon.get("/operator").text)
    r = anon.post("/operator/signin", data={"csrf_token": token, "admin_token": key})
    assert r.status_code == 401 and session.OPERATOR_COOKIE not in anon.cookies


# -- the model pages' snippets, run as a reader would run them ------------------------------


def snippet(page: str, name: str) -> str:
    match = re.search(rf'data-snippet="{name}"><code>(.*?)</code></pre>', page, re.S)
    assert match, f"no {name} snippet on the page"
    return html.unescape(match.group(1))


def run_python(code: str, key: str, tmp: Path) -> subprocess.CompletedProcess[str]:
    script = tmp / "snippet.py"
    script.write_text(code.replace(docs.KEY_PLACEHOLDER, key))
    return subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=120, check=False
    )


def run_curl(code: str, key: str, tmp: Path) -> tuple[int, str]:
    out = tmp / "curl.out"
    command = code.replace(docs.KEY_PLACEHOLDER, key) + f" -sS -o {out} -w '%{{http_code}}'"
    proc = subprocess.run(
        ["bash", "-c", command], capture_output=True, text=True, timeout=120, check=False
    )
    assert proc.returncode == 0, proc.stderr
    return int(proc.stdout), out.read_text()


@pytest.mark.parametrize("route", ["segmind", "openai"])
def test_seed_model_snippets_run_against_the_server(
    seed_live: LiveServer, tmp_path: Path, route: str
) -> None:
    key = provision(seed_live.db, f"snippets-{route}", 1)
    for slug in SEEDS:
        page = httpx.get(f"{seed_live.base_url}/models/{slug}").text
        assert "Available" in page, slug
        proc = run_python(snippet(page, f"python-{route}"), key, tmp_path)
        assert proc.returncode == 0, f"{slug}: {proc.stderr}"
        assert proc.stdout.strip(), slug
        status, body = run_curl(snippet(page, f"curl-{route}"), key, tmp_path)
        assert status == 200, f"{slug}: {body}"
        assert '"chat.completion"' in body


def test_snippets_of_a_model_without_weights_get_the_documented_404(
    console: LiveServer, tmp_path: Path
) -> None:
    key = provision(console.db, "snippets-503", 1)
    slug = "llama-v3p1-8b-instruct"  # not installed on this server
    page = httpx.get(f"{console.base_url}/models/{slug}").text
    assert "Not installed" in page and "calls answer 404" in page
    proc = run_python(snippet(page, "python-segmind"), key, tmp_path)
    assert proc.returncode != 0 and "404" in proc.stderr
    status, body = run_curl(snippet(page, "curl-openai"), key, tmp_path)
    # Users are told it is not installed; how to install it is the operator's business.
    assert status == 404 and "is not installed on this server" in body
