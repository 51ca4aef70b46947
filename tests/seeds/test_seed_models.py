"""The three seed slugs, each served by a tiny random-weight GGUF of its real
architecture through the real engine: routes, exact prompts, stops, limits, tools."""

from __future__ import annotations

import asyncio
import json
import re
from typing import Any

import httpx
import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam

from servelm.api.services import services
from servelm.chat.conversation import engine_body, estimate_prompt_tokens, fit_conversation
from servelm.chat.protocol import parse_chat_request
from servelm.engines.llamacpp import LlamaCppEngine
from tests.conftest import LiveServer, provision

pytestmark = pytest.mark.slow  # real engine processes or models: seconds each

LLAMA = "llama-v3p1-8b-instruct"
MIXTRAL_7 = "mixtral-8x7b-instruct"
MIXTRAL_22 = "mixtral-8x22b-instruct"
SEEDS = (LLAMA, MIXTRAL_7, MIXTRAL_22)

# The conversation on the Segmind pages.
SEED_MESSAGES: list[ChatCompletionMessageParam] = [
    {"role": "user", "content": "tell me a joke on cats"},
    {"role": "assistant", "content": "here is a joke about cats..."},
    {"role": "user", "content": "now a joke on dogs"},
]


def on_loop(live: LiveServer, coro: Any) -> Any:
    """Run a coroutine on the server's event loop (its engines belong to that loop)."""
    return asyncio.run_coroutine_threadsafe(coro, services(live.app).loop).result(timeout=60)


def engine(live: LiveServer, slug: str) -> LlamaCppEngine:
    """The model's engine, loaded first if no request has loaded it yet (models load
    on demand, and which test of a worker's share comes first is not fixed)."""
    svc = services(live.app)

    async def load() -> None:  # a lease is released on the loop it was taken on
        (await svc.models.acquire(svc.catalog.resolve(slug))).release()

    if slug not in svc.engines:
        on_loop(live, load())
    eng = svc.engines[slug]
    assert isinstance(eng, LlamaCppEngine)
    return eng


def prepared(live: LiveServer, slug: str, request: dict[str, Any]) -> dict[str, Any]:
    """The engine body servelm builds for a request (conversation fitted, roles mapped)."""
    req = parse_chat_request(json.dumps(request).encode())
    body = engine_body(req)
    body["messages"] = fit_conversation(body["messages"], services(live.app).catalog.resolve(slug))
    return body


def rendered(live: LiveServer, slug: str, messages: list[dict[str, Any]], **extra: Any) -> str:
    body = prepared(live, slug, {"messages": messages, **extra})
    text = on_loop(live, engine(live, slug).render_prompt(body))
    # llama.cpp gives the template today's date; pin it so the expectations are exact.
    return re.sub(r"Today Date: \d{1,2} \w{3} \d{4}", "Today Date: 26 Jul 2024", text)


def token_id(live: LiveServer, slug: str, text: str) -> int:
    ids = on_loop(live, engine(live, slug).tokenize(text, add_special=False))
    assert len(ids) == 1, f"{text!r} is {len(ids)} tokens in {slug}"
    return int(ids[0])


# -- both routes -----------------------------------------------------------------------


