"""What the connection guards (servelm.api.conn_guard) cost per request: uvicorn with its
own httptools protocol against the guarded one, serving a trivial ASGI app, so the
difference is the protocol's alone. Keep-alive connections, 1 and 16 in flight;
server CPU per request (from /proc) and client-side latency p50/p99; the two
protocols alternate, ``--repeats`` times each, and the medians are reported.

    .venv/bin/python bench/conn_guard_overhead.py [--requests 5000] [--repeats 3]
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

BODY = b'{"ok":true}'


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        return
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [(b"content-type", b"application/json"), (b"content-length", b"11")],
        }
    )
    await send({"type": "http.response.body", "body": BODY})


def serve(kind: str, port: int) -> None:
    import uvicorn
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    from servelm.api import conn_guard

    http: Any = (
        HttpToolsProtocol if kind == "plain" else conn_guard.protocol_for(conn_guard.ConnLimits())
    )
    uvicorn.run(app, host="127.0.0.1", port=port, http=http, log_config=None, access_log=False)


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / 100  # clock ticks (SC_CLK_TCK = 100)


async def one_connection(port: int, n: int, latencies: list[float]) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    request = b"GET / HTTP/1.1\r\nHost: bench\r\nUser-Agent: bench\r\nAccept: */*\r\n\r\n"
    for _ in range(n):
        start = time.perf_counter()
        writer.write(request)
        head = await reader.readuntil(b"\r\n\r\n")
        length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
        await reader.readexactly(length)
        latencies.append(time.perf_counter() - start)
    writer.close()


async def load(port: int, requests: int, concurrency: int) -> list[float]:
    latencies: list[float] = []
    per = requests // concurrency
    await asyncio.gather(*(one_connection(port, per, latencies) for _ in range(concurrency)))
    return latencies


def run_one(kind: str, requests: int, concurrency: int) -> dict[str, float]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    argv = [sys.executable, __file__, "--serve", kind, "--port", str(port)]
    proc = subprocess.Popen(argv)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        asyncio.run(load(port, 200, concurrency))  # warm up
        before = cpu_seconds(proc.pid)
        latencies = sorted(asyncio.run(load(port, requests, concurrency)))
        cpu = cpu_seconds(proc.pid) - before
    finally:
        proc.terminate()
        proc.wait()
    return {
        "cpu_us": cpu / len(latencies) * 1e6,
        "p50_ms": latencies[len(latencies) // 2] * 1000,
        "p99_ms": latencies[int(len(latencies) * 0.99)] * 1000,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--serve", choices=["plain", "guarded"])
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--requests", type=int, default=5000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    if args.serve:
        serve(args.serve, args.port)
        return
    for concurrency in (1, 16):
        runs: dict[str, list[dict[str, float]]] = {"plain": [], "guarded": []}
        for _ in range(args.repeats):
            for kind in runs:
                runs[kind].append(run_one(kind, args.requests, concurrency))
        for kind, results in runs.items():
            med = {k: statistics.median(r[k] for r in results) for k in results[0]}
            print(
                f"c={concurrency:<3} {kind:8} cpu {med['cpu_us']:6.1f} us/req  "
                f"p50 {med['p50_ms']:.3f} ms  p99 {med['p99_ms']:.3f} ms",
                flush=True,
            )


if __name__ == "__main__":
    main()
