"""The chat request's walk, in order (DESIGN.md "One request, start to end").

Routers stay thin: they hand the raw body and the dialect to ``ChatService``, which
validates, resolves the model, prepares the engine body, generates, and shapes the
response. Everything dialect-specific about *errors* lives in ``servelm.api.errors``;
the success shapes are the same OpenAI ``chat.completion`` on both routes.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Literal

from servelm.billing.holds import NotEnoughCredits, Settlement, affordable_max_tokens
from servelm.billing.service import Billing, Principal
from servelm.catalog import Catalog, ModelSpec, format_credits, price_micro
from servelm.conversation import fit_conversation
from servelm.engines.base import Engine
from servelm.errors import (
    ContextWindowExceeded,
    InvalidRequest,
    ModelUnavailable,
    ServelmError,
)
from servelm.input_limits import check_prompt_size
from servelm.media import ImageLoader, MediaLimits, inline_images
from servelm.metrics import Metrics
from servelm.protocol import (
    ChatRequest,
    chunk_body,
    completion_body,
    parse_chat_request,
    usage_body,
)

log = logging.getLogger(__name__)

Dialect = Literal["segmind", "openai"]

# Sent to the engine only when the client set them.
_PASSTHROUGH = (
    "temperature",
    "top_p",
    "stop",
    "seed",
    "presence_penalty",
    "frequency_penalty",
    "logit_bias",
    "logprobs",
    "top_logprobs",
    "tool_choice",
    "parallel_tool_calls",
    "ignore_eos",
    "min_tokens",
)


@dataclass
class Call:
    """One chat request's state from validation to settlement."""

    request_id: str
    dialect: Dialect
    spec: ModelSpec
    engine: Engine
    request: ChatRequest
    body: dict[str, Any]
    prompt_tokens: int
    max_tokens: int
    # False when prompt_tokens is only an upper bound (remote engines count later).
    prompt_exact: bool = True
    principal: Principal | None = None
    # Balance right after the hold (what a stream's headers can say), and the
    # settlement once done.
    held_balance: int | None = None
    settlement: Settlement | None = None
    status: str = "ok"
    completion_id: str = field(default_factory=lambda: f"chatcmpl-{uuid.uuid4().hex}")
    created: int = field(default_factory=lambda: int(time.time()))
    started: float = field(default_factory=time.perf_counter)
    # What actually happened, filled in while generating.
    completion_tokens: int = 0
    finish_reason: str | None = None
    usage: dict[str, Any] | None = None


