"""The structure the walk relies on: one path rule, one error renderer, the key cache,
the chat routes in the schema and behind every middleware, and the error envelopes."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from servelm.access import keys as auth
from servelm.api import app as app_module
from servelm.api.errors import render
from servelm.api.openapi import ChatCompletion
from servelm.api.paths import dialect_for_path, route_family, segmind_slug
from servelm.billing import accounts
from servelm.catalog.specs import Catalog
from servelm.errors import AuthenticationError, InsufficientCredits, InvalidRequest
from tests.conftest import LiveServer, make_settings, start_server
from tests.fast.conftest import SLUG, SPEC, new_key
from tests.support.scripted_engine import scripted_factory

# -- one path rule -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "slug", "dialect", "family"),
    [
        ("/v1/chat/completions", None, "openai", "openai_chat"),
        ("/v1/chat/completions/", None, "openai", "openai_chat"),
        ("/v1/llama-v3p1-8b-instruct", "llama-v3p1-8b-instruct", "segmind", "segmind_chat"),
        ("/v1/org/model", None, "segmind", "segmind_chat"),
        ("/v1/models", None, "openai", "models"),
        ("/v1/models/x", None, "openai", "models"),
        ("/v1/credits", None, "openai", "account"),
        ("/v1/usage", None, "openai", "account"),
        ("/v1/get-user-credits", None, "openai", "account"),
        ("/v1/embeddings", None, "openai", "other"),
        ("/v1/batches", None, "openai", "batches"),
        ("/v1/files/file_1/content", None, "openai", "batches"),
        ("/v2/llama-v3p1-8b-instruct", None, "segmind", "async"),
        ("/v2/requests/req_1/status", None, "segmind", "async"),
        ("/v1/completions", None, "openai", "other"),
        ("/admin/accounts", None, "openai", "admin"),
        ("/health", None, "openai", "other"),
    ],
)
def test_one_rule_says_what_a_path_is(
    path: str, slug: str | None, dialect: str, family: str
) -> None:
    assert segmind_slug(path) == slug
    assert dialect_for_path(path) == dialect
    assert route_family(path) == family


# -- one error renderer ------------------------------------------------------------------


def test_render_gives_each_dialect_its_envelope_and_status() -> None:
    exc = InsufficientCredits("Not enough credits.", headers={"x-remaining-credits": "0.5"})
    seg = render(exc, "segmind")
    assert seg.status == 406 and json.loads(seg.body) == {"error": "Not enough credits."}
    assert (b"x-remaining-credits", b"0.5") in seg.headers
    oai = render(exc, "openai")
    assert oai.status == 402
    assert json.loads(oai.body)["error"]["code"] == "insufficient_credits"


def test_render_after_the_headers_is_an_sse_event_in_the_same_envelope() -> None:
    event = render(InvalidRequest("bad", param="x"), "openai", stream_started=True)
    assert event.body.startswith(b"data: ") and event.body.endswith(b"\n\n")
    assert json.loads(event.body[6:])["error"]["param"] == "x"
    assert event.headers == []


def test_one_renderer_in_the_codebase() -> None:
    src = Path(app_module.__file__).parents[1]
    renderers = [
        p.relative_to(src).as_posix()
        for p in src.rglob("*.py")
        if "segmind_body()" in p.read_text()
    ]
    assert renderers == ["api/errors.py"]


def test_one_chat_front_end_for_every_process_kind() -> None:
    """Issue 24: ``servelm worker`` and ``serve --workers``' engine process serve chat
    through api/chat.py, with no body reader, SSE writer or error envelope of their own."""
    src = Path(app_module.__file__).parents[1]
    own = ("http.response.body", "http.disconnect", 'b"data: ', "openai_body(", "receive()")
    for module in ("processes/worker.py", "processes/multiproc.py"):
        text = (src / module).read_text()
        assert [marker for marker in own if marker in text] == [], module
        assert "engine_front" in text, module


# -- the key cache, on an injected clock --------------------------------------------------


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


async def test_revocation_takes_effect_when_the_cached_lookup_expires(
    fast: LiveServer,
) -> None:
    key, _ = new_key(fast.db, 0)
    key_id = key.split("_")[1]
    lookups: list[str] = []

    async def lookup(kid: str) -> accounts.KeyRecord | None:
        lookups.append(kid)
        return accounts.find_key(fast.db, kid)

    clock = _Clock()
    authn = auth.Authenticator(lookup, cache_seconds=5, clock=clock)
    principal = await authn.authenticate(key)
    accounts.revoke_key(fast.db, key_id)
    clock.now = 4.9
    assert await authn.authenticate(key) == principal  # still trusted from the cache
    assert lookups == [key_id]
    clock.now = 5.1
    with pytest.raises(AuthenticationError, match="revoked"):
        await authn.authenticate(key)
    assert lookups == [key_id, key_id]


async def test_unknown_key_ids_are_cached_too() -> None:
    lookups: list[str] = []

    async def lookup(kid: str) -> None:
        lookups.append(kid)
        return None

    authn = auth.Authenticator(lookup, cache_seconds=5, clock=_Clock())
    forged = auth.generate().plaintext
    for _ in range(3):
        with pytest.raises(AuthenticationError, match="Invalid API key"):
            await authn.authenticate(forged)
    assert len(lookups) == 1


async def test_an_expired_key_is_refused() -> None:
    new = auth.generate()
    record = accounts.KeyRecord(
        id=1,
        key_id=new.key_id,
        account_id=1,
        name="k",
        allowed_models=None,
        expires_at=datetime(2026, 1, 1, tzinfo=UTC),
        revoked_at=None,
        created_at=datetime(2025, 1, 1, tzinfo=UTC),
        digest=new.digest,
    )

    async def lookup(kid: str) -> accounts.KeyRecord:
        return record

    later = datetime(2026, 1, 1, tzinfo=UTC) + timedelta(seconds=1)
    authn = auth.Authenticator(lookup, wall_clock=lambda: later)
    with pytest.raises(AuthenticationError, match="expired"):
        await authn.authenticate(new.plaintext)


def test_a_non_ascii_admin_token_is_a_401_not_a_crash() -> None:
    with pytest.raises(AuthenticationError):
        auth.check_admin_token("Bearer tökén\udcff", "secret")


# -- the routes in the schema, behind the middleware, in the metrics ------------------------


def test_openapi_lists_both_chat_routes_with_their_bodies(fast: LiveServer) -> None:
    spec = httpx.get(f"{fast.base_url}/openapi.json").json()
    for path in ("/v1/chat/completions", "/v1/{model}"):
        op = spec["paths"][path]["post"]
        schema = op["requestBody"]["content"]["application/json"]["schema"]
        assert schema["$ref"].endswith("/ChatRequest")
        assert "200" in op["responses"]
    assert "messages" in spec["components"]["schemas"]["ChatRequest"]["properties"]
    assert "406" in spec["paths"]["/v1/{model}"]["post"]["responses"]
    assert "402" in spec["paths"]["/v1/chat/completions"]["post"]["responses"]
    op = spec["paths"]["/v1/responses"]["post"]
    schema = op["requestBody"]["content"]["application/json"]["schema"]
    assert schema["$ref"].endswith("/ResponsesRequest")


def test_answers_match_the_documented_schema(fast: LiveServer) -> None:
    key, _ = new_key(fast.db, 1000)
    r = httpx.post(
        f"{fast.v1}/chat/completions",
        json={"model": SLUG, "messages": [{"role": "user", "content": "hi"}]},
        headers={"x-api-key": key},
    )
    ChatCompletion.model_validate(r.json())


class _Stamp:
    """A middleware an operator might add (tracing, CORS): it marks every response."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def stamped(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message["headers"], (b"x-stamp", b"yes")]
            await send(message)

        await self.app(scope, receive, stamped)


