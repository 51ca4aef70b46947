"""Issue 29.15: three refusals that used to speak the parser's or llama.cpp's language
say, in the caller's terms, which field is wrong and how (the real engine, the
default model: its vocabulary is 49,152 tokens)."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from tests.conftest import LiveServer

SLUG = "smollm2-135m-instruct"
MSGS = [{"role": "user", "content": "hi"}]


def openai(live: LiveServer, body: dict[str, Any] | bytes) -> httpx.Response:
    kw: dict[str, Any] = {"content": body} if isinstance(body, bytes) else {"json": body}
    return httpx.post(
        f"{live.v1}/chat/completions",
        headers={**live.headers(), "content-type": "application/json"},
        timeout=60,
        **kw,
    )


@pytest.mark.parametrize(
    ("bias", "says"),
    [
        # Past the model's vocabulary: llama.cpp would drop the bias without a word.
        ({"50000": 5}, "token id 50000 is outside the vocabulary of model "
         f"'{SLUG}' (token ids 0 to 49151)"),
        ({"99999999": 5}, "token id 99999999 is outside"),
        ({"hello": 5}, "'hello' is not one"),
    ],
)  # fmt: skip
def test_logit_bias_says_which_token_and_why(
    live: LiveServer, bias: dict[str, int], says: str
) -> None:
    r = openai(live, {"model": SLUG, "messages": MSGS, "max_tokens": 1, "logit_bias": bias})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == "logit_bias"
    assert says in err["message"]
    assert "integers" not in err["message"]
    # Within the vocabulary it is taken.
    last = {"49151": 1}
    ok = openai(live, {"model": SLUG, "messages": MSGS, "max_tokens": 1, "logit_bias": last})
    assert ok.status_code == 200, ok.text


def test_a_ref_loop_is_named_not_a_grammar_failure(live: LiveServer) -> None:
    loop = {"a": {"$ref": "#/$defs/b"}, "b": {"$ref": "#/$defs/a"}}
    schema = {"$defs": loop, "$ref": "#/$defs/a"}
    body = {
        "model": SLUG,
        "messages": MSGS,
        "max_tokens": 4,
        "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}},
    }
    r = openai(live, body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == "response_format.json_schema.schema"
    assert "loops back to itself" in err["message"] and "#/$defs/a -> #/$defs/b" in err["message"]
    assert "grammar" not in err["message"]
    # A recursive schema that describes a value (a tree) still runs.
    tree = {"$defs": {"n": {"type": "object", "properties": {"kids": {"type": "array",
            "items": {"$ref": "#/$defs/n"}}}}}, "$ref": "#/$defs/n"}  # fmt: skip
    body["response_format"]["json_schema"]["schema"] = tree  # type: ignore[index]
    assert openai(live, body).status_code == 200


def test_a_lone_surrogate_names_its_field_in_each_dialect(live: LiveServer) -> None:
    raw = b'{"model": "%s", "messages": [{"role": "user", "content": "smile \\ud83d"}]}' % (
        SLUG.encode()
    )
    r = openai(live, raw)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == "messages[0].content"
    assert "\\ud83d" in err["message"] and "surrogate" in err["message"]
    assert "hex escape" not in err["message"]
    seg = httpx.post(
        f"{live.v1}/{SLUG}",
        content=b'{"messages": [{"role": "user", "content": "ok"}, '
        b'{"role": "user", "content": "\\udc00"}]}',
        headers={**live.headers(), "content-type": "application/json"},
        timeout=60,
    )
    assert seg.status_code == 400
    assert "messages[1].content" in seg.json()["error"] and "surrogate" in seg.json()["error"]
