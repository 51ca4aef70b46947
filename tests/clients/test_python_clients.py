"""The Python client libraries people point at OpenAI-compatible servers, each
against a real server with the tiny Llama 3.1 (issue 30, acceptance 1 and 2):
LiteLLM's SDK, LangChain's ChatOpenAI and pydantic-ai (the openai SDK itself is
everywhere else in the suite). Plain, stream, structured output, and a named tool
choice returning the named call (biased as the seed test does). The libraries are
the ``clients`` extra, which ``make test`` installs."""

from __future__ import annotations

import json
import warnings
from decimal import Decimal
from typing import Any, Literal

import httpx
import pytest
from pydantic import BaseModel

from tests.conftest import LiveServer, provision
from tests.seeds.test_seed_models import LLAMA, NO_ARGS, WEATHER
from tests.seeds.test_tool_choice import call_bias

pytestmark = pytest.mark.slow

ASK = [{"role": "user", "content": "What time is it?"}]
YES_NO = {
    "type": "object",
    "properties": {"answer": {"type": "string", "enum": ["yes", "no"]}},
    "required": ["answer"],
    "additionalProperties": False,
}


class Answer(BaseModel):
    answer: Literal["yes", "no"]


def ledger_charge(live: LiveServer, key: str) -> Decimal:
    """What the account paid so far: its grant less its balance."""
    r = httpx.get(f"{live.v1}/credits", headers={"x-api-key": key})
    return 5 - Decimal(r.json()["credits"])


# -- LiteLLM ----------------------------------------------------------------------------


def test_litellm_reports_the_charge_as_its_response_cost(
    seed_live: LiveServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # LiteLLM's price map is the one it ships: no fetch from the internet at import.
    monkeypatch.setenv("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    litellm = pytest.importorskip("litellm", reason="the clients extra is not installed")
    key = provision(seed_live.db, "litellm", 5)
    kw: dict[str, Any] = {
        "model": f"openai/{LLAMA}",
        "api_base": seed_live.v1,
        "api_key": key,
        "max_tokens": 5,
    }
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        done = litellm.completion(messages=ASK, **kw)
        first = ledger_charge(seed_live, key)
        chunks = list(litellm.completion(messages=ASK, stream=True, **kw))
        structured = litellm.completion(
            messages=[{"role": "user", "content": "Is the sky blue?"}],
            response_format={
                "type": "json_schema",
                "json_schema": {"name": "answer", "schema": YES_NO, "strict": True},
            },
            **{**kw, "max_tokens": 40},
        )
        named = litellm.completion(
            messages=ASK,
            tools=[WEATHER, NO_ARGS],
            tool_choice={"type": "function", "function": {"name": "get_time"}},
            temperature=0,
            logit_bias=call_bias(seed_live),
            **{**kw, "max_tokens": 40},
        )
    serialization = [w for w in caught if "Serializ" in str(w.message)]
    assert not serialization, [str(w.message) for w in serialization]
    # The cost LiteLLM reports is the request's charge, as a number.
    cost = done._hidden_params["response_cost"]
    assert isinstance(cost, float) and Decimal(str(cost)) == first > 0
    assert done.usage.cost == cost
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    answer = json.loads(structured.choices[0].message.content)
    assert answer in ({"answer": "yes"}, {"answer": "no"})
    (call,) = named.choices[0].message.tool_calls
    assert call.function.name == "get_time" and json.loads(call.function.arguments) == {}


# -- LangChain --------------------------------------------------------------------------


def test_langchain_chat_openai(seed_live: LiveServer) -> None:
    lc = pytest.importorskip("langchain_openai", reason="the clients extra is not installed")
    key = provision(seed_live.db, "langchain", 5)
    model = lc.ChatOpenAI(
        model=LLAMA, base_url=seed_live.v1, api_key=key, max_tokens=5, max_retries=0
    )
    reply = model.invoke("What time is it?")
    assert reply.usage_metadata is not None and reply.usage_metadata["output_tokens"] >= 1
    streamed = "".join(str(c.content) for c in model.stream("What time is it?"))
    assert streamed
    longer = lc.ChatOpenAI(
        model=LLAMA, base_url=seed_live.v1, api_key=key, max_tokens=40, max_retries=0
    )
    structured = longer.with_structured_output(Answer, method="json_schema")
    assert isinstance(structured.invoke("Is the sky blue?"), Answer)
    biased = lc.ChatOpenAI(
        model=LLAMA,
        base_url=seed_live.v1,
        api_key=key,
        max_tokens=40,
        temperature=0,
        logit_bias=call_bias(seed_live),
        max_retries=0,
    )
    tools = biased.bind_tools([WEATHER, NO_ARGS], tool_choice="get_time")
    called = tools.invoke("What time is it?")
    assert [(c["name"], c["args"]) for c in called.tool_calls] == [("get_time", {})]
    # LangChain's Responses API path (servelm's POST /v1/responses).
    responses = lc.ChatOpenAI(
        model=LLAMA,
        base_url=seed_live.v1,
        api_key=key,
        max_tokens=5,
        max_retries=0,
        use_responses_api=True,
    )
    answered = responses.invoke("What time is it?")
    assert answered.text and answered.usage_metadata is not None
    assert answered.usage_metadata["output_tokens"] >= 1
    assert "".join(c.text for c in responses.stream("What time is it?"))


# -- pydantic-ai ------------------------------------------------------------------------


def test_pydantic_ai_agent(seed_live: LiveServer) -> None:
    pytest.importorskip("pydantic_ai", reason="the clients extra is not installed")
    from pydantic_ai import Agent, NativeOutput, ToolOutput
    from pydantic_ai.models.openai import OpenAIChatModel
    from pydantic_ai.providers.openai import OpenAIProvider

    key = provision(seed_live.db, "pydantic-ai", 5)
    model = OpenAIChatModel(LLAMA, provider=OpenAIProvider(base_url=seed_live.v1, api_key=key))
    agent = Agent(model, model_settings={"max_tokens": 5})
    result = agent.run_sync("What time is it?")
    assert result.usage.output_tokens >= 1

    async def streamed() -> str:
        async with agent.run_stream("What time is it?") as run:
            return "".join([t async for t in run.stream_text(delta=True)])

    import asyncio

    assert asyncio.run(streamed())
    # Greedy: sampled, the tiny model once wrote past 40 tokens inside the JSON.
    native = Agent(
        model, output_type=NativeOutput(Answer), model_settings={"max_tokens": 40, "temperature": 0}
    )
    assert isinstance(native.run_sync("Is the sky blue?").output, Answer)

    class Time(BaseModel):
        pass

    # The default output mode is a tool the model must call ("required"): the
    # seed test's bias walks the tiny model into an empty call of it.
    tooled = Agent(
        model,
        output_type=ToolOutput(Time, name="get_time"),
        model_settings={"max_tokens": 40, "temperature": 0, "logit_bias": call_bias(seed_live)},
    )
    assert isinstance(tooled.run_sync("What time is it?").output, Time)
    # pydantic-ai's Responses API model (servelm's POST /v1/responses).
    from pydantic_ai.models.openai import OpenAIResponsesModel

    responses = OpenAIResponsesModel(
        LLAMA, provider=OpenAIProvider(base_url=seed_live.v1, api_key=key)
    )
    answered = Agent(responses, model_settings={"max_tokens": 5}).run_sync("What time is it?")
    assert answered.output and answered.usage.output_tokens >= 1
