"""Run by tests/clients/test_instructor.py with instructor's own venv's Python (not
imported by the suite): instructor against a live servelm, the answers printed as
one JSON object for the test to check. Reads SERVELM_V1, SERVELM_KEY, SERVELM_MODEL
and SERVELM_BIAS (the seed test's push into a call of get_time)."""

from __future__ import annotations

import json
import os
from typing import Any, Literal

import instructor
import openai
from pydantic import BaseModel, ConfigDict


class Answer(BaseModel):
    answer: Literal["yes", "no"]


class Time(BaseModel):
    """The tool instructor's TOOLS mode names after the model's title."""

    model_config = ConfigDict(title="get_time")


def main() -> None:
    raw = openai.OpenAI(
        base_url=os.environ["SERVELM_V1"], api_key=os.environ["SERVELM_KEY"], max_retries=0
    )
    model = os.environ["SERVELM_MODEL"]
    bias = json.loads(os.environ["SERVELM_BIAS"])
    ask = [{"role": "user", "content": "What time is it?"}]
    sky = [{"role": "user", "content": "Is the sky blue?"}]
    seen: dict[str, Any] = {"instructor": instructor.__version__, "openai": openai.__version__}

    plain_client = instructor.from_openai(raw, mode=instructor.Mode.JSON_SCHEMA)
    plain = plain_client.chat.completions.create(
        model=model, messages=ask, response_model=None, max_tokens=5
    )
    seen["plain"] = {
        "content": plain.choices[0].message.content,
        "usage": plain.usage.model_dump() if plain.usage else None,
    }

    structured = plain_client.chat.completions.create(
        model=model, messages=sky, response_model=Answer, max_tokens=40, max_retries=1
    )
    seen["structured"] = structured.model_dump()

    # instructor's streaming: partial objects as the JSON arrives.
    partials = [
        p.model_dump()
        for p in plain_client.chat.completions.create_partial(
            model=model, messages=sky, response_model=Answer, max_tokens=40, max_retries=1
        )
    ]
    seen["stream"] = partials

    # TOOLS mode sends tool_choice {"type": "function", "function": {"name": "get_time"}}.
    tools_client = instructor.from_openai(raw, mode=instructor.Mode.TOOLS)
    called, completion = tools_client.chat.completions.create_with_completion(
        model=model,
        messages=ask,
        response_model=Time,
        max_tokens=40,
        temperature=0,
        logit_bias=bias,
        max_retries=1,
    )
    seen["tool"] = {
        "object": called.model_dump(),
        "calls": [
            {"name": c.function.name, "arguments": c.function.arguments}
            for c in completion.choices[0].message.tool_calls or []
        ],
    }
    print(json.dumps(seen))


if __name__ == "__main__":
    main()
