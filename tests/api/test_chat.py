"""Both dialects against the real server, with real clients (httpx and the openai SDK)."""

from __future__ import annotations

import json

import httpx
import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam

from servelm.api.services import services
from servelm.engines.base import Engine
from tests.conftest import LiveServer, engine_of

SLUG = "smollm2-135m-instruct"
JOKE: list[ChatCompletionMessageParam] = [{"role": "user", "content": "tell me a joke on cats"}]


@pytest.fixture
def client(live: LiveServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=live.v1, api_key=live.api_key, max_retries=0, timeout=60)


def test_segmind_route_answers_with_a_real_completion(http: httpx.Client) -> None:
    r = http.post(f"/v1/{SLUG}", json={"messages": JOKE})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "chat.completion"
    assert body["model"] == SLUG
    choice = body["choices"][0]
    assert choice["message"]["role"] == "assistant"
    assert choice["message"]["content"].strip()
    assert choice["finish_reason"] in ("stop", "length")
    usage = body["usage"]
    assert usage["prompt_tokens"] > 5
    assert usage["completion_tokens"] >= 1
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert r.headers["x-request-id"].startswith("req_")


def test_segmind_route_accepts_curl_form_content_type(http: httpx.Client) -> None:
    # `curl -d` sends application/x-www-form-urlencoded; the README example uses it.
    r = http.post(
        f"/v1/{SLUG}",
        content=json.dumps({"messages": JOKE, "max_tokens": 4}),
        headers={"content-type": "application/x-www-form-urlencoded"},
    )
    assert r.status_code == 200, r.text


def test_alias_resolves_and_response_echoes_the_slug(http: httpx.Client) -> None:
    r = http.post(
        "/v1/chat/completions", json={"model": "smollm2", "messages": JOKE, "max_tokens": 3}
    )
    assert r.status_code == 200, r.text
    assert r.json()["model"] == SLUG


def test_openai_sdk_non_streaming(client: openai.OpenAI) -> None:
    resp = client.chat.completions.create(model=SLUG, messages=JOKE, max_tokens=16)
    assert resp.object == "chat.completion"
    assert resp.choices[0].message.content
    assert resp.usage is not None and resp.usage.completion_tokens <= 16
    assert resp.choices[0].finish_reason in ("stop", "length")


