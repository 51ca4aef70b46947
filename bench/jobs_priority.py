"""Issue 28, acceptance 4: queued work runs on the capacity interactive traffic leaves.

One gateway process with the small model (``servelm serve``, default slots), three
measurements in one run:

1. ``idle``: the batch's own throughput on an otherwise idle server (lines/s from
   creation to ``completed``) against the same lines sent synchronously to
   ``/v1/chat/completions`` at concurrency 1, 2, 4 and 8; the ratio is to the best.
2. ``alone``: 8 interactive streaming clients (a key each, closed loop) and their
   time to first token, no batch running.
3. ``with_batch``: the same 8 clients while a ``--lines`` batch runs (measured once
   the batch has started completing lines); the ratio of the TTFT p50s.

    flock /tmp/servelm-bench.lock .venv/bin/python bench/jobs_priority.py
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import openai

# The suite's process and account helpers, from the checkout this script is in.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from servelm.config import Settings, default_data_dir
from servelm.store.db import Database
from tests import procs
from tests.conftest import provision

SLUG = "smollm2-135m-instruct"
CHAT = "/v1/chat/completions"
RESULTS = Path(__file__).parent / "results"


def line_body(i: int, max_tokens: int) -> dict[str, Any]:
    return {
        "model": SLUG,
        "messages": [{"role": "user", "content": f"Write a line about the number {i}."}],
        "max_tokens": max_tokens,
        "temperature": 0,
    }


def jsonl(n: int, max_tokens: int) -> bytes:
    rows = [
        json.dumps(
            {"custom_id": f"r{i}", "method": "POST", "url": CHAT, "body": line_body(i, max_tokens)}
        )
        for i in range(n)
    ]
    return ("\n".join(rows) + "\n").encode()


def run_batch(client: openai.OpenAI, n: int, max_tokens: int) -> tuple[str, float]:
    """Create an n-line batch; its id and the time it was created (monotonic)."""
    f = client.files.create(file=("in.jsonl", jsonl(n, max_tokens)), purpose="batch")
    t0 = time.monotonic()
    batch = client.batches.create(input_file_id=f.id, endpoint=CHAT, completion_window="24h")
    return batch.id, t0


def wait_batch(client: openai.OpenAI, batch_id: str) -> Any:
    while (b := client.batches.retrieve(batch_id)).status not in ("completed", "failed"):
        time.sleep(0.2)
    return b


def sync_throughput(base: str, key: str, n: int, max_tokens: int, concurrency: int) -> float:
    """Lines per second sending the batch's lines to /v1/chat/completions directly."""
    with httpx.Client(base_url=base, headers={"x-api-key": key}, timeout=300) as h:

        def one(i: int) -> None:
            r = h.post(CHAT, json=line_body(i, max_tokens))
            r.raise_for_status()

        t0 = time.monotonic()
        with ThreadPoolExecutor(concurrency) as pool:
            list(pool.map(one, range(n)))
        return n / (time.monotonic() - t0)


def interactive(base: str, keys: list[str], requests: int, max_tokens: int) -> list[float]:
    """8 streaming clients, closed loop: each client's time to first content token."""
    ttfts: list[float] = []
    lock = threading.Lock()

    def client(n: int) -> None:
        c = openai.OpenAI(base_url=f"{base}/v1", api_key=keys[n], max_retries=0)
        for i in range(requests):
            t0 = time.monotonic()
            stream = c.chat.completions.create(
                model=SLUG,
                messages=[{"role": "user", "content": f"Client {n} asks question {i}."}],
                max_tokens=max_tokens,
                stream=True,
            )
            first = None
            for chunk in stream:
                if first is None and chunk.choices and chunk.choices[0].delta.content:
                    first = time.monotonic() - t0
            assert first is not None, "no content streamed"
            with lock:
                ttfts.append(first)

    with ThreadPoolExecutor(len(keys)) as pool:
        list(pool.map(client, range(len(keys))))
    return ttfts


