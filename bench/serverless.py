"""Serverless local models (issue 27.4): a warm model's time to first token while other
models load and unload beside it, against the same model on a quiet server; and what
a cold request pays beyond the model's load time.

    flock /tmp/servelm-bench.lock .venv/bin/python bench/serverless.py

One ``servelm serve`` process (SQLite, billing on) with copies of the tiny Llama 3.1
GGUF (8.2 MB; about 67 MB estimated loaded with a 131,072-token window's KV cache
and the model's process):

- ``w``, the warm model, and ``x0``..``x3`` behind a budget for three: one client
  streams to ``w`` back to back; in the "busy" blocks a second client calls
  ``x0``..``x3`` in turn, each call a cold load that evicts the least recently used
  ``x`` (``w``, used every few ms, is never the one; the run checks that no ``w``
  answer paid a cold start). Quiet and busy blocks alternate, so drift hits both.
- ``c`` (``keep_alive`` 1 s): wait until it is unloaded, time a request (it loads
  ``c``, with room free), read the load's duration from ``/metrics``
  (``servelm_model_load_duration_seconds_sum``), then time the same request warm:
  the cold request's added latency over the load is ``cold - warm - load``.

Writes bench/results/serverless.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests.support
from gateway_overhead import BIN, RESULTS, free_port, machine, wait_http

from servelm.catalog.models_file import load_catalog
from servelm.catalog.weights.default_model import default_model_path
from servelm.config import default_data_dir
from servelm.engines.llamacpp import footprint
from tests.support import ggufgen

CONTEXT = 131072
CHURN = ("x0", "x1", "x2", "x3")


def start(tmp: Path) -> tuple[subprocess.Popen[bytes], str, str, int]:
    models_dir = default_data_dir() / "models"
    seeds = ggufgen.ensure_models(default_data_dir() / "testmodels", default_model_path(models_dir))
    source = seeds["llama-v3p1-8b-instruct"]
    entries = []
    for slug in ("w", *CHURN, "c"):
        path = shutil.copy(source, tmp / f"{slug}.gguf")
        keep = "1" if slug == "c" else '"10m"'
        entries.append(
            f'[models.{slug}]\npath = "{path}"\ncontext_window = {CONTEXT}\n'
            f"max_output_tokens = 1024\nkeep_alive = {keep}\n"
        )
    models_file = tmp / "servelm.toml"
    models_file.write_text(
        "\n".join(entries) + "\n[models.smollm2-135m-instruct]\nenabled = false\n"
    )
    each = footprint(load_catalog(models_dir, models_file).resolve("w"))
    assert each is not None
    port = free_port()
    env = {
        **os.environ,
        "SERVELM_DATA_DIR": str(tmp),
        "SERVELM_MODELS_DIR": str(models_dir),
        "SERVELM_MODELS_FILE": str(models_file),
        "SERVELM_STARTER_CREDITS": "1000000000",
        "SERVELM_LOG_LEVEL": "info",
        "SERVELM_THREADS": "1",
        "SERVELM_MODEL_MEMORY": str(each * 7 // 2),  # w and two x; never a third x
    }
    env.pop("SERVELM_DATABASE_URL", None)
    log = (tmp / "server.log").open("wb")
    proc = subprocess.Popen(
        [str(BIN / "servelm"), "serve", "--port", str(port)],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    wait_http(f"http://127.0.0.1:{port}/health")
    key = (tmp / "first-api-key").read_text().strip()  # the first start's key
    return proc, f"http://127.0.0.1:{port}", key, each


def ttft(client: httpx.Client, url: str, key: str, slug: str) -> tuple[float, bool]:
    """Seconds to the first content chunk of a stream; whether it paid a cold start."""
    body = {
        "model": slug,
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 8,
        "stream": True,
    }
    started = time.perf_counter()
    with client.stream(
        "POST", f"{url}/v1/chat/completions", json=body, headers={"x-api-key": key}
    ) as r:
        assert r.status_code == 200, r.read()
        first = None
        for line in r.iter_lines():
            if first is None and line.startswith("data: {") and '"content"' in line:
                first = time.perf_counter() - started
        assert first is not None
        return first, "x-servelm-cold-start-ms" in r.headers


def plain(
    client: httpx.Client, url: str, key: str, slug: str, text: str = "hi"
) -> tuple[float, int | None]:
    body = {"model": slug, "messages": [{"role": "user", "content": text}], "max_tokens": 8}
    started = time.perf_counter()
    r = client.post(f"{url}/v1/chat/completions", json=body, headers={"x-api-key": key})
    elapsed = time.perf_counter() - started
    assert r.status_code == 200, r.text
    cold = r.headers.get("x-servelm-cold-start-ms")
    return elapsed, int(cold) if cold is not None else None


def metric(client: httpx.Client, url: str, name: str, slug: str) -> float:
    for line in client.get(f"{url}/metrics").text.splitlines():
        if line.startswith(f'{name}{{model="{slug}"}}'):
            return float(line.split()[-1])
    return 0.0


def state(client: httpx.Client, url: str, key: str, slug: str) -> str:
    models = client.get(f"{url}/v1/models", headers={"x-api-key": key}).json()["data"]
    return str(next(m["state"] for m in models if m["id"] == slug))


def churn(url: str, key: str, stop: threading.Event, churned: list[bool], turn: list[int]) -> None:
    """Call the x models in turn until stopped: each call a load beside ``w``. The turn
    goes on from the last block's (``turn``): begun again at x0, a block's first calls
    found the two x models it had ended with still loaded, and with them just used,
    ``w`` was the least recently used model and the next load evicted it."""
    with httpx.Client(timeout=300) as other:
        while not stop.is_set():
            _, cold = plain(other, url, key, CHURN[turn[0] % len(CHURN)])
            churned.append(cold is not None)
            turn[0] += 1


def warm_vs_churn(url: str, key: str, blocks: int, per_block: int) -> dict[str, Any]:
    quiet: list[float] = []
    busy: list[float] = []
    w_cold = 0
    loads = 0
    turn = [0]
    with httpx.Client(timeout=300) as client:
        for _ in range(5):
            ttft(client, url, key, "w")  # loaded, its first requests out of the way
        for block in range(2 * blocks):
            churning = block % 2 == 1
            stop = threading.Event()
            churned: list[bool] = []

            churner = threading.Thread(target=churn, args=(url, key, stop, churned, turn))
            if churning:
                churner.start()
                time.sleep(0.3)  # the first load under way
            for _ in range(per_block):
                seconds, cold = ttft(client, url, key, "w")
                w_cold += cold
                (busy if churning else quiet).append(seconds)
            if churning:
                stop.set()
                churner.join()
                loads += sum(churned)
            else:
                time.sleep(0.2)
    q, b = statistics.median(quiet), statistics.median(busy)
    return {
        "quiet_ttft_ms_p50": round(q * 1000, 2),
        "busy_ttft_ms_p50": round(b * 1000, 2),
        "ratio_p50": round(b / q, 3),
        "quiet_ttft_ms_p90": round(statistics.quantiles(quiet, n=10)[-1] * 1000, 2),
        "busy_ttft_ms_p90": round(statistics.quantiles(busy, n=10)[-1] * 1000, 2),
        "samples_each": len(quiet),
        "loads_beside_it": loads,
        "warm_requests_that_paid_a_cold_start": w_cold,
    }


def cold_overhead(url: str, key: str, rounds: int) -> dict[str, Any]:
    rows = []
    with httpx.Client(timeout=300) as client:
        for n in range(rounds):
            deadline = time.monotonic() + 60
            while state(client, url, key, "c") != "unloaded":
                assert time.monotonic() < deadline, "c never unloaded"
                time.sleep(0.05)
            before = metric(client, url, "servelm_model_load_duration_seconds_sum", "c")
            # Different prompts of one length: the warm one finds no prefix cached.
            cold, header = plain(client, url, key, "c", f"hi {n}")
            load = metric(client, url, "servelm_model_load_duration_seconds_sum", "c") - before
            warm, again = plain(client, url, key, "c", f"ho {n}")
            assert header is not None and again is None
            rows.append(
                {
                    "cold_ms": round(cold * 1000, 2),
                    "warm_ms": round(warm * 1000, 2),
                    "load_ms": round(load * 1000, 2),
                    "header_ms": header,
                    "added_over_load_ms": round((cold - warm - load) * 1000, 2),
                    # The pool's own part: the request's wait for the load, less the load.
                    "wait_over_load_ms": round(header - load * 1000, 2),
                }
            )
    added = [r["added_over_load_ms"] for r in rows]
    return {
        "rounds": rows,
        "added_over_load_ms_p50": round(statistics.median(added), 2),
        "added_over_load_ms_max": max(added),
        "load_ms_p50": round(statistics.median(r["load_ms"] for r in rows), 2),
        "wait_over_load_ms_p50": round(statistics.median(r["wait_over_load_ms"] for r in rows), 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--blocks", type=int, default=4, help="quiet/busy block pairs")
    parser.add_argument("--per-block", type=int, default=40, help="w requests per block")
    parser.add_argument("--cold-rounds", type=int, default=10)
    parser.add_argument("--out", type=Path, default=RESULTS / "serverless.json")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="servelm-bench-serverless-"))
    proc, url, key, each = start(tmp)
    file_bytes = (tmp / "w.gguf").stat().st_size
    try:
        warm = warm_vs_churn(url, key, args.blocks, args.per_block)
        print("warm model beside loads:", json.dumps(warm), flush=True)
        cold = cold_overhead(url, key, args.cold_rounds)
        print(
            "cold request: added over load p50",
            cold["added_over_load_ms_p50"],
            "ms, max",
            cold["added_over_load_ms_max"],
            "ms; load p50",
            cold["load_ms_p50"],
            "ms",
            flush=True,
        )
    finally:
        proc.terminate()
        proc.wait(30)
    result = {
        "date": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
        "machine": machine(),
        "model": {"file_bytes": file_bytes, "footprint_estimate_bytes": each},
        "warm_beside_loads": warm,
        "cold_start": cold,
        "goals": {
            "warm_ttft_ratio_le_1.25": warm["ratio_p50"] <= 1.25,
            "cold_added_over_load_le_50ms_p50": cold["added_over_load_ms_p50"] <= 50,
        },
    }
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print("wrote", args.out)


if __name__ == "__main__":
    main()