@pytest.mark.parametrize("slug", SEEDS)
def test_seed_slug_serves_the_segmind_route(seed_live: LiveServer, slug: str) -> None:
    r = httpx.post(
        f"{seed_live.v1}/{slug}",
        json={"messages": SEED_MESSAGES, "max_tokens": 12},
        headers=seed_live.headers(),
        timeout=60,
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"] == slug
    usage = body["usage"]
    # Twelve tokens generated: a random-weight model may end on a byte of an unfinished
    # character, which is never sent and never charged (charging.bill_what_was_sent),
    # so the client pays for 11 of them now and then; at most twelve, never none.
    assert body["choices"][0]["finish_reason"] == "length"
    assert 1 <= usage["completion_tokens"] <= 12
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    # The count servelm held credits for is the count the engine reports.
    expected = on_loop(
        seed_live,
        engine(seed_live, slug).count_prompt_tokens(
            prepared(seed_live, slug, {"messages": SEED_MESSAGES})
        ),
    )
    assert usage["prompt_tokens"] == expected


@pytest.mark.parametrize("slug", SEEDS)
def test_seed_slug_serves_the_openai_route_streaming_and_not(
    seed_live: LiveServer, slug: str
) -> None:
    client = openai.OpenAI(base_url=seed_live.v1, api_key=seed_live.api_key, max_retries=0)
    done = client.chat.completions.create(model=slug, messages=SEED_MESSAGES, max_tokens=6)
    assert done.model == slug and done.usage is not None
    stream = client.chat.completions.create(
        model=slug,
        messages=SEED_MESSAGES,
        max_tokens=6,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.prompt_tokens == done.usage.prompt_tokens
    # Six tokens are generated each time; a random-weight model may end on a byte of
    # an unfinished character, which llama.cpp never sends, and the client then pays
    # for the text it got (charging.bill_what_was_sent): at most six, never none.
    for usage in (done.usage, chunks[-1].usage):
        assert 1 <= usage.completion_tokens <= 6


def test_models_list_shows_the_seed_context_windows(seed_live: LiveServer) -> None:
    cards = {
        m["id"]: m
        for m in httpx.get(f"{seed_live.v1}/models", headers=seed_live.headers()).json()["data"]
    }
    windows = {slug: cards[slug]["context_window"] for slug in SEEDS}
    assert windows == {LLAMA: 131072, MIXTRAL_7: 32768, MIXTRAL_22: 65536}
    assert all(cards[slug]["available"] for slug in SEEDS)


# -- the exact prompt text each model receives -------------------------------------------

LLAMA_SYSTEM = (
    "<|start_header_id|>system<|end_header_id|>\n\n"
    "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n"
)


def llama_turn(role: str, text: str) -> str:
    return f"<|start_header_id|>{role}<|end_header_id|>\n\n{text}<|eot_id|>"


LLAMA_GEN = "<|start_header_id|>assistant<|end_header_id|>\n\n"
U = {"role": "user", "content": "Hi"}
S = {"role": "system", "content": "Be brief."}
A = {"role": "assistant", "content": "Hello!"}
U2 = {"role": "user", "content": "Bye"}

# (conversation, {slug: exact prompt}); BOS is not in the text: llama.cpp adds it as a
# token when it tokenizes (add_bos), which the token tests below check.
PROMPTS = [
    (
        [U],
        {
            LLAMA: LLAMA_SYSTEM + "<|eot_id|>" + llama_turn("user", "Hi") + LLAMA_GEN,
            MIXTRAL_7: "[INST] Hi [/INST]",
            MIXTRAL_22: "[INST] Hi[/INST]",
        },
    ),
    (
        [S, U],
        {
            LLAMA: LLAMA_SYSTEM + "Be brief.<|eot_id|>" + llama_turn("user", "Hi") + LLAMA_GEN,
            MIXTRAL_7: "[INST] Be brief.\n\nHi [/INST]",
            MIXTRAL_22: "[INST] Be brief.\n\nHi[/INST]",
        },
    ),
    (
        [S, U, A, U2],
        {
            LLAMA: LLAMA_SYSTEM
            + "Be brief.<|eot_id|>"
            + llama_turn("user", "Hi")
            + llama_turn("assistant", "Hello!")
            + llama_turn("user", "Bye")
            + LLAMA_GEN,
            # v1: the system text joins the first user turn...
            MIXTRAL_7: "[INST] Be brief.\n\nHi [/INST]Hello!</s>[INST] Bye [/INST]",
            # ...v3: the last one, as mistral-common does.
            MIXTRAL_22: "[INST] Hi[/INST] Hello!</s>[INST] Be brief.\n\nBye[/INST]",
        },
    ),
    (
        [U, U2],
        {
            # Llama takes consecutive user turns as they are; Mixtral's strict
            # alternation needs them merged.
            LLAMA: LLAMA_SYSTEM
            + "<|eot_id|>"
            + llama_turn("user", "Hi")
            + llama_turn("user", "Bye")
            + LLAMA_GEN,
            MIXTRAL_7: "[INST] Hi\n\nBye [/INST]",
            MIXTRAL_22: "[INST] Hi\n\nBye[/INST]",
        },
    ),
    (
        # OpenAI's developer role is a system message to these models.
        [{"role": "developer", "content": "Be brief."}, U],
        {
            LLAMA: LLAMA_SYSTEM + "Be brief.<|eot_id|>" + llama_turn("user", "Hi") + LLAMA_GEN,
            MIXTRAL_7: "[INST] Be brief.\n\nHi [/INST]",
            MIXTRAL_22: "[INST] Be brief.\n\nHi[/INST]",
        },
    ),
]


@pytest.mark.parametrize(
    ("slug", "messages", "expected"),
    [(slug, conv, want[slug]) for conv, want in PROMPTS for slug in SEEDS],
    ids=[
        f"{slug}-{name}"
        for name in ("user", "system", "multi-turn", "consecutive-users", "developer")
        for slug in SEEDS
    ],
)
def test_rendered_prompt_matches_the_published_format(
    seed_live: LiveServer, slug: str, messages: list[dict[str, Any]], expected: str
) -> None:
    assert rendered(seed_live, slug, messages) == expected


@pytest.mark.parametrize(
    ("slug", "controls", "plain"),
    [
        (
            LLAMA,
            [
                "<|begin_of_text|>",
                "<|start_header_id|>",
                "<|end_header_id|>",
                "<|eot_id|>",
                "<|eom_id|>",
            ],
            [],
        ),
        (MIXTRAL_7, ["<s>", "</s>"], ["[INST]", "[/INST]"]),  # v1: [INST] is plain text
        (MIXTRAL_22, ["<s>", "</s>", "[INST]", "[/INST]"], []),  # v3: control tokens
    ],
)
def test_special_tokens_tokenize_as_on_the_real_models(
    seed_live: LiveServer, slug: str, controls: list[str], plain: list[str]
) -> None:
    for text in controls:
        token_id(seed_live, slug, text)
    for text in plain:
        ids = on_loop(seed_live, engine(seed_live, slug).tokenize(text, add_special=False))
        assert len(ids) > 1
    # The prompt starts with exactly one BOS, added by the tokenizer, never doubled.
    bos = token_id(seed_live, slug, "<|begin_of_text|>" if slug == LLAMA else "<s>")
    body = prepared(seed_live, slug, {"messages": [U]})
    eng = engine(seed_live, slug)
    ids = on_loop(seed_live, eng.tokenize(on_loop(seed_live, eng.render_prompt(body))))
    assert ids[0] == bos and ids.count(bos) == 1


# -- stops and limits --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("slug", "stop_token"),
    [(LLAMA, "<|eot_id|>"), (LLAMA, "<|eom_id|>"), (MIXTRAL_7, "</s>"), (MIXTRAL_22, "</s>")],
)
def test_generation_stops_on_the_models_end_tokens(
    seed_live: LiveServer, slug: str, stop_token: str
) -> None:
    """Force the end token with logit_bias: the model must stop there, and never show it."""
    forced = token_id(seed_live, slug, stop_token)
    r = httpx.post(
        f"{seed_live.v1}/{slug}",
        json={"messages": [U], "max_tokens": 20, "logit_bias": {str(forced): 100}},
        headers=seed_live.headers(),
        timeout=60,
    )
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    assert choice["finish_reason"] == "stop"
    assert stop_token not in (choice["message"]["content"] or "")
    assert r.json()["usage"]["completion_tokens"] <= 1


def test_an_ordinary_forced_token_runs_to_the_limit(seed_live: LiveServer) -> None:
    """The control for the test above: a non-end token does not stop generation."""
    forced = token_id(seed_live, LLAMA, "cat")
    r = httpx.post(
        f"{seed_live.v1}/{LLAMA}",
        json={"messages": [U], "max_tokens": 5, "logit_bias": {str(forced): 100}},
        headers=seed_live.headers(),
        timeout=60,
    )
    assert r.json()["choices"][0]["finish_reason"] == "length"
    assert r.json()["choices"][0]["message"]["content"] == "cat" * 5


def test_max_tokens_above_the_models_output_limit_is_400(seed_live: LiveServer) -> None:
    r = httpx.post(
        f"{seed_live.v1}/{MIXTRAL_7}",
        json={"messages": [U], "max_tokens": 9000},
        headers=seed_live.headers(),
        timeout=60,
    )
    assert r.status_code == 400
    assert "max_tokens is 9000" in r.json()["error"] and "8192" in r.json()["error"]


@pytest.mark.parametrize(
    ("messages", "words"),
    [
        ([{"role": "system", "content": "only a system prompt"}], "needs a user message"),
        ([{"role": "assistant", "content": "I start"}], "start with a user message"),
    ],
)
def test_mixtral_conversations_that_cannot_be_fixed_are_400(
    seed_live: LiveServer, messages: list[dict[str, Any]], words: str
) -> None:
    r = httpx.post(
        f"{seed_live.v1}/{MIXTRAL_7}",
        json={"messages": messages},
        headers=seed_live.headers(),
        timeout=60,
    )
    assert r.status_code == 400 and words in r.json()["error"]


# -- Llama 3.1 tools ---------------------------------------------------------------------

WEATHER: dict[str, Any] = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    },
}