def p50(xs: list[float]) -> float:
    return statistics.median(xs)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--lines", type=int, default=1000)
    ap.add_argument("--line-tokens", type=int, default=8)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--requests", type=int, default=12, help="per interactive client")
    ap.add_argument("--tokens", type=int, default=16, help="per interactive request")
    ap.add_argument("--threads", default="2")
    ap.add_argument("--sync", default="1,2,4,8", help="concurrencies of the synchronous sends")
    ap.add_argument("--slots", default="4")
    ap.add_argument("--jobs-concurrency", default="0", help="0: the default (half the slots)")
    ap.add_argument("--out", default=str(RESULTS / "jobs_priority.json"))
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp())
    env = procs.gateway_env(
        tmp / "data",
        default_data_dir() / "models",
        SERVELM_THREADS=args.threads,
        SERVELM_SLOTS=args.slots,
        SERVELM_JOBS_CONCURRENCY=args.jobs_concurrency,
    )
    (gw,) = procs.start(env, tmp / "logs")
    try:
        db = Database(Settings(data_dir=tmp / "data").db_url)
        batch_key = provision(db, "batch", 10_000)
        keys = [provision(db, f"live{n}", 1000) for n in range(args.clients)]
        client = openai.OpenAI(base_url=f"{gw.base_url}/v1", api_key=batch_key, max_retries=0)
        out: dict[str, Any] = {"args": vars(args), "load_average_at_start": os.getloadavg()}
        # Warm the model (loaded on first use) before anything is timed.
        sync_throughput(gw.base_url, batch_key, 4, args.line_tokens, 1)

        # 1. Batch throughput on an idle server vs the same lines sent synchronously.
        sync = {
            c: sync_throughput(gw.base_url, batch_key, args.lines, args.line_tokens, c)
            for c in map(int, args.sync.split(","))
        }
        print("sync lines/s by concurrency:", {c: round(v, 2) for c, v in sync.items()})
        bid, t0 = run_batch(client, args.lines, args.line_tokens)
        done = wait_batch(client, bid)
        batch_rate = args.lines / (time.monotonic() - t0)
        best = max(sync.values())
        print(f"batch {done.status} at {batch_rate:.2f} lines/s; best sync {best:.2f}")
        out["idle"] = {
            "sync_lines_per_s": sync,
            "batch_lines_per_s": batch_rate,
            "batch_counts": done.request_counts.model_dump() if done.request_counts else None,
            "ratio_to_best_sync": batch_rate / best,
        }

        # 2. Interactive alone.
        alone = interactive(gw.base_url, keys, args.requests, args.tokens)
        print(f"TTFT alone: p50 {p50(alone) * 1000:.0f} ms over {len(alone)}")

        # 3. Interactive while a batch runs (once it is completing lines).
        bid, _ = run_batch(client, args.lines, args.line_tokens)
        while (c := client.batches.retrieve(bid).request_counts) is None or c.completed < 10:
            time.sleep(0.2)
        before = c.completed
        loaded = interactive(gw.base_url, keys, args.requests, args.tokens)
        during = client.batches.retrieve(bid)
        assert during.request_counts is not None
        progressed = during.request_counts.completed - before
        print(
            f"TTFT with batch: p50 {p50(loaded) * 1000:.0f} ms over {len(loaded)}; "
            f"batch lines done meanwhile: {progressed}"
        )
        ratio = p50(loaded) / p50(alone)
        print(f"TTFT p50 ratio (with batch / alone): {ratio:.3f}")
        out["ttft"] = {
            "alone_ms": [round(x * 1000, 1) for x in alone],
            "with_batch_ms": [round(x * 1000, 1) for x in loaded],
            "alone_p50_ms": p50(alone) * 1000,
            "with_batch_p50_ms": p50(loaded) * 1000,
            "ratio_p50": ratio,
            "batch_lines_done_during": progressed,
        }
        final = wait_batch(client, bid)
        out["with_batch_final"] = (
            final.request_counts.model_dump() if final.request_counts else None
        )
        out["load_average_at_end"] = os.getloadavg()
        Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
        print("wrote", args.out)
    finally:
        gw.stop()


if __name__ == "__main__":
    main()
