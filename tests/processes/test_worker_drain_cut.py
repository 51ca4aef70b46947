"""A ``servelm worker`` whose drain window runs out with requests still running exits,
cutting them, within the window and a small margin: it used to sit in "Waiting for
application shutdown" while llama.cpp finished the prompts of the requests it had cut
(a prefill cannot be interrupted, and closing the engine joined it while llama.cpp
ran in the worker; now the model's process just ends)."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from servelm.processes.lifecycle import SHUTDOWN_MARGIN
from tests.fleet import fleetprocs

pytestmark = pytest.mark.slow  # a real worker, prompts of thousands of tokens

DRAIN = 1.0
# The drain waits for the cut requests to settle (instant in a worker: it holds no
# money), then uvicorn closes connections within its margin, and closing the engine
# ends the model's process at once; the rest is a process ending on a shared machine.
EXIT_BOUND = DRAIN + SHUTDOWN_MARGIN + 5


async def long_prompts(url: str, count: int) -> list[tuple[int, str]]:
    """Chats whose prompts keep llama.cpp busy well past the window (a prefill of
    ~3,100 tokens each, on one thread)."""
    words = " ".join(f"w{i}" for i in range(800))
    async with httpx.AsyncClient(timeout=600) as client:

        async def one(i: int) -> tuple[int, str]:
            body = {
                "model": fleetprocs.SLUG,
                "messages": [{"role": "user", "content": f"{i} {words}"}],
                "max_tokens": 200,
                "stream": i % 2 == 0,
            }
            r = await client.post(f"{url}/v1/chat/completions", json=body)
            return r.status_code, r.text

        return await asyncio.gather(*(one(i) for i in range(count)))


def test_worker_exits_when_its_drain_window_runs_out(tmp_path: Path, models_dir: Path) -> None:
    worker = fleetprocs.worker(
        tmp_path,
        models_dir,
        "--slots",
        "2",
        SERVELM_DRAIN_SECONDS=str(DRAIN),
        SERVELM_LOG_FORMAT="json",
    ).start()
    worker.wait_ready()
    assert worker.proc is not None

    async def scenario() -> tuple[list[tuple[int, str]], float | None]:
        chats = asyncio.create_task(long_prompts(worker.url, 2))
        loop = asyncio.get_running_loop()

        def running() -> int:
            return int(httpx.get(f"{worker.url}/health", timeout=60).json()["slots_busy"])

        # A prompt is in llama.cpp when the signal comes (the other may still be
        # counted or waiting: the drain cuts it all the same).
        while await loop.run_in_executor(None, running) < 1:
            assert not chats.done(), chats.result()
            await asyncio.sleep(0.5)
        assert worker.proc is not None
        worker.proc.send_signal(signal.SIGTERM)
        sent = time.monotonic()
        results = await chats
        try:
            await loop.run_in_executor(None, lambda: worker.proc and worker.proc.wait(EXIT_BOUND))
        except subprocess.TimeoutExpired:
            return results, None
        return results, time.monotonic() - sent

    try:
        results, exited_after = asyncio.run(scenario())
    finally:
        if worker.proc.poll() is None:
            worker.kill()
    log = worker.log.read_text()
    assert exited_after is not None, f"still running {EXIT_BOUND} s after SIGTERM:\n{log[-3000:]}"
    assert worker.proc.returncode == 0
    # Both were cut as the drain cuts: a 503 before anything was sent (nothing to pay),
    # or, on a stream that had begun, an error event after what it sent (a gateway
    # charges what it relayed).
    for status, text in results:
        if status == 200:
            events = [line.removeprefix("data: ") for line in text.splitlines() if line]
            error = json.loads(events[-1])["error"]
        else:
            assert status == 503, text
            error = json.loads(text)["error"]
        assert error["code"] == "overloaded", text
    assert "drain window over: stopping 2 requests" in log, log[-3000:]
    # The engine closed as on any stop: its model's process ended without finishing
    # the prompts of the requests that were cut.
    assert "Application shutdown complete" in log, log[-3000:]