def test_llama_tools_go_into_the_prompt_as_its_template_specifies(
    seed_live: LiveServer,
) -> None:
    text = rendered(seed_live, LLAMA, [U], tools=[WEATHER])
    assert text.startswith(
        "<|start_header_id|>system<|end_header_id|>\n\nEnvironment: ipython\n"
        "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nGiven the following functions, please "
        "respond with a JSON for a function call with its proper arguments that best answers "
        "the given prompt.\n\n"
    )
    assert '"name": "get_weather"' in text and text.endswith("Hi<|eot_id|>" + LLAMA_GEN)


def test_llama_tool_call_history_renders_with_ipython_results(seed_live: LiveServer) -> None:
    call = {
        "id": "call_1",
        "type": "function",
        "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'},
    }
    messages: list[dict[str, Any]] = [
        U,
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
    ]
    text = rendered(seed_live, LLAMA, messages, tools=[WEATHER])
    assert (
        '<|start_header_id|>assistant<|end_header_id|>\n\n{"name": "get_weather", '
        '"parameters": {"city": "Oslo"}}<|eot_id|>'
        "<|start_header_id|>ipython<|end_header_id|>\n\nsunny<|eot_id|>" + LLAMA_GEN
    ) in text


def test_the_byte_bound_covers_hostile_tool_conversations(seed_live: LiveServer) -> None:
    """The hold of an engine that counts late (``estimate_prompt_tokens``) must bound
    what the template makes of tool results, calls, names and tools. Control bytes
    are a token each (as many tokens as bytes, the bound's own limit), and quotes,
    backslashes and non-ASCII are what JSON escaping lengthens."""
    nasty = "\x01" * 1500 + '"\\\u00e9\u4e2d\U0001f600' * 20 + "<|eot_id|>"
    call = {
        "id": "call_" + "\u4e2d" * 50,
        "type": "function",
        "function": {"name": "get_weather", "arguments": json.dumps({"city": nasty})},
    }
    messages = [
        {"role": "user", "content": nasty, "name": "n" * 100},
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": call["id"], "content": nasty},
    ]
    body = prepared(seed_live, LLAMA, {"messages": messages, "tools": [WEATHER]})
    counted = on_loop(seed_live, engine(seed_live, LLAMA).count_prompt(body))
    assert counted > 3000
    assert estimate_prompt_tokens(body) >= counted


