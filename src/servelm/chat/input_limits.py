"""What one request may cost before it reaches an engine (issue 17, points 1 and 11).

llama.cpp compiles a ``json_schema`` (and the tools' parameter schemas) into a
grammar that is checked against every candidate token, on the thread that serves
*every* slot: an ``enum`` of 10,000 items froze a model for minutes, and 1,000 items
cost 7 s. Schemas llama.cpp cannot compile at all (``{"type": "foo"}``,
``{"$ref": "#"}``, ``{"anyOf": []}``) came back as 500s. So every schema is walked
here, once, with hard bounds on its size, depth, node count and enum values, and
checked for what the compiler refuses; ``logit_bias``, ``stop`` and ``tools`` get
bounds of their own. Everything is refused with a 400 naming the field.

A prompt is bounded by bytes before any tokenizer sees it: no tokenizer spends
fewer than one token per ``MAX_BYTES_PER_TOKEN`` bytes, so a prompt larger than
that many bytes per token of the context window cannot fit, and is refused without
spending seconds of CPU to count it exactly.
"""

from __future__ import annotations

import json
import re
from typing import TYPE_CHECKING, Any

from servelm.chat.protocol import ChatRequest
from servelm.errors import ContextWindowExceeded, InvalidRequest

if TYPE_CHECKING:
    from servelm.catalog.specs import ModelSpec

# One schema (response_format's, or one tool's parameters).
MAX_SCHEMA_BYTES = 16 * 1024
MAX_SCHEMA_DEPTH = 16
MAX_SCHEMA_NODES = 1000
# Enum values cost the grammar most (each is an alternative tried on every token):
# 512 items added 1.4 s to a 9-token answer on the default model, 64 added 0.1 s.
MAX_ENUM_VALUES = 64
MAX_ENUM_VALUES_TOTAL = 128
# Repetition bounds and number ranges are expanded into grammar rules.
MAX_REPEAT = 1024
MAX_NUMBER_BOUND = 2**53
MAX_PATTERN_CHARS = 1000

MAX_TOOLS = 64
MAX_TOOLS_BYTES = 64 * 1024
MAX_LOGIT_BIAS = 300
MAX_TOKEN_ID = 10_000_000
MAX_STOP_CHARS = 1000
# seed travels as a 64-bit integer in every engine we know.
SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1
MAX_INT_PARAM = 2**31 - 1

# Longer than any token of a common tokenizer (SmolLM2's longest run of spaces is 64
# bytes in one token).
MAX_BYTES_PER_TOKEN = 128

_TYPES = frozenset({"string", "number", "integer", "boolean", "object", "array", "null"})
_SCHEMA_LISTS = ("anyOf", "oneOf", "allOf")
_SCHEMA_MAPS = ("properties", "$defs", "definitions", "patternProperties")
_SCHEMA_ONE = ("items", "additionalProperties", "not", "contains", "propertyNames")
_REPEATS = ("minItems", "maxItems", "minLength", "maxLength", "minProperties", "maxProperties")
# Keywords that say nothing about which values a schema allows.
_ANNOTATIONS = frozenset({"title", "description", "$comment", "examples", "default", "$id"})
_BOUNDS = ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf")


def check_request(req: ChatRequest) -> None:
    """Every bound on what the request's options may cost; raises InvalidRequest."""
    if req.seed is not None and not SEED_MIN <= req.seed <= SEED_MAX:
        raise InvalidRequest("seed must fit in a 64-bit integer.", param="seed")
    for name in ("min_tokens", "max_tokens", "max_completion_tokens"):
        value = getattr(req, name)
        if value is not None and value > MAX_INT_PARAM:
            raise InvalidRequest(f"{name} is far too large.", param=name)
    rf = req.response_format
    if rf is not None and rf.json_schema is not None and rf.json_schema.schema_ is not None:
        check_schema(rf.json_schema.schema_, "response_format.json_schema.schema")
    if req.tools:
        if len(req.tools) > MAX_TOOLS:
            raise InvalidRequest(f"At most {MAX_TOOLS} tools are allowed.", param="tools")
        for i, tool in enumerate(req.tools):
            if tool.function.parameters is not None:
                check_schema(tool.function.parameters, f"tools[{i}].function.parameters")
        size = len(json.dumps([t.model_dump() for t in req.tools]))
        if size > MAX_TOOLS_BYTES:
            raise InvalidRequest(
                f"The tools are {size} bytes of JSON, above the limit of {MAX_TOOLS_BYTES}.",
                param="tools",
            )
    if req.logit_bias is not None:
        _check_logit_bias(req.logit_bias)
    if req.stop is not None:
        stops = [req.stop] if isinstance(req.stop, str) else req.stop
        for stop in stops:
            if len(stop) > MAX_STOP_CHARS:
                raise InvalidRequest(
                    f"A stop sequence may have at most {MAX_STOP_CHARS} characters.",
                    param="stop",
                )


