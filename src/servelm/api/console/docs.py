"""What a model page says, generated from the catalog entry and the request schema.

Snippets are plain text here; templates escape them. The key placeholder is
``YOUR_API_KEY`` everywhere, so a reader (or a test) swaps in one string.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from servelm.catalog.specs import ModelSpec
from servelm.chat.protocol import ChatRequest

KEY_PLACEHOLDER = "YOUR_API_KEY"
PROMPT = "tell me a joke on cats"
SNIPPET_MAX_TOKENS = 64

# What each request field does, in this server. Fields not listed (engine extensions
# used by benchmarks) are left off the page.
_PARAMS: dict[str, str] = {
    "model": "Model slug or alias. OpenAI route only; the Segmind route takes it from the path.",
    "messages": "The conversation: objects with role (system, developer, user, assistant, "
    "tool) and content (a string, or an array of text and image_url blocks).",
    "max_tokens": "Most tokens to generate. Without it: the model's default, capped at what "
    "the balance affords.",
    "max_completion_tokens": "Same as max_tokens (OpenAI's newer name); send one of them.",
    "temperature": "Sampling temperature; 0 is (nearly) deterministic.",
    "top_p": "Nucleus sampling: keep the smallest token set with this total probability.",
    "n": "Number of choices; only 1 is supported.",
    "stop": "A string or up to 4 strings that end generation.",
    "seed": "Seed for sampling, for repeatable output.",
    "presence_penalty": "Penalise tokens that already appeared.",
    "frequency_penalty": "Penalise tokens by how often they appeared.",
    "logit_bias": "Token id → bias added to its logit.",
    "logprobs": "Return the log probability of each output token.",
    "top_logprobs": "How many alternatives per token (needs logprobs).",
    "response_format": "json_object, or json_schema enforced by the engine's grammar.",
    "tools": "Function definitions the model may call (models with a tool template).",
    "tool_choice": "none, auto, required, or a named function.",
    "parallel_tool_calls": "Whether several tool calls may come in one reply.",
    "stream": "Send tokens as server-sent events while they are generated.",
    "stream_options": '{"include_usage": true} adds a final chunk with usage, cost and '
    "remaining credits.",
}


@dataclass(frozen=True)
class Param:
    name: str
    type: str
    default: str
    description: str


def _type_of(schema: dict[str, Any], defs: dict[str, Any]) -> str:
    if "$ref" in schema:
        return "object"
    if "anyOf" in schema:
        kinds = [_type_of(s, defs) for s in schema["anyOf"] if s.get("type") != "null"]
        return " or ".join(dict.fromkeys(kinds))
    if "enum" in schema:
        return " | ".join(json.dumps(v) for v in schema["enum"])
    if "const" in schema:
        return json.dumps(schema["const"])
    kind = str(schema.get("type", "any"))
    if kind == "array":
        return f"array of {_type_of(schema.get('items', {}), defs)}"
    bounds = [
        f"{op} {schema[k]}"
        for k, op in (("minimum", "≥"), ("maximum", "≤"), ("minItems", "items ≥"))
        if k in schema
    ]
    kind = {"integer": "integer", "number": "number", "string": "string"}.get(kind, kind)
    return f"{kind} ({', '.join(bounds)})" if bounds else kind


def parameters() -> list[Param]:
    """The request body's fields, from ``ChatRequest`` itself."""
    schema = ChatRequest.model_json_schema()
    defs = schema.get("$defs", {})
    required = set(schema.get("required", []))
    out: list[Param] = []
    for name, prop in schema["properties"].items():
        if name not in _PARAMS:
            continue
        default = "required" if name in required else json.dumps(prop.get("default"))
        out.append(Param(name, _type_of(prop, defs), default, _PARAMS[name]))
    return out


ERRORS: list[tuple[str, str]] = [
    (
        "400",
        "The body is not valid JSON, a field is missing or out of range (the message "
        "names it), the prompt exceeds the context window, or images are sent to a text-only "
        "model.",
    ),
    ("401", "No API key, a malformed or unknown key, or a revoked or expired one."),
    (
        "402",
        "OpenAI route: the balance cannot pay for the prompt (insufficient_credits); the "
        "message says the balance and the amount needed.",
    ),
    ("403", "The key is limited to other models."),
    (
        "404",
        "No model with this slug or alias (model_not_found), or one this server lists "
        "but cannot serve: its weights are not installed (model_not_installed) or did "
        "not load (model_load_failed). No Retry-After: retrying cannot help.",
    ),
    ("405", "A method other than POST on a chat route."),
    ("406", "Segmind route: the balance cannot pay for the prompt (Segmind's status for it)."),
    ("413", "The body or an image is larger than the server's limit."),
    ("429", "A rate limit was reached (when the operator configured limits)."),
    ("500", "The engine failed; never caused by the request."),
    ("502", "A remote engine answered with an error or unparseable output."),
    (
        "503",
        "The model's queue is full, the server is draining, or every replica of a "
        "remote model is down: conditions that pass, with Retry-After.",
    ),
    ("504", "A remote engine sent nothing for longer than its timeout."),
]


def _messages(vision: bool) -> list[dict[str, Any]]:
    if not vision:
        return [{"role": "user", "content": PROMPT}]
    return [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "What is in this image?"},
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,..."}},
            ],
        }
    ]