NO_ARGS: dict[str, Any] = {
    "type": "function",
    "function": {
        "name": "get_time",
        "description": "The current time.",
        "parameters": {"type": "object", "properties": {}, "additionalProperties": False},
    },
}


@pytest.mark.parametrize("stream", [False, True])
def test_llama_tool_calls_come_back_as_tool_calls(seed_live: LiveServer, stream: bool) -> None:
    """Random weights never write a call on their own. With tool_choice=required the
    engine's grammar allows only content-then-call; logit biases on the call's own
    pieces walk the model into it ("{" first, so the call starts at once; "}" above the
    other pieces, so the empty arguments close; all of them above the whitespace the
    grammar also allows). The engine parses what the model wrote, and servelm must
    return it in OpenAI's shape on both paths."""
    eng = engine(seed_live, LLAMA)
    bias: dict[str, int] = {}
    for piece in ('"', ":", ",", "name", "parameters", "get_time"):
        for tid in on_loop(seed_live, eng.tokenize(piece, add_special=False)):
            bias[str(tid)] = 80
    bias[str(token_id(seed_live, LLAMA, "}"))] = 90
    bias[str(token_id(seed_live, LLAMA, "{"))] = 100
    client = openai.OpenAI(base_url=seed_live.v1, api_key=seed_live.api_key, max_retries=0)
    kw: dict[str, Any] = {
        "model": LLAMA,
        "messages": [{"role": "user", "content": "What time is it?"}],
        "tools": [NO_ARGS],
        "tool_choice": "required",
        "max_tokens": 40,
        "temperature": 0,
        "logit_bias": bias,
    }
    if stream:
        name, arguments, call_id, finish = "", "", "", None
        for chunk in client.chat.completions.create(stream=True, **kw):
            for choice in chunk.choices:
                finish = choice.finish_reason or finish
                for tc in choice.delta.tool_calls or ():
                    call_id = tc.id or call_id
                    if tc.function is not None:
                        name += tc.function.name or ""
                        arguments += tc.function.arguments or ""
    else:
        done = client.chat.completions.create(**kw)
        finish = done.choices[0].finish_reason
        (call,) = done.choices[0].message.tool_calls or []
        assert call.type == "function"
        name, arguments, call_id = call.function.name, call.function.arguments, call.id
        assert not done.choices[0].message.content
    assert finish == "tool_calls", (name, arguments)
    assert name == "get_time" and call_id
    assert json.loads(arguments) == {}