def _check_logit_bias(bias: dict[str, float]) -> None:
    if len(bias) > MAX_LOGIT_BIAS:
        raise InvalidRequest(
            f"logit_bias may have at most {MAX_LOGIT_BIAS} entries.", param="logit_bias"
        )
    for token in bias:
        if not (token.isascii() and token.isdigit()):
            raise InvalidRequest(
                f"Invalid value for 'logit_bias': its keys are token ids (whole numbers "
                f"from 0), and {token[:20]!r} is not one.",
                param="logit_bias",
            )
        if len(token) > 12 or int(token) > MAX_TOKEN_ID:
            raise _outside_vocabulary(token, None)


def check_logit_bias_vocabulary(req: ChatRequest, spec: ModelSpec, vocab_size: int | None) -> None:
    """Every ``logit_bias`` token id inside the model's vocabulary: llama.cpp drops the
    others silently, and the caller would never learn the bias did nothing."""
    if req.logit_bias is None or vocab_size is None:
        return
    for token in req.logit_bias:
        if int(token) >= vocab_size:
            raise _outside_vocabulary(token, (spec.slug, vocab_size))


def _outside_vocabulary(token: str, model: tuple[str, int] | None) -> InvalidRequest:
    where = (
        f"the vocabulary of model '{model[0]}' (token ids 0 to {model[1] - 1})"
        if model is not None
        else "any model's vocabulary"
    )
    return InvalidRequest(
        f"Invalid value for 'logit_bias': token id {token[:20]} is outside {where}.",
        param="logit_bias",
    )


def check_prompt_size(req: ChatRequest, spec: ModelSpec) -> None:
    """Refuse a prompt that cannot fit the context window, counting bytes only."""
    size = 0
    for m in req.messages:
        size += len(m.text().encode())
        if m.tool_calls:
            size += sum(len(tc.function.arguments.encode()) for tc in m.tool_calls)
    limit = spec.context_window * MAX_BYTES_PER_TOKEN
    if size > limit:
        raise ContextWindowExceeded(
            f"The prompt is {size} bytes of text: more than the context window of "
            f"{spec.context_window} tokens of model '{spec.slug}' can hold.",
            param="messages",
        )


