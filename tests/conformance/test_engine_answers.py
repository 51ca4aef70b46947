"""OpenAI semantics where llama.cpp's own differ (issue 16, points 2, 4, 5), on the
real engine: logprobs, charges that match the text received, usage details."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest

from servelm.api.services import services
from servelm.engines.llamacpp import LlamaCppEngine
from tests.conftest import LiveServer

MODEL = "smollm2-135m-instruct"
JOKE = [{"role": "user", "content": "tell me a joke on cats"}]


def chat(http: httpx.Client, **body: Any) -> dict[str, Any]:
    r = http.post("/v1/chat/completions", json={"model": MODEL, "messages": JOKE} | body)
    assert r.status_code == 200, r.text
    data: dict[str, Any] = r.json()
    return data


def tokens_of(live: LiveServer, text: str) -> int:
    """What the model's own tokenizer makes of ``text`` (its llama.cpp server's route)."""
    engine = services(live.app).engines[MODEL]
    assert isinstance(engine, LlamaCppEngine)
    address = engine.address
    assert address is not None
    r = httpx.post(f"{address}/tokenize", json={"content": text, "add_special": False})
    return len(r.json()["tokens"])


def test_logprobs_alone_gives_one_entry_per_token_and_no_alternatives(
    http: httpx.Client,
) -> None:
    data = chat(http, max_tokens=5, logprobs=True, seed=1, temperature=0)
    entries = data["choices"][0]["logprobs"]["content"]
    assert entries, "one entry per token"
    assert all(e["top_logprobs"] == [] for e in entries)
    assert "".join(e["token"] for e in entries) == data["choices"][0]["message"]["content"]


def test_top_logprobs_zero_still_gives_an_entry_per_token(http: httpx.Client) -> None:
    data = chat(http, max_tokens=5, logprobs=True, top_logprobs=0, seed=1, temperature=0)
    entries = data["choices"][0]["logprobs"]["content"]
    assert len(entries) >= 1
    assert all(e["top_logprobs"] == [] for e in entries)
    assert "".join(e["token"] for e in entries) == data["choices"][0]["message"]["content"]


def test_top_logprobs_gives_that_many_alternatives_streamed_too(http: httpx.Client) -> None:
    body = {
        "model": MODEL,
        "messages": JOKE,
        "max_tokens": 4,
        "logprobs": True,
        "top_logprobs": 2,
        "stream": True,
    }
    counts: list[int] = []
    with http.stream("POST", "/v1/chat/completions", json=body) as r:
        for line in r.iter_lines():
            if not line.startswith("data: {"):
                continue
            for choice in json.loads(line[6:])["choices"]:
                for e in (choice.get("logprobs") or {}).get("content") or ():
                    counts.append(len(e["top_logprobs"]))
    assert counts and set(counts) == {2}


def test_an_empty_stop_string_is_no_stop_and_is_not_charged_for_nothing(
    live: LiveServer, http: httpx.Client
) -> None:
    data = chat(http, max_tokens=4, stop="", temperature=0)
    text = data["choices"][0]["message"]["content"]
    assert text != ""
    ending = 1 if data["choices"][0]["finish_reason"] == "stop" else 0
    assert data["usage"]["completion_tokens"] == tokens_of(live, text) + ending


def test_a_natural_end_bills_the_text_and_the_end_token(
    live: LiveServer, http: httpx.Client
) -> None:
    messages = [{"role": "user", "content": "What is 2+2? Answer with one number."}]
    data = chat(http, messages=messages, max_tokens=100, temperature=0)
    assert data["choices"][0]["finish_reason"] == "stop"
    text = data["choices"][0]["message"]["content"]
    assert data["usage"]["completion_tokens"] == tokens_of(live, text) + 1


@pytest.mark.parametrize("max_tokens", [1, 2, 3, 4, 8, 64])
def test_json_object_cut_short_charges_the_text_received(
    live: LiveServer, http: httpx.Client, max_tokens: int
) -> None:
    data = chat(
        http,
        max_tokens=max_tokens,
        response_format={"type": "json_object"},
        seed=3,
        temperature=0,
    )
    text = data["choices"][0]["message"]["content"]
    # The charge follows the text received: never tokens whose text never came (the
    # token that ends an answer, which has no text, is the one exception).
    ending = 1 if data["choices"][0]["finish_reason"] == "stop" else 0
    assert data["usage"]["completion_tokens"] == tokens_of(live, text) + ending
    assert data["usage"]["completion_tokens"] <= max_tokens


def test_usage_has_the_specs_details_and_the_prompt_cache_shows(http: httpx.Client) -> None:
    first = chat(http, max_tokens=2, temperature=0)
    again = chat(http, max_tokens=2, temperature=0)
    for data in (first, again):
        usage = data["usage"]
        assert set(usage["prompt_tokens_details"]) >= {"cached_tokens"}
        assert usage["completion_tokens_details"]["reasoning_tokens"] == 0
        assert data["system_fingerprint"].startswith("fp_")
    # The same prompt again: llama.cpp reuses the slot's cache for all but the last token.
    assert again["usage"]["prompt_tokens_details"]["cached_tokens"] > 0
    assert first["system_fingerprint"] == again["system_fingerprint"]
