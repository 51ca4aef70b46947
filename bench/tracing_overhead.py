"""What tracing (servelm.telemetry.tracing) costs per chat request: the request
context middleware around a chat route that builds the hop's headers, as the
gateway runs them, called directly (no sockets, so the difference is tracing's
alone). Tracing off, then on with the file exporter writing to /dev/null (a span
made, ended and serialized per request); the two alternate, ``--repeats`` times
each, and the medians are reported as CPU per request and the on/off ratio.

    .venv/bin/python bench/tracing_overhead.py [--requests 20000] [--repeats 3]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from typing import Any

from servelm.api.middleware import RequestContextMiddleware
from servelm.api.paths import OPENAI_CHAT
from servelm.config import Settings
from servelm.telemetry import tracing

START = {"type": "http.response.start", "status": 200, "headers": []}
BODY = {"type": "http.response.body", "body": b"{}"}


async def chat(scope: dict[str, Any], receive: Any, send: Any) -> None:
    tracing.hop_headers()  # what a relay to a replica sends
    await send(START)
    await send(BODY)


async def run(requests: int) -> float:
    app = RequestContextMiddleware(chat)  # type: ignore[arg-type]
    headers = [(b"host", b"bench"), (b"content-type", b"application/json")]

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"{}", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        return None

    started = time.process_time()
    for _ in range(requests):
        scope = {"type": "http", "method": "POST", "path": OPENAI_CHAT, "headers": headers}
        await app(scope, receive, send)
    return (time.process_time() - started) / requests


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=20000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    on = Settings(trace_exporter="file", trace_file="/dev/null")  # type: ignore[arg-type]
    results: dict[str, list[float]] = {"off": [], "on": []}
    asyncio.run(run(2000))  # warm-up
    for _ in range(args.repeats):
        tracing.shutdown()
        results["off"].append(asyncio.run(run(args.requests)))
        tracing.setup(on, "bench")
        results["on"].append(asyncio.run(run(args.requests)))
    tracing.shutdown()
    off, traced = statistics.median(results["off"]), statistics.median(results["on"])
    print("| tracing | CPU per request |")
    print("|---|---|")
    print(f"| off | {off * 1e6:.1f} µs |")
    print(f"| on (file exporter, /dev/null) | {traced * 1e6:.1f} µs |")
    print(f"on / off: {traced / off:.2f}×, +{(traced - off) * 1e6:.1f} µs per request")


if __name__ == "__main__":
    main()