@pytest.fixture
def stamped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[LiveServer]:
    real = app_module.create_app

    def with_stamp(*a: object, **kw: object) -> object:
        app = real(*a, **kw)  # type: ignore[arg-type]
        app.add_middleware(_Stamp)
        return app

    monkeypatch.setattr("tests.conftest.create_app", with_stamp)
    srv = start_server(
        make_settings(tmp_path, tmp_path / "models"),
        Catalog([SPEC]),
        engine_factory=scripted_factory,
    )
    yield srv
    srv.stop()


def test_a_middleware_added_to_the_app_applies_to_the_chat_routes(stamped: LiveServer) -> None:
    body = {"model": SLUG, "messages": [{"role": "user", "content": "hi"}]}
    for url in (f"{stamped.v1}/chat/completions", f"{stamped.v1}/{SLUG}"):
        r = httpx.post(url, json=body, headers=stamped.headers())
        assert r.status_code == 200
        assert r.headers["x-stamp"] == "yes"
    assert httpx.get(f"{stamped.v1}/models", headers=stamped.headers()).headers["x-stamp"]


def test_metrics_label_account_routes_as_account(fast: LiveServer) -> None:
    key, _ = new_key(fast.db, 0)
    assert httpx.get(f"{fast.v1}/credits", headers={"x-api-key": key}).status_code == 200
    text = httpx.get(f"{fast.base_url}/metrics").text
    assert 'servelm_requests_total{route="account",status="200"}' in text


