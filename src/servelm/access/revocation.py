"""Revocation across gateways: a key revoked, or an account's plan or limits
changed, on one gateway (or by the CLI) reaches every gateway's caches at once over
Redis pub/sub, instead of waiting out the cache time.

``Invalidation`` forgets locally and publishes; its subscriber task forgets what
others publish. Messages are ``key:<key id>`` and ``account:<account id>``. A
subscriber that loses its connection forgets everything when it is back, since it
may have missed messages meanwhile. Without Redis it only forgets locally.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncGenerator, Callable
from typing import Any, cast

import redis
import redis.asyncio as aioredis
from redis.exceptions import RedisError

log = logging.getLogger(__name__)


def channel(prefix: str) -> str:
    return f"{prefix}:invalidate"


class Invalidation:
    def __init__(
        self,
        client: aioredis.Redis | None,
        prefix: str,
        *,
        forget: list[Callable[[str], None]],
        forget_account: list[Callable[[int], None]],
        forget_all: list[Callable[[], None]],
    ) -> None:
        self.client = client
        self.channel = channel(prefix)
        self._forget = forget
        self._forget_account = forget_account
        self._forget_all = forget_all
        self._task: asyncio.Task[None] | None = None
        self.subscribed = asyncio.Event()

    # -- what this gateway changed -----------------------------------------------------

    async def key_changed(self, key_id: str) -> None:
        self._apply(f"key:{key_id}")
        await self._publish(f"key:{key_id}")

    async def account_changed(self, account_id: int) -> None:
        self._apply(f"account:{account_id}")
        await self._publish(f"account:{account_id}")

    async def _publish(self, message: str) -> None:
        if self.client is None:
            return
        try:
            await asyncio.wait_for(self.client.publish(self.channel, message), 1.0)
        except (RedisError, OSError, TimeoutError) as exc:
            # Other gateways fall back to their cache time.
            log.warning("could not announce %s to other gateways: %s", message, exc)

    # -- what others changed -----------------------------------------------------------

    def _apply(self, message: str) -> None:
        kind, _, ref = message.partition(":")
        if kind == "key":
            for fn in self._forget:
                fn(ref)
        elif kind == "account" and ref.isdigit():
            for forget_account in self._forget_account:
                forget_account(int(ref))

    def start(self) -> None:
        if self.client is not None:
            self._task = asyncio.create_task(self._listen())

    async def _listen(self) -> None:
        assert self.client is not None
        missed = False
        while True:
            try:
                pubsub = self.client.pubsub(ignore_subscribe_messages=True)
                # A subscription lives on its own connection that waits for messages:
                # no socket read timeout on it, unlike the limiter's calls.
                await pubsub.subscribe(self.channel)
                if missed:
                    for fn in self._forget_all:
                        fn()
                self.subscribed.set()
                # listen() is an async generator, typed as a plain iterator.
                listening = cast(AsyncGenerator[dict[str, Any]], pubsub.listen())
                async with contextlib.aclosing(listening) as messages:
                    async for message in messages:
                        data = message.get("data")
                        if isinstance(data, bytes):
                            self._apply(data.decode())
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("invalidation subscriber lost Redis (%s); retrying", exc)
                self.subscribed.clear()
                missed = True
                await asyncio.sleep(1.0)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)


def announce(url: str | None, prefix: str, message: str) -> None:
    """For the CLI (no event loop, no server): tell running gateways, if any share
    Redis, that ``key:<id>`` or ``account:<id>`` changed. Best effort."""
    if not url:
        return
    try:
        client = redis.Redis.from_url(url, socket_timeout=1.0, socket_connect_timeout=1.0)
        client.publish(channel(prefix), message)
        client.close()
    except (RedisError, OSError) as exc:
        log.warning("could not announce %s to gateways: %s", message, exc)
