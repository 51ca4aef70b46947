"""Points 1, 2 (the prompt) and 11 of issue 17: what one request may make the engine
do. Schemas that would freeze a model, or that llama.cpp cannot compile, and numbers
or prompts no engine takes are refused with a 400 (or 413) at once, naming the field,
while an ordinary request next to them completes."""

from __future__ import annotations

import asyncio
import json
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest

from servelm.api.services import services
from servelm.catalog.specs import DEFAULT_MODEL_SLUG
from servelm.chat.input_limits import MAX_ENUM_VALUES
from servelm.errors import InvalidRequest
from tests.conftest import LiveServer
from tests.hostile.conftest import LIAR, assert_money_sound

SCHEMA_PARAM = "response_format.json_schema.schema"


def schema_body(schema: Any, **extra: Any) -> dict[str, Any]:
    return {
        "model": DEFAULT_MODEL_SLUG,
        "messages": [{"role": "user", "content": "pick one"}],
        "max_tokens": 8,
        "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}},
        **extra,
    }


def post(live: LiveServer, body: dict[str, Any], path: str = "/chat/completions") -> httpx.Response:
    return httpx.post(f"{live.v1}{path}", json=body, headers=live.headers(), timeout=120)


def ordinary(live: LiveServer) -> httpx.Response:
    body = {
        "model": DEFAULT_MODEL_SLUG,
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 4,
    }
    return post(live, body)


def alongside(live: LiveServer, hostile: dict[str, Any]) -> tuple[httpx.Response, httpx.Response]:
    """The hostile request and an ordinary one, sent together."""
    with ThreadPoolExecutor(2) as pool:
        bad = pool.submit(post, live, hostile)
        good = pool.submit(ordinary, live)
        return bad.result(), good.result()


def test_enum_of_ten_thousand_items_is_refused_and_freezes_nothing(live: LiveServer) -> None:
    schema = {"type": "string", "enum": [f"item{i}" for i in range(10_000)]}
    bad, good = alongside(live, schema_body(schema))
    assert bad.status_code == 400, bad.text
    assert bad.json()["error"]["param"] == SCHEMA_PARAM
    assert good.status_code == 200, good.text
    assert_money_sound(live)


@pytest.mark.parametrize(
    "schema",
    [
        {"type": "string", "enum": [f"item{i}" for i in range(MAX_ENUM_VALUES + 1)]},
        {
            "type": "object",
            "properties": {
                f"p{j}": {"type": "string", "enum": [f"v{i}" for i in range(60)]} for j in range(3)
            },
        },
        json.loads('{"type":"object","properties":{"a":' * 40 + "{}" + "}}" * 40),
        {"type": "object", "properties": {f"p{i}": {"type": "string"} for i in range(1200)}},
        {"type": "array", "items": {"type": "string"}, "minItems": 100_000},
        {"type": "string", "maxLength": 10**9},
        {"type": "integer", "minimum": -(10**300), "maximum": 10**300},
        {"type": "string", "pattern": "("},
    ],
    ids=["enum", "enum-total", "depth", "nodes", "minItems", "maxLength", "range", "pattern"],
)
def test_schema_cost_bounds(live: LiveServer, schema: dict[str, Any]) -> None:
    r = post(live, schema_body(schema))
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == SCHEMA_PARAM


@pytest.mark.parametrize(
    "schema",
    [{"type": "foo"}, {"$ref": "#"}, {"anyOf": []}, {"$ref": "#/$defs/missing"}, {"enum": []}],
    ids=["type-foo", "ref-root", "anyof-empty", "ref-missing", "enum-empty"],
)
def test_schemas_llama_cpp_cannot_compile_are_400(live: LiveServer, schema: Any) -> None:
    bad, good = alongside(live, schema_body(schema))
    assert bad.status_code == 400, bad.text
    assert bad.json()["error"]["param"] == SCHEMA_PARAM
    assert good.status_code == 200
    # The Segmind route, too.
    seg = post(
        live,
        {k: v for k, v in schema_body(schema).items() if k != "model"},
        f"/{DEFAULT_MODEL_SLUG}",
    )
    assert seg.status_code == 400, seg.text