class ChatService:
    def __init__(
        self,
        catalog: Catalog,
        engines: dict[str, Engine],
        unavailable: dict[str, str] | None = None,
        metrics: Metrics | None = None,
        billing: Billing | None = None,
        media: ImageLoader | None = None,
    ) -> None:
        self.catalog = catalog
        self.media = media or ImageLoader(MediaLimits())
        self.engines = engines
        self.metrics = metrics
        self.billing = billing
        # slug → why it is not served (missing weights, failed load), said in the 503.
        self.unavailable = unavailable or {}

    # -- steps 1-6: validate, resolve, prepare ---------------------------------------

    def parse(self, raw: bytes, dialect: Dialect) -> ChatRequest:
        return parse_chat_request(raw)

    def resolve(self, request: ChatRequest, slug: str | None) -> tuple[ModelSpec, Engine]:
        if slug is None:
            if not request.model:
                raise InvalidRequest("Missing required parameter: 'model'.", param="model")
            slug = request.model
        spec = self.catalog.resolve(slug)
        engine = self.engines.get(spec.slug)
        if engine is None:
            reason = self.unavailable.get(spec.slug, "it is not loaded on this server")
            raise ModelUnavailable(f"Model '{spec.slug}' is unavailable: {reason}", retry_after=60)
        return spec, engine

    async def prepare(
        self,
        request_id: str,
        dialect: Dialect,
        request: ChatRequest,
        spec: ModelSpec,
        engine: Engine,
        principal: Principal | None = None,
    ) -> Call:
        if request.has_images() and not spec.vision:
            raise InvalidRequest(
                f"Model '{spec.slug}' does not accept images; send text content only.",
                param="messages",
            )
        if request.tools and not spec.tools:
            raise InvalidRequest(f"Model '{spec.slug}' does not support tools.", param="tools")
        # Hook (issue 17): a prompt too big for the window by its bytes alone is refused
        # before seconds of CPU go into tokenizing it.
        check_prompt_size(request, spec)
        body = engine_body(request)
        if request.has_images():
            # Every image is fetched or decoded and checked here; the engine only ever
            # sees data URIs (llama.cpp would otherwise fetch URLs itself, unchecked).
            await inline_images(body, self.media)
        body["messages"] = fit_conversation(body["messages"], spec)
        counted = await engine.count_prompt_tokens(body)
        # A remote engine cannot count before generating: bound the prompt from above
        # (for the credit hold) and let the upstream enforce its own window.
        prompt_tokens = counted if counted is not None else estimate_prompt_tokens(body)
        exact = counted is not None and engine.prompt_count_exact(body)
        max_tokens = self._max_tokens(request, spec, prompt_tokens, exact=exact)
        call = Call(
            request_id=request_id,
            dialect=dialect,
            spec=spec,
            engine=engine,
            request=request,
            body=body,
            prompt_tokens=prompt_tokens,
            max_tokens=max_tokens,
            prompt_exact=exact,
            principal=principal,
        )
        if principal is not None and self.billing is not None:
            await self._hold(call, principal)
        body["max_tokens"] = call.max_tokens
        return call

    async def _hold(self, call: Call, principal: Principal) -> None:
        """Step 7: reserve the worst case, or, when the client set no limit, as many
        output tokens as the balance affords."""
        assert self.billing is not None
        spec = call.spec
        try:
            amount = price_micro(spec, call.prompt_tokens, call.max_tokens)
            call.held_balance = await self.billing.hold(
                principal, call.request_id, spec.slug, amount
            )
        except NotEnoughCredits as exc:
            if call.request.requested_max_tokens is not None:
                raise
            affordable = affordable_max_tokens(
                exc.balance,
                call.prompt_tokens,
                spec.input_price_micro,
                spec.output_price_micro,
                call.max_tokens,
            )
            if affordable < 1:
                raise
            call.max_tokens = affordable
            amount = price_micro(spec, call.prompt_tokens, affordable)
            call.held_balance = await self.billing.hold(
                principal, call.request_id, spec.slug, amount
            )

    @staticmethod
    def _max_tokens(
        request: ChatRequest, spec: ModelSpec, prompt_tokens: int, *, exact: bool = True
    ) -> int:
        asked = request.requested_max_tokens
        param = "max_completion_tokens" if request.max_completion_tokens else "max_tokens"
        if asked is not None and asked > spec.max_output_tokens:
            raise InvalidRequest(
                f"{param} is {asked}, above the maximum of {spec.max_output_tokens} "
                f"output tokens for model '{spec.slug}'.",
                param=param,
            )
        if not exact:
            return asked if asked is not None else spec.default_max_tokens
        room = spec.context_window - prompt_tokens
        if asked is None:
            # No explicit limit: generate up to the default, but never past the window.
            if room < 1:
                raise ContextWindowExceeded(
                    f"The prompt has {prompt_tokens} tokens, which fills the context window "
                    f"of {spec.context_window} tokens of model '{spec.slug}'.",
                    param="messages",
                )
            return min(spec.default_max_tokens, room)
        if asked > room:
            raise ContextWindowExceeded(
                f"The prompt has {prompt_tokens} tokens and {param} is {asked}: "
                f"{prompt_tokens + asked} tokens, more than the context window of "
                f"{spec.context_window} tokens of model '{spec.slug}'.",
                param=param,
            )
        return asked

    # -- steps 8 and 10: generate and respond ---------------------------------------

    async def complete(self, call: Call) -> dict[str, Any]:
        """Run to the end and assemble one ``chat.completion``."""
        content: list[str] = []
        tool_calls: dict[int, dict[str, Any]] = {}
        logprobs: list[Any] = []
        async for chunk in self._generate(call):
            for choice in chunk.get("choices") or ():
                delta = choice.get("delta") or {}
                if delta.get("content"):
                    content.append(delta["content"])
                for tc in delta.get("tool_calls") or ():
                    _merge_tool_call(tool_calls, tc)
                lp = choice.get("logprobs")
                if lp and lp.get("content"):
                    logprobs.extend(lp["content"])
        message: dict[str, Any] = {
            "role": "assistant",
            "content": "".join(content) if content or not tool_calls else None,
            "refusal": None,
        }
        if tool_calls:
            message["tool_calls"] = [tool_calls[i] for i in sorted(tool_calls)]
        return completion_body(
            completion_id=call.completion_id,
            model=call.spec.slug,
            created=call.created,
            message=message,
            finish_reason=call.finish_reason or "stop",
            usage=self.usage(call),
            logprobs={"content": logprobs, "refusal": None} if call.request.logprobs else None,
        )

    async def stream_chunks(self, call: Call) -> AsyncIterator[dict[str, Any]]:
        """``chat.completion.chunk`` dicts in OpenAI's order: role first, content, the
        finish chunk, then (with ``include_usage``) a usage-only chunk.

        The finish chunk is held back until the engine is done and the request is
        settled, so the last chunk the client sees carries the exact usage, cost and
        remaining credits either way.
        """
        include_usage = call.request.include_usage

        def chunk(**kw: Any) -> dict[str, Any]:
            body = chunk_body(
                completion_id=call.completion_id, model=call.spec.slug, created=call.created, **kw
            )
            if not include_usage:
                body.pop("usage")
            return body

        sent_role = False
        finish: dict[str, Any] | None = None
        async for raw in self._generate(call):
            for choice in raw.get("choices") or ():
                delta = dict(choice.get("delta") or {})
                delta.pop("role", None)
                if not sent_role:
                    if delta.get("content") is None:
                        delta.pop("content", None)
                    yield chunk(delta={"role": "assistant", "content": "", **delta})
                    sent_role = True
                    continue
                reason = choice.get("finish_reason")
                if reason is not None:
                    finish = chunk(
                        delta=delta, finish_reason=reason, logprobs=choice.get("logprobs")
                    )
                elif delta:
                    yield chunk(delta=delta, logprobs=choice.get("logprobs"))
        usage = self.usage(call)
        if finish is None:
            finish = chunk(delta={}, finish_reason=call.finish_reason or "stop")
        if include_usage:
            yield finish
            yield {**chunk(usage_only=True), "usage": usage}
        else:
            yield {**finish, "usage": usage}

    async def _generate(self, call: Call) -> AsyncIterator[dict[str, Any]]:
        stream = call.engine.stream(call.body, whole=not call.request.stream)
        call.status = "cancelled"  # until the engine says it finished
        try:
            async for raw in stream:
                usage = raw.get("usage")
                if usage:
                    call.usage = usage
                    call.completion_tokens = int(usage.get("completion_tokens", 0))
                    # The engine's own count is the truth for the prompt, too.
                    call.prompt_tokens = int(usage.get("prompt_tokens", call.prompt_tokens))
                for choice in raw.get("choices") or ():
                    if choice.get("finish_reason"):
                        call.finish_reason = choice["finish_reason"]
                    delta = choice.get("delta") or {}
                    if call.usage is None and (delta.get("content") or delta.get("tool_calls")):
                        call.completion_tokens += 1
                yield raw
            call.status = "ok"
        except ServelmError:
            call.status = "error"
            raise
        finally:
            # A client hang-up reaches us as cancellation of this task, and a second
            # one (a server shutting down) may interrupt the awaits here: settlement
            # is queued all the same, before its first await, and then commits
            # whether or not anyone waits for it. Without that the hold would stay
            # open, kept alive by our own keep-alive, until a restart.
            try:
                await stream.aclose()
            finally:
                await self._finish(call)

    async def _finish(self, call: Call) -> None:
        """Step 9, once per generation, however it ended: finished, failed or abandoned."""
        # Hook (issue 17): settlement first, and metrics in a finally: nothing else that
        # fails here may leave the hold open (it was kept alive until a restart).
        try:
            if call.held_balance is None or self.billing is None:
                return
            call.settlement = await self.billing.settle(
                call.request_id,
                charge=self.charge(call),
                prompt_tokens=call.prompt_tokens if call.prompt_exact or call.usage else 0,
                completion_tokens=call.completion_tokens,
                status=call.status,
                latency_ms=int((time.perf_counter() - call.started) * 1000),
            )
        finally:
            if self.metrics is not None:
                self.metrics.observe_tokens(
                    call.spec.slug, call.prompt_tokens, call.completion_tokens
                )

    @staticmethod
    def charge(call: Call) -> int:
        """What the user pays: the tokens generated and delivered. A request that
        failed or was abandoned before any output costs nothing, and so does a
        non-streaming one that failed or lost its client (no answer reached anyone); a
        stream cut short pays for what it sent. A prompt count that is only an upper
        bound (remote engine, no usage received) is not billed."""
        if call.status != "ok" and (call.completion_tokens == 0 or not call.request.stream):
            return 0
        prompt = call.prompt_tokens if (call.prompt_exact or call.usage) else 0
        return price_micro(call.spec, prompt, call.completion_tokens)

    def usage(self, call: Call) -> dict[str, Any]:
        extra: dict[str, Any] = {}
        if call.settlement is not None:
            # Credits as decimal strings: exact, unlike JSON numbers in most clients.
            extra["cost"] = format_credits(call.settlement.charged)
            extra["remaining_credits"] = format_credits(call.settlement.balance)
        return usage_body(call.prompt_tokens, call.completion_tokens, **extra)


