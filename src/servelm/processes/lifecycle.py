"""A gateway's life after start-up: ready, draining, gone.

SIGTERM (or SIGINT) starts a drain: ``/readyz`` answers 503 at once so a load
balancer stops sending, new chat requests get 503, and the requests already running
get ``SERVELM_DRAIN_SECONDS`` to finish. Those still running then are stopped: a
stream ends with an error event and is charged what it sent (its settlement runs as
always), a plain request gets a 503 and costs nothing. Then the server stops
accepting, and the lifespan closes engines and the database. A second signal exits
at once; holds left open then expire and the next start's sweeper releases them.

The handlers are installed when the engines have started, on purpose: llama.cpp
(xllamacpp) installs handlers of its own when a model loads, and the last one
installed wins.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from servelm.errors import Overloaded, ServelmError, UpstreamTimeout

log = logging.getLogger(__name__)


@dataclass
class Flight:
    """A chat request in flight: when its deadline falls, and since when its current
    send has been waiting on the client (both in loop time)."""

    deadline: float
    sending: float | None = None


# After the drain: how long uvicorn's own shutdown may take (connections closing).
SHUTDOWN_MARGIN = 2.0


# Why the lifecycle cancelled a request; ``raise_if_stopped`` turns it into an answer.
DRAIN, DEADLINE, SLOW_CLIENT = "drain", "deadline", "slow client"


class Lifecycle:
    def __init__(
        self,
        drain_seconds: float = 30.0,
        max_inflight: int | None = None,
        request_timeout: float = 600.0,
        send_timeout: float = 30.0,
    ) -> None:
        self.drain_seconds = drain_seconds
        self.max_inflight = max_inflight
        self.request_timeout = request_timeout
        self.send_timeout = send_timeout
        self.ready = False  # engines loaded and database open
        self.draining = False
        self.inflight: dict[asyncio.Task[Any], Flight] = {}
        self._stopped: dict[asyncio.Task[Any], str] = {}  # cancelled by us, and why
        self._signals = 0
        self._drain: asyncio.Task[None] | None = None
        self._watchdog: asyncio.Task[None] | None = None
        self._idle: asyncio.Event | None = None  # set when nothing is in flight
        # The uvicorn.Server serving this app, told to exit when the drain is done
        # (``servelm serve`` sets it).
        self.server: Any = None

    # -- signals -----------------------------------------------------------------------

    def install_signal_handlers(self) -> bool:
        """Take SIGTERM and SIGINT (only possible on the main thread)."""
        if threading.current_thread() is not threading.main_thread():
            return False
        if self.server is None:
            # Under uvicorn's own supervisor (``serve --workers``) nobody hands us the
            # server, but the handler we replace is its bound ``handle_exit``: that is
            # the server to stop once drained. Without it a worker drained and then
            # served on, and its supervisor waited for it for ever.
            server = getattr(signal.getsignal(signal.SIGTERM), "__self__", None)
            if hasattr(server, "should_exit"):
                self.server = server
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.on_signal, sig)
        return True

    def on_signal(self, sig: int = signal.SIGTERM) -> None:
        self._signals += 1
        if self._signals > 1:
            log.warning("second signal: exiting now; open holds expire and are swept")
            os._exit(1)
        log.info(
            "signal %s: draining, %d requests running, up to %.0f s",
            signal.Signals(sig).name,
            len(self.inflight),
            self.drain_seconds,
        )
        self._drain = asyncio.get_running_loop().create_task(self.drain())

    # -- the drain ---------------------------------------------------------------------

    async def _until_idle(self, seconds: float) -> None:
        self._idle = asyncio.Event()
        if not self.inflight:
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._idle.wait(), seconds)

    async def drain(self) -> None:
        self.draining = True
        await self._until_idle(self.drain_seconds)
        if self.inflight:
            log.warning("drain window over: stopping %d requests", len(self.inflight))
            for task in list(self.inflight):
                self.stop(task, DRAIN)
            # Their settlements run now; give them a moment to commit.
            await self._until_idle(10)
        log.info("drained; stopping the server")
        if self.server is not None:
            self.server.should_exit = True

    def stop(self, task: asyncio.Task[Any], reason: str) -> None:
        if task not in self._stopped:
            self._stopped[task] = reason
            task.cancel()

    def raise_if_stopped(self) -> None:
        """Inside a request being cancelled: if the drain or its deadline did it, end
        the request with an error (an event on a stream) instead of a dropped
        connection. A client too slow to read is not answered: the cancellation goes
        on, and the connection is dropped."""
        task = asyncio.current_task()
        reason = self._stopped.get(task) if task is not None else None
        if task is None or reason is None or reason == SLOW_CLIENT:
            return
        del self._stopped[task]
        task.uncancel()
        raise self.error_for(reason)

    def error_for(self, reason: str) -> ServelmError:
        if reason == DEADLINE:
            return UpstreamTimeout(
                "The request did not finish within its deadline.", code="deadline_exceeded"
            )
        return Overloaded(
            "The server is shutting down; this request was stopped. Retry it.", retry_after=1
        )

    def stopped_reason(self) -> str | None:
        """After a cancellation left the request: ours (and then absorbed here), or
        ``None`` if someone else cancelled it."""
        task = asyncio.current_task()
        reason = self._stopped.pop(task, None) if task is not None else None
        if reason is not None and task is not None:
            task.uncancel()
        return reason

    async def _watch(self, period: float = 0.2) -> None:
        """One loop for every request's deadline and send timeout: nothing is armed
        per request or per token."""
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(period)
            now = loop.time()
            for task, flight in list(self.inflight.items()):
                if now >= flight.deadline:
                    self.stop(task, DEADLINE)
                elif flight.sending is not None and now - flight.sending > self.send_timeout:
                    self.stop(task, SLOW_CLIENT)

    async def close(self) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()
            await asyncio.gather(self._watchdog, return_exceptions=True)

    # -- requests in flight (admitted by engines.admission.Gate) -------------------------

    @contextlib.contextmanager
    def track(self, timeout: float | None = None) -> Iterator[Flight]:
        """Around a chat request: counted in flight, found by the drain, stopped at
        its deadline (the operator's, or less if the client asked for less)."""
        task = asyncio.current_task()
        assert task is not None
        loop = asyncio.get_running_loop()
        if self._watchdog is None:
            self._watchdog = loop.create_task(self._watch())
        limit = self.request_timeout if timeout is None else min(timeout, self.request_timeout)
        flight = self.inflight[task] = Flight(loop.time() + limit)
        try:
            yield flight
        finally:
            self.inflight.pop(task, None)
            self._stopped.pop(task, None)
            if not self.inflight and self._idle is not None:
                self._idle.set()

    def current_deadline(self) -> float | None:
        """The deadline (loop time) of the request this task serves, if tracked."""
        task = asyncio.current_task()
        flight = self.inflight.get(task) if task is not None else None
        return None if flight is None else flight.deadline
