"""The per-process store: the same sliding-window log as the Redis script
(``redis_store.py``), on plain dicts. Used alone on a single gateway, and as the
fallback when Redis does not answer (fail-open).
"""

from __future__ import annotations

import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field

from servelm.access.limits.policy import Scope
from servelm.access.limits.window import Decision, ScopeState


@dataclass
class _Counters:
    requests: deque[tuple[int, str]] = field(default_factory=deque)  # (ms, request id)
    # request id → (ms, tokens), oldest first; ``tokens`` is the running sum.
    reserved: OrderedDict[str, tuple[int, int]] = field(default_factory=OrderedDict)
    tokens: int = 0
    leases: dict[str, int] = field(default_factory=dict)  # request id → lease end, ms


class MemoryStore:
    def __init__(self) -> None:
        self._scopes: dict[str, _Counters] = {}

    @staticmethod
    def now_ms() -> int:
        return time.monotonic_ns() // 1_000_000

    def _prune(self, c: _Counters, now: int, window: int) -> None:
        while c.requests and c.requests[0][0] <= now - window:
            c.requests.popleft()
        while c.reserved:
            rid, (at, tokens) = next(iter(c.reserved.items()))
            if at > now - window:
                break
            c.reserved.popitem(last=False)
            c.tokens -= tokens
        for rid in [r for r, end in c.leases.items() if end <= now]:
            del c.leases[rid]

    async def acquire(
        self,
        rid: str,
        tokens: int,
        scopes: tuple[Scope, ...],
        lease_ms: int,
        *,
        record: bool = True,
    ) -> Decision:
        """Admit and record ``rid``, or refuse it; ``record`` False only reads where
        the scopes stand (for the headers of a response the limiter never decided)."""
        now = self.now_ms()
        states: list[ScopeState] = []
        refusal: tuple[str, str, int] | None = None
        for s in scopes:
            c = self._scopes.setdefault(s.name, _Counters())
            self._prune(c, now, s.window_ms)
            state = ScopeState(s)
            n = len(c.requests)
            if s.rpm is not None:
                state.requests_left = s.rpm - n
                state.requests_reset_ms = c.requests[-1][0] + s.window_ms - now if n else 0
                if n + 1 > s.rpm and refusal is None:
                    wait = c.requests[n - s.rpm][0] + s.window_ms - now if s.rpm else s.window_ms
                    refusal = (s.name, "requests", wait)
            if s.tpm is not None:
                state.tokens_left = s.tpm - c.tokens
                last = next(reversed(c.reserved.values()))[0] if c.reserved else None
                state.tokens_reset_ms = last + s.window_ms - now if last is not None else 0
                if c.tokens + tokens > s.tpm and refusal is None:
                    if tokens > s.tpm:
                        refusal = (s.name, "tokens_too_large", s.window_ms)
                    else:
                        freed, wait = 0, s.window_ms
                        for at, amount in c.reserved.values():
                            freed += amount
                            if c.tokens - freed + tokens <= s.tpm:
                                wait = at + s.window_ms - now
                                break
                        refusal = (s.name, "tokens", wait)
            busy = s.concurrency is not None and len(c.leases) + 1 > s.concurrency
            if busy and refusal is None:
                refusal = (s.name, "concurrency", 1000)
            states.append(state)
        if refusal is not None:
            return Decision(False, states, *refusal)
        if not record:
            return Decision(True, states)
        for s, state in zip(scopes, states, strict=True):
            c = self._scopes[s.name]
            if s.rpm is not None:
                c.requests.append((now, rid))
                state.requests_left -= 1
                state.requests_reset_ms = s.window_ms
            if s.tpm is not None:
                c.reserved[rid] = (now, tokens)
                c.tokens += tokens
                state.tokens_left -= tokens
                state.tokens_reset_ms = s.window_ms
            if s.concurrency is not None:
                c.leases[rid] = now + lease_ms
        return Decision(True, states)

    async def settle(self, rid: str, tokens: int, scopes: tuple[Scope, ...]) -> None:
        for s in scopes:
            c = self._scopes.get(s.name)
            if c is None:
                continue
            c.leases.pop(rid, None)
            held = c.reserved.get(rid)
            if held is not None:
                c.reserved[rid] = (held[0], tokens)
                c.tokens += tokens - held[1]

    def renew(self, rid: str, scopes: tuple[Scope, ...], lease_ms: int) -> None:
        """A running request keeps its place among those in flight."""
        end = self.now_ms() + lease_ms
        for s in scopes:
            c = self._scopes.get(s.name)
            if c is not None and s.concurrency is not None and rid in c.leases:
                c.leases[rid] = end
