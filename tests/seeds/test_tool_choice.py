"""Tool choice the way client libraries send it, on the tiny Llama 3.1 (issue 30):
a named function (instructor's TOOLS mode, LangChain's ``bind_tools(tool_choice=NAME)``,
the Vercel SDK's ``toolChoice: {type: 'tool'}``) and the legacy ``functions`` /
``function_call`` both ways."""

from __future__ import annotations

import json
from typing import Any, cast

import openai
import pytest

from tests.conftest import LiveServer
from tests.seeds.test_seed_models import (
    LLAMA,
    NO_ARGS,
    WEATHER,
    engine,
    on_loop,
    prepared,
    token_id,
)

pytestmark = pytest.mark.slow

ASK: list[Any] = [{"role": "user", "content": "What time is it?"}]


def call_bias(live: LiveServer) -> dict[str, int]:
    """The seed test's push into a call of get_time (``test_llama_tool_calls_come_back
    _as_tool_calls``): random weights never write one on their own."""
    eng = engine(live, LLAMA)
    bias: dict[str, int] = {}
    for piece in ('"', ":", ",", "name", "parameters", "get_time"):
        for tid in on_loop(live, eng.tokenize(piece, add_special=False)):
            bias[str(tid)] = 80
    bias[str(token_id(live, LLAMA, "}"))] = 90
    bias[str(token_id(live, LLAMA, "{"))] = 100
    return bias


def client(live: LiveServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=live.v1, api_key=live.api_key, max_retries=0)


NAMED = {"type": "function", "function": {"name": "get_time"}}


@pytest.mark.parametrize("stream", [False, True])
def test_a_named_tool_choice_returns_that_call(seed_live: LiveServer, stream: bool) -> None:
    """llama.cpp reads an object tool_choice as "auto": with the same push into "{",
    auto ends in a call it cannot parse (502). Named, the engine is held to a call of
    that function, and the prompt is counted with only that tool, as generated."""
    kw: dict[str, Any] = {
        "model": LLAMA,
        "messages": ASK,
        "tools": [WEATHER, NO_ARGS],
        "tool_choice": NAMED,
        "max_tokens": 40,
        "temperature": 0,
        "logit_bias": call_bias(seed_live),
    }
    if stream:
        name, arguments, finish, usage = "", "", None, None
        for chunk in client(seed_live).chat.completions.create(
            stream=True, stream_options={"include_usage": True}, **kw
        ):
            usage = chunk.usage or usage
            for choice in chunk.choices:
                finish = choice.finish_reason or finish
                for tc in choice.delta.tool_calls or ():
                    if tc.function is not None:
                        name += tc.function.name or ""
                        arguments += tc.function.arguments or ""
    else:
        done = client(seed_live).chat.completions.create(**kw)
        (call,) = done.choices[0].message.tool_calls or []
        name, arguments = call.function.name, call.function.arguments
        finish, usage = done.choices[0].finish_reason, done.usage
    assert finish == "tool_calls" and name == "get_time", (name, arguments)
    assert json.loads(arguments) == {}
    alone = prepared(
        seed_live, LLAMA, {"messages": ASK, "tools": [NO_ARGS], "tool_choice": "required"}
    )
    assert usage is not None
    assert usage.prompt_tokens == on_loop(seed_live, engine(seed_live, LLAMA).count_prompt(alone))


# -- legacy functions, both ways ------------------------------------------------------

LEGACY_FN: Any = NO_ARGS["function"]


@pytest.mark.parametrize("stream", [False, True])
def test_legacy_functions_are_answered_with_function_call(
    seed_live: LiveServer, stream: bool
) -> None:
    """A request in the legacy form gets the legacy answer, as OpenAI's API gave it:
    ``message.function_call`` (streamed: ``delta.function_call``) and finish_reason
    "function_call". ``function_call: {"name": ...}`` is the named choice."""
    body: dict[str, Any] = {
        "model": LLAMA,
        "messages": ASK,
        "functions": [WEATHER["function"], LEGACY_FN],
        "function_call": {"name": "get_time"},
        "max_tokens": 40,
        "temperature": 0,
        "logit_bias": call_bias(seed_live),
    }
    if stream:
        name, arguments, finish = "", "", None
        for chunk in client(seed_live).chat.completions.create(stream=True, **body):
            for choice in chunk.choices:
                assert not choice.delta.tool_calls
                finish = choice.finish_reason or finish
                fc = choice.delta.function_call
                if fc is not None:
                    name += fc.name or ""
                    arguments += fc.arguments or ""
    else:
        done = client(seed_live).chat.completions.create(**body)
        message = done.choices[0].message
        assert message.tool_calls is None and message.function_call is not None
        name, arguments = message.function_call.name, message.function_call.arguments
        finish = done.choices[0].finish_reason
    assert finish == "function_call" and name == "get_time", (name, arguments)
    assert json.loads(arguments) == {}


