"""Routing policies over two ``servelm worker``s (SmolLM2) behind one gateway.

    .venv/bin/python bench/fleet_routing.py [--conversations 8 --turns 4 --repeats 1]

Per scenario (SCENARIOS below), two fresh workers and one gateway serving one model
per routing policy (they differ only in ``routing``), all over the same two workers,
so the policies are measured against the same processes, one after the other. Each
run is the multi-turn benchmark (``servelm bench --conversations``): ~1,000-word
system prompts, follow-up turns carrying the whole history, a fresh seed per run so
no run finds another's prompts cached. Scenarios: each conversation with its own
system prompt (a per-user document or persona) or one shared by all; llama.cpp's
host-memory prompt cache off (the regime where a replica's caches hold less than the
working set, as on a busy GPU) or at its 8 GiB default; and skew, where the second
replica has a quarter of the slots.

Writes bench/results/fleet_routing.json and bench/results/fleet_routing.png.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gateway_overhead import BIN, RESULTS, Proc, first_key, free_port, machine, wait_http

from servelm.cli.loadgen import bench_turns
from servelm.config import default_data_dir

POLICIES = ("prefix", "round_robin", "least_load")


def start_worker(slots: int, prompt_cache_mib: int | None) -> tuple[Proc, str]:
    port = free_port()
    argv = [str(BIN / "servelm"), "worker", "--model", "smollm2", "--port", str(port),
            "--threads", "1", "--slots", str(slots)]  # fmt: skip
    env = dict(os.environ)
    if prompt_cache_mib is not None:
        env["SERVELM_PROMPT_CACHE_MIB"] = str(prompt_cache_mib)
    proc = Proc(argv, env)
    wait_http(f"http://127.0.0.1:{port}/health")
    return proc, f"http://127.0.0.1:{port}/v1"


def start_gateway(workers: list[str], policies: tuple[str, ...]) -> tuple[Proc, str, str]:
    data = Path(tempfile.mkdtemp(prefix="servelm-fleet-bench-"))
    models = data / "servelm.toml"
    replicas = ", ".join(f'"{w}"' for w in workers)
    models.write_text(
        "".join(
            f'[models.fleet-{p}]\nengine = "openai"\nreplicas = [{replicas}]\n'
            f'routing = "{p}"\nupstream_model = "smollm2-135m-instruct"\n'
            "health_interval = 1\ncontext_window = 8192\nmax_output_tokens = 1024\n\n"
            for p in policies
        )
        + "[models.smollm2-135m-instruct]\nenabled = false\n"
    )
    env = {
        **os.environ,
        "SERVELM_MODELS_DIR": str(default_data_dir() / "models"),
        "SERVELM_DATA_DIR": str(data),
        "SERVELM_MODELS_FILE": str(models),
        "SERVELM_STARTER_CREDITS": "1000000000",
        "SERVELM_LOG_LEVEL": "warning",
    }
    port = free_port()
    proc = Proc([str(BIN / "servelm"), "serve", "--port", str(port)], env)
    wait_http(f"http://127.0.0.1:{port}/health")
    return proc, f"http://127.0.0.1:{port}/v1", first_key(data, proc)


def run_once(url: str, key: str, policy: str, args: argparse.Namespace, *, seed: int,
             system_prompts: int) -> dict[str, Any]:  # fmt: skip
    return asyncio.run(
        bench_turns.run(
            f"{url}/chat/completions",
            model=f"fleet-{policy}",
            conversations=args.conversations,
            turns=args.turns,
            system_tokens=args.system_tokens,
            system_prompts=system_prompts,
            input_len=args.input_len,
            output_len=args.output_len,
            concurrency=args.conversations,
            api_key=key,
            seed=seed,
            think_time=getattr(args, "think_time", 0.0),
        )
    )


def summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    def med(f: Any) -> float:
        return statistics.median(f(r) for r in runs)

    return {
        "ttft_later_p50_ms": med(lambda r: r["ttft_later_turns_ms"]["p50"]),
        "ttft_later_p99_ms": med(lambda r: r["ttft_later_turns_ms"]["p99"]),
        "ttft_first_p50_ms": med(lambda r: r["ttft_first_turn_ms"]["p50"]),
        "e2e_p50_ms": med(lambda r: r["e2e_ms"]["p50"]),
        "e2e_p99_ms": med(lambda r: r["e2e_ms"]["p99"]),
        "request_throughput": med(lambda r: r["request_throughput"]),
        "failed": sum(r["failed"] for r in runs),
        "replica_share": [r["replica_share"] for r in runs],
    }


def scenario(url: str, key: str, policies: tuple[str, ...], args: argparse.Namespace,
             system_prompts: int, seed0: int) -> dict[str, Any]:  # fmt: skip
    runs: dict[str, list[dict[str, Any]]] = {p: [] for p in policies}
    for rep in range(args.repeats):
        for i, policy in enumerate(policies):
            # A fresh seed per run: no run finds another's prompts in a cache.
            seed = seed0 + rep * 10 + i
            r = run_once(url, key, policy, args, seed=seed, system_prompts=system_prompts)
            runs[policy].append(r)
            print(f"  {policy:12s} rep {rep}: turn>=2 TTFT p50 "
                  f"{r['ttft_later_turns_ms']['p50']:.0f} ms, e2e p99 {r['e2e_ms']['p99']:.0f} "
                  f"ms, {r['request_throughput']:.2f} req/s, failed {r['failed']}, "
                  f"share {r['replica_share']}", flush=True)  # fmt: skip
    return {p: {"summary": summary(rs), "runs": rs} for p, rs in runs.items()}


# (name, what it shows, worker slots, llama.cpp prompt cache MiB, system prompts
#  per conversation or shared, policies, conversations (None: --conversations))
SCENARIOS = [
    ("own_prompt_no_ram_cache", "own system prompt, prompt cache off", (4, 4), 0, "own",
     POLICIES, None),
    ("own_prompt_twice_the_slots", "8 conversations on 2 x 4 slots, own system prompt, "
     "prompt cache off", (4, 4), 0, "own", POLICIES, 8),
    ("shared_prompt_no_ram_cache", "one shared system prompt, prompt cache off", (4, 4), 0,
     "shared", ("prefix", "round_robin"), None),
    ("own_prompt_default_cache", "own system prompt, llama.cpp's 8 GiB prompt cache", (4, 4),
     None, "own", ("prefix", "round_robin"), None),
    ("skew", "skew: second replica 1 slot, prompt cache off", (4, 1), 0, "own",
     ("prefix", "least_load"), None),
]  # fmt: skip


def commit() -> str:
    """Which code a scenario's numbers measured (the routing rules change)."""
    out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                         text=True, check=False, cwd=Path(__file__).parent)  # fmt: skip
    return out.stdout.strip() or "unknown"


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = {"prefix": "#2a7", "round_robin": "#888", "least_load": "#48c"}
    shown = [sc for sc in SCENARIOS if sc[0] in results]
    fig, axes = plt.subplots(1, len(shown), figsize=(4.2 * len(shown), 4))
    for ax, (name, title, *_rest) in zip(axes, shown, strict=True):
        data = results[name]["policies"]
        metric = "e2e_p99_ms" if name == "skew" else "ttft_later_p50_ms"
        names = list(data)
        ax.bar(names, [data[n]["summary"][metric] for n in names],
               color=[colours[n] for n in names])  # fmt: skip
        ax.set_title(("e2e p99\n" if name == "skew" else "turn ≥ 2 TTFT p50\n") + title,
                     fontsize=9)  # fmt: skip
        ax.set_ylabel("ms")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def markdown(results: dict[str, Any]) -> str:
    """The results as the table docs/benchmarks.md carries."""
    lines = [
        "| scenario | routing | turn ≥ 2 TTFT p50 / p99 ms | turn 1 TTFT p50 ms | "
        "e2e p50 / p99 ms | req/s | failed | calls per replica | commit |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, *_ in SCENARIOS:
        if name not in results:
            continue
        for policy, data in results[name]["policies"].items():
            s = data["summary"]
            share = " / ".join(
                "+".join(f"{n:.0f}" for n in run.values()) for run in s["replica_share"]
            )
            lines.append(
                f"| {results[name]['title']} ({results[name].get('conversations', '?')} conv.) "
                f"| {policy} | {s['ttft_later_p50_ms']:.0f} / "
                f"{s['ttft_later_p99_ms']:.0f} | {s['ttft_first_p50_ms']:.0f} | "
                f"{s['e2e_p50_ms']:.0f} / {s['e2e_p99_ms']:.0f} | "
                f"{s['request_throughput']:.2f} | {s['failed']} | {share} | "
                f"{results[name].get('commit', 'before 718819f')} |"
            )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--conversations", type=int, default=8)
    ap.add_argument("--turns", type=int, default=4)
    ap.add_argument("--system-tokens", type=int, default=1000)
    ap.add_argument("--input-len", type=int, default=24)
    ap.add_argument("--output-len", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--out", type=Path, default=RESULTS / "fleet_routing.json")
    ap.add_argument("--report", action="store_true", help="Print --out as Markdown; run nothing.")
    ap.add_argument(
        "--scenarios",
        default=",".join(name for name, *_ in SCENARIOS),
        help="Which to run; results of others already in --out are kept.",
    )
    args = ap.parse_args()
    if args.report:
        done = json.loads(args.out.read_text())
        print(markdown(done))
        plot(done, args.out.with_suffix(".png"))
        return
    results: dict[str, Any] = json.loads(args.out.read_text()) if args.out.exists() else {}
    results["machine"] = machine()
    results.setdefault("args", {}).update({k: str(v) for k, v in vars(args).items()})
    chosen = args.scenarios.split(",")
    conversations = args.conversations
    for i, (name, title, slots, cache, prompts, policies, count) in enumerate(SCENARIOS):
        if name not in chosen:
            continue
        args.conversations = count or conversations
        print(title, flush=True)
        procs: list[Proc] = []
        try:
            workers = [start_worker(n, cache) for n in slots]
            procs += [p for p, _ in workers]
            gw, url, key = start_gateway([w for _, w in workers], policies)
            procs.append(gw)
            system_prompts = args.conversations if prompts == "own" else 1
            runs = scenario(url, key, policies, args, system_prompts, 100 * (i + 1))
            results[name] = {"title": title, "conversations": args.conversations,
                             "turns": args.turns, "policies": runs, "commit": commit(),
                             "load_1min_at_end": os.getloadavg()[0]}  # fmt: skip
        finally:
            for p in procs:
                p.stop()
        args.out.write_text(json.dumps(results, indent=2))
    plot(results, args.out.with_suffix(".png"))
    print(f"written {args.out}")


if __name__ == "__main__":
    main()
