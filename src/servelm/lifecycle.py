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
from typing import Any

from servelm.errors import Overloaded

log = logging.getLogger(__name__)


class Lifecycle:
    def __init__(self, drain_seconds: float = 30.0, max_inflight: int | None = None) -> None:
        self.drain_seconds = drain_seconds
        self.max_inflight = max_inflight
        self.ready = False  # engines loaded and database open
        self.draining = False
        self.inflight: set[asyncio.Task[Any]] = set()
        self._stopped: set[asyncio.Task[Any]] = set()  # cancelled by the drain
        self._signals = 0
        self._drain: asyncio.Task[None] | None = None
        self._idle: asyncio.Event | None = None  # set when nothing is in flight
        # The uvicorn.Server serving this app, told to exit when the drain is done
        # (``servelm serve`` sets it).
        self.server: Any = None

    # -- signals -----------------------------------------------------------------------

    def install_signal_handlers(self) -> bool:
        """Take SIGTERM and SIGINT (only possible on the main thread)."""
        if threading.current_thread() is not threading.main_thread():
            return False
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
                self._stopped.add(task)
                task.cancel()
            # Their settlements run now; give them a moment to commit.
            await self._until_idle(10)
        log.info("drained; stopping the server")
        if self.server is not None:
            self.server.should_exit = True

    def raise_if_stopped(self) -> None:
        """Inside a request being cancelled: if the drain did it, end the request with
        a 503 (an error event on a stream) instead of a dropped connection."""
        task = asyncio.current_task()
        if task is not None and task in self._stopped:
            self._stopped.discard(task)
            task.uncancel()
            raise Overloaded(
                "The server is shutting down; this request was stopped. Retry it.",
                retry_after=1,
            )

    # -- admission ---------------------------------------------------------------------

    @contextlib.contextmanager
    def track(self) -> Iterator[None]:
        """Around a chat request: counted in flight, found by the drain."""
        task = asyncio.current_task()
        assert task is not None
        self.inflight.add(task)
        try:
            yield
        finally:
            self.inflight.discard(task)
            if not self.inflight and self._idle is not None:
                self._idle.set()

    def admit(self) -> None:
        """Before a chat request starts: refuse it quickly while draining or full."""
        if self.draining:
            raise Overloaded("The server is shutting down; retry on another.", retry_after=1)
        if self.max_inflight is not None and len(self.inflight) >= self.max_inflight:
            raise Overloaded("The server is at capacity; retry shortly.", retry_after=1)
