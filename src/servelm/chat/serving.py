"""The chat request's walk, start to end, in one place.

``ChatService.handle`` is the orchestrator: every step below is one method, called
from there in this order, and nothing else in the codebase calls them out of order.

    authenticate → read body → parse → resolve model → model rights → idempotency
    → prepare (images, template, count where it decides something) → hold credits
    → generate → settle → shape

The HTTP layer (``servelm.api.chat``) only hands in a ``ChatExchange`` (headers, a
body reader, the dialect) and writes back the ``JsonReply`` or ``StreamReply`` it
gets, or renders the ``ServelmError`` raised. Errors raised after authentication
carry ``x-remaining-credits``, so every authenticated response tells the balance.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import AsyncGenerator
from typing import Any, Literal

from servelm.access.keys import (
    Authenticator,
    Principal,
    WorkerKey,
    check_model_rights,
)
from servelm.access.limits import Limiter
from servelm.access.sessions import session_live
from servelm.billing.money import format_credits, not_enough
from servelm.billing.service import Billing
from servelm.catalog.specs import Catalog, ModelSpec
from servelm.chat import charging
from servelm.chat.answers import assemble_completion, reorder_stream
from servelm.chat.calls import (
    Call,
    ChatExchange,
    JsonReply,
    StreamReply,
    check_capabilities,
)
from servelm.chat.charging import (
    bill_what_was_sent,
    billed_prompt,
    charge,
    count_prompt,
    count_prompt_late,
    defer_count,
    money_headers,
    settle_usage,
    tally,
    tell_balance,
    usage_of,
)
from servelm.chat.conversation import engine_body, fit_conversation
from servelm.chat.input_limits import check_logit_bias_vocabulary, check_prompt_size, check_request
from servelm.chat.media import ImageLoader, MediaLimits, inline_images
from servelm.chat.observe import observe_end, token_seen
from servelm.chat.protocol import ChatRequest, parse_chat_request, usage_body
from servelm.chat.responses import parse_responses, responses_params
from servelm.chat.responses_answers import reshape
from servelm.engines.admission import PromptSize, SlotShares
from servelm.engines.base import Engine
from servelm.engines.pool import COLD_START_HEADER, Lease, ModelPool
from servelm.engines.registry import is_local
from servelm.errors import (
    AuthenticationError,
    InvalidRequest,
    ModelNotInstalled,
    ServelmError,
)
from servelm.telemetry import logs
from servelm.telemetry.metrics import Metrics

log = logging.getLogger(__name__)


class ChatService:
    def __init__(
        self,
        catalog: Catalog,
        engines: dict[str, Engine] | ModelPool,
        *,
        billing: Billing | None = None,
        authenticator: Authenticator | WorkerKey | None = None,
        media: ImageLoader | None = None,
        unavailable: dict[str, str] | None = None,
        metrics: Metrics | None = None,
        limiter: Limiter | None = None,
        prompt_count: Literal["auto", "exact", "bound"] = "exact",
        fair_slots: bool = True,
    ) -> None:
        self.catalog = catalog
        # Which models are loaded, and loading them on demand (engines.pool).
        self.models = engines if isinstance(engines, ModelPool) else ModelPool.of(engines)
        # A gateway has both. A process without accounts (``servelm worker``, the
        # engine process of ``serve --workers``) has a ``WorkerKey``, no billing, and
        # callers that own no account: the same walk without its money steps.
        self._billing = billing
        self._authenticator = authenticator
        self.media = media or ImageLoader(MediaLimits())
        self.metrics = metrics
        self.limiter = limiter
        # "auto": count before admission only where the prompt's upper bound would
        # decide something (``charging.defer_count``). "bound" is the engine's own switch.
        self.lazy_count = prompt_count == "auto"
        if unavailable:
            self.models.unavailable.update(unavailable)
        self.told_no_images: set[str] = set()
        self.fair_slots = fair_slots
        self.shares = SlotShares()

    @property
    def engines(self) -> dict[str, Engine]:
        """The models loaded now (a local one may be servable and not loaded)."""
        return self.models.engines

    @property
    def unavailable(self) -> dict[str, str]:
        """slug → why it is not served (missing weights, a failed start)."""
        return self.models.unavailable

    @property
    def billing(self) -> Billing:
        if self._billing is None:
            raise RuntimeError("this service has no billing (a bare worker)")
        return self._billing

    @property
    def authenticator(self) -> Authenticator | WorkerKey:
        if self._authenticator is None:
            raise RuntimeError("this service has no authenticator")
        return self._authenticator

    # -- the walk ----------------------------------------------------------------------

    async def handle(self, ex: ChatExchange) -> JsonReply | StreamReply:
        principal = await self.authenticate(ex)
        try:
            raw = await ex.read_body()
            if ex.api == "responses":  # the chat request it means; the answer reshaped
                wire, request = parse_responses(raw)
                with responses_params():
                    return reshape(wire, await self._answer(ex, raw, request, principal))
            return await self._answer(ex, raw, self.parse(raw), principal)
        except ServelmError as exc:
            await tell_balance(self._billing, exc, principal)
            if self.limiter is not None:
                await self.limiter.peek(principal)
            raise

    async def _answer(
        self, ex: ChatExchange, raw: bytes, request: ChatRequest, principal: Principal
    ) -> JsonReply | StreamReply:
        """From the model to the answer: the walk's steps after parsing."""
        # Bound what the options may cost the engine before it sees them (issue 17),
        # whichever API's body the request came in.
        check_request(request)
        spec = self.resolve(request, ex.slug)
        check_model_rights(principal, spec.slug)
        # The model, loaded now if it was not; it stays loaded until the lease ends
        # (the generation settled, or this walk failed before it).
        lease = await self.models.acquire(spec)
        try:
            reply = await self._generate_reply(ex, raw, request, spec, lease, principal)
        except BaseException:
            lease.release()
            raise
        if lease.cold_start_ms is not None:
            reply.headers[COLD_START_HEADER] = str(lease.cold_start_ms)
            logs.annotate(cold_start_ms=lease.cold_start_ms)
        return reply

    async def _generate_reply(
        self,
        ex: ChatExchange,
        raw: bytes,
        request: ChatRequest,
        spec: ModelSpec,
        lease: Lease,
        principal: Principal,
    ) -> JsonReply | StreamReply:
        engine = lease.engine
        engine.check_capacity()
        await self.precheck_credits(request, spec, principal, len(raw))
        if ex.idempotency_key is not None and principal.owns_account:
            return await self._idempotent(ex, raw, request, spec, lease, principal)
        call = await self.prepare(ex.request_id, request, spec, engine)
        call.lease = lease
        await self.check_rate_limit(call, principal)
        await self.hold_credits(call, principal)
        await self.share_of_slots(call, principal)
        if request.stream:
            return await self.stream_reply(call, count_first=not principal.owns_account)
        return await self.json_reply(call)

    async def authenticate(self, ex: ChatExchange) -> Principal:
        """The key in the headers, or else the web console's session (the playground)."""
        session_key_id = None
        if ex.api_key is None and ex.authorization is None and ex.session is not None:
            session_key_id, sid = ex.session
            # Sessions live in the gateway's database; a process without one has none.
            if self._billing is None or not await self.billing.run(
                session_live, self.billing.db, sid
            ):
                raise AuthenticationError("Your console session has ended; sign in again.")
        return await self.authenticator.authenticate_request(
            ex.api_key, ex.authorization, session_key_id
        )

    def parse(self, raw: bytes) -> ChatRequest:
        return parse_chat_request(raw)

    def resolve(self, request: ChatRequest, slug: str | None) -> ModelSpec:
        if slug is None:
            if not request.model:
                raise InvalidRequest("Missing required parameter: 'model'.", param="model")
            slug = request.model
        spec = self.catalog.resolve(slug)
        if not self.models.servable(spec.slug):
            # The reason (a file path, a load error) is the operator's: it went to the
            # log at start-up and is in `servelm models list` and GET /admin/models.
            missing = is_local(spec) and not (spec.path and spec.path.is_file())
            state = "is not installed" if missing else "could not be loaded"
            raise ModelNotInstalled(
                f"Model '{spec.slug}' {state} on this server; ask its operator.",
                param="model",
                code="model_not_installed" if missing else "model_load_failed",
            )
        return spec

    async def precheck_credits(
        self, request: ChatRequest, spec: ModelSpec, principal: Principal, body_bytes: int
    ) -> None:
        """Before costly preparation, refuse a balance that cannot pay for it
        (``charging.precheck_floor``)."""
        if not principal.owns_account:
            return
        least = charging.precheck_floor(request, spec, body_bytes)
        if least is None:
            return
        balance = await self.billing.balance(principal.account_id)
        if balance < least:
            raise not_enough(balance, least, at_least=not request.has_images())

    def _seeing(self) -> list[str]:
        """The models here that take images, for the refusal of images elsewhere."""
        return [s.slug for s in self.catalog if s.vision and self.models.servable(s.slug)]

    async def prepare(
        self, request_id: str, request: ChatRequest, spec: ModelSpec, engine: Engine
    ) -> Call:
        """Images inlined and checked, the conversation fitted to the model, the prompt
        counted (exactly where the engine can, and under ``prompt_count = "auto"`` only
        where its upper bound would decide something) and the output limit decided."""
        check_capabilities(request, spec, self._seeing, self.told_no_images)
        # A prompt too big for the window by its bytes alone is refused
        # before seconds of CPU go into tokenizing it.
        check_prompt_size(request, spec)
        check_logit_bias_vocabulary(request, spec, engine.vocab_size)
        body = engine_body(request)
        if request.has_images():
            # Every image is fetched or decoded and checked here; the engine only ever
            # sees data URIs (llama.cpp would otherwise fetch URLs itself, unchecked).
            await inline_images(body, self.media)
        body["messages"] = fit_conversation(body["messages"], spec)
        call = Call(
            request_id=request_id,
            spec=spec,
            engine=engine,
            request=request,
            body=body,
            prompt_tokens=0,
            max_tokens=0,
        )
        if not (self.lazy_count and defer_count(call)):
            await count_prompt(call)
        return call

    async def check_rate_limit(self, call: Call, principal: Principal) -> None:
        """The key's and account's requests, tokens (prompt + max output, reserved now,
        the unused part refunded at settlement) and concurrency: 429 past any of them.
        Before the hold, so a refused request holds and charges nothing."""
        if self.limiter is None:
            return
        if call.count_deferred and await self.limiter.limits_tokens(principal):
            # A key with a token budget is charged its reservation exactly.
            await count_prompt(call)
        call.limit = await self.limiter.acquire(principal, call.prompt_tokens + call.max_tokens)

    async def queued_rate_limit(self, call: Call, principal: Principal) -> None:
        """Queued work's tokens (prompt + max output, the unused part refunded at
        settlement) against the account's ``batch_tpm``, apart from the interactive
        limits: waits for room; 429 only for a line larger than the whole budget."""
        if self.limiter is None:
            return
        tokens = call.prompt_tokens + call.max_tokens
        call.limit = await self.limiter.acquire_queued(principal, tokens)

    async def hold_credits(self, call: Call, principal: Principal) -> None:
        """The hold ``charging.hold`` decides. A refused hold gives its rate
        reservation back. A caller that owns no account holds nothing (and so is
        settled for nothing)."""
        if not principal.owns_account:
            return
        try:
            await charging.hold(self.billing, call, principal)
        except BaseException:
            if call.limit is not None:
                await call.limit.release()
            raise

    async def share_of_slots(self, call: Call, principal: Principal) -> None:
        """Whether this request counts against its account's share of the model's
        slots (taken in ``generate``, before the engine's own queue)."""
        slots = getattr(call.engine, "slots", None)
        if not self.fair_slots or not isinstance(slots, int):
            return
        plan = (await self.limiter.policy(principal)).slots if self.limiter else None
        call.share_size = SlotShares.share(slots, plan) or 0
        if call.share_size:
            call.share = (principal.account_id, call.spec.slug)

    async def json_reply(self, call: Call) -> JsonReply:
        body = await assemble_completion(call, self.generate(call), usage_of)
        # A worker's call owns no account: nothing was held or settled, no money to tell.
        return JsonReply(200, body, money_headers(call) if call.settlement is not None else {})

    async def stream_reply(self, call: Call, *, count_first: bool = False) -> StreamReply:
        """``count_first``: the caller is a gateway relaying this stream (it owns no
        account here), told the prompt's count with the first chunk, so that a stream
        cut before the last one still bills it (``charging.settle_usage``)."""
        chunks = reorder_stream(call, self.generate(call), usage_of)
        try:
            first = await anext(chunks)
        except BaseException:
            await chunks.aclose()
            raise
        if count_first and call.request.include_usage and call.prompt_exact:
            first = {**first, "usage": usage_body(call.prompt_tokens, 0)}
        headers: dict[str, str] = {}
        if call.held_balance is not None:
            # Headers leave before generation: they can only say the balance after
            # the hold. The final chunk's usage has the exact cost.
            headers["x-remaining-credits"] = format_credits(call.held_balance)
        return StreamReply(headers, first, chunks)

    async def generate(self, call: Call) -> AsyncGenerator[dict[str, Any]]:
        """The engine's raw chunks, counted as they pass; settles however it ends."""
        stream = call.engine.stream(
            call.body,
            client_streams=call.request.stream,
            prompt=PromptSize(call.prompt_tokens, call.prompt_exact),
        )
        call.status = "cancelled"  # until the engine says it finished
        relayed = call.relayed
        shared = False
        try:
            if call.share is not None:
                # Past its account's share of the model's slots it waits here.
                await self.shares.take(call.share, call.share_size, call.engine.admission)
                shared = True
            async for raw in stream:
                if tally(call, raw):
                    token_seen(self.metrics, call)
                yield raw
            self._usage_checked(call)
            # The token that ended the answer (end of turn, a stop string) has no
            # text but was generated: it is billed, as llama.cpp and vLLM count it.
            ending = 1 if call.finish_reason == "stop" else 0
            if (
                call.usage is not None
                and not relayed.tool_calls
                and relayed.content_chunks + ending < call.completion_tokens
            ):
                await bill_what_was_sent(call, "".join(relayed.text), ending)
            call.status = "ok"
        except ServelmError as exc:
            call.status = "error"
            call.error = exc
            raise
        finally:
            # A client hang-up reaches us as cancellation of this task, and a second
            # one (a server shutting down) may interrupt the awaits here: settlement
            # is queued all the same, before its first await, and then commits
            # whether or not anyone waits for it. Without that the hold would stay
            # open, kept alive by our own keep-alive, until a restart.
            try:
                await stream.aclose()  # type: ignore[attr-defined]
            finally:
                if shared and call.share is not None:
                    self.shares.give(call.share)
                try:
                    self._usage_checked(call)
                    await count_prompt_late(call)
                finally:
                    try:
                        await self.settle(call)
                    finally:
                        if call.lease is not None:
                            call.lease.release()  # the model may unload from now on

    def _usage_checked(self, call: Call) -> None:
        """The engine's counts checked against what was relayed (once); each one
        corrected is counted for the operator."""
        for what, direction in settle_usage(call):
            if self.metrics is not None:
                self.metrics.observe_usage_corrected(call.spec.slug, what, direction)
            if what == "completion":
                call.engine.usage_contradicted()

    async def settle(self, call: Call) -> None:
        """Once per generation, however it ended: finished, failed or abandoned. The
        money moves first; nothing after it (metrics, the log line) can keep a hold
        open, and the rate reservation is settled whatever else failed."""
        try:
            if call.held_balance is not None:
                owed = charge(call)
                call.settlement = await self.billing.settle(
                    call.request_id,
                    charge=owed,
                    prompt_tokens=billed_prompt(call),
                    completion_tokens=call.completion_tokens,
                    status=call.status,
                    latency_ms=int((time.perf_counter() - call.started) * 1000),
                    record=call.record,
                )
                if not call.settlement.already and call.settlement.charged < owed:
                    # A charge never exceeds its hold; an engine that counted more
                    # than the hold's bound is the only way here, and worth a look.
                    log.warning(
                        "request %s: its usage costs %s, more than its hold of %s, "
                        "which is what it was charged",
                        call.request_id,
                        format_credits(owed),
                        format_credits(call.settlement.charged),
                    )
        finally:
            try:
                observe_end(self.metrics, call)
            finally:
                if call.limit is not None:
                    # The unused part of the token reservation is free again, and the
                    # request leaves the in-flight count.
                    await call.limit.settle(call.prompt_tokens + call.completion_tokens)

    # -- idempotency -------------------------------------------------------------------

    async def _idempotent(
        self,
        ex: ChatExchange,
        raw: bytes,
        request: ChatRequest,
        spec: ModelSpec,
        lease: Lease,
        principal: Principal,
    ) -> JsonReply:
        """A retried request with the same Idempotency-Key and body is charged once and
        answered with the same completion."""
        key = ex.idempotency_key or ""
        if not 1 <= len(key) <= 255:
            raise InvalidRequest("Idempotency-Key must be 1 to 255 characters.")
        if request.stream:
            raise InvalidRequest(
                "Idempotency-Key is supported for non-streaming requests only.", param="stream"
            )
        billing = self.billing
        account = principal.account_id
        replay = await billing.idempotency_begin(account, key, hashlib.sha256(raw).hexdigest())
        if replay is not None:
            balance = await billing.balance(account)
            headers = {
                "x-remaining-credits": format_credits(balance),
                "x-cost": "0.000000",  # this answer is not charged again
                "idempotent-replayed": "true",
            }
            if self.limiter is not None:
                await self.limiter.peek(principal)
            return JsonReply(replay.status_code, replay.body, headers)
        try:
            call = await self.prepare(ex.request_id, request, spec, lease.engine)
            call.lease = lease
            await self.check_rate_limit(call, principal)
            await self.hold_credits(call, principal)
            await self.share_of_slots(call, principal)
            reply = await self.json_reply(call)
        except BaseException:
            await billing.idempotency_abort(account, key)
            raise
        assert call.settlement is not None
        await billing.idempotency_finish(account, key, 200, reply.body, call.settlement.charged)
        return reply
