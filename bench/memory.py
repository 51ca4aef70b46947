"""Gateway memory: RSS with 1,000 streams open at once (a slow upstream keeps them
open), and RSS sampled through a long run at a steady request rate (leak check).

    .venv/bin/python bench/memory.py --streams 1000 --leak-minutes 10 --rate 300

servelm runs as a gateway node (no local model), pinned to CPU 0 like in the gateway
benchmark; the long run streams at about half of what that one core serves
(500-640 streams/s measured).

Writes bench/results/memory.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from servelm.cli.loadgen import bench

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gateway_overhead import (
    CLIENT_CPU,
    GATEWAY_CPU,
    RESULTS,
    machine,
    rss_mib,
    start_servelm,
    start_upstream,
)


async def open_streams(url: str, key: str, n: int, pid: int, tokens: int) -> dict[str, Any]:
    """Open ``n`` streams, wait until every one has its first chunk, sample RSS, then
    let them finish."""
    limits = httpx.Limits(max_connections=n + 10)
    first = asyncio.Event()
    started = 0
    done = 0
    body = {
        "model": "instant",
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": tokens,
        "stream": True,
    }
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:

        async def one() -> None:
            nonlocal started, done
            async with client.stream(
                "POST", f"{url}/chat/completions", json=body, headers={"x-api-key": key}
            ) as r:
                assert r.status_code == 200, await r.aread()
                counted = False
                async for line in r.aiter_lines():
                    if not counted and line.startswith("data: "):
                        counted = True
                        started += 1
                        if started == n:
                            first.set()
            done += 1

        tasks = [asyncio.create_task(one()) for _ in range(n)]
        await asyncio.wait_for(first.wait(), timeout=300)
        peak = 0.0
        for _ in range(5):
            peak = max(peak, rss_mib(pid))
            await asyncio.sleep(0.2)
        await asyncio.gather(*tasks)
    return {"streams": n, "open_rss_mib": peak, "completed": done}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--streams", type=int, default=1000)
    parser.add_argument("--leak-minutes", type=float, default=10)
    parser.add_argument("--rate", type=float, default=300, help="streams/s for the long run")
    parser.add_argument("--out", type=Path, default=RESULTS / "memory.json")
    args = parser.parse_args()
    results: dict[str, Any] = {"machine": machine()}

    slow, slow_url = start_upstream(chunk_delay=1.0)
    os.sched_setaffinity(0, {CLIENT_CPU})
    gw, url, key = start_servelm(slow_url, slots=args.streams + 10, cpu=GATEWAY_CPU)
    try:
        # Warm every code path once, then measure idle.
        asyncio.run(open_streams(url, key, 10, gw.p.pid, tokens=2))
        results["idle_rss_mib"] = rss_mib(gw.p.pid)
        results.update(asyncio.run(open_streams(url, key, args.streams, gw.p.pid, tokens=20)))
        results["after_streams_rss_mib"] = rss_mib(gw.p.pid)
        print(json.dumps(results, indent=2), flush=True)
    finally:
        gw.stop()
        slow.stop()

    fast, fast_url = start_upstream(chunk_delay=0.0)
    gw, url, key = start_servelm(fast_url, slots=256, cpu=GATEWAY_CPU)
    try:

        def one_minute() -> dict[str, Any]:
            return asyncio.run(
                bench.run(
                    f"{url}/chat/completions",
                    model="instant",
                    load=bench.Load(rate=args.rate),
                    requests=int(args.rate * 60),
                    input_len=32,
                    output_len=16,
                    api_key=key,
                )
            )

        results["cold_rss_mib"] = rss_mib(gw.p.pid)
        # One unmeasured minute first: allocator arenas, caches and pooled connections
        # fill up once; a leak is growth after that.
        one_minute()
        samples = [(0.0, rss_mib(gw.p.pid))]
        print(f"  after a warm-up minute: RSS {samples[0][1]:7.1f} MiB", flush=True)
        began = time.monotonic()
        while time.monotonic() - began < args.leak_minutes * 60:
            r = one_minute()
            samples.append(((time.monotonic() - began) / 60, rss_mib(gw.p.pid)))
            print(
                f"  minute {samples[-1][0]:5.1f}: RSS {samples[-1][1]:7.1f} MiB, "
                f"{r['completed']} ok, {r['failed']} failed",
                flush=True,
            )
        results["long_run"] = {"rate": args.rate, "rss_mib_by_minute": samples}
    finally:
        gw.stop()
        fast.stop()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
