"""Engine efficiency: servelm's embedded llama.cpp engine against the same model on
xllamacpp's own HTTP server, same slots, context and threads.

    .venv/bin/python bench/engine_efficiency.py     # writes bench/results/engine_efficiency.json

Reports, per concurrency, output tokens/s of both, their ratio, and TTFT (p50, its
ratio and difference): what servelm's asyncio bridge, auth and credit hold cost on
top of the engine itself. ``--prompt-count exact,auto`` runs one servelm per way of
counting the prompt for the hold (``SERVELM_PROMPT_COUNT``, issue 15 goal 4), each
point measured on the raw server and then on each servelm, back to back.
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

from servelm.catalog.weights.default_model import default_model_path
from servelm.cli.loadgen import bench
from servelm.config import default_data_dir

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gateway_overhead import BIN, RESULTS, Proc, first_key, free_port, machine, wait_http


def start_servelm(slots: int, prompt_count: str = "exact") -> tuple[Proc, str, str]:
    data = Path(tempfile.mkdtemp(prefix="servelm-engine-bench-"))
    env = {
        **os.environ,
        "SERVELM_DATA_DIR": str(data),
        "SERVELM_MODELS_DIR": str(default_data_dir() / "models"),
        "SERVELM_STARTER_CREDITS": "1000000",
        "SERVELM_SLOTS": str(slots),
        "SERVELM_THREADS": "2",
        "SERVELM_LOG_LEVEL": "warning",
        "SERVELM_PROMPT_COUNT": prompt_count,
    }
    port = free_port()
    proc = Proc([str(BIN / "servelm"), "serve", "--port", str(port)], env)
    wait_http(f"http://127.0.0.1:{port}/health")
    return proc, f"http://127.0.0.1:{port}/v1", first_key(data, proc)


def start_llama_server(slots: int) -> tuple[subprocess.Popen[str], str]:
    port = free_port()
    model = default_model_path(default_data_dir() / "models")
    argv = [str(BIN / "python"), "-m", "tests.support.llama_server", str(model)]
    argv += ["--port", str(port), "--slots", str(slots), "--threads", "2", "--ctx", "8192"]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().startswith("READY")
    return proc, f"http://127.0.0.1:{port}/v1"


def point(url: str, key: str | None, c: int, args: argparse.Namespace) -> dict[str, Any]:
    r = asyncio.run(
        bench.run(
            f"{url}/chat/completions",
            model="smollm2-135m-instruct",
            load=bench.Load(concurrency=c),
            requests=max(args.requests_per_slot * c, 16),
            input_len=args.input_len,
            output_len=args.output_len,
            api_key=key,
            warmup=2,
        )
    )
    return {"concurrency": c, **r}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--concurrency", default="1,8,32")
    parser.add_argument("--input-len", type=int, default=64)
    parser.add_argument("--output-len", type=int, default=32)
    parser.add_argument("--requests-per-slot", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--prompt-count", default="exact", help="servelm variants, of auto,exact,bound"
    )
    parser.add_argument("--out", type=Path, default=RESULTS / "engine_efficiency.json")
    args = parser.parse_args()
    args.concurrency = [int(c) for c in args.concurrency.split(",")]
    slots = max(args.concurrency)
    results: dict[str, Any] = {
        "machine": machine(),
        "slots": slots,
        "settings": {k: v for k, v in vars(args).items() if k != "out"},
        "runs": [],
    }
    variants = [v for v in args.prompt_count.split(",") if v]
    # All stay up; only one is loaded at a time. Each point runs on the raw server,
    # then on each servelm, back to back, repeated: the machine's drift hits all alike.
    raw, raw_url = start_llama_server(slots)
    gateways = {v: start_servelm(slots, v) for v in variants}
    try:
        # Unmeasured: the first batches of a fresh llama.cpp allocate its compute
        # buffers and page the weights in (the first run measured half the speed).
        for c in args.concurrency:
            point(raw_url, None, c, args)
            for _, url, key in gateways.values():
                point(url, key, c, args)
        for repeat in range(args.repeats):
            for c in args.concurrency:
                r = point(raw_url, None, c, args)
                run: dict[str, Any] = {"repeat": repeat, "llama_server": r}
                for v, (_, url, key) in gateways.items():
                    s = run[f"servelm-{v}"] = point(url, key, c, args)
                    print(
                        f"  repeat {repeat} c={c:<3} {v:<5} out tok/s servelm"
                        f" {s['output_throughput']:6.1f} server {r['output_throughput']:6.1f}"
                        f" ratio {s['output_throughput'] / r['output_throughput']:.3f}"
                        f"  TTFT p50 {s['ttft_ms']['p50']:7.1f} / {r['ttft_ms']['p50']:7.1f} ms"
                        f"  failed {s['failed']} / {r['failed']}",
                        flush=True,
                    )
                results["runs"].append(run)
    finally:
        for proc, _, _ in gateways.values():
            proc.stop()
        raw.kill()
        raw.wait()

    print("\n| servelm | concurrency | out tok/s servelm | server | ratio (median) "
          "| TTFT p50 servelm / server | ratio (median) |")  # fmt: skip
    print("|---|---|---|---|---|---|---|")
    summary = []
    for v in variants:
        for c in args.concurrency:
            runs = [r for r in results["runs"] if r["llama_server"]["concurrency"] == c]
            mine = [r[f"servelm-{v}"] for r in runs]
            theirs = [r["llama_server"] for r in runs]
            row = {
                "prompt_count": v,
                "concurrency": c,
                "servelm": statistics.median(m["output_throughput"] for m in mine),
                "llama_server": statistics.median(t["output_throughput"] for t in theirs),
                "ratio": statistics.median(
                    m["output_throughput"] / t["output_throughput"]
                    for m, t in zip(mine, theirs, strict=True)
                ),
                "ratios": [
                    m["output_throughput"] / t["output_throughput"]
                    for m, t in zip(mine, theirs, strict=True)
                ],
                "ttft_p50": statistics.median(m["ttft_ms"]["p50"] for m in mine),
                "ttft_p50_server": statistics.median(t["ttft_ms"]["p50"] for t in theirs),
                "ttft_ratio": statistics.median(
                    m["ttft_ms"]["p50"] / t["ttft_ms"]["p50"]
                    for m, t in zip(mine, theirs, strict=True)
                ),
                "ttft_ratios": [
                    m["ttft_ms"]["p50"] / t["ttft_ms"]["p50"]
                    for m, t in zip(mine, theirs, strict=True)
                ],
                "ttft_p50_diff_ms": statistics.median(
                    m["ttft_ms"]["p50"] - t["ttft_ms"]["p50"]
                    for m, t in zip(mine, theirs, strict=True)
                ),
            }
            summary.append(row)
            print(
                f"| {v} | {c} | {row['servelm']:.1f} | {row['llama_server']:.1f}"
                f" | {row['ratio']:.2f} | {row['ttft_p50']:.1f} / {row['ttft_p50_server']:.1f} ms"
                f" | {row['ttft_ratio']:.2f} |"
            )
    results["summary"] = summary
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
