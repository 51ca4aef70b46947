"""How fast the excess is refused while the real engine is saturated (issue 13, point 4).

    .venv/bin/python bench/overload.py [--sent 40 --rounds 3]

One `servelm serve` with the default model (SmolLM2) on 2 slots, a queue of 2 and an
in-flight cap of 8, like tests/access/test_overload.py, which checks the money
and the statuses. This script measures what that test cannot measure fairly: an
httpx client spends milliseconds of its own CPU on each of 40 requests, so the last
request sent waits behind the client, not the server. Here every connection is open
before the burst, each request is one prepared ``send``, and each latency runs from
that request's own send to the first byte of its answer. A probe reads ``/healthz``
every 10 ms throughout. Writes bench/results/overload.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gateway_overhead import BIN, RESULTS, Proc, first_key, free_port, machine, wait_http

SLOTS, QUEUE, INFLIGHT = 2, 2, 8


def start(port: int) -> tuple[Proc, str]:
    data = Path(tempfile.mkdtemp(prefix="servelm-overload-"))
    env = {
        **os.environ,
        "SERVELM_DATA_DIR": str(data),
        "SERVELM_STARTER_CREDITS": "1000000",
        "SERVELM_LOG_LEVEL": "warning",
        "SERVELM_SLOTS": str(SLOTS),
        "SERVELM_QUEUE_SIZE": str(QUEUE),
        "SERVELM_MAX_INFLIGHT": str(INFLIGHT),
    }
    proc = Proc([str(BIN / "servelm"), "serve", "--port", str(port)], env)
    wait_http(f"http://127.0.0.1:{port}/readyz")
    return proc, first_key(data, proc)


def request(port: int, key: str) -> bytes:
    body = json.dumps(
        {
            "model": "smollm2-135m-instruct",
            "messages": [{"role": "user", "content": "Count to ten."}],
            "max_tokens": 24,
            "ignore_eos": True,
            "stream": True,
        }
    ).encode()
    return (
        f"POST /v1/chat/completions HTTP/1.1\r\nhost: 127.0.0.1:{port}\r\n"
        f"x-api-key: {key}\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\nconnection: close\r\n\r\n"
    ).encode() + body


async def one(
    conn: tuple[asyncio.StreamReader, asyncio.StreamWriter], payload: bytes
) -> tuple[int, float]:
    reader, writer = conn
    sent = time.perf_counter()
    writer.write(payload)
    status_line = await reader.readline()
    first = time.perf_counter() - sent
    await reader.read()  # the rest, so served streams run to the end
    writer.close()
    return int(status_line.split()[1]), first


async def probe(port: int, stop: asyncio.Event) -> list[float]:
    seen: list[float] = []
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    ask = f"GET /healthz HTTP/1.1\r\nhost: 127.0.0.1:{port}\r\n\r\n".encode()
    while not stop.is_set():
        started = time.perf_counter()
        writer.write(ask)
        head = await reader.readuntil(b"\r\n\r\n")
        length = int(re.search(rb"content-length: (\d+)", head, re.I).group(1))  # type: ignore[union-attr]
        await reader.readexactly(length)
        seen.append(time.perf_counter() - started)
        await asyncio.sleep(0.01)
    writer.close()
    return seen


async def burst(port: int, key: str, sent: int) -> dict[str, Any]:
    payload = request(port, key)
    conns = [await asyncio.open_connection("127.0.0.1", port) for _ in range(sent)]
    stop = asyncio.Event()
    prober = asyncio.create_task(probe(port, stop))
    await asyncio.sleep(0.5)  # the probe's baseline before the burst
    results = await asyncio.gather(*(one(c, payload) for c in conns))
    stop.set()
    health = await prober
    shed = sorted(t * 1000 for s, t in results if s == 503)
    served = sorted(t * 1000 for s, t in results if s == 200)
    health_ms = sorted(h * 1000 for h in health)
    return {
        "served": len(served),
        "shed": len(shed),
        "other": sorted({s for s, _ in results if s not in (200, 503)}),
        "shed_ms": {"p50": statistics.median(shed), "max": shed[-1]} if shed else None,
        "healthz_ms": {
            "n": len(health_ms),
            "p50": statistics.median(health_ms),
            "p99": health_ms[min(len(health_ms) - 1, int(len(health_ms) * 0.99))],
            "max": health_ms[-1],
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sent", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    port = free_port()
    proc, key = start(port)
    try:
        rounds = [asyncio.run(burst(port, key, args.sent)) for _ in range(args.rounds)]
    finally:
        proc.stop()
    for r in rounds:
        print(json.dumps(r))
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / "overload.json"
    out.write_text(
        json.dumps({"machine": machine(), "sent": args.sent, "rounds": rounds}, indent=1)
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
