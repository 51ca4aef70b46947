"""``POST /v1/responses`` (issue 30): OpenAI's Responses API on the chat walk, through
the official SDK's ``client.responses.create``, against the real engine and model."""

from __future__ import annotations

import json
import uuid
from decimal import Decimal
from typing import Any

import httpx
import openai
import pytest
from openai.types.responses import ResponseIncompleteEvent

from servelm.api.services import services
from servelm.billing import accounts, audit
from tests.conftest import LiveServer, provision

SLUG = "smollm2-135m-instruct"


def sdk(live: LiveServer, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=live.v1, api_key=key, max_retries=0)


def balance(live: LiveServer, key: str) -> Decimal:
    r = httpx.get(f"{live.v1}/credits", headers={"x-api-key": key})
    return Decimal(r.json()["credits"])


def test_a_plain_response_is_charged_as_its_usage_says(live: LiveServer) -> None:
    key = provision(live.db, "responses-plain", 1)
    raw = sdk(live, key).responses.with_raw_response.create(
        model=SLUG,
        input="Tell me a joke about cats.",
        instructions="Be brief.",
        max_output_tokens=8,
        temperature=0,  # greedy: the joke runs past 8 tokens every time, not by chance
    )
    r = raw.parse()
    assert r.object == "response" and r.id.startswith("resp_") and r.model == SLUG
    assert r.status == "incomplete" and r.incomplete_details is not None
    assert r.incomplete_details.reason == "max_output_tokens"
    assert r.output_text and r.output[0].type == "message"
    assert (
        r.to_dict()["store"] is False and r.instructions == "Be brief." and r.max_output_tokens == 8
    )
    usage = r.usage
    assert usage is not None and usage.output_tokens == 8
    assert usage.total_tokens == usage.input_tokens + 8
    extra = usage.model_extra or {}
    cost = Decimal(raw.headers["x-cost"])
    spec = services(live.app).catalog.resolve(SLUG)
    assert cost * 1_000_000 == spec.cost_micro(usage.input_tokens, usage.output_tokens)
    assert Decimal(str(extra["cost"])) == cost
    assert Decimal(str(extra["remaining_credits"])) == balance(live, key) == 1 - cost
    # The instructions are the system turn: the same prompt as the chat form.
    chat = httpx.post(
        f"{live.v1}/chat/completions",
        json={
            "model": SLUG,
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Tell me a joke about cats."},
            ],
            "max_tokens": 1,
        },
        headers={"x-api-key": key},
        timeout=60,
    )
    assert chat.json()["usage"]["prompt_tokens"] == usage.input_tokens


def test_a_streamed_response_sends_the_responses_events(live: LiveServer) -> None:
    key = provision(live.db, "responses-stream", 1)
    stream = sdk(live, key).responses.create(
        model=SLUG,
        input=[
            {"role": "user", "content": [{"type": "input_text", "text": "Say hello."}]},
        ],
        max_output_tokens=6,
        temperature=0,  # greedy: the answer runs past 6 tokens every time
        stream=True,
    )
    events = list(stream)
    kinds = [e.type for e in events]
    assert kinds[:4] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
    ]
    assert kinds[-4:] == [
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.incomplete",
    ]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    last = events[-1]
    assert isinstance(last, ResponseIncompleteEvent)
    done = last.response
    assert done.output_text == text and done.status == "incomplete"
    assert done.usage is not None and 1 <= done.usage.output_tokens <= 6
    cost = Decimal(str((done.usage.model_extra or {})["cost"]))
    assert cost > 0 and balance(live, key) == 1 - cost
    (row,) = audit.recent_requests(live.db, account_of(live, key), 5)
    assert Decimal(row["cost"]) / 1_000_000 == cost


def account_of(live: LiveServer, key: str) -> int:
    found = accounts.find_key(live.db, key.split("_")[1])
    assert found is not None
    return found.account_id


def test_structured_output_through_text_format(live: LiveServer) -> None:
    key = provision(live.db, "responses-schema", 1)
    schema = {
        "type": "object",
        "properties": {"answer": {"type": "string", "enum": ["yes", "no"]}},
        "required": ["answer"],
        "additionalProperties": False,
    }
    r = sdk(live, key).responses.create(
        model=SLUG,
        input="Is the sky blue? Answer as JSON.",
        text={"format": {"type": "json_schema", "name": "a", "schema": schema, "strict": True}},
        max_output_tokens=40,
    )
    assert r.status == "completed", r.output_text
    assert json.loads(r.output_text) in ({"answer": "yes"}, {"answer": "no"})
    assert r.text is not None and r.text.format is not None
    assert r.text.format.type == "json_schema"


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"previous_response_id": "resp_123"}, "previous_response_id"),
        ({"conversation": "conv_123"}, "conversation"),
        ({"background": True}, "background"),
        ({"input": [{"type": "item_reference", "id": "msg_1"}]}, "input[0]"),
        ({"tools": [{"type": "web_search"}]}, "tools[0].type"),
        ({"max_output_tokens": 0}, "max_output_tokens"),
        ({"input": [{"role": "wizard", "content": "x"}]}, "input[0]"),
        (
            {"text": {"format": {"type": "json_schema", "name": "x", "schema": {"type": "nope"}}}},
            "text.format.schema",
        ),
    ],
)
def test_what_needs_stored_state_or_is_malformed_is_a_clear_400(
    live: LiveServer, extra: dict[str, Any], param: str
) -> None:
    key = provision(live.db, f"responses-400-{uuid.uuid4().hex[:8]}", 1)
    body = {"model": SLUG, "input": "hi", **extra}
    r = httpx.post(f"{live.v1}/responses", json=body, headers={"x-api-key": key}, timeout=60)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error"
    assert balance(live, key) == 1


def test_an_image_for_a_text_model_is_refused_naming_the_input(live: LiveServer) -> None:
    """Images arrive as input_image parts and go the chat walk's checks: this model
    sees no images, and the 400 names the Responses field, before any charge."""
    key = provision(live.db, "responses-image", 1)
    image = {"type": "input_image", "image_url": "data:image/png;base64,AAAA"}
    body = {
        "model": SLUG,
        "input": [{"role": "user", "content": [{"type": "input_text", "text": "What?"}, image]}],
    }
    r = httpx.post(f"{live.v1}/responses", json=body, headers={"x-api-key": key}, timeout=60)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == "input" and "takes no images" in r.text
    assert balance(live, key) == 1
