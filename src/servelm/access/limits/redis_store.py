"""The shared store: every gateway counts in the same Redis, one script per check.

The check is one Lua script (one round trip, atomic): for every scope of the request
it drops what left the window, checks requests, tokens and requests in flight, and
only if every scope has room records the request in all of them (unless the lease
is negative: then it only reads, for the headers of a response the limiter did not
decide). Time is Redis's own
clock (``TIME``), so gateways on hosts with skewed clocks still share one window.

Per scope, four keys: a sorted set of request ids by arrival (requests), a sorted set
of request ids by arrival plus a hash of their reserved tokens with the running sum
in ``_sum`` (tokens), and a sorted set of request ids by lease end (in flight). A
lease is short and renewed while its request runs (``keep``), so a request whose end
Redis never heard of (a stall, a lost settlement, a dead process, an admission the
gateway gave up waiting for but Redis ran late) leaves the set within one lease.
"""

from __future__ import annotations

import asyncio
from typing import Any

import redis.asyncio as aioredis
from redis.backoff import NoBackoff
from redis.exceptions import RedisError
from redis.retry import Retry

from servelm.access.limits.policy import Scope
from servelm.access.limits.window import Decision, ScopeState

_ACQUIRE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local rid, need, lease = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local n = (#ARGV - 3) / 4
local out = {1, 0, '', ''}
local states = {}
for i = 0, n - 1 do
  local rq, tk, th, cc = KEYS[i*4+1], KEYS[i*4+2], KEYS[i*4+3], KEYS[i*4+4]
  local rpm, tpm = tonumber(ARGV[4+i*4]), tonumber(ARGV[5+i*4])
  local conc, win = tonumber(ARGV[6+i*4]), tonumber(ARGV[7+i*4])
  redis.call('ZREMRANGEBYSCORE', rq, '-inf', now - win)
  local gone = redis.call('ZRANGEBYSCORE', tk, '-inf', now - win)
  if #gone > 0 then
    -- One id at a time: unpack() of a long list would overflow Lua's stack.
    local freed = 0
    for _, id in ipairs(gone) do
      freed = freed + tonumber(redis.call('HGET', th, id) or '0')
      redis.call('HDEL', th, id)
    end
    redis.call('HINCRBY', th, '_sum', -freed)
    redis.call('ZREMRANGEBYSCORE', tk, '-inf', now - win)
  end
  redis.call('ZREMRANGEBYSCORE', cc, '-inf', now)
  local nrq = redis.call('ZCARD', rq)
  local sum = tonumber(redis.call('HGET', th, '_sum') or '0')
  local rq_reset, tk_reset = 0, 0
  local last = redis.call('ZRANGE', rq, -1, -1, 'WITHSCORES')
  if #last > 0 then rq_reset = tonumber(last[2]) + win - now end
  last = redis.call('ZRANGE', tk, -1, -1, 'WITHSCORES')
  if #last > 0 then tk_reset = tonumber(last[2]) + win - now end
  states[#states + 1] = {rpm - nrq, rq_reset, tpm - sum, tk_reset}
  if out[1] == 1 then
    if rpm >= 0 and nrq + 1 > rpm then
      local wait = win
      if rpm > 0 then
        local e = redis.call('ZRANGE', rq, nrq - rpm, nrq - rpm, 'WITHSCORES')
        wait = tonumber(e[2]) + win - now
      end
      out = {0, wait, i, 'requests'}
    elseif tpm >= 0 and sum + need > tpm then
      if need > tpm then
        out = {0, win, i, 'tokens_too_large'}
      else
        local wait, freed = win, 0
        local entries = redis.call('ZRANGE', tk, 0, -1, 'WITHSCORES')
        for j = 1, #entries, 2 do
          freed = freed + tonumber(redis.call('HGET', th, entries[j]) or '0')
          if sum - freed + need <= tpm then
            wait = tonumber(entries[j + 1]) + win - now
            break
          end
        end
        out = {0, wait, i, 'tokens'}
      end
    elseif conc >= 0 and redis.call('ZCARD', cc) + 1 > conc then
      out = {0, 1000, i, 'concurrency'}
    end
  end
end
if out[1] == 1 and lease >= 0 then
  for i = 0, n - 1 do
    local rq, tk, th, cc = KEYS[i*4+1], KEYS[i*4+2], KEYS[i*4+3], KEYS[i*4+4]
    local rpm, tpm = tonumber(ARGV[4+i*4]), tonumber(ARGV[5+i*4])
    local conc, win = tonumber(ARGV[6+i*4]), tonumber(ARGV[7+i*4])
    if rpm >= 0 then
      redis.call('ZADD', rq, now, rid)
      redis.call('PEXPIRE', rq, win)
      states[i + 1][1] = states[i + 1][1] - 1
      states[i + 1][2] = win
    end
    if tpm >= 0 then
      redis.call('ZADD', tk, now, rid)
      redis.call('HSET', th, rid, need)
      redis.call('HINCRBY', th, '_sum', need)
      redis.call('PEXPIRE', tk, win)
      redis.call('PEXPIRE', th, win)
      states[i + 1][3] = states[i + 1][3] - need
      states[i + 1][4] = win
    end
    if conc >= 0 then
      redis.call('ZADD', cc, now + lease, rid)
      redis.call('PEXPIRE', cc, lease)
    end
  end
end
for _, s in ipairs(states) do
  for _, v in ipairs(s) do out[#out + 1] = v end
end
return out
"""

# Settling: the reservation becomes what was used (the rest is free again at once),
# and the request leaves the in-flight set. A reservation already out of the window
# has nothing left to refund.
_SETTLE = """
local rid, used = ARGV[1], tonumber(ARGV[2])
for i = 0, #KEYS / 2 - 1 do
  local th, cc = KEYS[i*2+1], KEYS[i*2+2]
  local held = redis.call('HGET', th, rid)
  if held then
    redis.call('HSET', th, rid, used)
    redis.call('HINCRBY', th, '_sum', used - tonumber(held))
  end
  redis.call('ZREM', cc, rid)
end
return 1
"""


# Keeping leases: the requests still running get a fresh lease end, those whose
# settlement could not be recorded leave the in-flight set. Plain ZADD, not XX: a
# lease a Redis stall let lapse comes back while its request runs (a release racing
# a renewal can at worst keep a finished request one lease long).
_KEEP = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local lease, renewing = tonumber(ARGV[1]), tonumber(ARGV[2])
for i = 1, #KEYS do
  if i <= renewing then
    redis.call('ZADD', KEYS[i], now + lease, ARGV[2 + i])
    redis.call('PEXPIRE', KEYS[i], lease)
  else
    redis.call('ZREM', KEYS[i], ARGV[2 + i])
  end
end
return 1
"""


class StoreUnavailable(Exception):
    """Redis did not answer in time or at all."""


def connect(url: str, timeout: float, *, subscriber: bool = False) -> aioredis.Redis:
    """A client that gives up fast: a short socket timeout and no retries, so a dead
    Redis costs a request at most ``timeout``, never a hang. A subscriber's reads wait
    for messages as long as it takes (only its connecting is bounded)."""
    return aioredis.Redis.from_url(
        url,
        socket_timeout=None if subscriber else timeout,
        socket_connect_timeout=timeout,
        retry=Retry(NoBackoff(), 0),
        health_check_interval=0,
    )


class RedisStore:
    def __init__(self, client: aioredis.Redis, prefix: str, timeout: float) -> None:
        self.client = client
        self.prefix = prefix
        self.timeout = timeout
        self._acquire = client.register_script(_ACQUIRE)
        self._settle = client.register_script(_SETTLE)
        self._keep = client.register_script(_KEEP)

    def _keys(self, scope: Scope) -> list[str]:
        base = f"{self.prefix}:rl:{scope.name}"
        return [f"{base}:rq", f"{base}:tk", f"{base}:th", f"{base}:cc"]

    async def _call(self, script: Any, keys: list[str], args: list[Any]) -> Any:
        try:
            # The socket timeout bounds each read; this bounds the whole exchange
            # (connect, a lost script cache's second round trip) all the same.
            return await asyncio.wait_for(script(keys=keys, args=args), self.timeout * 2)
        except (RedisError, OSError, TimeoutError) as exc:
            raise StoreUnavailable(f"{type(exc).__name__}: {exc}") from exc

    async def acquire(
        self,
        rid: str,
        tokens: int,
        scopes: tuple[Scope, ...],
        lease_ms: int,
        *,
        record: bool = True,
    ) -> Decision:
        keys: list[str] = []
        # A negative lease tells the script to record nothing: a read of the scopes.
        args: list[Any] = [rid, tokens, lease_ms if record else -1]
        for s in scopes:
            keys += self._keys(s)
            args += [_arg(s.rpm), _arg(s.tpm), _arg(s.concurrency), s.window_ms]
        raw = await self._call(self._acquire, keys, args)
        states = []
        for i, s in enumerate(scopes):
            rq_left, rq_reset, tk_left, tk_reset = (int(v) for v in raw[4 + i * 4 : 8 + i * 4])
            states.append(ScopeState(s, rq_left, rq_reset, tk_left, tk_reset))
        if int(raw[0]) == 1:
            return Decision(True, states)
        reason = raw[3].decode() if isinstance(raw[3], bytes) else str(raw[3])
        return Decision(False, states, scopes[int(raw[2])].name, reason, int(raw[1]))

    async def settle(self, rid: str, tokens: int, scopes: tuple[Scope, ...]) -> None:
        keys: list[str] = []
        for s in scopes:
            k = self._keys(s)
            keys += [k[2], k[3]]
        await self._call(self._settle, keys, [rid, tokens])

    async def keep(
        self,
        renew: list[tuple[str, tuple[Scope, ...]]],
        release: list[tuple[str, tuple[Scope, ...]]],
        lease_ms: int,
    ) -> None:
        """One round trip for every lease of this process: ``renew`` gets a lease end
        of now + ``lease_ms``, ``release`` leaves the in-flight sets."""
        keys: list[str] = []
        rids: list[str] = []
        for group in (renew, release):
            for rid, scopes in group:
                for s in scopes:
                    if s.concurrency is not None:
                        keys.append(self._keys(s)[3])
                        rids.append(rid)
            if group is renew:
                renewing = len(keys)
        if keys:
            await self._call(self._keep, keys, [lease_ms, renewing, *rids])


def _arg(limit: int | None) -> int:
    return -1 if limit is None else limit
