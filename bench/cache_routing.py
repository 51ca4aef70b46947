"""Routing judged by cache hits: three ``servelm worker`` replicas behind one gateway.

    flock /tmp/servelm-bench.lock .venv/bin/python bench/cache_routing.py [--slots 2]

Three workers (SmolLM2-135M, 1 thread, ``--slots`` slots each, llama.cpp's
host-memory prompt cache off unless ``--prompt-cache-mib`` says otherwise) and one
gateway serving one model per routing policy over the same three workers. Per load
(as many conversations as the replicas have slots in all, then twice as many) and
per policy, back to back in one run: the multi-turn benchmark (``servelm bench
--conversations``), 4 turns, each conversation with its own ~1,000-word system
prompt, a fresh ``--seed`` per run so no run finds another's prompts cached, and
``--think-time`` seconds (mean, exponential) between an answer and the next turn:
without it the loop is closed and least-load routing finds a conversation's cache by
the accident that its replica has just freed a slot. The policies take turns in
``--rounds`` rounds, each round in the reverse order of the last, so a machine whose
load drifts during the run weighs on every policy alike. Reported per run: the
share of turn ≥ 2 prompt tokens the workers served from their prompt cache
(``usage.prompt_tokens_details.cached_tokens`` over ``prompt_tokens``, as the gateway
relays them), turn ≥ 2 TTFT, and calls per replica.

Writes bench/results/cache_routing.json; ``--report`` prints it as Markdown.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fleet_routing import POLICIES, commit, run_once, start_gateway, start_worker
from gateway_overhead import RESULTS, Proc, machine

REPLICAS = 3


def markdown(results: dict[str, Any]) -> str:
    lines = [
        "| conversations | routing | turn ≥ 2 prompt tokens from cache "
        "| turn ≥ 2 TTFT p50 / p99 ms | turn 1 TTFT p50 ms | e2e p50 ms | req/s | failed "
        "| calls per replica |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for load in results["loads"]:
        rows = [(f"{policy} ({i + 1})", r) for i, runs in enumerate(load["rounds"])
                for policy, r in runs.items()]  # fmt: skip
        for policy, r in sorted(rows):
            share = "+".join(f"{n:.0f}" for n in r["replica_share"].values())
            lines.append(
                f"| {load['conversations']} | {policy} | {r['cached_share_later_turns']:.1%} "
                f"({r['cached_tokens_later_turns']} / {r['prompt_tokens_later_turns']}) | "
                f"{r['ttft_later_turns_ms']['p50']:.0f} / {r['ttft_later_turns_ms']['p99']:.0f} "
                f"| {r['ttft_first_turn_ms']['p50']:.0f} | {r['e2e_ms']['p50']:.0f} | "
                f"{r['request_throughput']:.2f} | {r['failed']} | {share} |"
            )
    lines += ["", "| conversations | routing | turn ≥ 2 from cache, all rounds "
              "| turn ≥ 2 TTFT p50, median of rounds ms | turn 1 TTFT p50, median ms |",
              "|---|---|---|---|---|"]  # fmt: skip
    for load in results["loads"]:
        for policy in POLICIES:
            runs = [runs[policy] for runs in load["rounds"]]
            cached = sum(r["cached_tokens_later_turns"] for r in runs)
            prompt = sum(r["prompt_tokens_later_turns"] for r in runs) or 1
            later = statistics.median(r["ttft_later_turns_ms"]["p50"] for r in runs)
            first = statistics.median(r["ttft_first_turn_ms"]["p50"] for r in runs)
            lines.append(f"| {load['conversations']} | {policy} | {cached / prompt:.1%} "
                         f"| {later:.0f} | {first:.0f} |")  # fmt: skip
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--slots", type=int, default=2, help="slots per worker")
    ap.add_argument("--turns", type=int, default=4)
    ap.add_argument("--system-tokens", type=int, default=1000)
    ap.add_argument("--input-len", type=int, default=24)
    ap.add_argument("--output-len", type=int, default=16)
    ap.add_argument("--seed", type=int, default=2600)
    ap.add_argument("--think-time", type=float, default=3.0, help="mean seconds between turns")
    ap.add_argument("--rounds", type=int, default=2, help="runs per policy and load")
    ap.add_argument(
        "--prompt-cache-mib",
        type=int,
        default=0,
        help="llama.cpp's host-memory prompt cache per worker (SERVELM_PROMPT_CACHE_MIB); "
        "0: only what the slots hold, the regime where a replica's caches hold less than "
        "the working set; -1: llama.cpp's default (8 GiB)",
    )
    ap.add_argument("--out", type=Path, default=RESULTS / "cache_routing.json")
    ap.add_argument("--report", action="store_true", help="Print --out as Markdown; run nothing.")
    args = ap.parse_args()
    if args.report:
        print(markdown(json.loads(args.out.read_text())))
        return
    results: dict[str, Any] = {"machine": machine(), "commit": commit()}
    results["args"] = {k: str(v) for k, v in vars(args).items()}
    results["loads"] = []
    procs: list[Proc] = []
    try:
        cache = None if args.prompt_cache_mib < 0 else args.prompt_cache_mib
        workers = [start_worker(args.slots, cache) for _ in range(REPLICAS)]
        procs += [p for p, _ in workers]
        gw, url, key = start_gateway([w for _, w in workers], POLICIES)
        procs.append(gw)
        seed = args.seed
        for conversations in (REPLICAS * args.slots, 2 * REPLICAS * args.slots):
            args.conversations = conversations
            load: dict[str, Any] = {"conversations": conversations, "rounds": []}
            for rnd in range(args.rounds):
                order = POLICIES if rnd % 2 == 0 else tuple(reversed(POLICIES))
                runs: dict[str, Any] = {}
                for policy in order:
                    seed += 1  # fresh conversations: nothing of an earlier run is cached
                    r = run_once(url, key, policy, args, seed=seed, system_prompts=conversations)
                    runs[policy] = r
                    print(f"{conversations} conv. round {rnd + 1} {policy:12s}: turn>=2 cached "
                          f"{r['cached_share_later_turns']:.1%}, TTFT p50 "
                          f"{r['ttft_later_turns_ms']['p50']:.0f} ms, failed {r['failed']}, "
                          f"share {r['replica_share']}", flush=True)  # fmt: skip
                load["rounds"].append(runs)
            results["loads"].append(load)
            args.out.write_text(json.dumps(results, indent=2))
        results["load_1min_at_end"] = os.getloadavg()[0]
    finally:
        for p in procs:
            p.stop()
    args.out.write_text(json.dumps(results, indent=2))
    print(markdown(results))
    print(f"written {args.out}")


if __name__ == "__main__":
    main()
