"""What one streamed chat completion costs an HTTP client: httpx, aiohttp and
servelm.engines.http1 against the instant upstream.

    .venv/bin/python bench/http_clients.py     # needs the bench extra (aiohttp)

Each client runs in its own process pinned to CPU 0 (the upstream has CPU 1), keeps
its connections alive, reads a 16-token SSE stream and parses every event, as the
gateway's relay does. Reported: requests/s and the client's CPU per request. This is
why servelm carries its own client (docs/benchmarks.md). Writes
bench/results/http_clients.json.
"""

from __future__ import annotations

import asyncio
import json
import resource
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gateway_overhead import RESULTS, machine, pinned, start_upstream

BODY = json.dumps(
    {
        "model": "instant",
        "messages": [{"role": "user", "content": "hi " * 64}],
        "max_tokens": 16,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
).encode()
HEADERS = {"content-type": "application/json"}
CLIENTS = ("httpx", "aiohttp", "servelm.engines.http1")


async def with_httpx(base: str) -> tuple[Callable[[], Awaitable[int]], Callable[[], Any]]:
    import httpx

    client = httpx.AsyncClient(base_url=base)

    async def one() -> int:
        n = 0
        async with client.stream("POST", "/chat/completions", content=BODY, headers=HEADERS) as r:
            async for line in r.aiter_lines():
                if line.startswith("data:") and line[5:].strip() != "[DONE]":
                    json.loads(line[5:])
                    n += 1
        return n

    return one, client.aclose


async def with_aiohttp(base: str) -> tuple[Callable[[], Awaitable[int]], Callable[[], Any]]:
    import aiohttp

    session = aiohttp.ClientSession()

    async def one() -> int:
        n = 0
        async with session.post(f"{base}/chat/completions", data=BODY, headers=HEADERS) as r:
            async for line in r.content:
                if line.startswith(b"data:") and line[5:].strip() != b"[DONE]":
                    json.loads(line[5:])
                    n += 1
        return n

    return one, session.close


async def with_http1(base: str) -> tuple[Callable[[], Awaitable[int]], Callable[[], Any]]:
    from servelm.engines import http1

    pool = http1.Pool(base)

    async def one() -> int:
        n = 0
        async with await pool.request("POST", "/chat/completions", BODY) as r:
            async for data in http1.sse_data(r.iter_bytes()):
                if data != b"[DONE]":
                    json.loads(data)
                    n += 1
        return n

    return one, pool.aclose


async def measure(client: str, base: str, concurrency: int, requests: int) -> dict[str, Any]:
    make = {"httpx": with_httpx, "aiohttp": with_aiohttp, "servelm.engines.http1": with_http1}[
        client
    ]
    one, close = await make(base)
    for _ in range(50):
        assert await one() == 19  # role, 16 tokens, finish, usage
    left = requests

    async def worker() -> None:
        nonlocal left
        while left > 0:
            left -= 1
            await one()

    usage = resource.getrusage(resource.RUSAGE_SELF)
    cpu0 = usage.ru_utime + usage.ru_stime
    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    wall = time.perf_counter() - t0
    usage = resource.getrusage(resource.RUSAGE_SELF)
    await close()
    return {
        "client": client,
        "concurrency": concurrency,
        "requests_per_s": requests / wall,
        "cpu_us_per_request": (usage.ru_utime + usage.ru_stime - cpu0) * 1e6 / requests,
    }


def main() -> None:
    if len(sys.argv) == 5 and sys.argv[1] == "--one":
        import uvloop

        _, client, base, concurrency = sys.argv[1:]
        print(json.dumps(uvloop.run(measure(client, base, int(concurrency), 3000))))
        return
    upstream, base = start_upstream()
    results: dict[str, Any] = {"machine": machine(), "points": []}
    try:
        for concurrency in (1, 16):
            for client in CLIENTS:
                argv = [sys.executable, __file__, "--one", client, base, str(concurrency)]
                out = subprocess.run(pinned(0, argv), capture_output=True, text=True, check=True)
                point = json.loads(out.stdout)
                results["points"].append(point)
                print(
                    f"{client:14} c={concurrency:<3} {point['requests_per_s']:7.0f} req/s"
                    f"  {point['cpu_us_per_request']:6.0f} us CPU per request",
                    flush=True,
                )
    finally:
        upstream.stop()
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "http_clients.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