class _Walk:
    """One schema's walk: counts nodes and enum values, resolves references."""

    def __init__(self, root: dict[str, Any], param: str) -> None:
        self.root = root
        self.param = param
        self.nodes = 0
        self.enums = 0

    def fail(self, where: str, message: str) -> InvalidRequest:
        return InvalidRequest(
            f"Invalid value for '{self.param}': {message} (at {where}).", param=self.param
        )

    def node(self, value: Any, where: str, depth: int) -> None:
        self.nodes += 1
        if self.nodes > MAX_SCHEMA_NODES:
            raise self.fail(where, f"the schema has more than {MAX_SCHEMA_NODES} nodes")
        if depth > MAX_SCHEMA_DEPTH:
            raise self.fail(where, f"the schema nests deeper than {MAX_SCHEMA_DEPTH} levels")
        if isinstance(value, bool):
            return  # true / false are schemas too
        if not isinstance(value, dict):
            raise self.fail(where, "a schema must be an object")
        self.keywords(value, where, depth)

    def keywords(self, s: dict[str, Any], where: str, depth: int) -> None:
        if "type" in s:
            kinds = s["type"] if isinstance(s["type"], list) else [s["type"]]
            bad = [k for k in kinds if not (isinstance(k, str) and k in _TYPES)]
            if bad or not kinds:
                raise self.fail(where, f"unknown type {bad[0] if bad else '[]'!r}")
        if "$ref" in s:
            self.ref(s["$ref"], where)
        for key in ("enum", "const"):
            if key in s:
                self.enum([s[key]] if key == "const" else s[key], f"{where}/{key}")
        for key in _SCHEMA_LISTS:
            if key in s:
                items = s[key]
                if not isinstance(items, list) or not items:
                    raise self.fail(f"{where}/{key}", f"{key} must be a non-empty array")
                for i, sub in enumerate(items):
                    self.node(sub, f"{where}/{key}/{i}", depth + 1)
        for key in _SCHEMA_MAPS:
            if key in s:
                if not isinstance(s[key], dict):
                    raise self.fail(f"{where}/{key}", f"{key} must be an object")
                for name, sub in s[key].items():
                    self.node(sub, f"{where}/{key}/{name}", depth + 1)
        for key in _SCHEMA_ONE:
            if key in s:
                self.node(s[key], f"{where}/{key}", depth + 1)
        if "prefixItems" in s:
            if not isinstance(s["prefixItems"], list):
                raise self.fail(f"{where}/prefixItems", "prefixItems must be an array")
            for i, sub in enumerate(s["prefixItems"]):
                self.node(sub, f"{where}/prefixItems/{i}", depth + 1)
        if "required" in s and not (
            isinstance(s["required"], list) and all(isinstance(r, str) for r in s["required"])
        ):
            raise self.fail(f"{where}/required", "required must be an array of names")
        self.numbers(s, where)

    def numbers(self, s: dict[str, Any], where: str) -> None:
        for key in _REPEATS:
            if key in s:
                v = s[key]
                if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= MAX_REPEAT:
                    raise self.fail(f"{where}/{key}", f"{key} must be an integer 0..{MAX_REPEAT}")
        for key in _BOUNDS:
            if key in s:
                v = s[key]
                ok = isinstance(v, int | float) and not isinstance(v, bool)
                if not ok or not abs(v) <= MAX_NUMBER_BOUND:
                    raise self.fail(
                        f"{where}/{key}", f"{key} must be a number within ±{MAX_NUMBER_BOUND}"
                    )
        if "pattern" in s:
            pattern = s["pattern"]
            if not isinstance(pattern, str) or len(pattern) > MAX_PATTERN_CHARS:
                raise self.fail(
                    f"{where}/pattern", f"pattern must be a string of <= {MAX_PATTERN_CHARS}"
                )
            try:
                re.compile(pattern)
            except (re.error, RecursionError, OverflowError) as exc:
                raise self.fail(f"{where}/pattern", f"pattern is not a regex ({exc})") from None

    def enum(self, values: Any, where: str) -> None:
        if not isinstance(values, list) or not values:
            raise self.fail(where, "enum must be a non-empty array")
        if len(values) > MAX_ENUM_VALUES:
            raise self.fail(where, f"enum has {len(values)} values, above {MAX_ENUM_VALUES}")
        self.enums += len(values)
        if self.enums > MAX_ENUM_VALUES_TOTAL:
            raise self.fail(
                where, f"the schema has more than {MAX_ENUM_VALUES_TOTAL} enum values in all"
            )

    def ref(self, ref: Any, where: str) -> None:
        """Only references into the document's own ``$defs`` / ``definitions`` compile;
        the root itself (``#``) does not."""
        if not isinstance(ref, str) or not ref.startswith("#/") or ref == "#/":
            raise self.fail(where, f"unsupported $ref {str(ref)[:60]!r}; use '#/$defs/<name>'")
        target: Any = self.root
        for part in ref[2:].split("/"):
            part = part.replace("~1", "/").replace("~0", "~")
            if not isinstance(target, dict) or part not in target:
                raise self.fail(where, f"$ref {ref[:60]!r} does not resolve")
            target = target[part]
        if not isinstance(target, dict | bool):
            raise self.fail(where, f"$ref {ref[:60]!r} does not point at a schema")
        self.ref_loop(ref, where)

    def ref_loop(self, ref: str, where: str) -> None:
        """A chain of references that comes back to itself with nothing in between
        (``a`` is ``$ref: b``, ``b`` is ``$ref: a``) describes no value at all; llama.cpp
        fails on it with "failed to parse grammar". Recursion through a property or
        an item (a tree) is fine and is not refused."""
        seen = [ref]
        target: Any = self.resolve(ref)
        while isinstance(target, dict) and isinstance(target.get("$ref"), str):
            if set(target) - _ANNOTATIONS - {"$ref"}:
                return  # the reference sits beside keywords that describe a value
            nxt = target["$ref"]
            if nxt in seen:
                chain = " -> ".join([*seen, nxt])
                raise self.fail(
                    where,
                    f"$ref loops back to itself ({chain[:200]}) without describing any "
                    "value; point it at a schema with a type or properties",
                )
            seen.append(nxt)
            target = self.resolve(nxt)

    def resolve(self, ref: str) -> Any:
        target: Any = self.root
        for part in ref[2:].split("/"):
            part = part.replace("~1", "/").replace("~0", "~")
            if not isinstance(target, dict) or part not in target:
                return None
            target = target[part]
        return target


def check_schema(schema: Any, param: str) -> None:
    """Bound a JSON schema's cost and refuse what llama.cpp cannot compile."""
    if not isinstance(schema, dict):
        raise InvalidRequest(f"Invalid value for '{param}': must be an object.", param=param)
    size = len(json.dumps(schema))
    if size > MAX_SCHEMA_BYTES:
        raise InvalidRequest(
            f"Invalid value for '{param}': the schema is {size} bytes of JSON, above the "
            f"limit of {MAX_SCHEMA_BYTES}.",
            param=param,
        )
    _Walk(schema, param).node(schema, "#", 0)