# -- envelopes and balances on every authenticated answer -----------------------------------


@pytest.mark.parametrize(
    ("method", "path", "body", "status", "shape"),
    [
        ("POST", f"/v1/{SLUG}", {}, 401, "segmind"),
        ("POST", "/v1/chat/completions", {"model": SLUG}, 401, "openai"),
        (
            "POST",
            "/v1/no-such-model",
            {"messages": [{"role": "user", "content": "x"}]},
            404,
            "segmind",
        ),
        ("POST", "/v1/org/no-such-model", {"messages": []}, 404, "segmind"),
        ("POST", "/v1/embeddings", {"input": "x"}, 404, "openai"),
        ("POST", "/v1/completions", {"prompt": "x"}, 404, "openai"),
        ("POST", "/v1/responses", {"input": "x"}, 400, "openai"),
        ("GET", "/v1/responses", None, 405, "openai"),
        ("GET", "/v1/chat/completions", None, 405, "openai"),
        ("POST", "/v1/models", {}, 405, "openai"),
    ],
)
def test_errors_come_in_the_routes_own_envelope(
    fast: LiveServer, method: str, path: str, body: object, status: int, shape: str
) -> None:
    headers = {} if status == 401 else fast.headers()
    r = httpx.request(method, f"{fast.base_url}{path}", json=body, headers=headers)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert isinstance(error, str if shape == "segmind" else dict)


def test_unsupported_openai_endpoints_say_so(fast: LiveServer) -> None:
    r = httpx.post(f"{fast.v1}/embeddings", json={"input": "x"}, headers=fast.headers())
    assert r.json()["error"]["code"] == "unsupported_endpoint"
    assert "not supported" in r.json()["error"]["message"]


def test_a_trailing_slash_on_chat_completions_is_served_not_redirected(
    fast: LiveServer,
) -> None:
    body = {"model": SLUG, "messages": [{"role": "user", "content": "hi"}]}
    r = httpx.post(f"{fast.v1}/chat/completions/", json=body, headers=fast.headers())
    assert r.status_code == 200


@pytest.mark.parametrize("path", ["/v1/models", "/v1/credits", "/v1/usage"])
def test_user_routes_tell_the_balance(fast: LiveServer, path: str) -> None:
    key, _ = new_key(fast.db, 1_500_000)
    r = httpx.get(f"{fast.base_url}{path}", headers={"x-api-key": key})
    assert r.status_code == 200
    assert r.headers["x-remaining-credits"] == "1.500000"


def test_an_empty_body_from_a_known_key_tells_the_balance(fast: LiveServer) -> None:
    key, _ = new_key(fast.db, 2_000_000)
    r = httpx.post(f"{fast.v1}/chat/completions", content=b"", headers={"x-api-key": key})
    assert r.status_code == 400
    assert r.headers["x-remaining-credits"] == "2.000000"