def _py_dict(value: Any, indent: int = 0) -> str:
    return json.dumps(value, indent=4, ensure_ascii=False).replace("\n", "\n" + " " * indent)


def snippets(spec: ModelSpec, base_url: str) -> list[tuple[str, str, str]]:
    """(id, title, code) for every snippet on the page, in display order."""
    seg_url = f"{base_url}/v1/{spec.slug}"
    oai_url = f"{base_url}/v1/chat/completions"
    seg_body: dict[str, Any] = {"messages": _messages(False), "max_tokens": SNIPPET_MAX_TOKENS}
    oai_body: dict[str, Any] = {"model": spec.slug, **seg_body}
    seg_json = json.dumps(seg_body, ensure_ascii=False)
    oai_json = json.dumps(oai_body, ensure_ascii=False)
    py = """import requests

url = "{url}"
headers = {{{header}}}
data = {body}
response = requests.post(url, json=data, headers=headers, timeout=120)
response.raise_for_status()
print(response.json()["choices"][0]["message"]["content"])
"""
    js = """const axios = require("axios");

const url = "{url}";
const data = {body};

axios
  .post(url, data, {{ headers: {{ {header} }} }})
  .then((response) => console.log(response.data.choices[0].message.content))
  .catch((error) => console.error(error.response ? error.response.data : error.message));
"""
    curl = """curl -X POST "{url}" \\
  -H "{header}" \\
  -H "content-type: application/json" \\
  -d '{body}'"""
    openai_py = f"""from openai import OpenAI

client = OpenAI(base_url="{base_url}/v1", api_key="{KEY_PLACEHOLDER}")
reply = client.chat.completions.create(
    model="{spec.slug}",
    messages=[{{"role": "user", "content": "{PROMPT}"}}],
    max_tokens={SNIPPET_MAX_TOKENS},
)
print(reply.choices[0].message.content)
"""
    openai_stream = f"""from openai import OpenAI

client = OpenAI(base_url="{base_url}/v1", api_key="{KEY_PLACEHOLDER}")
stream = client.chat.completions.create(
    model="{spec.slug}",
    messages=[{{"role": "user", "content": "{PROMPT}"}}],
    stream=True,
    stream_options={{"include_usage": True}},
)
for chunk in stream:
    if chunk.choices and chunk.choices[0].delta.content:
        print(chunk.choices[0].delta.content, end="", flush=True)
    if chunk.usage:
        print("\\ncost:", chunk.usage.model_extra["cost"])
"""
    openai_segmind = f"""from openai import OpenAI

# The Segmind route through the SDK's generic POST: the model is in the path.
client = OpenAI(base_url="{base_url}/v1", api_key="{KEY_PLACEHOLDER}")
body = {{
    "messages": [{{"role": "user", "content": "{PROMPT}"}}],
    "max_tokens": {SNIPPET_MAX_TOKENS},
}}
reply = client.post("/{spec.slug}", body=body, cast_to=dict)
print(reply["choices"][0]["message"]["content"])
"""
    seg_key = f'"x-api-key": "{KEY_PLACEHOLDER}"'
    oai_key = f'"Authorization": "Bearer {KEY_PLACEHOLDER}"'
    return [
        (
            "python-segmind",
            "Python requests",
            py.format(url=seg_url, header=seg_key, body=_py_dict(seg_body)),
        ),
        (
            "js-segmind",
            "JavaScript axios",
            js.format(url=seg_url, header=seg_key, body=_py_dict(seg_body)),
        ),
        (
            "curl-segmind",
            "curl",
            curl.format(url=seg_url, header=f"x-api-key: {KEY_PLACEHOLDER}", body=seg_json),
        ),
        ("openai-segmind", "openai SDK", openai_segmind),
        (
            "python-openai",
            "Python requests",
            py.format(url=oai_url, header=oai_key, body=_py_dict(oai_body)),
        ),
        (
            "js-openai",
            "JavaScript axios",
            js.format(url=oai_url, header=oai_key, body=_py_dict(oai_body)),
        ),
        (
            "curl-openai",
            "curl",
            curl.format(
                url=oai_url, header=f"Authorization: Bearer {KEY_PLACEHOLDER}", body=oai_json
            ),
        ),
        ("openai-openai", "openai SDK", openai_py),
        ("openai-stream", "openai SDK, streaming", openai_stream),
    ]


RESPONSE_EXAMPLE = {
    "id": "chatcmpl-…",
    "object": "chat.completion",
    "created": 1767225600,
    "model": "SLUG",
    "choices": [
        {
            "index": 0,
            "message": {"role": "assistant", "content": "Why did the cat …", "refusal": None},
            "logprobs": None,
            "finish_reason": "stop",
        }
    ],
    "usage": {
        "prompt_tokens": 14,
        "completion_tokens": 22,
        "total_tokens": 36,
        "cost": "0.000004",
        "remaining_credits": "9.999996",
    },
}


def response_example(spec: ModelSpec) -> str:
    text = json.dumps(RESPONSE_EXAMPLE, indent=2, ensure_ascii=False)
    return text.replace('"SLUG"', json.dumps(spec.slug))


IMAGE_EXAMPLE = json.dumps(_messages(True), indent=2)
