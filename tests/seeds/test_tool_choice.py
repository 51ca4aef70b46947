"""Tool choice the way client libraries send it, on the tiny Llama 3.1 (issue 30):
a named function (instructor's TOOLS mode, LangChain's ``bind_tools(tool_choice=NAME)``,
the Vercel SDK's ``toolChoice: {type: 'tool'}``) and the legacy ``functions`` /
``function_call`` both ways."""

from __future__ import annotations

import json
from typing import Any

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

ASK = [{"role": "user", "content": "What time is it?"}]


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

