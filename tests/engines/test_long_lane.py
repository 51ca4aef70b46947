"""The long-prompt lane (``engines.llamacpp``): prompts of ``SERVELM_LONG_PROMPT_TOKENS``
and more run in a second process of their model, at a lower CPU priority, so that
their prefill cannot stall short requests (issue 25.1); a short prompt never starts
it; a lane whose process died starts again at the next long prompt while the model
keeps serving; closing the engine ends both processes; and the budget counts the
lane from the load. The latency it buys is measured in bench/kv_admission.py."""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path
from typing import Any

from servelm.catalog.specs import ModelSpec
from servelm.config import Settings
from servelm.engines import gguf_files, llamacpp
from servelm.engines.llamacpp import LONG_LANE_NICE, PROCESS_BYTES, LlamaCppEngine
from tests.engines.test_engine_process import reaped
from tests.support.prompts import word_prompt

LONG_FROM = 256


def body(content: str) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": content}], "max_tokens": 2, "temperature": 0}


async def usage(engine: LlamaCppEngine, content: str) -> dict[str, int]:
    """Run the request to its end; the engine's usage."""
    last: dict[str, Any] = {}
    async for chunk in engine.stream(body(content)):
        last = chunk
    return dict(last["usage"])


def nice_values(pid: int) -> set[int]:
    """The nice value of each of the process's threads (Linux keeps one per thread;
    field 19 of ``/proc/PID/task/TID/stat``)."""
    out = set()
    for task in Path(f"/proc/{pid}/task").iterdir():
        fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        out.add(int(fields[16]))
    return out


async def test_long_prompts_run_in_a_second_process_at_a_lower_priority(
    seed_models: dict[str, Path],
) -> None:
    spec = ModelSpec(slug="lanes", path=seed_models["llama-v3p1-8b-instruct"], context_window=2048)
    engine = LlamaCppEngine(spec, threads=1, slots=2, queue_size=4, long_prompt_tokens=LONG_FROM)
    await engine.start()
    main = engine.pid
    assert main is not None
    ours = os.getpriority(os.PRIO_PROCESS, 0)
    lanes: list[int] = []
    try:
        short = await usage(engine, "hi")
        assert short["prompt_tokens"] < LONG_FROM
        assert engine.long_lane_pid is None  # a short prompt never starts it

        text = word_prompt(7, 400)
        tokens = await engine.count_prompt(body(text))
        assert tokens >= LONG_FROM
        assert (await usage(engine, text))["prompt_tokens"] == tokens
        lane = engine.long_lane_pid
        assert lane is not None and lane != main
        lanes.append(lane)
        # Every thread of the lane's process runs niced; the model's first process not.
        assert nice_values(lane) == {ours + LONG_LANE_NICE}
        assert nice_values(main) == {ours}
        # The long prompt was prefilled there, not in the first process.
        described = engine.describe()["long_prompt_lane"]
        assert described == {"from_prompt_tokens": LONG_FROM, "running": True, "kv_used": 0}
        totals = await engine.metrics()
        assert totals["prompt_tokens_total"] >= tokens + short["prompt_tokens"]

        # The lane's process dies (the OOM killer): the model still serves short
        # prompts, and the next long one starts the lane again.
        os.kill(lane, signal.SIGKILL)
        # Seen once this loop reaps it (the engine's process watcher runs here).
        async with asyncio.timeout(30):
            while engine.describe()["long_prompt_lane"]["running"]:
                await asyncio.sleep(0.02)
        assert engine.alive()
        assert (await usage(engine, "hi"))["prompt_tokens"] == short["prompt_tokens"]
        assert engine.long_lane_pid is None  # nothing starts it again before it is needed
        assert (await usage(engine, word_prompt(8, 400)))["prompt_tokens"] >= LONG_FROM
        again = engine.long_lane_pid
        assert again is not None and again not in (lane, main)
        lanes.append(again)
    finally:
        await engine.close()
    assert reaped(main) and all(reaped(pid) for pid in lanes)
    assert engine.long_lane_pid is None and engine.pid is None


def test_the_budget_counts_the_lane_from_the_load(seed_models: dict[str, Path]) -> None:
    path = seed_models["llama-v3p1-8b-instruct"]
    spec = ModelSpec(slug="lanes", path=path, context_window=2048)
    without = llamacpp.footprint(spec, Settings(long_prompt_tokens=0))
    with_lane = llamacpp.footprint(spec, Settings(long_prompt_tokens=LONG_FROM))
    assert without is not None and with_lane is not None
    assert with_lane - without == gguf_files.kv_cache_bytes(path, 2048) + PROCESS_BYTES
    # A window no larger than the threshold: no lane, nothing more counted.
    small = ModelSpec(slug="small", path=path, context_window=LONG_FROM)
    assert llamacpp.footprint(small, Settings(long_prompt_tokens=LONG_FROM)) == llamacpp.footprint(
        small, Settings(long_prompt_tokens=0)
    )
