"""The limiter the request walk calls: ``acquire(principal, tokens)`` before the
credit hold, ``Reservation.settle(actual_tokens)`` where the request is settled.

Why our own window instead of the ``limits`` package: ``limits`` (moving window,
sliding-window counter, Redis and async storages) checks one limit per call and can
only add to a counter. A request here is checked against up to six limits at once
(requests, tokens and requests in flight, for its key and for its account) and must
be admitted by all of them or recorded in none, in one Redis round trip; its tokens
are reserved at the worst case and the unused part is given back at settlement, and
requests in flight leave their set when they end. Checking six limits one by one
would take six round trips and charge a request refused by the fifth against the
first four; ``limits`` has no refund and no lease. So both stores here keep the same
exact sliding-window log (``memory.py``, and ``redis_store.py`` as one Lua script).

With ``SERVELM_REDIS_URL`` the counts live in Redis and are shared by every gateway.
When Redis does not answer within ``SERVELM_RATELIMIT_REDIS_TIMEOUT`` the limiter
either falls back to this process's own counts (fail-open, the default; logged and
counted in ``/metrics``) or refuses with 503 (fail-closed); for a second after a
failure it does not try Redis again, so an outage costs one timeout, not one per
request.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any, Literal, Protocol

from prometheus_client import CollectorRegistry, Counter

from servelm.access.limits.memory import MemoryStore
from servelm.access.limits.policy import Policy, Scope, build_policy, read_key_limits
from servelm.access.limits.redis_store import RedisStore, StoreUnavailable
from servelm.access.limits.window import Decision
from servelm.catalog.specs import Plan
from servelm.errors import Overloaded, RateLimited
from servelm.store.db import Database
from servelm.telemetry import logs

log = logging.getLogger(__name__)

# The rate-limit headers of the request this task is serving; the request middleware
# adds them to the response (success, error or stream alike).
_headers: contextvars.ContextVar[dict[str, str] | None] = contextvars.ContextVar(
    "ratelimit_headers", default=None
)

FailMode = Literal["open", "closed"]
_REDIS_PAUSE = 1.0  # seconds without trying Redis after it failed


def response_headers() -> list[tuple[bytes, bytes]]:
    """For the response being started: this request's rate-limit headers, if any."""
    found = _headers.get()
    if not found:
        return []
    return [(k.lower().encode(), v.encode()) for k, v in found.items()]


class Caller(Protocol):
    """Who is asking (``billing.service.Principal`` fits)."""

    @property
    def key_pk(self) -> int: ...
    @property
    def key_id(self) -> str: ...
    @property
    def account_id(self) -> int: ...


class Reservation:
    """One admitted request's place in its windows. ``settle`` or ``release`` it once;
    later calls do nothing. Neither ever raises: they run in ``finally`` blocks."""

    def __init__(self, limiter: Limiter, rid: str, policy: Policy, store: str, tokens: int):
        self._limiter = limiter
        self.rid = rid
        self.policy = policy
        self.store = store  # "redis" or "memory": where the counts were recorded
        self.tokens = tokens
        self.done = policy.unlimited

    async def settle(self, actual_tokens: int) -> None:
        """The request is over: it used ``actual_tokens``; the rest is free again."""
        if self.done:
            return
        self.done = True
        await self._limiter._settle(self, max(0, actual_tokens))

    async def release(self) -> None:
        """The request never ran (refused after admission): refund all its tokens."""
        await self.settle(0)


