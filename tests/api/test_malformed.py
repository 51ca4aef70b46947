"""Malformed requests: each gets the right 4xx, in the route's dialect; none a 5xx."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest

SLUG = "smollm2-135m-instruct"
OK_MSG = [{"role": "user", "content": "hi"}]


@dataclass
class Case:
    name: str
    status: int
    body: Any = None  # JSON-encodable, or bytes sent as-is
    method: str = "POST"
    headers: dict[str, str] = field(default_factory=dict)
    param: str | None = None  # the field the OpenAI envelope must blame
    says: str = ""  # a fragment the message must contain


def _with(**kw: Any) -> dict[str, Any]:
    return {"messages": OK_MSG, **kw}


CASES = [
    Case("not json", 400, b"{nope", says="not valid JSON"),
    Case("json array", 400, b"[1,2]", says="JSON object"),
    Case("empty body", 400, b"", says="empty"),
    Case("missing messages", 400, {}, param="messages", says="messages"),
    Case("empty messages", 400, {"messages": []}, param="messages"),
    Case("messages not array", 400, {"messages": "hi"}, param="messages"),
    Case(
        "unknown role",
        400,
        {"messages": [{"role": "bot", "content": "x"}]},
        param="messages[0].role",
    ),
    Case("user without content", 400, {"messages": [{"role": "user"}]}, param="messages[0]"),
    Case(
        "content wrong type",
        400,
        {"messages": [{"role": "user", "content": 7}]},
        param="messages[0].content",
    ),
    Case(
        "unknown content block",
        400,
        {"messages": [{"role": "user", "content": [{"type": "audio", "data": "x"}]}]},
        param="messages[0].content[0]",
        says="audio",
    ),
    Case(
        "text block without text",
        400,
        {"messages": [{"role": "user", "content": [{"type": "text"}]}]},
        param="messages[0].content[0].text",
    ),
    Case(
        "image on a text-only model",
        400,
        {
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "what is this"},
                        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
                    ],
                }
            ]
        },
        param="messages",
        says="takes no images",
    ),
    Case("temperature too high", 400, _with(temperature=2.5), param="temperature"),
    Case("temperature a string", 400, _with(temperature="hot"), param="temperature"),
    Case("top_p above 1", 400, _with(top_p=1.5), param="top_p"),
    Case("n greater than 1", 400, _with(n=2), param="n", says="n=1"),
    Case("five stop strings", 400, _with(stop=["a", "b", "c", "d", "e"]), param="stop"),
    Case("max_tokens zero", 400, _with(max_tokens=0), param="max_tokens"),
    Case(
        "max_tokens above model max",
        400,
        _with(max_tokens=100000),
        param="max_tokens",
        says="maximum",
    ),
    Case("presence_penalty out of range", 400, _with(presence_penalty=3), param="presence_penalty"),
    Case("top_logprobs without logprobs", 400, _with(top_logprobs=2), param="top_logprobs"),
    Case(
        "stream_options without stream",
        400,
        _with(stream_options={"include_usage": True}),
        param="stream_options",
    ),
    Case(
        "unknown response_format",
        400,
        _with(response_format={"type": "xml"}),
        param="response_format.type",
    ),
    Case(
        "json_schema without schema object",
        400,
        _with(response_format={"type": "json_schema"}),
        param="response_format",
    ),
    Case(
        "tools on a model without tool template",
        400,
        _with(tools=[{"type": "function", "function": {"name": "f"}}]),
        param="tools",
    ),
    Case(
        "wrong content type",
        400,
        b"<xml/>",
        headers={"content-type": "application/xml"},
        says="Content-Type",
    ),
    Case("body too large", 413, b"x" * (2 * 1024 * 1024 + 1), says="limit"),
    Case("wrong method", 405, None, method="GET"),
    Case(
        "prompt over the context window",
        400,
        {"messages": [{"role": "user", "content": "cat " * 9000}], "max_tokens": 10},
        says="context window",
    ),
]


def _send(client: httpx.Client, url: str, case: Case, model: str | None) -> httpx.Response:
    headers = dict(case.headers)
    if isinstance(case.body, bytes):
        content = case.body
        headers.setdefault("content-type", "application/json")
        return client.request(case.method, url, content=content, headers=headers)
    if case.body is None:
        return client.request(case.method, url, headers=headers)
    body = dict(case.body)
    if model:
        body.setdefault("model", model)
    return client.request(case.method, url, json=body, headers=headers)


@pytest.fixture(scope="module")
def small_body_server(models_dir, tmp_path_factory):  # type: ignore[no-untyped-def]
    """The default model's entry on the scripted engine: every case is refused before
    generation, by the walk's own rules, so no real engine is needed (the fast lane)."""
    from servelm.catalog.builtins import default_spec
    from servelm.catalog.specs import Catalog
    from tests.conftest import make_settings, start_server
    from tests.support.scripted_engine import scripted_factory

    srv = start_server(
        make_settings(tmp_path_factory.mktemp("small"), models_dir, max_body_bytes=2 * 1024 * 1024),
        Catalog([default_spec(models_dir)]),
        engine_factory=scripted_factory,
    )
    yield srv
    srv.stop()


def test_there_are_at_least_twenty_kinds() -> None:
    assert len({c.name for c in CASES}) >= 20


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_openai_route(small_body_server, case: Case) -> None:  # type: ignore[no-untyped-def]
    with httpx.Client(
        base_url=small_body_server.base_url, timeout=60, headers=small_body_server.headers()
    ) as client:
        r = _send(client, "/v1/chat/completions", case, SLUG)
    assert r.status_code == case.status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert isinstance(err["message"], str) and err["message"]
    if case.param:
        assert err["param"] == case.param
    assert case.says in err["message"]
    assert r.headers["x-request-id"]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_segmind_route(small_body_server, case: Case) -> None:  # type: ignore[no-untyped-def]
    with httpx.Client(
        base_url=small_body_server.base_url, timeout=60, headers=small_body_server.headers()
    ) as client:
        r = _send(client, f"/v1/{SLUG}", case, None)
    assert r.status_code == case.status, r.text
    body = r.json()
    assert set(body) == {"error"}
    assert isinstance(body["error"], str) and case.says in body["error"]


def test_unknown_model_is_404_in_each_dialect(http: httpx.Client) -> None:
    r = http.post("/v1/no-such-model", json={"messages": OK_MSG})
    assert r.status_code == 404
    assert "no-such-model" in r.json()["error"]
    r = http.post("/v1/chat/completions", json={"model": "no-such-model", "messages": OK_MSG})
    assert r.status_code == 404
    assert r.json()["error"]["code"] == "model_not_found"


def test_missing_model_on_openai_route(http: httpx.Client) -> None:
    r = http.post("/v1/chat/completions", json={"messages": OK_MSG})
    assert r.status_code == 400
    assert r.json()["error"]["param"] == "model"


def test_unknown_path_is_json_404(http: httpx.Client) -> None:
    r = http.get("/v9/whatever")
    assert r.status_code == 404
    assert r.json()["error"]["message"]


def test_wrong_method_on_models_is_405(http: httpx.Client) -> None:
    r = http.post("/v1/models", json={})
    assert r.status_code == 405
    assert r.json()["error"]["code"] == "method_not_allowed"


def test_unknown_fields_are_ignored(http: httpx.Client) -> None:
    r = http.post(
        "/v1/chat/completions",
        json={
            "model": SLUG,
            "messages": OK_MSG,
            "max_tokens": 2,
            "store": True,
            "metadata": {"a": "b"},
            "user": "u1",
            "service_tier": "auto",
        },
    )
    assert r.status_code == 200, r.text
