"""The serving process's handle on one loaded model's process (``llamacpp_process``):
start it and wait for its model to load, see it end, stop it.

The model's process writes llama.cpp's logs on stderr; the last lines are kept (a
failed load's cause, a crash's last words) and, with debug logging, logged here.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
import os
import signal
import sys
from typing import Any

from servelm.engines import llamacpp_process

log = logging.getLogger(__name__)

# Seconds a model's process gets to end once its stdin is closed before it is killed
# (it exits at once, skipping llama.cpp's teardown, unless stuck in the kernel).
STOP_GRACE = 5.0
# Lines kept of what a model's process last wrote on stderr.
LAST_WORDS = 20


class LoadFailed(Exception):
    """The model's process ended before its model was loaded; the message says how
    and what it said."""


class ModelProcess:
    def __init__(self, slug: str, *, verbose: bool = False) -> None:
        self.slug = slug
        self._verbose = verbose
        self._proc: asyncio.subprocess.Process | None = None
        self._follow: asyncio.Task[None] | None = None
        self._last_words: collections.deque[str] = collections.deque(maxlen=LAST_WORDS)
        self._serving = False  # it said READY and nobody has asked it to stop

    async def start(self, params: dict[str, Any], *, nice: int = 0) -> str:
        """Start the process, have it load the model with ``params`` and run at CPU
        priority ``nice`` (added to ours); its server's base URL. LoadFailed when it
        ends first; killed if this is cancelled."""
        try:
            return await self._start(params, nice)
        except BaseException:
            await self.stop(kill=True)
            raise

    async def _start(self, params: dict[str, Any], nice: int) -> str:
        proc = self._proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            llamacpp_process.__name__,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        self._follow = asyncio.get_running_loop().create_task(
            self._follow_stderr(proc), name=f"model process {self.slug}"
        )
        assert proc.stdin is not None and proc.stdout is not None
        order = {"parent": os.getpid(), "params": params, "nice": nice}
        try:
            proc.stdin.write(json.dumps(order).encode() + b"\n")
            await proc.stdin.drain()
        except (BrokenPipeError, ConnectionResetError):
            pass  # it has ended already: its status and stderr say why, below
        while line := await proc.stdout.readline():
            word, _, address = line.decode(errors="replace").strip().partition(" ")
            if word == llamacpp_process.READY:
                self._serving = True
                return address
        await self._follow
        raise LoadFailed(self.exit_reason())

    async def _follow_stderr(self, proc: asyncio.subprocess.Process) -> None:
        """Keep what the process writes on stderr until it ends; a warning if it
        ended while serving, unasked."""
        assert proc.stderr is not None
        while True:
            try:
                line = await proc.stderr.readline()
            except ValueError:
                continue  # a line past the reader's limit (64 KiB): dropped
            if not line:
                break
            text = line.decode(errors="replace").rstrip()
            self._last_words.append(text)
            if self._verbose:
                log.debug("%s: %s", self.slug, text)
        await proc.wait()
        if self._serving:
            self._serving = False
            log.warning(
                "model %s: its llama.cpp process ended while serving (%s)",
                self.slug,
                self.exit_reason(),
            )

    def alive(self) -> bool:
        return self._proc is not None and self._proc.returncode is None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None and self.alive() else None

    async def ended(self, within: float) -> bool:
        """Whether the process has ended, waiting up to ``within`` seconds to see it
        (its exit is seen a moment after it happens: a watcher thread reaps it)."""
        if self._follow is not None and not self._follow.done():
            await asyncio.wait({self._follow}, timeout=within)
        return self._proc is not None and self._proc.returncode is not None

    def exit_reason(self) -> str:
        code = self._proc.returncode if self._proc is not None else None
        if code is not None and code < 0:
            how = f"killed by {signal.Signals(-code).name}"
        else:
            how = f"exit status {code}"
        said = " / ".join(w for w in self._last_words if w)
        return f"{how}; it said: {said}" if said else how

    async def stop(self, *, kill: bool = False) -> None:
        """End the process and reap it: its memory is back when this returns. Its
        stdin closed is its signal to exit (it ignores SIGTERM); ``kill``, or a
        process still there after ``STOP_GRACE``, gets SIGKILL (one still loading
        does not read its stdin)."""
        self._serving = False
        proc = self._proc
        if proc is None:
            return
        if proc.stdin is not None:
            proc.stdin.close()
        if proc.returncode is None:
            if kill:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
            try:
                async with asyncio.timeout(STOP_GRACE):
                    await proc.wait()
            except TimeoutError:
                log.warning("model %s: its process did not exit; killed", self.slug)
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()
        if self._follow is not None:
            await self._follow