class Limiter:
    def __init__(
        self,
        db: Database,
        plans: dict[str, Plan],
        *,
        redis: RedisStore | None = None,
        fail: FailMode = "open",
        lease_seconds: float = 6.0,
        cache_seconds: float = 5.0,
        registry: CollectorRegistry | None = None,
        run: Callable[..., Awaitable[Any]] | None = None,
    ) -> None:
        self.db = db
        self.plans = plans
        self.redis = redis
        self.fail = fail
        self.lease_ms = int(lease_seconds * 1000)
        self.cache_seconds = cache_seconds
        self.memory = MemoryStore()
        self._run = run  # runs a blocking function off the loop (Billing.run)
        self._policies: dict[str, tuple[Policy, int, float]] = {}  # key id → policy
        self._redis_paused_until = 0.0
        # Reservations holding a place among requests in flight, renewed by the
        # keeper while they run; Redis ones whose release did not reach Redis, and
        # since when (past one lease they are gone on their own).
        self._live: dict[str, Reservation] = {}
        self._unreleased: dict[str, tuple[tuple[Scope, ...], float]] = {}
        self._keeper: asyncio.Task[None] | None = None
        registry = registry or CollectorRegistry()
        self.refusals = Counter(
            "servelm_ratelimit_refusals",
            "Requests refused by a rate limit, by scope kind and reason.",
            ["scope", "reason"],
            registry=registry,
        )
        self.queued_waits = Counter(
            "servelm_ratelimit_queued_waits",
            "Times a queued line waited for room in its account's batch_tpm.",
            registry=registry,
        )
        self.fallbacks = Counter(
            "servelm_ratelimit_fallbacks",
            "Rate-limit checks or settlements Redis did not answer (fail-open: decided "
            "by this process alone; fail-closed: refused with 503).",
            ["op"],
            registry=registry,
        )

    # -- policies ----------------------------------------------------------------------

    async def policy(self, principal: Caller) -> Policy:
        key_pk, key_id = principal.key_pk, principal.key_id
        now = time.monotonic()
        cached = self._policies.get(key_id)
        if cached is not None and now - cached[2] <= self.cache_seconds:
            return cached[0]
        if self._run is not None:
            limits = await self._run(read_key_limits, self.db, key_pk)
        else:
            limits = read_key_limits(self.db, key_pk)
        policy = build_policy(key_pk, limits, self.plans)
        account = limits.account_id if limits is not None else -1
        self._policies[key_id] = (policy, account, now)
        return policy

    async def limits_tokens(self, principal: Caller) -> bool:
        """Whether the caller has a tokens-per-minute budget (the reservation then
        wants an exact prompt count)."""
        return (await self.policy(principal)).limits_tokens

    def forget(self, key_id: str) -> None:
        self._policies.pop(key_id, None)

    def forget_account(self, account_id: int) -> None:
        for key_id in [k for k, v in self._policies.items() if v[1] == account_id]:
            del self._policies[key_id]

    def forget_all(self) -> None:
        self._policies.clear()

    # -- the check ---------------------------------------------------------------------

    async def acquire(self, principal: Caller, tokens: int) -> Reservation:
        """Admit a request that may use ``tokens`` (prompt + max output), or raise
        ``RateLimited`` (429) / ``Overloaded`` (503, fail-closed with Redis down)."""
        logs.annotate(key_id=principal.key_id, account_id=principal.account_id)
        policy = await self.policy(principal)
        rid = uuid.uuid4().hex
        if policy.unlimited:
            return Reservation(self, rid, policy, "memory", tokens)
        decision, store = await self._decide(rid, tokens, policy)
        headers = decision.headers()
        _headers.set(headers)
        if not decision.allowed:
            scope = "key" if decision.scope.startswith("k:") else "account"
            self.refusals.labels(scope, decision.reason).inc()
            raise RateLimited(
                _message(decision), headers={"Retry-After": str(decision.retry_after)}
            )
        res = Reservation(self, rid, policy, store, tokens)
        if any(s.concurrency is not None for s in policy.scopes):
            self._live[rid] = res
            if self._keeper is None or self._keeper.done():
                self._keeper = asyncio.get_running_loop().create_task(self._keep_leases())
        return res

    async def acquire_queued(self, principal: Caller, tokens: int) -> Reservation:
        """Admit a queued line (async request or batch line) against its account's
        ``batch_tpm``, waiting for room instead of refusing: queued work has no client
        to retry it. ``RateLimited`` only for a line larger than the whole budget."""
        policy = await self.policy(principal)
        queued = Policy((policy.batch,)) if policy.batch is not None else Policy(())
        while True:
            rid = uuid.uuid4().hex
            if queued.unlimited:
                return Reservation(self, rid, queued, "memory", tokens)
            decision, store = await self._decide(rid, tokens, queued)
            if decision.allowed:
                return Reservation(self, rid, queued, store, tokens)
            if decision.reason == "tokens_too_large":
                self.refusals.labels("batch", decision.reason).inc()
                raise RateLimited(_message(decision))
            self.queued_waits.inc()
            await asyncio.sleep(
                max(0.05, min(decision.retry_after, queued.scopes[0].window_ms / 1000))
            )

    async def peek(self, principal: Caller) -> None:
        """The rate-limit headers for a response the limit step never decided (an
        early refusal, an idempotent replay): where the caller's scopes stand, with
        nothing recorded. Best effort: a store that fails costs the headers only."""
        if _headers.get() is not None:
            return
        try:
            policy = await self.policy(principal)
            if policy.unlimited:
                return
            decision: Decision | None = None
            if self.redis is not None and time.monotonic() >= self._redis_paused_until:
                try:
                    decision = await self.redis.acquire("", 0, policy.scopes, 0, record=False)
                except StoreUnavailable:
                    self._redis_paused_until = time.monotonic() + _REDIS_PAUSE
            if decision is None and (self.redis is None or self.fail == "open"):
                decision = await self.memory.acquire("", 0, policy.scopes, 0, record=False)
        except Exception:
            log.warning("could not read the rate-limit state for a response", exc_info=True)
            return
        if decision is not None:
            _headers.set(decision.headers())

    async def _decide(self, rid: str, tokens: int, policy: Policy) -> tuple[Decision, str]:
        if self.redis is not None:
            if time.monotonic() >= self._redis_paused_until:
                try:
                    return (
                        await self.redis.acquire(rid, tokens, policy.scopes, self.lease_ms),
                        "redis",
                    )
                except StoreUnavailable as exc:
                    self._redis_paused_until = time.monotonic() + _REDIS_PAUSE
                    log.warning("rate-limit store unavailable (%s); fail-%s", exc, self.fail)
            self.fallbacks.labels("acquire").inc()
            if self.fail == "closed":
                raise Overloaded(
                    "The rate limiter is unavailable; try again shortly.", retry_after=1
                )
        return await self.memory.acquire(rid, tokens, policy.scopes, self.lease_ms), "memory"

    async def _settle(self, res: Reservation, tokens: int) -> None:
        self._live.pop(res.rid, None)
        if res.store == "memory":
            await self.memory.settle(res.rid, tokens, res.policy.scopes)
            return
        assert self.redis is not None
        try:
            await self.redis.settle(res.rid, tokens, res.policy.scopes)
        except StoreUnavailable as exc:
            # The reservation leaves the window on its own; the lease is released by
            # the keeper when Redis answers again, or ends by itself within a lease.
            self.fallbacks.labels("settle").inc()
            log.warning("rate-limit settlement not recorded (%s)", exc)
            if any(s.concurrency is not None for s in res.policy.scopes):
                self._unreleased[res.rid] = (res.policy.scopes, time.monotonic())
        except Exception:
            log.exception("rate-limit settlement failed")

    # -- leases ------------------------------------------------------------------------

    async def _keep_leases(self) -> None:
        """While requests hold places in flight: renew their leases three times a
        lease, so a lease outlives its request by one lease at most, whatever
        happened to Redis or to this process."""
        while self._live or self._unreleased:
            await asyncio.sleep(self.lease_ms / 3000)
            try:
                await self.keep_leases()
            except Exception:
                log.exception("renewing rate-limit leases failed")

    async def keep_leases(self) -> None:
        now = time.monotonic()
        for rid, (_, since) in list(self._unreleased.items()):
            if now - since > self.lease_ms / 1000:
                del self._unreleased[rid]
        renew: list[tuple[str, tuple[Scope, ...]]] = []
        for rid, res in list(self._live.items()):
            if res.store == "memory":
                self.memory.renew(rid, res.policy.scopes, self.lease_ms)
            else:
                renew.append((rid, res.policy.scopes))
        if self.redis is None or not (renew or self._unreleased):
            return
        if now < self._redis_paused_until:
            return
        release = [(rid, scopes) for rid, (scopes, _) in self._unreleased.items()]
        try:
            await self.redis.keep(renew, release, self.lease_ms)
        except StoreUnavailable as exc:
            self._redis_paused_until = time.monotonic() + _REDIS_PAUSE
            self.fallbacks.labels("renew").inc()
            log.warning("rate-limit leases not renewed (%s)", exc)
            return
        for rid, _ in release:
            self._unreleased.pop(rid, None)

    async def close(self) -> None:
        if self._keeper is not None:
            self._keeper.cancel()
            await asyncio.gather(self._keeper, return_exceptions=True)
        if self.redis is not None:
            await self.redis.client.aclose()


def _message(d: Decision) -> str:
    whose = {"k": "this API key", "b": "this account's queued work"}.get(
        d.scope[:1], "this account"
    )
    window = next((s.scope.window_ms for s in d.states if s.scope.name == d.scope), 60_000)
    per = "minute" if window == 60_000 else f"{window / 1000:g} s"
    if d.reason == "tokens_too_large":
        return (
            f"Rate limit reached: the request may use more tokens than {whose} may use "
            f"per {per} in all; lower max_tokens or shorten the prompt."
        )
    if d.reason == "concurrency":
        most = next((s.scope.concurrency for s in d.states if s.scope.name == d.scope), None)
        plural = "" if most == 1 else "s"
        return (
            f"Rate limit reached for {whose}: at most {most} request{plural} in flight "
            "at once. Retry when one ends."
        )
    what = {"requests": f"requests per {per}", "tokens": f"tokens per {per}"}.get(
        d.reason, d.reason
    )
    return f"Rate limit reached for {whose}: {what}. Try again in {d.retry_after} s."