def test_a_schema_within_the_bounds_is_served(live: LiveServer) -> None:
    schema = {
        "type": "object",
        "properties": {
            "color": {"type": "string", "enum": [f"c{i}" for i in range(MAX_ENUM_VALUES)]}
        },
        "required": ["color"],
    }
    bad, good = alongside(live, schema_body(schema, max_tokens=16))
    assert bad.status_code == 200, bad.text
    assert good.status_code == 200
    assert_money_sound(live)


def test_450_digit_seed_is_400(live: LiveServer) -> None:
    head = '{"model":"' + DEFAULT_MODEL_SLUG + '","messages":[{"role":"user","content":"hi"}]'
    raw = head + ',"max_tokens":2,"seed":' + "9" * 450 + "}"
    r = httpx.post(
        f"{live.v1}/chat/completions",
        content=raw,
        headers={**live.headers(), "content-type": "application/json"},
        timeout=60,
    )
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == "seed"


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"logit_bias": {str(i): 1 for i in range(5000)}}, "logit_bias"),
        ({"logit_bias": {"not-a-token": 5}}, "logit_bias"),
        ({"stop": ["x" * 100_000]}, "stop"),
        ({"min_tokens": 10**20}, "min_tokens"),
    ],
    ids=["logit-bias-size", "logit-bias-key", "stop-length", "min-tokens"],
)
def test_option_cost_bounds(live: LiveServer, extra: dict[str, Any], param: str) -> None:
    body = {
        "model": DEFAULT_MODEL_SLUG,
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 2,
        **extra,
    }
    r = post(live, body)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param


def test_tool_parameter_schemas_are_bounded(liar_gateway: LiveServer) -> None:
    """A remote model with tools would have passed any schema on to its engine."""
    tool = {
        "type": "function",
        "function": {
            "name": "pick",
            "parameters": {"type": "string", "enum": [f"i{i}" for i in range(10_000)]},
        },
    }
    body = {"model": LIAR, "messages": [{"role": "user", "content": "hi"}], "tools": [tool]}
    r = post(liar_gateway, body)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == "tools[0].function.parameters"
    many = {**body, "tools": [{**tool, "function": {"name": f"f{i}"}} for i in range(100)]}
    r = post(liar_gateway, many)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == "tools"
    assert_money_sound(liar_gateway)


@pytest.mark.parametrize("megabytes", [10, 19])
def test_a_huge_prompt_is_refused_before_it_is_tokenized(live: LiveServer, megabytes: int) -> None:
    """A 10 MB prompt took 23 s of CPU to count before its 400; 19 MB was a 500 after
    31 s. Bytes alone show it cannot fit the window."""
    body = {
        "model": DEFAULT_MODEL_SLUG,
        "messages": [{"role": "user", "content": "cat " * (megabytes * 2**18)}],
    }
    bad, good = alongside(live, body)
    assert bad.status_code in (400, 413), bad.text
    assert "bytes" in bad.json()["error"]["message"]
    assert good.status_code == 200
    assert_money_sound(live)


def test_engine_refusal_of_input_is_a_400_not_a_500(live: LiveServer) -> None:
    """Past the gateway's own checks, whatever llama.cpp refuses as input is the
    client's fault: ``map_engine_error`` says 400."""
    engine = services(live.app).engines[DEFAULT_MODEL_SLUG]
    body = {
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 2,
        "response_format": {"type": "json_schema", "json_schema": {"schema": {"type": "foo"}}},
    }

    async def run() -> None:
        async for _ in engine.stream(body):
            pass

    future = asyncio.run_coroutine_threadsafe(run(), services(live.app).loop)
    with pytest.raises(InvalidRequest, match="unrecognized type foo"):
        future.result(timeout=60)
