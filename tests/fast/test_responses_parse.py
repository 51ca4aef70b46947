"""The Responses API's request translation (``servelm.chat.responses``) against hostile
bodies: whatever arrives, the answer is a chat request or a 400 naming a Responses
field, never another exception (a 500)."""

from __future__ import annotations

import json
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from servelm.chat.responses import parse_responses
from servelm.errors import InvalidRequest

JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=12,
)
ITEM = st.one_of(
    JSON,
    st.fixed_dictionaries(
        {
            "role": st.sampled_from(["user", "assistant", "system", "developer", "x"]),
            "content": JSON
            | st.lists(
                st.fixed_dictionaries(
                    {
                        "type": st.sampled_from(
                            ["input_text", "input_image", "output_text", "refusal", "x"]
                        ),
                        "text": JSON,
                        "image_url": JSON,
                    }
                ),
                max_size=2,
            ),
        },
    ),
    st.fixed_dictionaries(
        {
            "type": st.sampled_from(["function_call", "function_call_output", "item_reference"]),
            "call_id": JSON,
            "name": JSON,
            "arguments": JSON,
            "output": JSON,
        }
    ),
)
FUNCTION = st.fixed_dictionaries({"type": st.just("function"), "name": JSON, "parameters": JSON})
BODY = st.fixed_dictionaries(
    {"model": st.just("m") | JSON},
    optional={
        "input": st.text(max_size=8) | st.lists(ITEM, max_size=3) | JSON,
        "instructions": JSON,
        "tools": st.lists(JSON | FUNCTION, max_size=2) | JSON,
        "tool_choice": JSON | st.fixed_dictionaries({"type": st.just("function"), "name": JSON}),
        "text": JSON | st.fixed_dictionaries({"format": JSON}),
        "max_output_tokens": JSON,
        "temperature": JSON,
        "previous_response_id": JSON,
        "reasoning": JSON,
        "stream": JSON,
    },
)


@settings(max_examples=100, deadline=None)
@given(BODY)
def test_any_body_is_a_chat_request_or_a_400(body: dict[str, Any]) -> None:
    try:
        parse_responses(json.dumps(body).encode())
    except InvalidRequest as exc:
        assert exc.message