def engine_body(request: ChatRequest) -> dict[str, Any]:
    """The OpenAI-shaped body an engine receives: only what the client set."""
    body: dict[str, Any] = {"messages": [_engine_message(m) for m in request.messages]}
    for name in _PASSTHROUGH:
        value = getattr(request, name)
        if value is not None:
            body[name] = value
    if request.response_format is not None and request.response_format.type != "text":
        body["response_format"] = request.response_format.model_dump(
            by_alias=True, exclude_none=True
        )
    if request.tools:
        body["tools"] = [t.model_dump(exclude_none=True) for t in request.tools]
    return body


# Byte-level BPE never spends less than one byte of text per token, so bytes bound the
# text's tokens; the per-message and fixed allowances cover template tokens, and each
# image is budgeted at what large vision encoders spend on one.
_PER_MESSAGE_TOKENS = 16
_TEMPLATE_TOKENS = 256
_PER_IMAGE_TOKENS = 4096


def estimate_prompt_tokens(body: dict[str, Any]) -> int:
    """An upper bound on the prompt's tokens, for engines that cannot count early."""
    total = _TEMPLATE_TOKENS
    for m in body["messages"]:
        total += _PER_MESSAGE_TOKENS
        content = m.get("content")
        if isinstance(content, str):
            total += len(content.encode())
        elif isinstance(content, list):
            for part in content:
                if part.get("type") == "text":
                    total += len(part["text"].encode())
                else:
                    total += _PER_IMAGE_TOKENS
        if m.get("tool_calls"):
            total += len(json.dumps(m["tool_calls"]).encode())
    if body.get("tools"):
        total += len(json.dumps(body["tools"]).encode())
    return total


