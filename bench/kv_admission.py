"""Long prompts that fit the window alone but not together (issue 25, acceptance 1).

    flock /tmp/servelm-bench.lock .venv/bin/python bench/kv_admission.py [--long-tokens 7532]
        [--long-prompt-tokens N (SERVELM_LONG_PROMPT_TOKENS; 0: no long-prompt lane)]
        [--pause 1.0]

One `servelm serve` with the default model (SmolLM2, an 8,192-token window, 4 slots).
First a short request ("Say hello.", 8 tokens) is timed on the quiet server; then four
requests of about ``--long-tokens`` prompt tokens with ``max_tokens`` 2 are sent at
once, and another user sends the same short request again and again while they run,
waiting ``--pause`` seconds after each answer (as before them; 0: back to back, which
keeps the model's first process busy all the time, and then the long prompts in their
lower-priority lane get little CPU until the short ones stop). Reports the long
requests' statuses (before KV admission: four 500s, "Context size has been
exceeded"), their prompt tokens, and the short request's median latency
beside them over its quiet median. tests/engines/test_kv_admission.py checks the
statuses and the money; this measures the time, which a test must not.
Writes bench/results/kv_admission.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests.support
from gateway_overhead import BIN, RESULTS, Proc, free_port, machine, wait_http

from servelm.billing import accounts
from servelm.billing.money import MICRO
from servelm.config import default_data_dir
from servelm.store.db import Database
from tests.support.prompts import word_prompt

MODEL = "smollm2-135m-instruct"
SLOTS = 4
# Words, not numbers: SmolLM2's tokenizer splits digits one token each.


def start(port: int, data: Path, long_prompt_tokens: int | None) -> tuple[Proc, str]:
    lane = (
        {}
        if long_prompt_tokens is None
        else {"SERVELM_LONG_PROMPT_TOKENS": str(long_prompt_tokens)}
    )
    env = {
        **lane,
        **os.environ,
        "SERVELM_DATA_DIR": str(data),
        "SERVELM_MODELS_DIR": str(default_data_dir() / "models"),
        "SERVELM_STARTER_CREDITS": "1000000",
        "SERVELM_LOG_LEVEL": "warning",
        "SERVELM_SLOTS": str(SLOTS),
    }
    proc = Proc([str(BIN / "servelm"), "serve", "--port", str(port)], env)
    wait_http(f"http://127.0.0.1:{port}/readyz", timeout=300)
    return proc, (data / "first-api-key").read_text().strip()


def other_account(data: Path) -> str:
    """A second account's key: the short requests are another user's, not held back by
    the long ones' account and its fair share of the slots."""
    db = Database(f"sqlite:///{data / 'servelm.db'}")
    try:
        account = accounts.create_account(db, "beside")
        accounts.grant(db, account.id, 1000 * MICRO)
        return accounts.create_key(db, account.id, "beside")[1]
    finally:
        db.dispose()


async def chat(client: httpx.AsyncClient, content: str, max_tokens: int) -> tuple[int, float, Any]:
    body = {"model": MODEL, "messages": [{"role": "user", "content": content}]}
    started = time.perf_counter()
    r = await client.post("/v1/chat/completions", json={**body, "max_tokens": max_tokens})
    took = time.perf_counter() - started
    return r.status_code, took, r.json()


async def measure(
    base: str, key: str, other: str, long_tokens: int, quiet_runs: int, pause: float
) -> dict[str, Any]:
    async with (
        httpx.AsyncClient(base_url=base, headers={"x-api-key": key}, timeout=1800) as client,
        httpx.AsyncClient(base_url=base, headers={"x-api-key": other}, timeout=1800) as user,
    ):
        # Words per token of this tokenizer, from one count (the prompt's template adds
        # a few tokens): scale the word count to the asked prompt size.
        status, _, probe = await chat(client, word_prompt(99, 1000), 1)
        assert status == 200, probe
        per_word = (probe["usage"]["prompt_tokens"] - 30) / 1000
        words = int((long_tokens - 30) / per_word)
        quiet = []
        for _ in range(quiet_runs):
            status, took, answer = await chat(user, "Say hello.", 8)
            assert status == 200, answer
            quiet.append(took)
            await asyncio.sleep(pause)
        longs = [asyncio.create_task(chat(client, word_prompt(i, words), 2)) for i in range(SLOTS)]
        beside: list[tuple[int, float]] = []
        await asyncio.sleep(0.5)
        while not all(t.done() for t in longs):
            status, took, _ = await chat(user, "Say hello.", 8)
            beside.append((status, took))
            await asyncio.sleep(pause)
        done = [t.result() for t in longs]
    long_statuses = [s for s, _, _ in done]
    prompts = [a.get("usage", {}).get("prompt_tokens") for s, _, a in done if s == 200]
    errors = [a for s, _, a in done if s != 200]
    beside_ok = [t for s, t in beside if s == 200]
    return {
        "long_statuses": long_statuses,
        "long_prompt_tokens": prompts,
        "long_seconds": [round(t, 2) for _, t, _ in done],
        "long_errors": errors[:2],
        "short_quiet_median_s": round(statistics.median(quiet), 3),
        "short_beside_statuses": sorted({s for s, _ in beside}),
        "short_beside_count": len(beside),
        "short_beside_median_s": round(statistics.median(beside_ok), 3) if beside_ok else None,
        "short_beside_max_s": round(max(beside_ok), 3) if beside_ok else None,
        "ratio_median_beside_over_quiet": (
            round(statistics.median(beside_ok) / statistics.median(quiet), 2) if beside_ok else None
        ),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--long-tokens", type=int, default=7532)
    ap.add_argument("--quiet-runs", type=int, default=7)
    ap.add_argument(
        "--pause",
        type=float,
        default=1.0,
        help="seconds the other user waits after each answer before the next request",
    )
    ap.add_argument(
        "--long-prompt-tokens",
        type=int,
        default=None,
        help="SERVELM_LONG_PROMPT_TOKENS for the server (0: no long-prompt lane)",
    )
    ap.add_argument("--out", default=str(RESULTS / "kv_admission.json"))
    args = ap.parse_args()
    port = free_port()
    data = Path(tempfile.mkdtemp(prefix="servelm-kv-"))
    proc, key = start(port, data, args.long_prompt_tokens)
    other = other_account(data)
    try:
        result = asyncio.run(
            measure(
                f"http://127.0.0.1:{port}",
                key,
                other,
                args.long_tokens,
                args.quiet_runs,
                args.pause,
            )
        )
    finally:
        proc.stop()
    report = {
        "machine": machine(),
        "slots": SLOTS,
        "window": 8192,
        "lane_from_prompt_tokens": args.long_prompt_tokens,
        "pause_s": args.pause,
        **result,
    }
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