def test_openai_sdk_streaming_with_usage(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model=SLUG,
        messages=JOKE,
        max_tokens=12,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finishes = [
        c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason
    ]
    assert finishes and finishes[-1] in ("stop", "length")
    last = chunks[-1]
    assert last.choices == []
    assert last.usage is not None
    assert last.usage.completion_tokens >= 1
    assert text.strip()
    # Only the final chunk carries usage.
    assert all(c.usage is None for c in chunks[:-1])


def test_max_tokens_limits_output_and_reports_length(client: openai.OpenAI) -> None:
    resp = client.chat.completions.create(
        model=SLUG,
        messages=[{"role": "user", "content": "Write a long story about the sea."}],
        max_completion_tokens=5,
    )
    assert resp.usage is not None and resp.usage.completion_tokens == 5
    assert resp.choices[0].finish_reason == "length"


def test_prompt_count_before_generation_matches_engine_usage(live: LiveServer) -> None:
    import asyncio

    from servelm.chat.conversation import engine_body
    from servelm.chat.protocol import parse_chat_request

    engine: Engine = engine_of(live, SLUG)
    req = parse_chat_request(json.dumps({"messages": JOKE}).encode())
    body = engine_body(req)

    async def count() -> int:
        n = await engine.count_prompt_tokens(body)
        assert n is not None
        return n

    # The engine lives on the server's loop; its httpx client must be used there.
    loop = _server_loop(live)
    counted = asyncio.run_coroutine_threadsafe(count(), loop).result(30)
    with httpx.Client(base_url=live.base_url, timeout=60, headers=live.headers()) as http:
        usage = http.post(f"/v1/{SLUG}", json={"messages": JOKE, "max_tokens": 2}).json()["usage"]
    assert counted == usage["prompt_tokens"]


def _server_loop(live: LiveServer):  # type: ignore[no-untyped-def]
    return services(live.app).loop


def test_json_schema_response_parses_and_validates(client: openai.OpenAI) -> None:
    schema = {
        "type": "object",
        "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
        "required": ["name", "age"],
        "additionalProperties": False,
    }
    resp = client.chat.completions.create(
        model=SLUG,
        messages=[{"role": "user", "content": "Describe a person as JSON."}],
        max_tokens=80,
        temperature=0,
        response_format={
            "type": "json_schema",
            "json_schema": {"name": "person", "schema": schema, "strict": True},
        },
    )
    data = json.loads(resp.choices[0].message.content or "")
    assert set(data) == {"name", "age"}
    assert isinstance(data["name"], str)
    assert isinstance(data["age"], int)


def test_stop_sequence_ends_generation(client: openai.OpenAI) -> None:
    resp = client.chat.completions.create(
        model=SLUG,
        messages=[{"role": "user", "content": "Count from 1 to 20, separated by commas."}],
        max_tokens=60,
        temperature=0,
        stop=["5"],
    )
    content = resp.choices[0].message.content or ""
    assert "5" not in content
    assert resp.choices[0].finish_reason == "stop"


def test_seed_makes_sampling_repeatable(client: openai.OpenAI) -> None:
    kw = {"model": SLUG, "messages": JOKE, "max_tokens": 20, "temperature": 1.0, "seed": 1234}
    a = client.chat.completions.create(**kw).choices[0].message.content  # type: ignore[call-overload]
    b = client.chat.completions.create(**kw).choices[0].message.content  # type: ignore[call-overload]
    assert a == b


def test_logprobs_are_returned(client: openai.OpenAI) -> None:
    resp = client.chat.completions.create(
        model=SLUG, messages=JOKE, max_tokens=4, logprobs=True, top_logprobs=2
    )
    lp = resp.choices[0].logprobs
    assert lp is not None and lp.content is not None
    assert len(lp.content) == 4
    assert all(len(t.top_logprobs) == 2 for t in lp.content)
    assert all(t.logprob <= 0 for t in lp.content)


def test_developer_role_and_text_part_arrays(http: httpx.Client) -> None:
    r = http.post(
        f"/v1/{SLUG}",
        json={
            "messages": [
                {"role": "developer", "content": [{"type": "text", "text": "Answer briefly."}]},
                {"role": "user", "content": [{"type": "text", "text": "Name a color."}]},
            ],
            "max_tokens": 8,
        },
    )
    assert r.status_code == 200, r.text


def test_sdk_errors_map_to_exception_classes(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(model=SLUG, messages=[], max_tokens=3)
    assert bad.value.status_code == 400
    assert bad.value.body["param"] == "messages"  # type: ignore[index]
    with pytest.raises(openai.NotFoundError) as nf:
        client.chat.completions.create(model="no-such-model", messages=JOKE)
    assert "no-such-model" in nf.value.message
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("no-such-model")


def test_models_list_and_retrieve(client: openai.OpenAI) -> None:
    ids = [m.id for m in client.models.list()]
    assert SLUG in ids
    model = client.models.retrieve(SLUG)
    assert model.id == SLUG and model.object == "model"


def test_metrics_count_requests_and_tokens(http: httpx.Client) -> None:
    def value(text: str, prefix: str) -> float:
        return sum(float(ln.split()[-1]) for ln in text.splitlines() if ln.startswith(prefix))

    before = http.get("/metrics").text
    r = http.post(f"/v1/{SLUG}", json={"messages": JOKE, "max_tokens": 3})
    assert r.status_code == 200
    after = http.get("/metrics").text
    completion = f'servelm_tokens_total{{kind="completion",model="{SLUG}"}}'
    assert (
        value(after, completion) - value(before, completion)
        == r.json()["usage"]["completion_tokens"]
    )
    ok = 'servelm_requests_total{route="segmind_chat",status="200"}'
    assert value(after, ok) - value(before, ok) == 1
    assert f'servelm_engine_running{{model="{SLUG}"}}' in after
