"""Fitting conversations to models without a system role (Mixtral), and which
conversations the prompt's byte bound holds for."""

from __future__ import annotations

from typing import Any

import pytest

from servelm.catalog.builtins import builtin_specs
from servelm.chat.conversation import fit_conversation, plain_text
from servelm.errors import InvalidRequest

SPECS = {s.slug: s for s in builtin_specs(__import__("pathlib").Path("/nonexistent"))}
M7 = SPECS["mixtral-8x7b-instruct"]
M22 = SPECS["mixtral-8x22b-instruct"]
LLAMA = SPECS["llama-v3p1-8b-instruct"]

CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "tell me a joke on cats"},
    {"role": "assistant", "content": "here is a joke about cats..."},
    {"role": "user", "content": "now a joke on dogs"},
]


def test_8x7b_merges_system_into_the_first_user_turn() -> None:
    out = fit_conversation(CHAT, M7)
    assert [m["role"] for m in out] == ["user", "assistant", "user"]
    assert out[0]["content"] == "Be brief.\n\ntell me a joke on cats"
    assert out[2]["content"] == "now a joke on dogs"


def test_8x22b_merges_system_into_the_last_user_turn() -> None:
    out = fit_conversation(CHAT, M22)
    assert out[0]["content"] == "tell me a joke on cats"
    assert out[2]["content"] == "Be brief.\n\nnow a joke on dogs"


def test_llama_keeps_the_system_role() -> None:
    assert fit_conversation(CHAT, LLAMA) == CHAT


def test_consecutive_turns_are_merged_and_several_systems_joined() -> None:
    msgs = [
        {"role": "user", "content": "one"},
        {"role": "system", "content": "S1"},
        {"role": "user", "content": "two"},
        {"role": "system", "content": "S2"},
        {"role": "assistant", "content": "a"},
        {"role": "assistant", "content": "b"},
        {"role": "user", "content": "three"},
    ]
    out = fit_conversation(msgs, M7)
    assert out == [
        {"role": "user", "content": "S1\n\nS2\n\none\n\ntwo"},
        {"role": "assistant", "content": "a\n\nb"},
        {"role": "user", "content": "three"},
    ]


def test_text_part_arrays_merge_too() -> None:
    msgs: list[dict[str, Any]] = [
        {"role": "system", "content": "S"},
        {"role": "user", "content": [{"type": "text", "text": "look"}]},
    ]
    out = fit_conversation(msgs, M22)
    assert out[0]["content"][0] == {"type": "text", "text": "S\n\n"}


@pytest.mark.parametrize(
    "msgs",
    [
        [{"role": "system", "content": "only a system message"}],
        [{"role": "assistant", "content": "I start"}, {"role": "user", "content": "hi"}],
        [
            {"role": "user", "content": "hi"},
            {"role": "tool", "content": "42", "tool_call_id": "c1"},
        ],
    ],
)
def test_conversations_that_cannot_be_made_valid_are_400(msgs: list[dict[str, str]]) -> None:
    with pytest.raises(InvalidRequest) as exc:
        fit_conversation(msgs, M7)
    assert exc.value.status_code == 400
    assert "mixtral-8x7b-instruct" in exc.value.message


TOOL = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
CALL = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}


@pytest.mark.parametrize(
    ("body", "plain"),
    [
        ({"messages": CHAT}, True),
        ({"messages": CHAT, "tools": [TOOL]}, False),
        ({"messages": [{"role": "user", "content": "hi", "name": "x" * 500}]}, False),
        ({"messages": [{"role": "assistant", "content": None, "tool_calls": [CALL]}]}, False),
        ({"messages": [{"role": "tool", "content": "\x01" * 100, "tool_call_id": "c1"}]}, False),
        ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, False),
    ],
)
def test_only_plain_text_conversations_are_bounded_by_their_bytes(
    body: dict[str, object], plain: bool
) -> None:
    """Templates render tools and tool results through JSON and print names: the
    byte bound holds only for plain text (``prompt_count = "auto"`` skips the count
    there alone)."""
    assert plain_text(body) is plain
