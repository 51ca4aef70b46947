"""What the embedded engine's exact prompt count costs before admission (issue 15,
goal 4): the two calls into llama.cpp's HTTP routes (apply-template, tokenize) timed
alone and while N generations run, against the generation's own time to first token.

    .venv/bin/python bench/prompt_count.py            # concurrency 0, 8, 32

Each point: the count's p50/p90 over ``--counts`` counts issued one after another
while ``N`` streams of ``--output-len`` tokens keep every slot busy; and the TTFT p50
of those streams. Results: bench/results/prompt_count.json.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from servelm.catalog.builtins import default_spec
from servelm.config import default_data_dir
from servelm.engines.llamacpp import LlamaCppEngine

RESULTS = Path(__file__).resolve().parent / "results"


def body(i: int) -> dict[str, Any]:
    words = " ".join(f"word{(i * 7 + k) % 997}" for k in range(24))
    return {
        "messages": [{"role": "user", "content": f"{i}: {words}"}],
        "max_tokens": 32,
        "ignore_eos": True,
    }


async def stream_forever(
    engine: LlamaCppEngine, i: int, ttfts: list[float], stop: asyncio.Event
) -> None:
    try:
        await _streams(engine, i, ttfts, stop)
    except Exception as exc:
        ERRORS.append(repr(exc))


ERRORS: list[str] = []


async def _streams(engine: LlamaCppEngine, i: int, ttfts: list[float], stop: asyncio.Event) -> None:
    while not stop.is_set():
        start = time.perf_counter()
        first = True
        async for _ in engine.stream(body(i)):
            if first:
                ttfts.append((time.perf_counter() - start) * 1000)
                first = False
        i += 1000


async def _first_tokens(ttfts: list[float], streams: int) -> None:
    while len(ttfts) < streams:  # noqa: ASYNC110 (a list the stream tasks append to)
        await asyncio.sleep(0.05)


async def point(engine: LlamaCppEngine, streams: int, counts: int) -> dict[str, Any]:
    stop = asyncio.Event()
    ttfts: list[float] = []
    tasks = [asyncio.create_task(stream_forever(engine, i, ttfts, stop)) for i in range(streams)]
    # Every slot busy: wait until each stream has produced its first token.
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(_first_tokens(ttfts, streams), timeout=30)
    took = []
    for i in range(counts):
        start = time.perf_counter()
        await engine.count_prompt_tokens(body(10_000 + i))
        took.append((time.perf_counter() - start) * 1000)
    stop.set()
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    took.sort()
    return {
        "streams": streams,
        "count_p50_ms": statistics.median(took),
        "count_p90_ms": took[int(len(took) * 0.9)],
        "stream_ttft_p50_ms": statistics.median(ttfts) if ttfts else None,
        "stream_errors": ERRORS[:1],
    }


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--streams", default="0,8,32")
    parser.add_argument("--counts", type=int, default=50)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    spec = default_spec(default_data_dir() / "models")
    levels = [int(s) for s in args.streams.split(",")]
    engine = LlamaCppEngine(spec, threads=args.threads, slots=max([*levels, 1]), queue_size=4096)
    await engine.start()
    try:
        points = []
        for n in levels:
            points.append(await point(engine, n, args.counts))
            print(json.dumps(points[-1]), flush=True)
    finally:
        await engine.close()
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "prompt_count.json").write_text(
        json.dumps({"points": points, "argv": sys.argv[1:]}, indent=2)
    )


if __name__ == "__main__":
    asyncio.run(main())
