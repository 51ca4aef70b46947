"""A slowloris flood at the size the issue names (issue 25, acceptance 2).

    .venv/bin/python bench/slowloris.py [--heads 20000 --procs 2]

One `servelm serve` with its default settings (header deadline 10 s, 256 connections
per address) and the default model. First, quietly, a client on 127.0.0.1 reads
``/health`` and makes short chat requests; then ``--procs`` processes open ``--heads``
connections from 127.0.0.2, each sending an unfinished request head and one more
header byte every second (the classic drip), while the same client measures again;
quiet and flooded phases alternate for `--rounds` rounds.
Reported: p50 of ``/health`` and of a chat during the flood as a ratio of the quiet
p50, how many flood connections the server refused at once (429, past the per-address
share) or closed at the deadline (408), and the longest any one of them stayed open.
The flood is split over processes because one process may hold only 20,000 files
here. Writes bench/results/slowloris.json.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import resource
import selectors
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
import contextlib

from gateway_overhead import BIN, RESULTS, Proc, free_port, machine, wait_http

FLOOD_ADDRESS = "127.0.0.2"


def start(port: int) -> tuple[Proc, str, Path]:
    data = Path(tempfile.mkdtemp(prefix="servelm-slowloris-"))
    env = {
        **os.environ,
        "SERVELM_DATA_DIR": str(data),
        "SERVELM_STARTER_CREDITS": "1000000",
        "SERVELM_LOG_LEVEL": "warning",
    }
    proc = Proc([str(BIN / "servelm"), "serve", "--port", str(port)], env)
    wait_http(f"http://127.0.0.1:{port}/readyz")
    # Not a terminal: the first-start key is written beside the data, mode 0600.
    return proc, (data / "first-api-key").read_text().strip(), data


def flood(port: int, heads: int, hold: float, out: Any) -> None:
    """Open ``heads`` unfinished heads, drip a byte a second, and report what the
    server did to each: refused at once, closed later (after how long), or still open."""
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, heads + 256), hard))
    sel = selectors.DefaultSelector()
    opened: dict[socket.socket, float] = {}
    socket_of: dict[int, socket.socket] = {}
    closed_after: list[float] = []
    refused = 0
    statuses: dict[str, int] = {}
    for _ in range(heads):
        sock = socket.socket()
        sock.bind((FLOOD_ADDRESS, 0))
        sock.setblocking(False)
        with contextlib.suppress(BlockingIOError):  # a non-blocking connect under way
            sock.connect(("127.0.0.1", port))
        opened[sock] = time.monotonic()
        socket_of[sock.fileno()] = sock
        sel.register(sock, selectors.EVENT_READ)
    time.sleep(0.2)  # connects finish on loopback
    for sock in list(opened):
        with contextlib.suppress(OSError):  # closed by the server: read and counted below
            sock.send(b"GET /health HTTP/1.1\r\nHost: x\r\n")
    end = time.monotonic() + hold
    next_drip = time.monotonic() + 1.0
    while opened and time.monotonic() < end:
        for key, _ in sel.select(timeout=0.1):
            sock = socket_of[key.fd]
            try:
                data = sock.recv(4096)
            except OSError:
                data = b""
            status = data[9:12].decode(errors="replace") if data.startswith(b"HTTP/") else "reset"
            statuses[status] = statuses.get(status, 0) + 1
            since = time.monotonic() - opened.pop(sock)
            if status == "429":
                refused += 1
            else:
                closed_after.append(since)
            sel.unregister(sock)
            sock.close()
        if time.monotonic() >= next_drip:
            next_drip += 1.0
            for sock in list(opened):
                with contextlib.suppress(OSError):  # closed: counted when read
                    sock.send(b"x")
    out.put(
        {
            "heads": heads,
            "refused_at_once": refused,
            "closed_later": len(closed_after),
            "still_open": len(opened),
            "longest_open_s": max(closed_after, default=0.0),
            "statuses": statuses,
        }
    )
    for sock in opened:
        sock.close()


def measure(port: int, key: str, seconds: float) -> dict[str, list[float]]:
    """Sequential /health reads and short chats from 127.0.0.1 for ``seconds``."""
    transport = httpx.HTTPTransport(local_address="127.0.0.1")
    health: list[float] = []
    chat: list[float] = []
    body = {
        "model": "smollm2-135m-instruct",
        "messages": [{"role": "user", "content": "Say hi."}],
        "max_tokens": 4,
    }
    with httpx.Client(
        base_url=f"http://127.0.0.1:{port}", transport=transport, timeout=60
    ) as client:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            t = time.perf_counter()
            assert client.get("/health").status_code == 200
            health.append(time.perf_counter() - t)
            t = time.perf_counter()
            r = client.post("/v1/chat/completions", json=body, headers={"x-api-key": key})
            assert r.status_code == 200, r.text
            chat.append(time.perf_counter() - t)
    return {"health": health, "chat": chat}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--heads", type=int, default=20_000)
    parser.add_argument("--procs", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=15.0, help="each phase")
    parser.add_argument("--rounds", type=int, default=3, help="quiet, then flooded")
    args = parser.parse_args()
    port = free_port()
    proc, key, _ = start(port)
    quiet: dict[str, list[float]] = {"health": [], "chat": []}
    loud: dict[str, list[float]] = {"health": [], "chat": []}
    reports = []
    try:
        # Quiet and flooded phases alternate, so the machine's own drift (other
        # processes on these shared cores) falls on both alike.
        for _ in range(args.rounds):
            for k, v in measure(port, key, args.seconds).items():
                quiet[k] += v
            queue: Any = mp.Queue()
            share = args.heads // args.procs
            hold = args.seconds + 15
            flooders = [
                mp.Process(target=flood, args=(port, share, hold, queue)) for _ in range(args.procs)
            ]
            for f in flooders:
                f.start()
            time.sleep(3)  # the flood is open before the measurement starts
            for k, v in measure(port, key, args.seconds).items():
                loud[k] += v
            reports += [queue.get(timeout=args.seconds + 120) for _ in flooders]
            for f in flooders:
                f.join()
    finally:
        proc.stop()
    p50 = {k: statistics.median(v) for k, v in quiet.items()}
    p50_loud = {k: statistics.median(v) for k, v in loud.items()}
    result = {
        "machine": machine(),
        "heads": args.heads,
        "rounds": args.rounds,
        "quiet_p50_ms": {k: v * 1000 for k, v in p50.items()},
        "flood_p50_ms": {k: v * 1000 for k, v in p50_loud.items()},
        "ratio": {k: p50_loud[k] / p50[k] for k in p50},
        "samples": {k: (len(quiet[k]), len(loud[k])) for k in quiet},
        "flood": reports,
    }
    (RESULTS / "slowloris.json").write_text(json.dumps(result, indent=2))
    print(json.dumps({k: v for k, v in result.items() if k != "machine"}, indent=2))


if __name__ == "__main__":
    main()
