"""Rate limits: requests, tokens and requests in flight per key and per account,
counted in this process or, with Redis, across every gateway (``limiter.py``); a
caller's scopes from the catalog's plans and the key's own limits (``policy.py``).
The limiter's caches drop what ``access.revocation`` announces."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from prometheus_client import CollectorRegistry

from servelm.access.limits.limiter import Limiter, Reservation, response_headers
from servelm.access.limits.redis_store import RedisStore, connect
from servelm.access.revocation import Invalidation
from servelm.catalog.specs import Plan
from servelm.config import Settings
from servelm.store.db import Database

__all__ = [
    "Invalidation",
    "Limiter",
    "Plan",
    "Reservation",
    "build",
    "response_headers",
]


def build(
    settings: Settings,
    db: Database,
    registry: CollectorRegistry,
    run: Callable[..., Awaitable[Any]],
    *,
    plans: dict[str, Plan],
    forget: Callable[[str], None],
    forget_account: Callable[[int], None],
    forget_all: Callable[[], None],
) -> tuple[Limiter, Invalidation]:
    """The limiter and the invalidation channel for one gateway. ``forget*`` drop
    entries of the key cache (authentication), which the limiter's policy cache
    joins."""
    store = None
    listener = None
    if settings.redis_url:
        timeout = settings.ratelimit_redis_timeout
        store = RedisStore(connect(settings.redis_url, timeout), settings.redis_prefix, timeout)
        # Subscriptions wait for messages indefinitely: their own client, with no
        # read timeout (a short connect timeout still).
        listener = connect(settings.redis_url, timeout, subscriber=True)
    limiter = Limiter(
        db,
        plans,
        redis=store,
        fail=settings.ratelimit_fail,
        lease_seconds=settings.ratelimit_lease_seconds,
        cache_seconds=settings.key_cache_seconds,
        registry=registry,
        run=run,
    )
    invalidation = Invalidation(
        listener,
        settings.redis_prefix,
        forget=[forget, limiter.forget],
        forget_account=[forget_account, limiter.forget_account],
        forget_all=[forget_all, limiter.forget_all],
    )
    return limiter, invalidation
