"""Engine efficiency: servelm's embedded llama.cpp engine against the same model on
xllamacpp's own HTTP server, same slots, context and threads.

    .venv/bin/python bench/engine_efficiency.py     # writes bench/results/engine_efficiency.json

Reports, per concurrency, output tokens/s of both, their ratio, and the TTFT
difference: what servelm's asyncio bridge, auth and credit hold cost on top of the
engine itself.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from servelm import bench
from servelm.bundled import default_model_path
from servelm.config import default_data_dir

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gateway_overhead import BIN, RESULTS, Proc, free_port, machine, wait_http


def start_servelm(slots: int) -> tuple[Proc, str, str]:
    data = Path(tempfile.mkdtemp(prefix="servelm-engine-bench-"))
    env = {
        **os.environ,
        "SERVELM_DATA_DIR": str(data),
        "SERVELM_MODELS_DIR": str(default_data_dir() / "models"),
        "SERVELM_STARTER_CREDITS": "1000000",
        "SERVELM_SLOTS": str(slots),
        "SERVELM_THREADS": "2",
        "SERVELM_LOG_LEVEL": "warning",
    }
    port = free_port()
    proc = Proc([str(BIN / "servelm"), "serve", "--port", str(port)], env)
    wait_http(f"http://127.0.0.1:{port}/health")
    key = re.search(r"slm_[a-z0-9]{12}_[A-Za-z0-9_-]{43}", proc.log.read_text())
    assert key
    return proc, f"http://127.0.0.1:{port}/v1", key.group(0)


def start_llama_server(slots: int) -> tuple[subprocess.Popen[str], str]:
    port = free_port()
    model = default_model_path(default_data_dir() / "models")
    argv = [str(BIN / "python"), "-m", "servelm.testing.llama_server", str(model)]
    argv += ["--port", str(port), "--slots", str(slots), "--threads", "2", "--ctx", "8192"]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().startswith("READY")
    return proc, f"http://127.0.0.1:{port}/v1"


def sweep(url: str, key: str | None, args: argparse.Namespace) -> list[dict[str, Any]]:
    out = []
    for c in args.concurrency:
        r = asyncio.run(
            bench.run(
                f"{url}/chat/completions",
                model="smollm2-135m-instruct",
                load=bench.Load(concurrency=c),
                requests=max(2 * c, 8),
                input_len=args.input_len,
                output_len=args.output_len,
                api_key=key,
                warmup=2,
            )
        )
        print(
            f"  c={c:<3} {r['output_throughput']:7.1f} out tok/s"
            f"  TTFT p50 {r['ttft_ms']['p50']:8.1f} ms"
            f"  TPOT p50 {r['tpot_ms']['p50']:6.1f} ms  failed {r['failed']}",
            flush=True,
        )
        out.append({"concurrency": c, **r})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--concurrency", default="1,8,32")
    parser.add_argument("--input-len", type=int, default=64)
    parser.add_argument("--output-len", type=int, default=32)
    parser.add_argument("--out", type=Path, default=RESULTS / "engine_efficiency.json")
    args = parser.parse_args()
    args.concurrency = [int(c) for c in args.concurrency.split(",")]
    slots = max(args.concurrency)
    results: dict[str, Any] = {"machine": machine(), "slots": slots}

    print("xllamacpp HTTP server", flush=True)
    raw, url = start_llama_server(slots)
    try:
        results["llama_server"] = sweep(url, None, args)
    finally:
        raw.kill()
        raw.wait()
    print("servelm (embedded engine, keys and credits on)", flush=True)
    proc, url, key = start_servelm(slots)
    try:
        results["servelm"] = sweep(url, key, args)
    finally:
        proc.stop()

    print("\n| concurrency | out tok/s servelm | out tok/s llama.cpp server | ratio "
          "| TTFT p50 servelm − server |")  # fmt: skip
    print("|---|---|---|---|---|")
    for s, r in zip(results["servelm"], results["llama_server"], strict=True):
        ratio = s["output_throughput"] / r["output_throughput"]
        ttft = s["ttft_ms"]["p50"] - r["ttft_ms"]["p50"]
        print(
            f"| {s['concurrency']} | {s['output_throughput']:.1f} | {r['output_throughput']:.1f} "
            f"| {ratio:.2f} | {ttft:+.1f} ms |"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