def test_a_tool_call_the_engine_cannot_parse_is_a_502_and_costs_nothing(
    seed_live: LiveServer,
) -> None:
    """With tool_choice=auto the same push into "{" ends in a call llama.cpp cannot
    parse. That is the model's failure, not the client's or ours: 502, not 500."""
    key = provision(seed_live.db, "bad-output", 1)
    body = {
        "messages": [{"role": "user", "content": "What time is it?"}],
        "tools": [NO_ARGS],
        "tool_choice": "auto",
        "max_tokens": 15,
        "temperature": 0,
        "logit_bias": {str(token_id(seed_live, LLAMA, "{")): 100},
    }
    r = httpx.post(f"{seed_live.v1}/{LLAMA}", json=body, headers={"x-api-key": key}, timeout=60)
    assert r.status_code == 502, r.text
    assert "did not parse as a tool call" in r.json()["error"]
    assert r.headers["x-remaining-credits"] == "1.000000"
    with httpx.stream(
        "POST",
        f"{seed_live.v1}/chat/completions",
        json={**body, "model": LLAMA, "stream": True},
        headers={"x-api-key": key},
        timeout=60,
    ) as s:
        assert s.status_code == 200
        events = [line.removeprefix("data: ") for line in s.iter_lines() if line]
    assert "[DONE]" not in events
    assert json.loads(events[-1])["error"]["code"] == "invalid_model_output"


def test_tools_on_a_model_without_a_tool_template_are_400(seed_live: LiveServer) -> None:
    r = httpx.post(
        f"{seed_live.v1}/chat/completions",
        json={"model": MIXTRAL_7, "messages": [U], "tools": [WEATHER]},
        headers=seed_live.headers(),
        timeout=60,
    )
    assert r.status_code == 400 and r.json()["error"]["param"] == "tools"
