"""A check's outcome and how it reads in HTTP headers (OpenAI's ``x-ratelimit-*`` and
the IETF RateLimit fields), the same whichever store decided it."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from servelm.access.limits.policy import Scope


@dataclass
class ScopeState:
    scope: Scope
    requests_left: int = 0
    requests_reset_ms: int = 0
    tokens_left: int = 0
    tokens_reset_ms: int = 0


@dataclass
class Decision:
    allowed: bool
    states: list[ScopeState] = field(default_factory=list)
    # When refused: which scope, why ("requests", "tokens", "tokens_too_large",
    # "concurrency"), and how long until the request would fit.
    scope: str = ""
    reason: str = ""
    wait_ms: int = 0

    def headers(self) -> dict[str, str]:
        """The tightest scope's numbers per kind: what the caller can still do."""
        out: dict[str, str] = {}
        policy: list[str] = []
        fields: list[str] = []
        with_rpm = [s for s in self.states if s.scope.rpm is not None]
        if with_rpm:
            s = min(with_rpm, key=lambda s: s.requests_left)
            left = max(0, s.requests_left)
            out["x-ratelimit-limit-requests"] = str(s.scope.rpm)
            out["x-ratelimit-remaining-requests"] = str(left)
            out["x-ratelimit-reset-requests"] = duration(s.requests_reset_ms)
            w = _seconds(s.scope.window_ms)
            policy.append(f'"requests";q={s.scope.rpm};w={w}')
            fields.append(f'"requests";r={left};t={_seconds(s.requests_reset_ms)}')
        with_tpm = [s for s in self.states if s.scope.tpm is not None]
        if with_tpm:
            s = min(with_tpm, key=lambda s: s.tokens_left)
            left = max(0, s.tokens_left)
            out["x-ratelimit-limit-tokens"] = str(s.scope.tpm)
            out["x-ratelimit-remaining-tokens"] = str(left)
            out["x-ratelimit-reset-tokens"] = duration(s.tokens_reset_ms)
            w = _seconds(s.scope.window_ms)
            policy.append(f'"tokens";q={s.scope.tpm};w={w}')
            fields.append(f'"tokens";r={left};t={_seconds(s.tokens_reset_ms)}')
        if policy:
            out["RateLimit-Policy"] = ", ".join(policy)
            out["RateLimit"] = ", ".join(fields)
        return out

    @property
    def retry_after(self) -> int:
        """Whole seconds, rounded up: a client that waits this long gets through."""
        return max(1, math.ceil(self.wait_ms / 1000))


def _seconds(ms: int) -> int:
    return max(0, math.ceil(ms / 1000))


def duration(ms: int) -> str:
    """OpenAI's reset format: ``20ms``, ``1s``, ``6m0s``, ``1h2m3s``."""
    ms = max(0, int(ms))
    if ms < 1000:
        return f"{ms}ms"
    seconds = ms / 1000
    if seconds < 60:
        return f"{seconds:.3g}s"
    s = math.ceil(seconds)
    h, rest = divmod(s, 3600)
    m, sec = divmod(rest, 60)
    return f"{h}h{m}m{sec}s" if h else f"{m}m{sec}s"