def _engine_message(m: Any) -> dict[str, Any]:
    # Chat templates know "system", not OpenAI's newer "developer" role.
    out: dict[str, Any] = {"role": "system" if m.role == "developer" else m.role}
    if isinstance(m.content, list) and not m.images():
        # Many templates only render string content; a text-only array is one string.
        out["content"] = m.text()
    elif isinstance(m.content, list):
        out["content"] = [p.model_dump(exclude_none=True) for p in m.content]
    elif m.content is not None:
        out["content"] = m.content
    for name in ("name", "tool_call_id"):
        if getattr(m, name) is not None:
            out[name] = getattr(m, name)
    if m.tool_calls:
        out["tool_calls"] = [tc.model_dump() for tc in m.tool_calls]
    return out


def _merge_tool_call(acc: dict[int, dict[str, Any]], delta: dict[str, Any]) -> None:
    slot = acc.setdefault(
        int(delta.get("index", 0)),
        {"id": "", "type": "function", "function": {"name": "", "arguments": ""}},
    )
    if delta.get("id"):
        slot["id"] = delta["id"]
    fn = delta.get("function") or {}
    if fn.get("name"):
        slot["function"]["name"] += fn["name"]
    if fn.get("arguments"):
        slot["function"]["arguments"] += fn["arguments"]


def sse(data: dict[str, Any] | str) -> bytes:
    payload = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    return f"data: {payload}\n\n".encode()


def error_event(exc: ServelmError, dialect: Dialect) -> bytes:
    body = exc.segmind_body() if dialect == "segmind" else exc.openai_body()
    return sse(body)
