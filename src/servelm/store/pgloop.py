"""psycopg's async connection, waiting on its socket through one reader that stays on
the event loop.

psycopg's own wait (``waiting.wait_async``) registers a reader, arms a timer and takes
both off again at every wait. Under uvloop that came to about six ``epoll_ctl``, four
``epoll_wait`` and three ``getpid`` system calls per statement (strace of a hold and a
settlement), and that system time was most of what PostgreSQL added to a request's
gateway CPU over SQLite (docs/benchmarks.md, "PostgreSQL on the event loop"). Here the
reader is registered once, when the connection is first waited on, and a wait is one
future. ``wait`` is psycopg's hook for exactly this: it drives psycopg's protocol
generators, which say what they wait for (``Wait``) and are told what is ready
(``Ready``).
"""

from __future__ import annotations

import asyncio
import select
from collections.abc import Generator
from typing import Any, TypeVar

import psycopg
from psycopg.waiting import Ready, Wait

RV = TypeVar("RV")


def _ready_now(fileno: int, wait: Wait) -> int:
    """What the socket can do right now, as ``Ready`` bits (a zero-timeout poll: one
    system call)."""
    poller = select.poll()
    mask = (select.POLLIN if wait & Wait.R else 0) | (select.POLLOUT if wait & Wait.W else 0)
    poller.register(fileno, mask)
    ready = 0
    for _, events in poller.poll(0):
        if events & select.POLLIN:
            ready |= Ready.R
        if events & select.POLLOUT:
            ready |= Ready.W
    return ready


class LoopConnection(psycopg.AsyncConnection[Any]):
    _watched: int | None = None  # the socket our reader is registered on
    _waiting: asyncio.Future[Ready] | None = None

    async def wait(
        self,
        gen: Generator[Wait, Ready | int, RV],
        interval: float = 0.1,
        timeout: float | None = None,  # noqa: ASYNC109 (psycopg's signature)
    ) -> RV:
        loop = asyncio.get_running_loop()
        if timeout is not None:
            # Only psycopg's cancellation paths ask for a deadline: its own wait does
            # them, with a reader of its own on the socket (one fd, one reader).
            self._unwatch(loop)
            return await super().wait(gen, interval=interval, timeout=timeout)
        fileno = self.pgconn.socket
        if self._watched != fileno:
            self._unwatch(loop)
            loop.add_reader(fileno, self._on_readable)
            self._watched = fileno
        try:
            wait = next(gen)
            while True:
                if wait & Wait.W:
                    # A flush: the socket nearly always takes it at once.
                    ready: int = _ready_now(fileno, wait)
                    if not ready:
                        ready = await self._until(loop, fileno, writable=True)
                else:
                    ready = await self._until(loop, fileno, writable=False)
                wait = gen.send(ready)
        except StopIteration as done:
            result: RV = done.value
            return result
        except OSError as exc:
            raise psycopg.OperationalError("connection socket closed") from exc

    async def _until(
        self, loop: asyncio.AbstractEventLoop, fileno: int, *, writable: bool
    ) -> Ready:
        self._waiting = waiting = loop.create_future()
        if writable:
            loop.add_writer(fileno, self._wake, Ready.W)
        try:
            ready: Ready = await waiting
            return ready
        finally:
            self._waiting = None
            if writable:
                loop.remove_writer(fileno)

    def _on_readable(self) -> None:
        if self._waiting is not None:
            self._wake(Ready.R)
            return
        # Nobody waits, yet something arrived (a notice, the server closing): take it
        # into libpq's buffer, or the level-triggered reader fires at every turn.
        try:
            self.pgconn.consume_input()
        except psycopg.OperationalError:
            self._unwatch(asyncio.get_running_loop())  # closed; the next use fails

    def _wake(self, ready: Ready) -> None:
        if self._waiting is not None and not self._waiting.done():
            self._waiting.set_result(ready)

    def _unwatch(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._watched is not None:
            loop.remove_reader(self._watched)
            self._watched = None

    async def close(self) -> None:
        self._unwatch(asyncio.get_running_loop())
        await super().close()
