"""Failed secrets slow down: an address that got the admin token or a sign-in wrong
``allowed`` times within ``window`` seconds is answered 429 (with a truthful
``Retry-After``) until the oldest of those failures leaves the window, whatever it
sends meanwhile, the right secret included.

With Redis the failures are counted there (one sorted set per address, Redis's own
clock), so a guesser spreading over gateways is counted once; when Redis does not
answer, this process's own count decides (a guesser then gets ``allowed`` tries per
gateway per window, never more).
"""

from __future__ import annotations

import logging
import math
import time
import uuid
from collections import OrderedDict, deque

from servelm.access.limits.redis_store import RedisStore, StoreUnavailable
from servelm.errors import RateLimited

log = logging.getLogger(__name__)

# Records a failure (ARGV[3] = 1) or only reads; returns the milliseconds until the
# address is under its allowance again (0: it may try now).
_GUESSES = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local win, allowed, record = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - win)
if record == 1 then
  redis.call('ZADD', KEYS[1], now, ARGV[4])
  redis.call('PEXPIRE', KEYS[1], win)
end
local n = redis.call('ZCARD', KEYS[1])
if n < allowed then return 0 end
local e = redis.call('ZRANGE', KEYS[1], n - allowed, n - allowed, 'WITHSCORES')
return tonumber(e[2]) + win - now
"""

_MAX_ADDRESSES = 100_000  # per process: past it the least recently failed are dropped


class Guesses:
    def __init__(
        self, redis: RedisStore | None, *, allowed: int = 10, window_seconds: float = 300.0
    ) -> None:
        self.redis = redis
        self.allowed = allowed
        self.window_ms = int(window_seconds * 1000)
        self._script = redis.client.register_script(_GUESSES) if redis is not None else None
        self._failures: OrderedDict[str, deque[int]] = OrderedDict()

    async def check(self, address: str, what: str) -> None:
        """Before a secret is compared: raise ``RateLimited`` if ``address`` is out of
        tries. ``what`` names the secret in the message."""
        wait_ms = await self._count(address, record=False)
        if wait_ms > 0:
            seconds = max(1, math.ceil(wait_ms / 1000))
            raise RateLimited(
                f"Too many failed {what} attempts from your address; try again in {seconds} s.",
                code="too_many_failed_attempts",
                headers={"Retry-After": str(seconds)},
            )

    async def failed(self, address: str) -> None:
        """A wrong secret from ``address``."""
        await self._count(address, record=True)

    async def _count(self, address: str, *, record: bool) -> int:
        if self.redis is not None and self._script is not None:
            key = f"{self.redis.prefix}:guess:{address}"
            args = [self.window_ms, self.allowed, 1 if record else 0, uuid.uuid4().hex]
            try:
                return int(await self.redis._call(self._script, [key], args))
            except StoreUnavailable as exc:
                log.warning("failed-attempt count not shared (%s); counting here", exc)
        return self._local(address, record)

    def _local(self, address: str, record: bool) -> int:
        now = time.monotonic_ns() // 1_000_000
        failures = self._failures.get(address)
        if failures is None:
            if not record:
                return 0
            failures = self._failures[address] = deque()
            if len(self._failures) > _MAX_ADDRESSES:
                self._failures.popitem(last=False)
        while failures and failures[0] <= now - self.window_ms:
            failures.popleft()
        if record:
            failures.append(now)
            self._failures.move_to_end(address)
        if not failures:
            del self._failures[address]
            return 0
        if len(failures) < self.allowed:
            return 0
        return failures[len(failures) - self.allowed] + self.window_ms - now