def test_a_function_message_is_rendered_as_a_tool_result(seed_live: LiveServer) -> None:
    """The next legacy turn: the assistant's function_call and the ``role: "function"``
    result reach the template as a tool call and its result (Llama's ipython turn)."""
    legacy = [
        {"role": "user", "content": "What time is it?"},
        {
            "role": "assistant",
            "content": None,
            "function_call": {"name": "get_time", "arguments": "{}"},
        },
        {"role": "function", "name": "get_time", "content": "12:00"},
    ]
    as_tools = [
        legacy[0],
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_legacy_1",
                    "type": "function",
                    "function": {"name": "get_time", "arguments": "{}"},
                }
            ],
        },
        {"role": "tool", "name": "get_time", "tool_call_id": "call_legacy_1", "content": "12:00"},
    ]
    old = prepared(seed_live, LLAMA, {"messages": legacy, "functions": [LEGACY_FN]})
    new = prepared(seed_live, LLAMA, {"messages": as_tools, "tools": [NO_ARGS]})
    assert old["messages"] == new["messages"]
    text = on_loop(seed_live, engine(seed_live, LLAMA).render_prompt(old))
    assert "<|start_header_id|>ipython<|end_header_id|>\n\n12:00<|eot_id|>" in text
    r = client(seed_live).chat.completions.create(
        model=LLAMA, messages=cast(Any, legacy), functions=[LEGACY_FN], max_tokens=3
    )
    assert r.choices[0].finish_reason in ("length", "stop")


def test_a_function_message_without_its_name_is_a_400(seed_live: LiveServer) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client(seed_live).chat.completions.create(
            model=LLAMA,
            messages=cast(Any, [*ASK, {"role": "function", "content": "12:00"}]),
            functions=[LEGACY_FN],
            max_tokens=3,
        )
    assert caught.value.param == "messages[1].name"


def test_models_say_which_seed_takes_tools(seed_live: LiveServer) -> None:
    cards = {m.id: m.model_extra or {} for m in client(seed_live).models.list()}
    tools = {slug: cards[slug]["capabilities"]["tools"] for slug in cards}
    assert tools[LLAMA] is True
    assert tools["mixtral-8x7b-instruct"] is False and tools["mixtral-8x22b-instruct"] is False
    assert cards[LLAMA]["capabilities"]["context_window"] == 131072


# -- the Responses API's function tools ---------------------------------------------------

RESPONSES_TOOLS: list[Any] = [
    {"type": "function", **WEATHER["function"]},
    {"type": "function", **NO_ARGS["function"]},
]


@pytest.mark.parametrize("stream", [False, True])
def test_responses_named_tool_choice_returns_a_function_call_item(
    seed_live: LiveServer, stream: bool
) -> None:
    """The Responses form of the named choice (``{"type": "function", "name": ...}``)
    rides on the chat one; the call comes back as a ``function_call`` output item.
    ``logit_bias`` is servelm's extension on this route, as on the chat route."""
    kw: dict[str, Any] = {
        "model": LLAMA,
        "input": "What time is it?",
        "tools": RESPONSES_TOOLS,
        "tool_choice": {"type": "function", "name": "get_time"},
        "max_output_tokens": 40,
        "temperature": 0,
        "extra_body": {"logit_bias": call_bias(seed_live)},
    }
    if stream:
        events = list(client(seed_live).responses.create(stream=True, **kw))
        kinds = [e.type for e in events]
        assert "response.output_item.added" in kinds and kinds[-1] == "response.completed"
        deltas = "".join(
            e.delta for e in events if e.type == "response.function_call_arguments.delta"
        )
        (done,) = [e for e in events if e.type == "response.function_call_arguments.done"]
        assert done.arguments == deltas
        response = events[-1].response
    else:
        response = client(seed_live).responses.create(**kw)
    assert response.status == "completed"
    (item,) = [o for o in response.output if o.type == "function_call"]
    assert item.name == "get_time" and json.loads(item.arguments) == {} and item.call_id
    # The next turn: the call and its output, as the Responses API sends them back.
    follow = client(seed_live).responses.create(
        model=LLAMA,
        input=[
            {"role": "user", "content": "What time is it?"},
            {
                "type": "function_call",
                "call_id": item.call_id,
                "name": "get_time",
                "arguments": item.arguments,
            },
            {"type": "function_call_output", "call_id": item.call_id, "output": "12:00"},
        ],
        tools=RESPONSES_TOOLS,
        max_output_tokens=2,
    )
    messages = [
        {"role": "user", "content": "What time is it?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": item.call_id,
                    "type": "function",
                    "function": {"name": "get_time", "arguments": item.arguments},
                }
            ],
        },
        {"role": "tool", "tool_call_id": item.call_id, "content": "12:00"},
    ]
    body = prepared(seed_live, LLAMA, {"messages": messages, "tools": [WEATHER, NO_ARGS]})
    assert follow.usage is not None
    assert follow.usage.input_tokens == on_loop(
        seed_live, engine(seed_live, LLAMA).count_prompt(body)
    )
